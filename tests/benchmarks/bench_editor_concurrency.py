"""Wall time of one TextGrad editor round, concurrent vs sequential, against a loopback server
with an artificial per-call latency (issue 3, "speed").

    python tests/benchmarks/bench_editor_concurrency.py                # latency 0.5 s, batches 3 and 8
    python tests/benchmarks/bench_editor_concurrency.py --latency 0.2 --batch 8 --concurrency 8

Each round is a real check of a `NeurosymbolicLoop` (tiny model, real tokenizer; probe → router →
TextGrad round → gate) whose editor LLM is `tests/fault_server.py` answering every chat call after
`--latency` seconds. The cache is off, so every round makes its 3B+1 calls. Printed per batch size:
the editor round's wall time with `editor_concurrency=1` and `=N`, calls, and the ratio.
Target at batch 8: ratio <= 0.4.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: fault_server, tiny

from fault_server import FaultServer, editor_config, round_loop  # noqa: E402
from tiny import load_tokenizer  # noqa: E402


def model_dir() -> Path:
    from nslora_plugin.apps.tools.models import ensure_default_model

    cache = Path(os.environ.get("NSLORA_CACHE") or HERE.parents[1] / ".cache" / "nslora-test")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return ensure_default_model(cache, prefer_hub=False)


def one_round(tokenizer, server, rows, batch: int, concurrency: int, folder: Path) -> tuple[float, int]:
    cfg = editor_config(server, editor_batch_size=batch, probe_size=batch,
                        editor_concurrency=concurrency, editor_cache=False)
    loop, model = round_loop(tokenizer, folder, cfg, rows)
    loop.check(1, model)
    last = loop.usage()["last_round"]
    return last["seconds"], last["calls"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latency", type=float, default=0.5, help="seconds per editor call")
    p.add_argument("--batch", type=int, nargs="+", default=[3, 8], help="editor_batch_size values")
    p.add_argument("--concurrency", type=int, default=4, help="editor_concurrency to compare with 1")
    args = p.parse_args()
    logging.getLogger("nslora").setLevel(logging.ERROR)

    from nslora_plugin.core.data import make_word_problems

    tokenizer = load_tokenizer(model_dir())
    rows = make_word_problems(max(args.batch), seed=1)
    print(f"editor round wall time, per-call latency {args.latency:.2f} s "
          f"(loopback OpenAI-compatible server)")
    print(f"{'batch':>5} {'calls':>5} {'sequential s':>13} {f'concurrency={args.concurrency} s':>17} {'ratio':>6}")
    with FaultServer() as server, tempfile.TemporaryDirectory(prefix="nslora-bench-") as tmp:
        for batch in args.batch:
            times = {}
            for conc in (1, args.concurrency):
                server.reset(latency=args.latency)
                times[conc], calls = one_round(tokenizer, server, rows, batch, conc,
                                               Path(tmp) / f"b{batch}-c{conc}")
                assert calls == 3 * batch + 1, calls
            ratio = times[args.concurrency] / times[1]
            print(f"{batch:>5} {calls:>5} {times[1]:>13.2f} {times[args.concurrency]:>17.2f} {ratio:>6.2f}")
    print(f"(at most 3B+1 calls per round; B sub-graphs of 3 sequential calls each run "
          f"{args.concurrency} at a time, then one update call)")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"total {time.time() - t0:.1f} s")
