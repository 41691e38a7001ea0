"""`nslora compare --merge A.json B.json`: one comparison from results files that ran other arms.

Adding an arm to a finished comparison should not mean rerunning every other arm. Files can be
merged only when they describe the same experiment: the same model and student, task instances
with the same splits (row ids), the same training and task seeds and the same settings (the run
folder aside). Their arms must not overlap. The merged file keeps every run, recomputes each arm's
summary, every interval (items stay paired across arms, as the ids are the same) and the verdict,
and lists the commands it came from. Nothing is trained.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any, Sequence

#: settings that may differ between merged files (where each run wrote its folders)
_FREE_SETTINGS = {("nslora_config", "output_dir")}


class MergeError(ValueError):
    """Two results files that do not describe the same experiment, named with what differs."""


def read_result(path: Path) -> dict[str, Any]:
    """A compare results file, or a `MergeError` naming the file."""
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MergeError(f"{path}: not a readable compare JSON ({exc})") from exc
    if not isinstance(result, dict) or not isinstance(result.get("runs"), dict):
        raise MergeError(f"{path}: no 'runs' (a file written by `nslora compare` has them)")
    return result


def comparable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings two files must share. An NSLoRA setting added after a file was written counts
    as its default there (what that version ran, if the setting changed nothing by default)."""
    import dataclasses

    from nslora_plugin.core.config import NSLoRAConfig

    out = copy.deepcopy(settings)
    config = out.get("nslora_config")
    if isinstance(config, dict):
        for field in dataclasses.fields(NSLoRAConfig):
            if field.name not in config and field.default is not dataclasses.MISSING:
                config[field.name] = field.default
    for outer, inner in _FREE_SETTINGS:
        if isinstance(out.get(outer), dict):
            out[outer].pop(inner, None)
    return out


def first_difference(a: Any, b: Any, where: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{where}.{key}" if where else str(key)
            found = first_difference(a[key], b[key], f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    return None if a == b else where


def _check_same_experiment(first: dict[str, Any], other: dict[str, Any], name: str, name0: str) -> None:
    for key in ("model", "student"):
        if first.get(key) != other.get(key):
            raise MergeError(f"{name}: {key} {other.get(key)!r} differs from {name0}'s "
                             f"{first.get(key)!r}; merge only runs of the same experiment")
    where = first_difference(first.get("task_instances"), other.get("task_instances"), "task_instances")
    if where:
        raise MergeError(f"{name}: {where} differs from {name0} (other task instances or splits); "
                         "rerun with the same --task, --task-seeds and split sizes")
    check_same_settings(first, other, name, name0)


def check_same_settings(first: dict[str, Any], other: dict[str, Any], name: str, name0: str) -> None:
    """Both results ran the same settings (the run folder aside), or a `MergeError` naming the
    first difference."""
    where = first_difference(comparable_settings(first.get("settings") or {}),
                             comparable_settings(other.get("settings") or {}), "settings")
    if where:
        raise MergeError(f"{name}: {where} differs from {name0}; rerun with the same settings "
                         "(the results' `command` lists them)")


def keep_arms(result: dict[str, Any], arms: Sequence[str], n_boot: int | None = None) -> dict[str, Any]:
    """A copy of `result` with only `arms`: their runs, summaries, intervals and the verdict over
    them recomputed."""
    from nslora_plugin.apps.harness.compare import _arms_of, attach_intervals, verdict

    kept = copy.deepcopy(result)
    kept["runs"] = {ts: {s: {a: r for a, r in by_arm.items() if a in arms}
                         for s, by_arm in by_seed.items()} for ts, by_seed in kept["runs"].items()}
    kept["arms"] = _arms_of(kept["runs"])
    boot = n_boot or int((kept.get("settings") or {}).get("bootstrap_resamples", 2000))
    attach_intervals(kept, n_boot=boot)
    kept["verdict"] = verdict(kept, n_boot=boot)
    return kept


def merge_results(results: Sequence[dict[str, Any]], names: Sequence[str],
                  n_boot: int | None = None) -> dict[str, Any]:
    """One compare result from several with disjoint arms (see the module docstring)."""
    from nslora_plugin.apps.harness.compare import _arms_of, attach_intervals, verdict

    if len(results) < 2:
        raise MergeError("--merge needs at least two results files")
    first, name0 = results[0], names[0]
    merged = copy.deepcopy(first)
    owner: dict[str, str] = {arm: name0 for arm in first.get("arms", {})}
    for result, name in zip(results[1:], names[1:]):
        _check_same_experiment(first, result, name, name0)
        for arm in result.get("arms", {}):
            if arm in owner:
                raise MergeError(f"{name}: arm {arm!r} is also in {owner[arm]}; merge files with "
                                 "different arms (drop the arm from one run's --arms)")
            owner[arm] = name
        for ts, by_seed in result["runs"].items():
            for seed, arms in by_seed.items():
                merged["runs"].setdefault(ts, {}).setdefault(seed, {}).update(copy.deepcopy(arms))
        if not merged.get("base") and result.get("base"):
            merged["base"] = copy.deepcopy(result["base"])
    missing = [f"task seed {ts} seed {s}: {arm}" for ts, by_seed in merged["runs"].items()
               for s, arms in by_seed.items() for arm in owner if arm not in arms]
    if missing:
        raise MergeError("a merged arm lacks runs the others have (" + "; ".join(missing[:4]) +
                         "); every file must cover the same task seeds and seeds")
    merged["arms"] = _arms_of(merged["runs"])
    boot = n_boot or int((merged.get("settings") or {}).get("bootstrap_resamples", 2000))
    attach_intervals(merged, n_boot=boot)
    merged["verdict"] = verdict(merged, n_boot=boot)
    # one command per line: the runs behind the file, then the merge itself
    merged["command"] = "\n".join(str(r.get("command")) for r in results if r.get("command"))
    merged["merged_from"] = {arm: owner[arm] for arm in merged["arms"]}
    merged["wall_seconds"] = round(sum(float(r.get("wall_seconds") or 0) for r in results), 1)
    machines = [r.get("machine") for r in results]
    if any(m != machines[0] for m in machines[1:]):
        merged["machine"] = machines
    merged.pop("mix_note", None)  # the arms' mix is re-aggregated from the runs here
    return merged


def merge_files(paths: Sequence[str | Path], n_boot: int | None = None) -> dict[str, Any]:
    paths = [Path(p) for p in paths]
    return merge_results([read_result(p) for p in paths], [p.name for p in paths], n_boot)


def run_merge(args: argparse.Namespace) -> dict[str, Any]:
    """`nslora compare --merge`: the merged results file, its table and its page."""
    from rich.console import Console

    from nslora_plugin.apps.harness.compare import _command, _write, announce, print_table

    console = Console()
    try:
        result = merge_files(args.merge)
    except MergeError as exc:
        raise SystemExit(f"nslora compare --merge: {exc}") from None
    result["command"] += "\n" + _command()
    path = _write(result, args, Path(args.output_dir))
    print_table(console, result)
    announce(console, result, path)
    return result
