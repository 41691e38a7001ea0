"""`nslora sweep`: the "when" question — which arm wins as the mix of weaknesses moves.

One `nslora compare` per point of `--mix` (the synthetic task's `context_share`: the share of
facts stated in their own questions, so that only the format is left to learn for them), same
arms, task seeds, training seeds, budgets and splits at every point. Writes one JSON with every
point's full result, a Markdown table (held-out accuracy, mean ± sd over runs and the 95 %
hierarchical bootstrap interval over task instances, training seeds and held-out items, with the
n of each level) and a plot: held-out accuracy against the mix, one line per arm, with its
interval. The highest arm at each mix is named only where its interval against the runner-up
excludes 0; otherwise the point is a tie.

`--from-results A.json B.json` trains nothing: it builds the sweep from `nslora compare` results of
the synthetic task already run with the same settings, one per context share (to add a point
without rerunning the others); `--arms` picks the arms, which every file must have.

With `--task drift` the mix is the drift knob `--drift-sweep` names (the forgetting dose or the
verbosity ratio, both shares of training replies); every point also writes its compliance plot.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any, Sequence

from nslora_plugin.apps.harness.bootstrap import Interval
from nslora_plugin.apps.harness.compare import arm_interval as _arm_interval
from nslora_plugin.apps.harness.compare import build_parser as build_compare_parser
from nslora_plugin.apps.harness.compare import portable_paths
from nslora_plugin.apps.harness.tables import point_call


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = build_compare_parser(parser)
    p.add_argument("--mix", default="0,0.5,1",
                   help="comma-separated style shares (facts stated in the question), from 0 (every "
                        "fact must be learned) to 1 (only the format must be learned)")
    p.add_argument("--plot", default=None, help="where to write the plot (default: <json>.png)")
    p.add_argument("--from-results", nargs="+", default=None, metavar="JSON",
                   help="train nothing: build the sweep from `nslora compare` results files of the "
                        "synthetic task, one per point (its context share), run with the same "
                        "settings; --arms picks the arms every file must have")
    p.set_defaults(arms="lora,fixed,neurosymbolic")
    return p


def _mixes(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--mix {text!r}: expected comma-separated numbers between 0 and 1") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise SystemExit(f"--mix {text!r}: expected comma-separated numbers between 0 and 1")
    return values


def arm_interval(result: dict[str, Any], arm: str, n_boot: int) -> Interval:
    """Mean held-out accuracy of `arm` over task instances and seeds and its 95 % hierarchical
    bootstrap interval (`point, low, high = arm_interval(...)` unpacks it)."""
    return _arm_interval(result, arm, n_boot)


def sweep_point(result: dict[str, Any], mix: float, knob: str, n_boot: int) -> dict[str, Any]:
    """One point of the sweep: each arm's accuracy with its hierarchical interval, the verdict
    and the full compare result."""
    summary = {}
    for arm, a in result["arms"].items():
        iv = arm_interval(result, arm, n_boot)
        summary[arm] = {"accuracy": round(iv.point, 4), "accuracy_sd": a["held_out"].get("accuracy_sd", 0.0),
                        "interval95": [round(iv.low, 4), round(iv.high, 4)],
                        "levels": iv.levels,
                        "per_seed": a["held_out"].get("accuracy_per_seed", [a["held_out"]["accuracy"]]),
                        "per_run": a["held_out"].get("accuracy_per_run")}
    return {"style_share": mix, "knob": knob, "arms": summary, "verdict": result.get("verdict"),
            "result": result}


def points_from_results(paths: Sequence[str | Path], arms: Sequence[str],
                        n_boot: int) -> list[dict[str, Any]]:
    """`--from-results`: sweep points from compare results files of the synthetic task, one per
    context share, run with the same settings; each keeps only `arms` (which every file must
    have), with the verdict recomputed over them."""
    # the same notion of "the same experiment" as `compare --merge`
    from nslora_plugin.apps.harness.merge import MergeError, check_same_settings, keep_arms, read_result

    points: dict[float, dict[str, Any]] = {}
    first: tuple[str, dict[str, Any]] | None = None
    for path in map(Path, paths):
        try:
            result = read_result(path)
            if first is not None:
                check_same_settings(first[1], result, path.name, first[0])
        except MergeError as exc:
            raise SystemExit(f"--from-results {exc}") from None
        if first is not None and result.get("model") != first[1].get("model"):
            raise SystemExit(f"--from-results {path}: model differs from {first[0]}")
        task = result.get("task") or {}
        if task.get("name") != "synthetic" or "context_share" not in task:
            raise SystemExit(f"--from-results {path}: not a compare result of the synthetic task "
                             "(its context share is the sweep's knob)")
        missing = [a for a in arms if a not in result.get("arms", {})]
        if missing:
            raise SystemExit(f"--from-results {path}: no arm {', '.join(missing)} (it has "
                             f"{', '.join(result.get('arms', {}))}); pick arms every file has with --arms")
        first = first or (path.name, result)
        mix = float(task["context_share"])
        if mix in points:
            raise SystemExit(f"--from-results {path}: a second file for context share {mix:g}")
        kept = keep_arms(result, arms, n_boot)
        kept["source"] = path.name
        points[mix] = sweep_point(kept, mix, "context_share", n_boot)
    return [points[m] for m in sorted(points)]


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    from nslora_plugin.apps.harness.compare import run_compare

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    out_dir = Path(args.output_dir)
    json_path = Path(args.json) if args.json else out_dir / "sweep.json"
    if getattr(args, "from_results", None):
        knob = "context_share"
        points = points_from_results(args.from_results, arms, args.bootstrap)
        mixes = [p["style_share"] for p in points]
    else:
        knob = sweep_knob(args)
        mixes = _mixes(args.mix)
        points = []
        for mix in mixes:
            point_args = copy.copy(args)
            setattr(point_args, knob, mix)
            point_args.output_dir = str(out_dir / f"mix-{mix:g}")
            point_args.json = str(out_dir / f"mix-{mix:g}" / "compare.json")
            points.append(sweep_point(run_compare(point_args), mix, knob, args.bootstrap))
    sweep = {"command": points[0]["result"]["command"] if points else "", "mixes": mixes, "knob": knob,
             "arms": arms, "points": points}
    if getattr(args, "from_results", None):
        from nslora_plugin.apps.harness.compare import _command

        sweep["command"] = "\n".join([*(str(p["result"].get("command")) for p in points), _command()])
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(portable_paths(json.dumps(sweep, indent=2, ensure_ascii=False, default=str)) + "\n")
    json_path.with_suffix(".md").write_text(markdown(sweep))
    plot(sweep, Path(args.plot) if args.plot else json_path.with_suffix(".png"))
    try:
        from nslora_plugin.apps.report import sweep_report

        print(f"report: {sweep_report(sweep, json_path.with_suffix('.html'))}")
    except Exception as exc:  # the table, JSON and plot are written; a failed page loses nothing
        print(f"report: not written ({type(exc).__name__}: {exc})")
    print(markdown(sweep))
    return sweep


def sweep_knob(args: argparse.Namespace) -> str:
    """The argument each `--mix` value sets: the synthetic task's `context_share`, or the drift
    knob `--drift-sweep` names."""
    if args.task == "synthetic":
        return "context_share"
    if args.task == "drift":
        return "drift_" + getattr(args, "drift_sweep", "forget_dose")
    raise SystemExit("nslora sweep: the mix knob exists for --task synthetic and --task drift only")


def point_label(sweep: dict[str, Any], mix: float, short: bool = False) -> str:
    """A point's name in the table: facts/style shares, or the drift knob and its value."""
    knob = sweep.get("knob") or "context_share"
    if knob == "context_share":
        return f"{'' if short else 'facts/style '}{100 - 100 * mix:g}/{100 * mix:g}"
    return f"{knob.removeprefix('drift_')} {mix:g}"


