"""`--task drift` and the schedule arms: the generator (determinism, every knob, the data
schedule, final-spec scoring), the scripted editor, the schedules at a matched editor budget
(random timing seeded by the training seed), the trainer reading the schedule in order, and
`nslora compare` / `nslora sweep --task drift` on the tiny model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from nslora_plugin.apps.harness.drift import (DriftRewards, DriftSettings, eligible, make_drift_task,
                                              scheduled_rows)
from nslora_plugin.apps.harness.schedules import (SCHEDULE_ARMS, ScheduleRoute, ScriptedEditor,
                                                  check_steps, planned_checks)
from nslora_plugin.apps.student.rules import EVAL_RULES, get_rule
from nslora_plugin.core.answers import answers_match, extract_final_answer

SMALL = dict(max_steps=12, cohorts=(3, 2), probe_size=6, facts_onset=4, spec_onset=8)


def task(seed: int = 0, **knobs):
    return make_drift_task(DriftSettings(**{**SMALL, **knobs}), seed=seed)


# ------------------------------------------------------------------ the generator
def test_generator_is_deterministic_under_its_seed():
    a, b = task(1), task(1)
    assert (a.train, a.probe, a.held_out, a.system_prompt) == (b.train, b.probe, b.held_out, b.system_prompt)
    c = task(2)
    assert {r["entity"] for r in c.train}.isdisjoint({r["entity"] for r in a.train})
    assert a.meta["seed"] == 1 and c.meta["seed"] == 2


def test_every_constraint_is_an_evaluation_rule_and_its_phrasing():
    t = task()
    names = {r.name for r in EVAL_RULES}
    assert set(t.final_spec) <= names and len(t.final_spec) == 3
    for name in t.spec_at(0):
        assert get_rule(name).instruction(0) in t.system_prompt
    assert get_rule("quick_take_prefix").instruction(0) not in t.system_prompt
    assert get_rule("quick_take_prefix").instruction(0) in t.final_prompt()
    with pytest.raises(ValueError, match="warm-up rule"):
        task(new_rule="lowercase")
    with pytest.raises(ValueError, match="cannot be met together"):
        task(new_rule="uppercase")  # the marker line "Answer:" has lower-case letters


def test_the_spec_changes_at_its_onset():
    t = task(spec_onset=8)
    assert t.spec_at(0) == t.spec_at(7) == ("answer_line", "sixty_chars")
    assert t.spec_at(8) == t.final_spec == ("answer_line", "sixty_chars", "quick_take_prefix")
    assert task(spec_onset=5).spec_at(5) == t.final_spec and task(spec_onset=5).spec_at(4) != t.final_spec
    assert task(new_rule=None).final_spec == ("answer_line", "sixty_chars")
    assert task(spec_onset=20).final_spec == ("answer_line", "sixty_chars")  # after the run: never
    onsets = {o.mechanism: (o.step, o.kind) for o in t.onsets()}
    assert onsets == {"forgetting": (0, "data"), "new_facts": (4, "data"),
                      "side_effects": (4, "data"), "changed_spec": (8, "spec")}


@pytest.mark.parametrize("dose", [0.0, 0.25, 1.0])
def test_the_forgetting_dose_is_the_share_of_replies_without_the_format(dose):
    t = task(forget_dose=dose)
    fmt = get_rule("answer_line")
    for p in range(len(t.phase_starts())):
        rows = [r for r in t.train if r["phase"] == p]
        without = [r for r in rows if not r["has_format"]]
        assert len(without) == round(dose * len(rows))
        assert all(not fmt.check(r["answer"]) for r in without)
        assert all(fmt.check(r["answer"]) for r in rows if r["has_format"])


def test_verbose_replies_start_at_their_onset_and_break_the_cap():
    cap = get_rule("sixty_chars")
    t = task(verbose_ratio=0.5, verbose_onset=6, facts_onset=4)
    assert t.phase_starts() == [0, 4, 6]
    for r in t.train:
        if r["from_step"] < 6:
            assert not r["verbose"] and cap.check(r["answer"])
    late = [r for r in t.train if r["from_step"] == 6]
    assert sum(r["verbose"] for r in late) == round(0.5 * len(late))
    assert all(not cap.check(r["answer"]) for r in late if r["verbose"])
    assert all(cap.check(r["answer"]) for r in late if not r["verbose"])
    assert not any(r["verbose"] for r in task(verbose_ratio=0.0).train)


def test_cohort_sizes_and_the_facts_onset():
    t = task(cohorts=(3, 2), facts_onset=4)
    early = {r["entity"] for r in t.train if r["from_step"] == 0}
    late = {r["entity"] for r in t.train if r["from_step"] == 4}
    assert len(early) == 3 and len(late) == 5 and early < late
    assert {r["cohort"] for r in t.train if r["entity"] in late - early} == {2}
    assert t.meta["phases"][1]["cohorts"] == [1, 2] and t.meta["phases"][0]["cohorts"] == [1]
    assert {r["cohort"] for r in t.probe + t.held_out} <= {1, 2}
    none = task(cohorts=(3, 0))
    assert none.phase_starts() == [0, 4] and {r["cohort"] for r in none.train} == {1}
    # nothing new ever reaches training rows before the onset
    assert all(r["cohort"] == 1 for r in t.train if eligible(r, 3))


def test_splits_hold_no_fact_or_answer_of_the_gate():
    t = task(pool_size=4)
    fact = lambda r: (r["entity"], r["attribute"])  # noqa: E731
    assert not {fact(r) for r in t.held_out} & {fact(r) for r in t.probe + t.pool}
    quoted = {r["final_answer"].casefold() for r in t.probe + t.pool}
    assert not {r["final_answer"].casefold() for r in t.held_out} & quoted
    assert {r["paraphrase"] for r in t.train} == {0, 1} and {r["paraphrase"] for r in t.held_out} == {3}
    for r in t.probe + t.pool + t.held_out:  # references under the final spec
        assert all(get_rule(n).check(r["answer"]) for n in t.final_spec), r["answer"]
    assert not any(get_rule("quick_take_prefix").check(r["answer"]) for r in t.train)


def test_the_context_share_states_a_fact_in_every_question_about_it():
    t = task(context_share=0.5)
    facts = {(r["entity"], r["attribute"]): r["fact_in_question"] for r in t.train}
    assert sum(facts.values()) == round(0.5 * len(facts)) == t.meta["facts_in_question"]
    for r in t.train + t.probe + t.held_out:  # the same facts in every split, only those
        stated = r["final_answer"] in r["question"] and r["question"].startswith("Note: ")
        assert stated == facts[(r["entity"], r["attribute"])] == r["fact_in_question"], r
    assert t.meta["held_out_facts_in_question"] == sum(r["fact_in_question"] for r in t.held_out)
    assert not any(r["fact_in_question"] for r in task().train + task().held_out)
    assert task(context_share=0.5).train == t.train  # seeded
    with pytest.raises(ValueError, match="context_share"):
        task(context_share=1.5)


def test_the_schedule_switches_rows_at_the_onsets():
    t = task()
    rows = scheduled_rows(t.train, max_steps=12, batch_size=3, seed=0)
    assert len(rows) == 36
    for i, r in enumerate(rows):
        assert eligible(r, i // 3), (i, r["id"])
    assert {r["phase"] for r in rows[:12]} == {0} and {r["phase"] for r in rows[12:]} == {1}
    assert scheduled_rows(t.train, max_steps=12, batch_size=3, seed=0) == rows
    assert scheduled_rows(t.train, max_steps=12, batch_size=3, seed=1) != rows
    # every eligible row is trained before any repeats (an epoch within the phase)
    first_phase = [r["id"] for r in rows[:12]]
    assert len(set(first_phase)) == 12


def test_probes_are_scored_under_the_spec_of_their_step_and_held_out_under_the_final():
    t = task(spec_onset=8)
    answer = t.held_out[0]["final_answer"]
    old = f"{answer}.\nAnswer: {answer}"          # the initial spec only
    new = f"Quick take: {answer}.\nAnswer: {answer}"
    run = SimpleNamespace(step=4)
    rewards = DriftRewards(t)
    rewards.nslora_editor_start(run)
    example = SimpleNamespace(answer=answer)
    assert rewards.nslora_score_probe(example, old) == {"correctness": 1.0, "format": 1.0, "length": 1.0}
    run.step = 8
    assert rewards.nslora_score_probe(example, old)["format"] == 0.0
    assert rewards.nslora_score_probe(example, new) == {"correctness": 1.0, "format": 1.0, "length": 1.0}
    held = t.scoring_plugins()[0]
    assert held.step == 12 and held.nslora_score_probe(example, old)["format"] == 0.0
    assert t.failure_kind(answer, new) is None
    assert t.failure_kind(answer, old) == "symbolic"
    assert t.failure_kind(answer, "Quick take: nothing.\nAnswer: Zzzz") == "numerical"
    wordy = f"Quick take: {answer} is it, and here is much more text than sixty."
    assert t.failure_kind(answer, wordy) == "symbolic"
    assert answers_match(extract_final_answer(new, t.answer_pattern), answer)


def test_compare_scores_held_out_rows_with_the_task_plugins():
    """The plugin manager compare's `_evaluate` builds: the built-in rewards plus the task's."""
    from nslora_plugin.core.config import NSLoRAConfig
    from nslora_plugin.core.probe import ProbeEvaluator
    from nslora_plugin.core.records import ProbeExample
    from nslora_plugin.core.registry import make_plugin_manager

    t = task()
    answer = t.held_out[0]["final_answer"]
    config = NSLoRAConfig.from_dict({**t.config_overrides(), "editor": "constraint"})
    example = ProbeExample(id="x", question="q", reference=t.held_out[0]["answer"], answer=answer)
    plain = ProbeEvaluator(None, [example], config, make_plugin_manager(config))
    drift = ProbeEvaluator(None, [example], config, make_plugin_manager(config, t.scoring_plugins()))
    old = f"{answer}.\nAnswer: {answer}"
    assert plain.score(example, old, 0.0).passed           # the regex of the format alone
    assert not drift.score(example, old, 0.0).passed       # the final spec wants the prefix too
    assert drift.score(example, t.held_out[0]["answer"], 0.0).passed


# ------------------------------------------------------------------ the scripted editor
def test_the_scripted_editor_states_the_constraints_active_at_its_step():
    t = task(spec_onset=8)
    editor = ScriptedEditor(t)
    config = SimpleNamespace(max_prompt_chars=2000)
    ok = SimpleNamespace(completion="Velgrad.\nAnswer: Velgrad")
    broken = SimpleNamespace(completion="The capital is Velgrad, a long reply without any final line at all.")
    run = SimpleNamespace(step=4)
    assert editor.nslora_propose_edit(t.system_prompt, [ok], config, (), run) is None
    again = editor.nslora_propose_edit(t.system_prompt, [broken], config, (), run)
    assert again.editor == "scripted" and set(again.meta["constraints"]) == {"answer_line", "sixty_chars"}
    assert get_rule("answer_line").phrasings[1] in again.prompt  # restated in a new phrasing
    run.step = 8
    new = editor.nslora_propose_edit(t.system_prompt, [ok], config, (), run)
    assert new.meta["constraints"] == {"quick_take_prefix": "stated"}
    assert new.prompt == t.system_prompt + "\n" + get_rule("quick_take_prefix").instruction(0)
    assert editor.nslora_propose_edit(t.system_prompt, [ok], config, ("scripted",), run) is None


# ------------------------------------------------------------------ schedules and the budget
def test_schedules_plan_at_most_the_budget():
    t = task()
    checks = check_steps(12, 2)
    assert checks == [0, 2, 4, 6, 8, 10, 12]
    for arm in SCHEDULE_ARMS:
        for budget in range(5):
            planned = planned_checks(arm, checks, budget, seed=3, task=t)
            assert set(planned) <= set(checks)
            if arm != "alternate":  # alternate plans every check; its route stops at the budget
                assert len(planned) <= budget, (arm, budget, planned)
            if budget == 0:
                assert planned == []
    assert planned_checks("fixed@0", checks, 3) == [0]
    assert planned_checks("fixed-even", checks, 3) == [0, 4, 8]
    assert planned_checks("alternate", checks, 2) == checks
    # the oracle: changed spec at 8 (the check at 8 scores it), side effects after 4, forgetting after 0
    assert planned_checks("oracle-onset", checks, 3, task=t) == [2, 6, 8]
    assert planned_checks("oracle-onset", checks, 1, task=t) == [8]


def test_random_timing_is_seeded_by_the_training_seed():
    checks = check_steps(20, 2)
    draws = {seed: planned_checks("random-timing", checks, 3, seed=seed) for seed in range(6)}
    assert draws[0] == planned_checks("random-timing", checks, 3, seed=0)
    assert draws[0] != draws[1]
    assert len({tuple(d) for d in draws.values()}) > 1
    assert all(len(d) == 3 and d == sorted(d) for d in draws.values())


def test_a_schedule_route_never_runs_more_than_the_budget():
    class Run:
        def __init__(self):
            self.decision_counts = {"symbolic": 0}
            self.editor = SimpleNamespace(available=True, reason="")

    report = SimpleNamespace(failures=[object()], summary=lambda: {})
    config = SimpleNamespace(max_symbolic_rounds=2)
    route, run = ScheduleRoute("alternate", check_steps(12, 2), 2), Run()
    actions = []
    for step in check_steps(12, 2):
        d = route.nslora_route(SimpleNamespace(step=step), report, [], config, run)
        actions.append(d.action)
        run.decision_counts["symbolic"] += d.action == "symbolic"
    assert actions[:2] == ["symbolic", "symbolic"] and set(actions[2:]) == {"numerical"}
    quiet = SimpleNamespace(failures=[], summary=lambda: {})
    d = ScheduleRoute("fixed@0", [0], 2).nslora_route(SimpleNamespace(step=0), quiet, [], config, Run())
    assert d.action == "numerical" and "nothing fails" in d.reason


# ------------------------------------------------------------------ the trainer reads the schedule
@pytest.fixture(scope="module")
def tiny_model_dir(default_model_dir, tmp_path_factory):
    from tiny import save_tiny_model

    return save_tiny_model(default_model_dir, tmp_path_factory.mktemp("tiny-model"))


@pytest.mark.parametrize("in_order", [True, False])
def test_the_trainer_trains_each_step_on_its_scheduled_rows(tiny_model_dir, tmp_path, in_order):
    from tiny import capture_training_batches, load_tokenizer

    from nslora_plugin.apps.harness.sft import build_sft_trainer, load_fp32_model, sft_config

    t = task(max_steps=4, facts_onset=2, spec_onset=2)
    tokenizer = load_tokenizer(tiny_model_dir)
    rows, ordered = t.training_rows(t.train, max_steps=4, batch_size=2, seed=0)
    assert ordered and len(rows) == 8
    args = sft_config(tmp_path, max_steps=4, batch_size=2, learning_rate=1e-3, disable_tqdm=True)
    trainer = build_sft_trainer(load_fp32_model(tiny_model_dir), tokenizer, rows, t.system_prompt,
                                args, lora_r=2, quiet=True, in_order=in_order)
    seen = capture_training_batches(trainer, tokenizer)
    trainer.train()
    assert len(seen) == 8
    matches = [step == i // 2 and rows[i]["question"] in text and rows[i]["answer"] in text
               for i, (step, text) in enumerate(seen)]
    if in_order:
        assert all(matches), [(s, x[-80:]) for s, x in seen]
    else:  # the control: the default sampler shuffles, so the schedule would not hold
        assert not all(matches)


def test_compare_gives_its_trainer_the_schedule_in_order(tiny_model_dir, tmp_path):
    from argparse import Namespace

    from torch.utils.data import SequentialSampler
    from tiny import load_tokenizer

    from nslora_plugin.apps.harness.compare import _trainer
    from nslora_plugin.apps.harness.sft import load_fp32_model

    t = task(max_steps=3, facts_onset=1, spec_onset=2)
    args = Namespace(max_steps=3, batch_size=2, learning_rate=1e-3, seed=5, max_length=128, lora_r=2)
    trainer = _trainer(args, t, SimpleNamespace(system_prompt=t.system_prompt),
                       load_tokenizer(tiny_model_dir), load_fp32_model(tiny_model_dir), tmp_path)
    assert len(trainer.train_dataset) == 6
    assert isinstance(trainer._get_train_sampler(trainer.train_dataset), SequentialSampler)
    rendered = [m[1]["content"] for m in
                (r["messages"] if "messages" in r else r["prompt"] for r in trainer.train_dataset)]
    expected = scheduled_rows(t.train, max_steps=3, batch_size=2, seed=5)
    assert rendered == [r["question"] for r in expected]


# ------------------------------------------------------------------ compare and sweep, tiny
BUDGET = 2
ARMS = ("lora_instruction_final", "neurosymbolic", *SCHEDULE_ARMS)


@pytest.fixture(scope="module")
def drift_compare(tiny_model_dir, tmp_path_factory):
    from nslora_plugin.apps.cli import main

    out = tmp_path_factory.mktemp("drift-compare")
    code = main(["compare", "--task", "drift", "--model", str(tiny_model_dir), "--output-dir", str(out),
                 "--arms", ",".join(ARMS), "--max-steps", "4", "--check-every", "2",
                 "--entities", "3", "--probe-size", "2", "--held-out-size", "3",
                 "--max-new-tokens", "4", "--batch-size", "2", "--no-baseline",
                 "--max-symbolic-rounds", str(BUDGET), "--intervention-steps", "1",
                 "--drift-facts-onset", "2", "--drift-spec-onset", "2", "--bootstrap", "50",
                 "--set", "nll_threshold=100", "--set", "gate_tie_break=accept"])
    assert code == 0
    return out, json.loads((out / "compare.json").read_text())


def test_compare_runs_every_drift_arm(drift_compare):
    out, result = drift_compare
    assert list(result["arms"]) == list(ARMS)
    assert result["task"]["name"] == "drift" and result["task"]["final_spec"] == [
        "answer_line", "sixty_chars", "quick_take_prefix"]
    assert {o["mechanism"]: o["step"] for o in result["task"]["onsets"]} == {
        "forgetting": 0, "new_facts": 2, "side_effects": 2, "changed_spec": 2}
    for name, arm in result["arms"].items():
        assert arm["held_out"]["n"] == 3 and arm["train_steps"] == 4
        assert set(arm["held_out_passed"]) == set(result["splits"]["held_out"]["ids"])
        steps = [p["step"] for p in arm["compliance"] if p["when"] in ("start", "check")]
        assert steps == [0, 2, 4], (name, arm["compliance"])
        for p in arm["compliance"]:
            assert set(p["compliance"]) == set(result["task"]["final_spec"])
            assert ("quick_take_prefix" in p["active"]) == (p["step"] >= 2)
        assert set(arm["held_out_compliance"]["compliance"]) == set(result["task"]["final_spec"])
    assert result["arms"]["oracle-onset"]["schedule"]["upper_bound"] is True
    assert "upper bound" in result["arms"]["oracle-onset"]["schedule"]["label"]
    assert not result["arms"]["fixed@0"]["schedule"]["upper_bound"]
    assert result["arms"]["lora_instruction_final"]["system_prompt"].endswith(
        get_rule("quick_take_prefix").instruction(0))
    assert result["arms"]["neurosymbolic"]["interventions"]["candidate_sources"] == [
        "scripted editor (its first candidate)"]
    assert (out / "compare-compliance.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_matches_the_editor_budget_and_the_schedules(drift_compare):
    out, result = drift_compare
    for name, arm in result["arms"].items():
        decisions = [] if name == "lora_instruction_final" else [
            json.loads(line) for line in (out / name / "nslora" / "decisions.jsonl").read_text().splitlines()]
        rounds = [d["step"] for d in decisions if d["kind"] == "route" and d["action"] == "symbolic"]
        assert len(rounds) <= BUDGET and arm["editor_rounds"] == len(rounds) and arm["rounds_at"] == rounds
        assert arm["editor_proposals"] == arm["edits_proposed"]
        assert all(d["editor"] == "scripted" for d in decisions if d["kind"] == "edit")
        planned = arm["schedule"]["planned_checks"]
        if planned is not None:
            assert set(rounds) <= set(planned), (name, rounds, planned)
    assert result["arms"]["lora_instruction_final"]["editor_rounds"] == 0
    assert result["arms"]["fixed@0"]["rounds_at"] in ([0], [])
    assert result["arms"]["oracle-onset"]["schedule"]["planned_checks"] == [2, 4]
    assert result["arms"]["fixed-even"]["schedule"]["planned_checks"] == [0, 2]


def test_sweep_over_the_forgetting_dose(tiny_model_dir, tmp_path):
    from nslora_plugin.apps.cli import main

    out = tmp_path / "sweep"
    code = main(["sweep", "--task", "drift", "--model", str(tiny_model_dir), "--output-dir", str(out),
                 "--mix", "0,1", "--arms", "alternate", "--max-steps", "4", "--check-every", "2",
                 "--entities", "3", "--probe-size", "2", "--held-out-size", "2",
                 "--max-new-tokens", "4", "--batch-size", "2", "--no-baseline",
                 "--max-symbolic-rounds", "1", "--drift-facts-onset", "2", "--drift-spec-onset", "2",
                 "--bootstrap", "50", "--set", "gate_tie_break=accept"])
    assert code == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["knob"] == "drift_forget_dose" and sweep["mixes"] == [0.0, 1.0]
    for point, dose in zip(sweep["points"], (0.0, 1.0)):
        task_meta = point["result"]["task"]
        assert task_meta["settings"]["forget_dose"] == dose
        assert all(ph["without_format"] == round(dose * ph["rows"]) for ph in task_meta["phases"])
        assert point["result"]["arms"]["alternate"]["editor_rounds"] <= 1
        assert (out / f"mix-{dose:g}" / "compare-compliance.png").is_file()
    assert "forget_dose 0" in (out / "sweep.md").read_text()
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def _decision_result(acc: dict[str, list[list[int]]], rounds: dict[str, int]) -> dict:
    """A compare result over 2 task instances x 1 seed: `acc[arm][instance]` is its item passes."""
    runs: dict = {}
    for arm, per_task in acc.items():
        for ts, items in enumerate(per_task):
            runs.setdefault(str(ts), {}).setdefault("0", {})[arm] = {
                "held_out_passed": {f"h{i}": v for i, v in enumerate(items)}}
    arms = {arm: {"held_out": {"accuracy": sum(map(sum, per)) / sum(map(len, per))},
                  "editor_rounds_per_run": [rounds.get(arm, 0)] * len(per),
                  "router": {"label_rule_agreement": None}}
            for arm, per in acc.items()}
    return {"task": {"name": "drift"}, "runs": runs, "arms": arms}


def test_the_decision_rule_compares_with_the_best_practical_schedule():
    from nslora_plugin.apps.harness.compare import verdict

    ones, zeros, half = [1] * 12, [0] * 12, [1, 0] * 6
    result = _decision_result(
        {"neurosymbolic": [ones, ones], "fixed@0": [half, half], "alternate": [zeros, zeros],
         "oracle-onset": [ones, ones], "lora": [zeros, zeros]},
        {"neurosymbolic": 2, "fixed@0": 1, "alternate": 2, "oracle-onset": 2})
    d = verdict(result, n_boot=300)["drift_decision"]
    assert d["best_schedule_arm"] == "fixed@0" and d["comparators"] == ["fixed@0", "alternate"]
    assert d["margin"]["points"] == 50.0 and d["margin"]["interval95_points"][0] > 0
    assert d["wins"] and not d["target_met"]  # more editor rounds than fixed@0
    assert d["beside"]["oracle-onset"]["points"] == 0.0 and "lora" in d["beside"]
    # a tie with the best schedule does not win, whatever the other arms do
    tie = _decision_result({"neurosymbolic": [half, ones], "fixed@0": [ones, half],
                            "alternate": [zeros, zeros]}, {"neurosymbolic": 1, "fixed@0": 1})
    d = verdict(tie, n_boot=300)["drift_decision"]
    assert d["margin"]["points"] == 0.0 and not d["wins"] and not d["target_met"]
    # no practical schedule arm: no decision
    assert "drift_decision" not in verdict(_decision_result(
        {"neurosymbolic": [ones, ones], "oracle-onset": [ones, ones]}, {}), n_boot=100)
