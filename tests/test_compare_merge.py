"""`nslora compare --merge`: arms run apart become one comparison, and only when they describe the
same experiment. Checked on the committed evidence file, split by arms and merged back."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from nslora_plugin.apps.cli import main
from nslora_plugin.apps.harness.merge import MergeError, merge_results

EVIDENCE = Path(__file__).resolve().parents[1] / "recipes" / "results" / "evidence.json"


def _only(result: dict, arms: set[str]) -> dict:
    """The results file a run with `--arms` limited to `arms` would have written."""
    part = copy.deepcopy(result)
    part["runs"] = {ts: {s: {a: r for a, r in by_arm.items() if a in arms} for s, by_arm in by_seed.items()}
                    for ts, by_seed in part["runs"].items()}
    part["arms"] = {a: v for a, v in part["arms"].items() if a in arms}
    part.pop("verdict", None)
    return part


@pytest.fixture(scope="module")
def evidence() -> dict:
    return json.loads(EVIDENCE.read_text())


def test_split_and_merged_back_gives_the_same_comparison(evidence, tmp_path, capsys):
    arms = list(evidence["arms"])
    a, b = set(arms[: len(arms) // 2]), set(arms[len(arms) // 2:])
    files = []
    for name, part in (("a.json", _only(evidence, a)), ("b.json", _only(evidence, b))):
        files.append(tmp_path / name)
        files[-1].write_text(json.dumps(part))
    out = tmp_path / "merged.json"
    assert main(["compare", "--merge", *map(str, files), "--json", str(out),
                 "--output-dir", str(tmp_path)]) == 0
    merged = json.loads(out.read_text())
    assert set(merged["arms"]) == set(arms)
    assert merged["merged_from"] == {arm: "a.json" if arm in a else "b.json" for arm in arms}
    for arm in arms:
        got, want = merged["arms"][arm]["held_out"], evidence["arms"][arm]["held_out"]
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-4)
        assert got["accuracy_interval95"]["levels_text"] == want["accuracy_interval95"]["levels_text"]
        assert got["accuracy_interval95"]["low"] == pytest.approx(want["accuracy_interval95"]["low"], abs=0.02)
        assert merged["arms"][arm]["mix"]["pool_share"] == evidence["arms"][arm]["mix"]["pool_share"]
    # the verdict is recomputed across the files: the paired margins need both files' items
    v, w = merged["verdict"], evidence["verdict"]
    assert v["best_other_arm"] == w["best_other_arm"]
    assert v["margin_points"] == pytest.approx(w["margin_points"], abs=0.1)
    assert v["margin_interval95_points"] == pytest.approx(w["margin_interval95_points"], abs=2.0)
    # the runs' commands (here the same ones twice), then the merge's own
    ran = evidence["command"].splitlines()
    assert merged["command"].splitlines()[:-1] == ran + ran
    printed = capsys.readouterr().out
    assert "results:" in printed and "report:" in printed


def test_files_of_different_experiments_are_refused_with_what_differs(evidence):
    arms = list(evidence["arms"])
    a, b = _only(evidence, {arms[0]}), _only(evidence, {arms[1]})
    other = copy.deepcopy(b)
    other["settings"]["max_steps"] += 1
    with pytest.raises(MergeError, match=r"b\.json: settings\.max_steps differs from a\.json"):
        merge_results([a, other], ["a.json", "b.json"])
    other = copy.deepcopy(b)
    other["task_instances"]["0"]["splits"]["held_out"]["ids"] = ["another-row"]
    with pytest.raises(MergeError, match=r"task_instances\.0\.splits\.held_out\.ids differs"):
        merge_results([a, other], ["a.json", "b.json"])
    with pytest.raises(MergeError, match=rf"arm '{arms[0]}' is also in a\.json"):
        merge_results([a, _only(evidence, {arms[0]})], ["a.json", "c.json"])
    fewer = copy.deepcopy(b)
    fewer["runs"]["2"].pop("2")
    with pytest.raises(MergeError, match=rf"task seed 2 seed 2: {arms[1]}"):
        merge_results([a, fewer], ["a.json", "b.json"])
    # a setting newer than one file counts as its default there; set otherwise, it differs
    newer = copy.deepcopy(b)
    newer["settings"]["nslora_config"].pop("unstated_constraint_round", None)
    assert merge_results([a, newer], ["a.json", "b.json"])["arms"]
    newer["settings"]["nslora_config"]["unstated_constraint_round"] = False
    with pytest.raises(MergeError, match=r"unstated_constraint_round differs"):
        merge_results([a, newer], ["a.json", "b.json"])
    # where each run wrote its folders may differ
    moved = copy.deepcopy(b)
    moved["settings"]["nslora_config"]["output_dir"] = "elsewhere"
    assert set(merge_results([a, moved], ["a.json", "b.json"])["arms"]) == {arms[0], arms[1]}


def test_the_cli_names_the_problem(tmp_path, evidence):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(evidence))
    with pytest.raises(SystemExit, match=r"bad\.json: no 'runs'"):
        main(["compare", "--merge", str(good), str(bad), "--output-dir", str(tmp_path)])


def test_a_sweep_from_compare_results_one_per_context_share(evidence, tmp_path, capsys):
    half = tmp_path / "half.json"
    half.write_text(json.dumps(evidence))
    other = copy.deepcopy(evidence)  # stands for a run at another context share
    other["task"]["context_share"] = 1.0
    full = tmp_path / "full.json"
    full.write_text(json.dumps(_only(other, {"fixed", "neurosymbolic"})))
    out = tmp_path / "sweep.json"
    assert main(["sweep", "--from-results", str(full), str(half), "--arms", "fixed,neurosymbolic",
                 "--json", str(out), "--output-dir", str(tmp_path)]) == 0
    sweep = json.loads(out.read_text())
    assert sweep["mixes"] == [0.5, 1.0] and sweep["arms"] == ["fixed", "neurosymbolic"]
    point = sweep["points"][0]
    assert set(point["arms"]) == {"fixed", "neurosymbolic"} and point["result"]["source"] == "half.json"
    for arm in ("fixed", "neurosymbolic"):
        assert point["arms"][arm]["accuracy"] == pytest.approx(
            evidence["arms"][arm]["held_out"]["accuracy"], abs=1e-4)
    # the verdict is recomputed over the swept arms only
    assert point["verdict"]["best_other_arm"] == "fixed" and "lora" not in point["verdict"].get("margins", {})
    table = out.with_suffix(".md").read_text()
    assert "| facts/style 50/50 | facts/style 0/100 |" in table
    assert out.with_suffix(".png").stat().st_size > 1000
    assert len(sweep["command"].splitlines()) == 2 * len(evidence["command"].splitlines()) + 1

    with pytest.raises(SystemExit, match=r"full\.json: no arm lora"):
        main(["sweep", "--from-results", str(half), str(full), "--arms", "lora,fixed",
              "--json", str(out), "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"a second file for context share 0\.5"):
        main(["sweep", "--from-results", str(half), str(half), "--arms", "fixed",
              "--json", str(out), "--output-dir", str(tmp_path)])
    other["settings"]["max_steps"] = 60
    full.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match=r"settings\.max_steps differs from half\.json"):
        main(["sweep", "--from-results", str(half), str(full), "--arms", "fixed",
              "--json", str(out), "--output-dir", str(tmp_path)])
