"""`nslora compare` and its tasks: the synthetic facts + format generator, the GSM8K loader, the
ground-truth rule, the router's label/rule agreement, and one real (tiny) three-arm run through
the CLI. The statistics (`bootstrap.py`) are tested in test_bootstrap.py; task seeds, one mix,
answers in prompts, interventions, the gate and the hidden rule in test_compare_fair.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from nslora_plugin.apps.harness.compare import label_rule_agreement
from nslora_plugin.core.answers import format_compliant
from nslora_plugin.apps.harness.tasks import (
    FINAL_FORMAT,
    failure_kind,
    load_jsonl_task,
    make_entities,
    make_facts_task,
)

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


# ------------------------------------------------------------------ the synthetic task
def test_facts_task_is_deterministic_under_its_seed():
    a, b = make_facts_task(6, seed=1), make_facts_task(6, seed=1)
    assert (a.train, a.probe, a.held_out) == (b.train, b.probe, b.held_out)
    c = make_facts_task(6, seed=2)
    assert {r["entity"] for r in c.train} != {r["entity"] for r in a.train}


def test_paraphrase_split_asks_the_same_facts_in_new_words():
    task = make_facts_task(8, seed=0, train_paraphrases=2, probe_size=10)
    fact = lambda r: (r["entity"], r["attribute"])
    assert {r["paraphrase"] for r in task.train} == {0, 1}
    assert {r["paraphrase"] for r in task.probe} == {2}
    assert {r["paraphrase"] for r in task.held_out} == {3}
    train_facts = {fact(r) for r in task.train}
    assert len(train_facts) == 8 * 4 and len(task.train) == 2 * 8 * 4
    # every fact left after the gate (probe), held out in new words — none of the gate's, no
    # answer a gate row states
    held_facts, probe_facts = {fact(r) for r in task.held_out}, {fact(r) for r in task.probe}
    assert held_facts <= train_facts and not held_facts & probe_facts
    probe_answers = {r["final_answer"].casefold() for r in task.probe}
    assert not {r["final_answer"].casefold() for r in task.held_out} & probe_answers
    left = {f for f in train_facts - probe_facts}
    assert held_facts == {f for f in left if next(r for r in task.train if fact(r) == f)
                          ["final_answer"].casefold() not in probe_answers}
    assert {fact(r) for r in task.probe} <= train_facts and len(task.probe) == 10
    train_questions = {r["question"] for r in task.train}
    assert not train_questions & {r["question"] for r in task.probe + task.held_out}
    assert not {r["question"] for r in task.probe} & {r["question"] for r in task.held_out}
    # the format line is only in the references, never in the training replies
    assert not any("Final:" in r["answer"] for r in task.train)
    for r in task.probe + task.held_out:
        assert format_compliant(r["answer"], FINAL_FORMAT)
        assert r["answer"].endswith(f"Final: {r['final_answer']}") and r["kind_rule"]
    same = {fact(r): r["final_answer"] for r in task.train}
    assert all(same[fact(r)] == r["final_answer"] for r in task.held_out)
    assert task.config_overrides()["answer_format"] == FINAL_FORMAT


def test_no_fact_leaks_between_entity_names():
    entities = make_entities(40, seed=3)
    names = [e[k] for e in entities for k in ("entity", "capital", "founder")]
    assert len(set(names)) == len(names)
    low = [n.casefold() for n in names]
    for i, a in enumerate(low):
        for j, b in enumerate(low):
            if i != j:
                assert a not in b, (a, b)
    task = make_facts_task(40, seed=3)
    answers = {r["final_answer"].casefold() for r in task.train if r["attribute"] in ("capital", "founder")}
    for r in task.train + task.held_out:
        words = r["question"].casefold()
        # a question names its entity and never any capital or founder (its own or another's)
        assert not any(re.search(r"(?<!\w)" + re.escape(a) + r"(?!\w)", words) for a in answers), r


def test_ground_truth_kind_of_a_failure():
    kind = lambda c, a="Velgrad": failure_kind(a, c)
    assert kind("The capital of Norland is Velgrad.\nFinal: Velgrad") is None          # passes
    assert kind("The capital of Norland is Velgrad.") == "symbolic"                       # only form
    assert kind("It is velgrad, I think") == "symbolic"                                   # any case
    assert kind("The capital of Norland is Ashport.") == "numerical"                     # fact wrong
    assert kind("The capital of Norland is Velgrad.\nFinal: Ashport") == "numerical"     # wrong line
    assert kind("Velgradia is a city.") == "numerical"                                   # whole words
    assert kind("Founded in 1487.", "1487") == "symbolic"
    assert kind("Founded in 1488.\nFinal: 1488", "1487") == "numerical"
    # numbers (GSM8K): the last number decides whether the fact is there
    num = {"answer_format": FINAL_FORMAT, "answer_pattern": FINAL_FORMAT, "fact_match": "number"}
    assert failure_kind("12", "So 18 - 6 = 12 are male.", **num) == "symbolic"
    assert failure_kind("12", "12 are male, out of 18.", **num) == "numerical"
    assert failure_kind("12", "18 - 6 = 12\nFinal: 12", **num) is None
    assert failure_kind(None, "anything") is None


@pytest.mark.skipif(not GSM8K.is_file(), reason="GSM8K not in ../shared/data")
def test_gsm8k_loader_splits_and_rewrites_the_answer_line():
    a = load_jsonl_task(GSM8K, n_train=20, probe_size=5, held_out_size=7, seed=4)
    b = load_jsonl_task(GSM8K, n_train=20, probe_size=5, held_out_size=7, seed=4)
    assert a.train == b.train and a.held_out == b.held_out
    assert (len(a.train), len(a.probe), len(a.held_out)) == (20, 5, 7)
    assert a.name == "gsm8k" and a.fact_match == "number"
    qs = [{r["question"] for r in s} for s in (a.train, a.probe, a.held_out)]
    assert not (qs[0] & qs[1] or qs[0] & qs[2] or qs[1] & qs[2])
    for r in a.train:
        assert "####" not in r["answer"] and "<<" not in r["answer"] and "Final:" not in r["answer"]
        assert r["answer"].endswith(f"The answer is {r['final_answer']}.")
    for r in a.probe + a.held_out:
        assert r["answer"].endswith(f"Final: {r['final_answer']}") and re.fullmatch(r"-?[\d.]+", r["final_answer"])
    assert load_jsonl_task(GSM8K, n_train=20, probe_size=5, held_out_size=7, seed=5).held_out != a.held_out


def test_label_rule_agreement_joins_labels_with_the_rule_by_step_and_example():
    decisions = [
        {"kind": "start", "step": 0},
        {"kind": "route", "step": 2, "action": "symbolic",
         "labels": [{"example_id": "a", "label": "symbolic"}, {"example_id": "b", "label": "symbolic"}]},
        {"kind": "route", "step": 4, "action": "numerical",
         "labels": [{"example_id": "a", "label": "numerical"}]},
    ]
    truth = [{"step": 2, "example_id": "a", "kind": "symbolic"},
             {"step": 2, "example_id": "b", "kind": "numerical"},
             {"step": 4, "example_id": "a", "kind": "numerical"}]
    agree = label_rule_agreement(decisions, truth)
    assert agree["failures"] == 3
    assert agree["label_rule_agreement"] == pytest.approx(2 / 3, abs=1e-3)
    assert agree["action_rule_agreement"] == pytest.approx(2 / 3, abs=1e-3)
    assert agree["confusion_rule_by_label"]["numerical"] == {"numerical": 1, "symbolic": 1}
    assert [c["step"] for c in agree["per_check"]] == [2, 4]
    assert not any("accuracy" in k for k in agree)  # agreement with a rule, never "accuracy"



def test_verdict_pools_the_labels_of_every_arm():
    from nslora_plugin.apps.harness.compare import verdict

    def arm(acc, confusion):
        return {"held_out": {"accuracy": acc},
                "router": {"label_rule_agreement": 1.0, "confusion_rule_by_label": confusion}}

    result = {"arms": {
        "numerical": arm(0.0, {"numerical": {"numerical": 4, "symbolic": 0}, "symbolic": {"numerical": 2, "symbolic": 2}}),
        "symbolic": arm(0.1, {"numerical": {"numerical": 3, "symbolic": 1}}),
        "neurosymbolic": arm(0.2, {"numerical": {"numerical": 2, "symbolic": 0}}),
    }}
    v = verdict(result)
    assert v["best_other_arm"] == "symbolic" and v["margin_points"] == pytest.approx(10.0)
    assert v["winner"] == "neurosymbolic" and not any("target" in k or k.endswith("_met") for k in v)
    tie = verdict({"arms": {"fixed": arm(0.5, {}), "neurosymbolic": arm(0.5, {})}})
    assert tie["winner"] is None and tie["tied"] == ["fixed", "neurosymbolic"]
    from nslora_plugin.apps.harness.tables import verdict_lines
    words = {k: tie[k] for k in ("winner", "tied", "winner_accuracy")}
    assert verdict_lines({"verdict": words})[0].startswith(
        "highest held-out accuracy: a tie between fixed, neurosymbolic (0.500)")
    assert v["router_failures_all_arms"] == 14 and v["router_symbolic_failures_all_arms"] == 4
    assert v["router_label_rule_agreement_all_arms"] == pytest.approx(11 / 14, abs=1e-4)


# ------------------------------------------------------------------ one real run, tiny model
@pytest.fixture(scope="module")
def tiny_model_dir(default_model_dir, tmp_path_factory):
    from tiny import save_tiny_model

    return save_tiny_model(default_model_dir, tmp_path_factory.mktemp("tiny-model"))


def test_compare_runs_three_arms_and_writes_table_and_json(tiny_model_dir, tmp_path, capsys):
    from nslora_plugin.apps.cli import main

    out = tmp_path / "cmp"
    code = main(["compare", "--model", str(tiny_model_dir), "--output-dir", str(out),
                 "--max-steps", "4", "--check-every", "2", "--entities", "3", "--probe-size", "4",
                 "--max-new-tokens", "6", "--batch-size", "4", "--no-baseline",
                 "--set", "nll_threshold=100", "--set", "gate_tie_break=accept"])
    assert code == 0
    printed = capsys.readouterr().out
    for arm in ("numerical", "symbolic", "neurosymbolic"):
        assert arm in printed
    assert "label/rule agr." in printed and "held-out acc" in printed and "95 % interval" in printed
    assert "router accuracy" not in printed and "router acc " not in printed

    result = json.loads((out / "compare.json").read_text())
    assert list(result["arms"]) == ["numerical", "symbolic", "neurosymbolic"]
    n_held = len(make_facts_task(3, probe_size=4).held_out)  # the facts outside the gate
    assert result["task"]["held_out"] == n_held and result["settings"]["max_steps"] == 4
    for name, arm in result["arms"].items():
        h = arm["held_out"]
        assert h["n"] == n_held
        for key in ("accuracy", "fact_accuracy", "format_compliance"):
            assert 0.0 <= h[key] <= 1.0
        assert h["n_probe_facts"] == 0 and h["n_other_facts"] == n_held  # no held-out fact is the gate's
        iv = h["accuracy_interval95"]
        assert iv["low"] <= h["accuracy"] <= iv["high"]
        assert iv["levels_text"] == f"1 task seed × 1 seed × {n_held} items"
        assert arm["wall_seconds"] > 0 and isinstance(arm["editor_calls"], int)
        assert arm["router"]["failures"] > 0  # every arm logs labelled failures at its checks
        assert (out / name / "ground_truth.jsonl").is_file() and (out / name / "held_out.jsonl").is_file()
    num, sym, ns = (result["arms"][a] for a in ("numerical", "symbolic", "neurosymbolic"))
    assert num["train_steps"] == 4 and ns["train_steps"] == 4 and sym["train_steps"] == 0
    assert num["edits_proposed"] == 0 and num["decisions"]["symbolic"] == 0
    assert sym["edits_accepted"] == 1 and ns["edits_accepted"] == 1  # the constraint editor, tie accepted
    assert "Final:" in sym["system_prompt"] and "Final:" in ns["system_prompt"]
    # a tiny random model knows no fact: every failure is factual by construction; even with
    # nll_threshold=100 (NLL says nothing) the answer_missing feature labels them factual, and
    # the symbolic round still ran because the format was broken and no prompt stated it yet
    assert ns["router"]["label_rule_agreement"] == 1.0
    assert ns["decisions"]["symbolic"] >= 1
    v = result["verdict"]
    assert (v["winner"] in result["arms"] or set(v["tied"]) <= set(result["arms"])) and "margin_points" in v


def test_fair_arms_seeds_and_splits(tiny_model_dir, tmp_path, capsys):
    """The fair baselines, a pool apart from the gate split, two seeds and a paired interval."""
    from nslora_plugin.apps.cli import main

    out = tmp_path / "fair"
    arms = "lora,lora_instruction,lora_instruction_all,fixed,neurosymbolic"
    code = main(["compare", "--model", str(tiny_model_dir), "--output-dir", str(out), "--arms", arms,
                 "--max-steps", "4", "--check-every", "2", "--entities", "3", "--probe-size", "4",
                 "--pool-size", "3", "--seeds", "0,1", "--bootstrap", "200",
                 "--max-new-tokens", "6", "--batch-size", "4", "--no-baseline",
                 "--set", "nll_threshold=100", "--set", "gate_tie_break=accept",
                 "--set", "style_share_threshold=0"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "95 % interval" in printed and "1 task seed × 2 seeds × " in printed
    assert "per run (task seed/seed)" in printed
    assert "target" not in printed

    result = json.loads((out / "compare.json").read_text())
    splits = result["splits"]
    n_held = len(make_facts_task(3, probe_size=4, pool_size=3).held_out)
    assert {k: v["n"] for k, v in splits.items()} == {"train": 24, "gate": 4, "pool": 3, "held_out": n_held}
    gate, pool = set(splits["gate"]["ids"]), set(splits["pool"]["ids"])
    assert not gate & pool and not (gate | pool) & set(splits["held_out"]["ids"])
    assert list(result["runs"]) == ["0"] and list(result["runs"]["0"]) == ["0", "1"]
    assert list(result["arms"]) == arms.split(",")
    for name, arm in result["arms"].items():
        assert len(arm["held_out"]["accuracy_per_seed"]) == 2 and arm["seeds"] == 2
    v = result["verdict"]
    lo, hi = v["margin_interval95_points"]
    assert lo <= v["margin_points"] <= hi and v["levels"]["seeds"] == [2, 2]
    assert v["margin_levels"] == f"1 task seed × 2 seeds × {n_held} items"
    assert v["margin_call"] in ("tie", "neurosymbolic ahead", f"{v['best_other_arm']} ahead")
    # each arm's mix is stated: plain LoRA sees the pool as 3 of 27 rows, fixed at augment_share
    mixes = {name: arm["mix"] for name, arm in result["arms"].items()}
    assert mixes["lora"]["pool_share"] == pytest.approx(3 / 27, abs=1e-4) and mixes["lora"]["from_step"] == 0
    assert mixes["fixed"]["pool_share"] == 0.25 and mixes["fixed"]["from_step_per_run"] == [0, 0]
    for seed in ("0", "1"):
        runs = result["runs"]["0"][seed]
        assert runs["lora"]["train_steps"] == 4 and runs["lora"]["edits_proposed"] == 0
        assert "Final:" in runs["lora_instruction"]["system_prompt"]
        assert runs["lora"]["system_prompt"] == result["settings"]["nslora_config"]["system_prompt"]
        # the neurosymbolic arm trains on pool rows only: no gate row ever becomes a training row
        augmented = out / f"seed-{seed}" / "neurosymbolic" / "nslora" / "augmented.jsonl"
        ids = {json.loads(line)["example_id"] for line in augmented.open()}
        assert ids and ids <= pool
        # the fixed schedule edits on the baseline probe, then only trains
        decisions = [json.loads(x) for x in
                     (out / f"seed-{seed}" / "fixed" / "nslora" / "decisions.jsonl").open()]
        routes = [d for d in decisions if d["kind"] == "route"]
        assert routes[0]["step"] == 0 and routes[0]["action"] == "symbolic"
        assert all(r["action"] == "numerical" for r in routes[1:])


def test_baseline_rows_write_the_instruction_where_the_reply_follows_it():
    from nslora_plugin.apps.harness.compare import baseline_rows, build_parser, build_config
    from nslora_plugin.apps.harness.tasks import make_facts_task

    task = make_facts_task(3, probe_size=4, pool_size=3)
    cfg = build_config(build_parser().parse_args([]), task, Path("unused"))
    rows, prompt = baseline_rows("lora_instruction", task, cfg)
    instructed = [r for r in rows if "system_prompt" in r]
    assert {r["id"] for r in instructed} == {r["id"] for r in task.pool}  # only their replies end in Final:
    assert prompt.endswith(task.format_instruction)
    rows_all, _ = baseline_rows("lora_instruction_all", task, cfg)
    assert all(r.get("system_prompt") == prompt for r in rows_all)
    rows_plain, plain_prompt = baseline_rows("lora", task, cfg)
    assert len(rows_plain) == len(task.train) + len(task.pool) and plain_prompt == task.system_prompt


def test_the_margin_interval_brackets_the_difference():
    from nslora_plugin.apps.harness.compare import margin_interval

    a = {"0": {"held_out_passed": {str(i): int(i < 6) for i in range(10)}},
         "1": {"held_out_passed": {str(i): int(i < 7) for i in range(10)}}}
    b = {"0": {"held_out_passed": {str(i): int(i < 3) for i in range(10)}},
         "1": {"held_out_passed": {str(i): int(i < 3) for i in range(10)}}}
    result = {"runs": {"0": {s: {"neurosymbolic": a[s], "lora": b[s]} for s in ("0", "1")}}}
    point, lo, hi = margin_interval(result, "neurosymbolic", "lora", n_boot=500)
    assert point == pytest.approx(0.35) and lo < point < hi and lo > 0
    same = margin_interval(result, "lora", "lora", n_boot=200)
    assert (same.point, same.low, same.high) == (0, 0, 0)


def test_the_when_sweep_writes_a_table_and_a_plot(tiny_model_dir, tmp_path):
    from nslora_plugin.apps.cli import main
    from nslora_plugin.apps.harness.tasks import make_facts_task

    given = make_facts_task(3, probe_size=4, context_share=1.0)
    assert all(r["fact_in_question"] and r["final_answer"] in r["question"] for r in given.held_out)
    assert not any(r["fact_in_question"] for r in make_facts_task(3, probe_size=4).held_out)

    out = tmp_path / "sweep"
    code = main(["sweep", "--model", str(tiny_model_dir), "--output-dir", str(out),
                 "--mix", "0,1", "--arms", "lora,neurosymbolic", "--seeds", "0,1", "--bootstrap", "100",
                 "--max-steps", "2", "--check-every", "2", "--entities", "3", "--probe-size", "4",
                 "--pool-size", "2", "--max-new-tokens", "6", "--batch-size", "4", "--no-baseline"])
    assert code == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert [p["style_share"] for p in sweep["points"]] == [0.0, 1.0]
    for point in sweep["points"]:
        assert set(point["arms"]) == {"lora", "neurosymbolic"}
        for arm in point["arms"].values():
            lo, hi = arm["interval95"]
            assert lo <= arm["accuracy"] <= hi and len(arm["per_seed"]) == 2
        assert point["result"]["task"]["context_share"] == point["style_share"]
    table = (out / "sweep.md").read_text()
    assert "facts/style 100/0" in table and "facts/style 0/100" in table
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_a_learned_router_can_start_from_flipped_weights(tiny_model_dir, tmp_path):
    from nslora_plugin.apps.cli import main
    from nslora_plugin.builtins.router import PRIOR_WEIGHTS

    out = tmp_path / "flipped"
    code = main(["compare", "--model", str(tiny_model_dir), "--output-dir", str(out),
                 "--arms", "neurosymbolic", "--router-start", "flipped", "--set", "router=learned",
                 "--max-steps", "4", "--check-every", "2", "--entities", "3", "--probe-size", "4",
                 "--max-new-tokens", "6", "--batch-size", "4", "--no-baseline"])
    assert code == 0
    decisions = [json.loads(x) for x in (out / "neurosymbolic" / "nslora" / "decisions.jsonl").open()]
    first = next(d for d in decisions if d["kind"] == "route")
    assert first["scores"]["w_format_violation"] == -PRIOR_WEIGHTS["format_violation"]
    result = json.loads((out / "compare.json").read_text())
    assert result["settings"]["router_start"] == "flipped"
    assert result["arms"]["neurosymbolic"]["router"]["per_check"]  # per-check label accuracy


def test_compare_counts_candidates_per_editor(tiny_model_dir, tmp_path):
    from nslora_plugin.apps.cli import main

    out = tmp_path / "demos"
    code = main(["compare", "--model", str(tiny_model_dir), "--output-dir", str(out),
                 "--arms", "neurosymbolic", "--editor", "demonstrations", "--pool-size", "3",
                 "--max-steps", "4", "--check-every", "2", "--entities", "3", "--probe-size", "4",
                 "--max-new-tokens", "6", "--batch-size", "4", "--no-baseline",
                 "--set", "style_share_threshold=0", "--set", "demo_candidates=2"])
    assert code == 0
    ns = json.loads((out / "compare.json").read_text())["arms"]["neurosymbolic"]
    demos = ns["editors"]["demonstrations"]
    assert demos["proposed"] >= 1 and demos["accepted"] <= demos["proposed"]
    assert sum(c["proposed"] for c in ns["editors"].values()) == ns["edits_proposed"]


def test_hidden_format_rule_and_the_question_edit_ablation(tiny_model_dir, tmp_path, capsys):
    """`--hide-format-rule`: no editor gets any text about the format, the regex included (the
    demonstrations editor shows worked examples; no candidate states the rule or the pattern),
    while the manual-fix arm still writes the task's instruction by hand;
    `neurosymbolic_questions` is neurosymbolic with question edits on."""
    from nslora_plugin.apps.cli import main
    from nslora_plugin.apps.harness.tasks import FINAL_FORMAT, FINAL_INSTRUCTION

    out = tmp_path / "cmp"
    code = main(["compare", "--model", str(tiny_model_dir), "--output-dir", str(out),
                 "--arms", "lora_instruction,neurosymbolic_questions", "--hide-format-rule",
                 "--editor", "demonstrations", "--intervention-steps", "0",
                 "--max-steps", "4", "--check-every", "2", "--entities", "3", "--probe-size", "4",
                 "--pool-size", "3", "--max-new-tokens", "6", "--batch-size", "4", "--no-baseline",
                 "--set", "nll_threshold=100", "--set", "gate_tie_break=accept",
                 "--set", "style_share_threshold=0"])
    assert code == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["settings"]["format_rule"] == "hidden"
    assert "unavailable" in result["settings"]["constraint_editor"]
    assert list(result["arms"]) == ["lora_instruction", "neurosymbolic_questions"]
    arm_cfg = json.loads((out / "neurosymbolic_questions" / "nslora" / "config.json").read_text())
    assert arm_cfg["format_instruction"] == "" and arm_cfg["editor_fallback"] == "none"
    assert arm_cfg["edit_questions"] is True
    history = [json.loads(x) for x in
               (out / "neurosymbolic_questions" / "nslora" / "prompt_history.jsonl").open()]
    candidates = [c["prompt"] for c in history[1:]]
    assert candidates and all(c["editor"].startswith("demonstrations") for c in history[1:])
    assert not any(FINAL_INSTRUCTION in p or FINAL_FORMAT in p or "matching the pattern" in p
                   for p in candidates)
    assert "Final:" in result["arms"]["lora_instruction"]["system_prompt"]


def test_the_constraint_editor_is_unavailable_when_the_rule_is_hidden(tiny_model_dir, tmp_path, capsys):
    from nslora_plugin.apps.cli import main
    from nslora_plugin.builtins.editors.constraint import ConstraintEditor, constraint_statements
    from nslora_plugin.core.config import NSLoRAConfig

    with pytest.raises(SystemExit) as stop:  # chosen as the editor: a clear message, no run
        main(["compare", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "x"),
              "--arms", "symbolic", "--hide-format-rule", "--no-baseline"])
    assert "constraint editor is unavailable" in str(stop.value) and not (tmp_path / "x" / "symbolic").exists()
    with pytest.raises(SystemExit, match="constraint editor is unavailable"):  # as the fallback
        main(["compare", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "y"),
              "--editor", "demonstrations", "--set", "editor_fallback=constraint",
              "--hide-format-rule", "--no-baseline"])
    # the rule in no editor's words: no statement (TextGrad reads its constraints from here)
    hidden = NSLoRAConfig(answer_format=FINAL_FORMAT, format_instruction="", editor="constraint")
    assert constraint_statements(hidden) == {}
    status = ConstraintEditor().nslora_editor_status(config=hidden)
    assert not status.ready and "hidden" in status.reason
    unset = NSLoRAConfig(answer_format=FINAL_FORMAT)  # not hidden, only not written: the regex
    assert "matching the pattern" in constraint_statements(unset)["format"]
    assert ConstraintEditor().nslora_editor_status(config=unset).ready


def test_manual_fix_keeps_the_instruction_when_it_is_hidden_from_the_editors():
    from nslora_plugin.apps.harness.compare import baseline_rows, build_config, build_parser
    from nslora_plugin.apps.harness.tasks import make_facts_task

    task = make_facts_task(3, probe_size=4, pool_size=3)
    args = build_parser().parse_args(["--hide-format-rule", "--editor", "demonstrations"])
    cfg = build_config(args, task, Path("unused"))
    assert cfg.format_instruction == "" and cfg.answer_format == task.answer_format
    _, prompt = baseline_rows("lora_instruction", task, cfg)
    assert prompt.endswith(task.format_instruction)


def test_textgrad_with_the_local_backend_needs_no_server(tiny_model_dir, tmp_path):
    """`--editor textgrad --editor-backend local`: the editor model runs in-process (the trained
    model's folder by default), no `transformers serve` is started, and every update call the
    editor made is counted under the textgrad editor."""
    from nslora_plugin.apps.cli import main

    out = tmp_path / "local"
    code = main(["compare", "--model", str(tiny_model_dir), "--output-dir", str(out),
                 "--arms", "symbolic", "--editor", "textgrad", "--editor-backend", "local",
                 "--hide-format-rule", "--max-steps", "4", "--check-every", "2", "--entities", "3",
                 "--probe-size", "4", "--max-new-tokens", "6", "--batch-size", "4",
                 "--no-baseline", "--max-symbolic-rounds", "1"])
    assert code == 0
    assert not (out / "editor-server.log").exists()
    result = json.loads((out / "compare.json").read_text())
    cfg = result["settings"]["nslora_config"]
    assert cfg["editor_backend"] == "local" and cfg["editor_model"]
    arm_cfg = json.loads((out / "symbolic" / "nslora" / "config.json").read_text())
    assert arm_cfg["editor_backend"] == "local" and arm_cfg["format_instruction"] == ""
    symbolic = result["arms"]["symbolic"]
    assert symbolic["editor_calls"] >= 1  # the in-process editor was called
    tg = symbolic["editors"].get("textgrad", {"proposed": 0, "unusable": 0})
    assert tg["proposed"] + tg["unusable"] >= 1
