"""Probe generation speed: NSLoRA's probe (stops each reply at its first complete answer line) vs a
plain batched greedy `generate` of `probe_max_new_tokens` on the same rows, same model, same
batches, interleaved in one process. Not a test: nothing is asserted.

    python tests/benchmarks/bench_probe.py                              # embedded 135M, base weights
    python tests/benchmarks/bench_probe.py --adapter nslora-demo/final  # a trained adapter (the demo's)

Tokens are counted as generated before padding (each row up to its end of turn, stop, or the cap).
The last line is `probe wall-time ratio stop/plain: X.XX`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

ANSWER_FORMAT = r"^Answer: (-?\d+)\s*$"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder to apply (e.g. the demo's final/)")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--system-prompt", default="You are a helpful assistant.\nEnd your reply with a final "
                                              "line of the form 'Answer: <number>'.")
    p.add_argument("--cache", default=os.environ.get("NSLORA_CACHE", str(REPO / ".cache" / "nslora-test")))
    args = p.parse_args()

    import torch
    from transformers import AutoTokenizer

    from nslora_plugin import NSLoRAConfig
    from nslora_plugin.core.data import make_word_problems
    from nslora_plugin.apps.tools.models import ensure_default_model
    from nslora_plugin.core.registry import make_plugin_manager
    from nslora_plugin.core.probe import ProbeEvaluator
    from nslora_plugin.apps.harness.sft import load_fp32_model
    from nslora_plugin.trainer.precision import cpu_model_name

    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    model_dir = ensure_default_model(args.cache, prefer_hub=False)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_fp32_model(model_dir)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    questions = [r["question"] for r in make_word_problems(args.rows, seed=7)]
    evaluators = {}
    for name, stop in (("plain", False), ("stop", True)):
        cfg = NSLoRAConfig(answer_format=ANSWER_FORMAT, probe_max_new_tokens=args.max_new_tokens,
                           probe_batch_size=args.batch_size, probe_stop_at_answer=stop)
        evaluators[name] = ProbeEvaluator(tokenizer, [], cfg, make_plugin_manager(cfg))

    def tokens(replies: list[str]) -> int:
        # +1 for the end-of-turn token of rows that ended before the cap
        return sum(min(len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1, args.max_new_tokens)
                   for r in replies)

    walls: dict[str, list[float]] = {"plain": [], "stop": []}
    counts: dict[str, int] = {}
    replies: dict[str, list[str]] = {}
    print(f"CPU: {cpu_model_name()}; {args.rows} rows, batch {args.batch_size}, cap "
          f"{args.max_new_tokens} new tokens, adapter {args.adapter or 'none (base weights)'}", flush=True)
    for rep in range(args.reps):
        for name, ev in evaluators.items():
            t = time.perf_counter()
            out = ev.generate(model, args.system_prompt, questions)
            walls[name].append(time.perf_counter() - t)
            replies[name], counts[name] = out, tokens(out)
            print(f"rep {rep + 1} {name:5s}: {walls[name][-1]:.2f} s, {counts[name]} tokens", flush=True)
    same_answers = sum(plain.startswith(stop) for plain, stop in zip(replies["plain"], replies["stop"]))
    med = {k: statistics.median(v) for k, v in walls.items()}
    for name in ("plain", "stop"):
        print(f"{name:5s}: median {med[name]:.2f} s, {counts[name]} tokens, "
              f"{counts[name] / med[name]:.1f} tokens/s")
    print(f"replies whose stopped text is a prefix of the plain one: {same_answers}/{len(questions)}")
    print(f"probe wall-time ratio stop/plain: {med['stop'] / med['plain']:.2f}")


if __name__ == "__main__":
    main()
