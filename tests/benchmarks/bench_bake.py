"""What `nslora bake` keeps: held-out accuracy and format compliance of the run's adapter with its
optimized prompt, the same adapter without it, and the baked adapter without it. Not a test:
nothing is asserted.

    nslora demo --output-dir runs/demo                       # a finished run on the facts task
    python tests/benchmarks/bench_bake.py runs/demo --out bake.json

The facts task is rebuilt from the demo's own settings (`--entities`, `--probe-size`,
`--pool-size`, `--eval-size`, `--seed`: pass the ones the demo ran with). The teacher answers the
task's training questions (written to a JSONL next to the run and passed as `--data`), the baked
adapter learns those replies under the initial system prompt; the three arms are then scored on
the held-out rows — which neither the run nor the bake trained on — by the task's own rule (a
right fact and the `Final:` line), with 95 % bootstrap intervals over the items and the paired
interval of baked minus adapter-without-prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a finished `nslora demo` folder (facts task)")
    p.add_argument("--entities", type=int, default=10)
    p.add_argument("--probe-size", type=int, default=8)
    p.add_argument("--pool-size", type=int, default=8)
    p.add_argument("--eval-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="bake steps (default: two passes)")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--student-prompt", choices=("initial", "empty"), default="initial")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--force", action="store_true", help="bake again even when RUN_DIR/baked exists")
    p.add_argument("--out", default="bake.json")
    args = p.parse_args()

    from nslora_plugin.apps.harness.bootstrap import hierarchical_bootstrap, nest
    from nslora_plugin.apps.harness.tasks import fact_present, make_facts_task
    from nslora_plugin.apps.student.compliance import bootstrap_interval
    from nslora_plugin.apps.tools.bake import BakeSettings, bake, evaluate
    from nslora_plugin.core.answers import answers_match, extract_final_answer, format_compliant
    from nslora_plugin.core.data import load_probe_examples
    from nslora_plugin.trainer.precision import cpu_model_name

    run_dir = Path(args.run_dir)
    task = make_facts_task(args.entities, seed=args.seed, probe_size=args.probe_size,
                           held_out_size=args.eval_size, pool_size=args.pool_size)
    questions = run_dir / "bake-questions.jsonl"
    questions.write_text("".join(json.dumps({"question": r["question"]}) + "\n" for r in task.train))
    t0 = time.time()
    baked = run_dir / "baked"
    if args.force or not (baked / "bake.json").is_file():
        baked = bake(run_dir, data=questions, force=args.force, say=print, settings=BakeSettings(
            steps=args.steps, learning_rate=args.learning_rate, max_new_tokens=args.max_new_tokens,
            student_prompt=args.student_prompt, seed=args.seed))
    bake_seconds = time.time() - t0

    def check(example, reply: str) -> dict[str, float]:
        fmt = format_compliant(reply, task.answer_format)
        final = extract_final_answer(reply, task.answer_pattern)
        fact = fact_present(example.answer or "", reply, task.fact_match)
        right = bool(fmt and final is not None and answers_match(final, example.answer or ""))
        return {"accuracy": float(right), "fact": float(fact), "format": float(fmt)}

    t1 = time.time()
    result = evaluate(run_dir, task.held_out, check, baked=baked, max_new_tokens=args.max_new_tokens)
    eval_seconds = time.time() - t1
    per_item: dict[str, dict[str, list[float]]] = {}
    examples = load_probe_examples(task.held_out)
    for name, arm in result["arms"].items():
        scored = [check(e, r) for e, r in zip(examples, arm["replies"])]
        per_item[name] = {k: [s[k] for s in scored] for k in ("accuracy", "fact", "format")}
        arm["intervals"] = {k: [round(x, 3) for x in bootstrap_interval(v, seed=args.seed)]
                            for k, v in per_item[name].items()}
    ids = [f"h{i}" for i in range(result["n"])]
    margin = hierarchical_bootstrap(
        nest(dict(zip(ids, per_item["baked+student"]["accuracy"])), args.seed, args.seed),
        nest(dict(zip(ids, per_item["adapter+student"]["accuracy"])), args.seed, args.seed), 2000)
    result["baked_minus_adapter_without_prompt"] = {
        "difference": round(margin.point, 4), "interval95": [round(margin.low, 4), round(margin.high, 4)],
        "levels": margin.levels}
    result.update({"cpu": cpu_model_name(), "command": " ".join(sys.argv), "task": task.meta,
                   "bake_seconds": round(bake_seconds, 1), "eval_seconds": round(eval_seconds, 1),
                   "bake": json.loads((Path(baked) / "bake.json").read_text())})
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"CPU: {result['cpu']}; held-out n={result['n']}")
    print("| arm | system prompt | accuracy [95 % CI] | fact | format |")
    print("|---|---|---:|---:|---:|")
    for name, arm in result["arms"].items():
        s, iv = arm["scores"], arm["intervals"]
        print(f"| {name} | {'(none)' if arm['system_prompt'] is None else repr(arm['system_prompt'][:60])} "
              f"| {s['accuracy']:.3f} [{iv['accuracy'][0]:.3f}, {iv['accuracy'][1]:.3f}] "
              f"| {s['fact']:.3f} | {s['format']:.3f} [{iv['format'][0]:.3f}, {iv['format'][1]:.3f}] |")
    m = result["baked_minus_adapter_without_prompt"]
    print(f"baked − adapter without prompt (accuracy): {m['difference']:+.3f} "
          f"[{m['interval95'][0]:+.3f}, {m['interval95'][1]:+.3f}] ({m['levels']})")


if __name__ == "__main__":
    main()