def markdown(sweep: dict[str, Any]) -> str:
    from nslora_plugin.apps.harness.tables import markdown_table

    columns = ["arm", *(point_label(sweep, m) for m in sweep["mixes"])]
    rows = []
    for arm in sweep["arms"]:
        cells = [arm]
        for point in sweep["points"]:
            s = point["arms"][arm]
            cells.append(f"{s['accuracy']:.3f} ± {s['accuracy_sd']:.3f} "
                         f"[{s['interval95'][0]:.3f}, {s['interval95'][1]:.3f}]"
                         + (f" ({s['levels']})" if s.get("levels") else ""))
        rows.append(cells)
    calls = "; ".join(f"{point_label(sweep, p['style_share'], short=True)}: "
                      f"{point_call(p.get('verdict'))}" for p in sweep["points"])
    return (markdown_table(columns, rows)
            + "\nheld-out accuracy, mean ± sd over runs [95 % hierarchical bootstrap interval] "
              "(task seeds × training seeds × held-out items); highest arm per mix, against the "
              f"runner-up (a tie when the paired interval contains 0): {calls}\n")


def plot(sweep: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plots extra is optional
        print("nslora sweep: matplotlib is not installed (pip install 'nslora-plugin[plots]'); no plot")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [100 * p["style_share"] for p in sweep["points"]]
    for arm in sweep["arms"]:
        ys = [p["arms"][arm]["accuracy"] for p in sweep["points"]]
        lo = [y - p["arms"][arm]["interval95"][0] for y, p in zip(ys, sweep["points"])]
        hi = [p["arms"][arm]["interval95"][1] - y for y, p in zip(ys, sweep["points"])]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=arm)
    knob = sweep.get("knob") or "context_share"
    ax.set_xlabel("share of weaknesses a prompt can fix (facts stated in the question), %"
                  if knob == "context_share" else f"{knob.removeprefix('drift_')} (share of training replies), %")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.legend()
    ax.set_title("When does each update help?")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    run_sweep(build_parser().parse_args(argv))
    return 0
