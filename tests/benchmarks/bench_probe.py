"""Probe generation speed, variants side by side on the same rows and model, interleaved in one
process (warm-up rounds untimed, then `--reps` rounds; medians). Not a test: nothing is asserted.

`--compare stop` (the default): NSLoRA's probe (stops each reply at its first complete answer line)
vs a plain batched greedy `generate` of `--max-new-tokens` (64); last line
`probe wall-time ratio stop/plain: X.XX`.

`--compare cache`: the probe's generation on transformers' dynamic KV cache (the product's
default), the static cache, and the static cache with the decoding forward `torch.compile`d; the
first call of each is reported apart (compilation happens there). Last line
`generation wall-time ratio static/dynamic: X.XX, compiled/dynamic: Y.YY` (`--caches` picks them).

`--compare batch`: a whole probe (generation + reference NLL) at each `--batch-sizes` setting,
"auto" being the memory estimate's batch (`probe_batch_size: 0`). Last line
`probe wall-time ratio auto/8: X.XX`.

    python tests/benchmarks/bench_probe.py                              # embedded 135M, base weights
    python tests/benchmarks/bench_probe.py --adapter nslora-demo/final  # a trained adapter (the demo's)
    python tests/benchmarks/bench_probe.py --compare cache --threads 1 --reps 5 --json cache.json
    python tests/benchmarks/bench_probe.py --compare batch --batch-sizes 1,8,auto --reps 5

Tokens are counted as generated before padding (each row up to its end of turn, stop, or the cap).
Each variant is also put against the matmul limit: a forward costs 2 x parameters FLOPs a token,
and the device's peak is estimated by timing a large matmul (`--peak-size`) on the same threads;
"processed" counts every token the model ran on (prompts, padding and finished rows included).
CPU seconds (process time) are printed next to wall seconds: with `--threads 1` they move less
with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

ANSWER_FORMAT = r"^Answer: (-?\d+)\s*$"


def peak_flops(size: int, threads: int, reps: int = 5) -> float:
    """FLOP/s of the best of `reps` fp32 `size` x `size` matmuls: the device's practical peak."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = min(_timed(lambda: a @ b) for _ in range(reps))
    return 2 * size ** 3 / best


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", choices=("stop", "cache", "batch"), default="stop")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder to apply (e.g. the demo's final/)")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--max-new-tokens", default=None,
                   help="the cap; default 64 for --compare stop, auto (from the references) otherwise")
    p.add_argument("--batch-size", type=int, default=16, help="rows a batch (--compare stop, cache)")
    p.add_argument("--batch-sizes", default="8,auto", help="--compare batch: settings to compare")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed rounds first (default: 1 for --compare cache, else 0)")
    p.add_argument("--threads", type=int, default=max(os.cpu_count() or 1, 1))
    p.add_argument("--peak-size", type=int, default=2048, help="matmul size for the peak FLOP/s; 0: skip")
    p.add_argument("--caches", default="dynamic,static,compiled",
                   help="--compare cache: the variants, dynamic first (the ratios are to it)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.add_argument("--system-prompt", default="You are a helpful assistant.\nEnd your reply with a final "
                                              "line of the form 'Answer: <number>'.")
    p.add_argument("--cache", default=os.environ.get("NSLORA_CACHE", str(REPO / ".cache" / "nslora-test")))
    args = p.parse_args()

    import torch
    from transformers import AutoTokenizer

    from nslora_plugin import NSLoRAConfig
    from nslora_plugin.apps.harness.sft import load_fp32_model
    from nslora_plugin.apps.tools.models import ensure_default_model
    from nslora_plugin.core.data import load_probe_examples, make_word_problems
    from nslora_plugin.core.probe import STATIC, ProbeEvaluator
    from nslora_plugin.core.registry import make_plugin_manager
    from nslora_plugin.trainer.precision import cpu_model_name

    torch.set_num_threads(args.threads)
    model_dir = ensure_default_model(args.cache, prefer_hub=False)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_fp32_model(model_dir)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    params = sum(t.numel() for t in {id(t): t for t in model.parameters()}.values())
    examples = load_probe_examples(make_word_problems(args.rows, seed=7))
    questions = [e.question for e in examples]
    cap_setting = args.max_new_tokens or ("64" if args.compare == "stop" else "auto")
    warmup = args.warmup if args.warmup is not None else (1 if args.compare == "cache" else 0)

    def evaluator(**settings: Any) -> ProbeEvaluator:
        batch = settings.pop("probe_batch_size", args.batch_size)
        cfg = NSLoRAConfig(answer_format=ANSWER_FORMAT, probe_max_new_tokens=cap_setting,
                           probe_batch_size=max(batch, 1), **settings)
        cfg.probe_batch_size = batch  # 0: the memory estimate's batch ("auto")
        return ProbeEvaluator(tokenizer, examples, cfg, make_plugin_manager(cfg))

    # name -> the call a round times; each returns the replies
    variants: dict[str, Callable[[], list[str]]] = {}
    if args.compare == "stop":
        for name, stop in (("plain", False), ("stop", True)):
            ev = evaluator(probe_stop_at_answer=stop)
            variants[name] = lambda ev=ev: ev.generate(model, args.system_prompt, questions)
    elif args.compare == "cache":
        for name in args.caches.split(","):
            if name not in ("dynamic", "static", "compiled"):
                p.error(f"--caches: {name!r} is not dynamic, static or compiled")
            ev = evaluator()
            if name != "dynamic":
                ev.cache_implementation, ev.compile_forward = STATIC, name == "compiled"
            variants[name] = lambda ev=ev: ev.generate(model, args.system_prompt, questions)
    else:
        for setting in args.batch_sizes.split(","):
            ev = evaluator(probe_batch_size=0 if setting.strip() == "auto" else int(setting))
            variants[setting.strip()] = lambda ev=ev: ev.generate_and_score(model, args.system_prompt,
                                                                            ev.examples)[0]
    cap = evaluator().max_new_tokens

    processed = {"tokens": 0}
    real_generate = model.generate

    def counting_generate(*a: Any, **k: Any) -> Any:
        out = real_generate(*a, **k)
        processed["tokens"] += int(out.sequences.numel())  # prompts + new tokens, padding included
        return out
    model.generate = counting_generate

    def tokens(replies: list[str]) -> int:
        # +1 for the end-of-turn token of rows that ended before the cap
        return sum(min(len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1, cap) for r in replies)

    peak = peak_flops(args.peak_size, args.threads) if args.peak_size else None
    device = "CPU: " + cpu_model_name() if not torch.cuda.is_available() else "GPU: " + torch.cuda.get_device_name(0)
    print(f"{device}; {args.threads} threads; {args.rows} rows, cap {cap} new tokens ({cap_setting}), "
          f"{params / 1e6:.1f}M parameters, adapter {args.adapter or 'none (base weights)'}"
          + (f"; matmul peak {peak / 1e9:.1f} GFLOP/s ({args.peak_size}^3 fp32)" if peak else ""), flush=True)

    walls: dict[str, list[float]] = {k: [] for k in variants}
    cpus: dict[str, list[float]] = {k: [] for k in variants}
    first: dict[str, float] = {}
    counts: dict[str, int] = {}
    seen: dict[str, int] = {}
    replies: dict[str, list[str]] = {}
    for rnd in range(warmup + args.reps):
        for name, call in variants.items():
            processed["tokens"] = 0
            t, c = time.perf_counter(), time.process_time()
            out = call()
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            first.setdefault(name, wall)
            replies[name], counts[name], seen[name] = out, tokens(out), processed["tokens"]
            timed = rnd >= warmup
            if timed:
                walls[name].append(wall)
                cpus[name].append(cpu)
            print(f"{'rep ' + str(rnd - warmup + 1) if timed else 'warm-up'} {name:8s}: {wall:.2f} s "
                  f"({cpu:.2f} s CPU), {counts[name]} tokens", flush=True)

    base = next(iter(variants))
    med = {k: statistics.median(v) for k, v in walls.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpus.items()}
    summary: dict[str, Any] = {"device": device, "threads": args.threads, "rows": args.rows, "cap": cap,
                               "parameters": params, "peak_flops": peak, "compare": args.compare,
                               "variants": {}}
    for name in variants:
        rate = counts[name] / med[name]
        row = {"median_seconds": round(med[name], 3), "median_cpu_seconds": round(med_cpu[name], 3),
               "first_call_seconds": round(first[name], 3), "tokens": counts[name],
               "processed_tokens": seen[name], "tokens_per_second": round(rate, 2),
               "same_replies_as_" + base: sum(a == b for a, b in zip(replies[name], replies[base]))}
        line = (f"{name:8s}: median {med[name]:.2f} s ({med_cpu[name]:.2f} s CPU), {counts[name]} tokens, "
                f"{rate:.1f} tokens/s")
        if peak:
            limit = peak / (2 * params)
            row["matmul_limit_tokens_per_second"] = round(limit, 1)
            row["share_of_matmul_limit"] = round(rate / limit, 4)
            row["share_of_matmul_limit_processed"] = round(seen[name] / med[name] / limit, 4)
            line += (f" = {rate / limit:.1%} of the matmul limit {limit:.0f} tokens/s "
                     f"({seen[name] / med[name] / limit:.1%} counting the {seen[name]} processed)")
        if args.compare == "cache":
            line += f"; first call {first[name]:.1f} s"
        summary["variants"][name] = row
        print(line)
    if args.compare == "stop":
        prefixes = sum(a.startswith(b) for a, b in zip(replies["plain"], replies["stop"]))
        print(f"replies whose stopped text is a prefix of the plain one: {prefixes}/{len(questions)}")
    else:
        for name in variants:
            same = summary["variants"][name]["same_replies_as_" + base]
            print(f"{name:8s}: {same}/{len(questions)} replies identical to {base}'s")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if args.compare == "stop":
        print(f"probe wall-time ratio stop/plain: {med['stop'] / med['plain']:.2f}")
    elif args.compare == "cache":
        print("generation wall-time ratio " + ", ".join(f"{k}/{base}: {med[k] / med[base]:.2f}"
                                                         for k in variants if k != base))
    else:
        names = list(variants)
        print(f"probe wall-time ratio {names[-1]}/{names[0]}: {med[names[-1]] / med[names[0]]:.2f}")


if __name__ == "__main__":
    main()
