"""Probe wall time on 1 and on 2 processes: the same probe rows, model and settings, run one after
the other and repeated in alternation (1, 2, 1, 2, ...) in one invocation, so machine noise hits
both. Not a test: nothing is asserted.

    python tests/benchmarks/bench_probe_ranks.py                 # embedded 135M, 32 rows, 3 reps

Each process gets one thread (OMP_NUM_THREADS=1): a rank stands for one device, so "2 processes"
is two devices sharing the probe rows (the protocol of `nslora_plugin/core/ranks.py`: rank 0
broadcasts the request, each rank answers its share, the answers are gathered). The last line is
`probe wall-time ratio 2 procs / 1 proc: X.XX` (the issue's target: <= 0.6).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

SYSTEM = "You are a helpful assistant.\nEnd your reply with a final line of the form 'Answer: <number>'."


def worker(args: argparse.Namespace) -> None:
    """One rank: time `args.reps` probes of the same rows (rank 0 leads, the others serve)."""
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nslora_plugin.core.config import NSLoRAConfig
    from nslora_plugin.core.data import load_probe_examples, make_word_problems
    from nslora_plugin.core.registry import make_plugin_manager
    from nslora_plugin.core.probe import ProbeEvaluator
    from nslora_plugin.core.ranks import Ranks, run_together

    PartialState(cpu=True)  # joins the torchrun world over gloo (or stays one process)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    cfg = NSLoRAConfig(system_prompt=SYSTEM, probe_size=args.rows, probe_batch_size=args.batch_size,
                       probe_max_new_tokens=args.max_new_tokens, answer_format=r"^Answer: (-?\d+)\s*$")
    examples = load_probe_examples(make_word_problems(args.rows, seed=5), limit=args.rows)
    evaluator = ProbeEvaluator(tok, examples, cfg, make_plugin_manager(cfg, []))
    ranks = evaluator.ranks = Ranks.detect(model)
    times = []
    for rep in range(args.reps):
        ranks.broadcast(("sync", None))  # every rank starts the probe together
        start = time.perf_counter()
        run_together(evaluator, model,
                     lambda: evaluator.evaluate(model, SYSTEM, step=rep, version=0) if ranks.is_main else None,
                     lambda: None, lambda shared: None)
        times.append(time.perf_counter() - start)
    if ranks.is_main:
        print("BENCH " + json.dumps({"world": ranks.world_size, "times": times,
                                     "rows_answered": evaluator.rows_answered}), flush=True)


def run(procs: int, args: argparse.Namespace) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    script = [str(Path(__file__).resolve()), "--worker", "--model", args.model, "--rows", str(args.rows),
              "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
              "--reps", "1"]
    if procs == 1:
        cmd = [sys.executable, *script]
    else:
        from nslora_plugin.apps.tools.serve import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(free_port()), *script]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise SystemExit(f"{procs} process(es) failed:\n{out.stderr[-3000:]}")
    return json.loads(line[6:])["times"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.model is None:
        from nslora_plugin.apps.tools.models import ensure_default_model

        args.model = str(ensure_default_model(prefer_hub=False))
    from nslora_plugin.trainer.precision import cpu_model_name

    print(f"CPU: {cpu_model_name()}, {os.cpu_count()} cores; {args.rows} rows, batch {args.batch_size}, "
          f"{args.max_new_tokens} new tokens, 1 thread per process")
    one: list[float] = []
    two: list[float] = []
    for rep in range(args.reps):  # alternate, so drift in machine load hits both
        one += run(1, args)
        two += run(2, args)
        print(f"rep {rep + 1}: 1 proc {one[-1]:.2f} s, 2 procs {two[-1]:.2f} s", flush=True)
    m1, m2 = statistics.median(one), statistics.median(two)
    print(f"median probe: 1 proc {m1:.2f} s, 2 procs {m2:.2f} s")
    print(f"probe wall-time ratio 2 procs / 1 proc: {m2 / m1:.2f}")


if __name__ == "__main__":
    main()
