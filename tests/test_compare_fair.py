"""`nslora compare` as a statistician and an ML reviewer read it (issue 24): task instances apart
from training seeds, one data mix for every arm (the upsampled-pool baseline), no held-out answer
in any evaluated prompt, the gate's acceptances split into reward gains and tie-breaks with the
strict arm, and the router against interventions — on tiny real models through the real
`SFTTrainer`. The bootstrap itself is tested in test_bootstrap.py."""

from __future__ import annotations

import json

import pytest

from nslora_plugin.apps.harness.tasks import (
    AnswerInPrompt,
    answer_leaks,
    check_no_answer_in_prompt,
    make_facts_task,
)


@pytest.fixture(scope="module")
def tiny_model_dir(default_model_dir, tmp_path_factory):
    from tiny import save_tiny_model

    return save_tiny_model(default_model_dir, tmp_path_factory.mktemp("tiny-model"))


TINY = ["--max-steps", "4", "--check-every", "2", "--entities", "3", "--probe-size", "4",
        "--max-new-tokens", "6", "--batch-size", "4", "--no-baseline", "--bootstrap", "200"]


# ------------------------------------------------------------------ no answers in prompts
def test_held_out_facts_share_nothing_an_editor_may_quote():
    for seed in range(4):
        task = make_facts_task(12, seed=seed, probe_size=16, pool_size=8)
        fact = lambda r: (r["entity"], r["attribute"])  # noqa: E731
        quotable = task.probe + task.pool
        assert not {fact(r) for r in task.held_out} & {fact(r) for r in quotable}
        text = "\n".join(f"{r['question']}\n{r['answer']}" for r in quotable)
        # no held-out answer in any row a demonstration or a critique could quote
        assert not answer_leaks(task.held_out, text)
        assert len(task.held_out) == 48 - 16 - 8 - task.meta["held_out_excluded_shared_answer"]


def test_a_held_out_answer_in_the_prompt_is_named():
    task = make_facts_task(3, probe_size=4, pool_size=3)
    row = task.held_out[0]
    prompt = f"You are a helpful assistant.\nExamples of good replies:\n\nReply: {row['answer']}"
    with pytest.raises(AnswerInPrompt) as stop:
        check_no_answer_in_prompt(task.held_out, prompt, "arm neurosymbolic")
    message = str(stop.value)
    assert row["id"] in message and repr(row["final_answer"]) in message and "arm neurosymbolic" in message
    assert stop.value.leaks[0]["in"] == "system prompt"
    # a rewritten question that states the answer counts too; the sweep's stated facts do not
    rewritten = {row["id"]: f"{row['question']} (hint: {row['final_answer']})"}
    assert answer_leaks(task.held_out, "", questions=rewritten)[0]["in"] == "question"
    given = make_facts_task(3, probe_size=4, context_share=1.0)
    assert all(r["final_answer"] in r["question"] for r in given.held_out)
    assert not answer_leaks(given.held_out, "You are a helpful assistant.")
    # numbers are too common to look for alone: the problem itself must be quoted
    numeric = [{"id": "held-1", "question": "Tom has 3 apples and buys 9 more. How many?",
                "answer": "3 + 9 = 12\nFinal: 12", "final_answer": "12"}]
    assert not answer_leaks(numeric, "Reply with 12 words at most.", fact_match="number")
    quoted = "Question: Tom has 3 apples and buys 9 more. How many?"
    assert answer_leaks(numeric, quoted, fact_match="number")[0]["what"] == "question"


def test_a_run_stops_when_a_held_out_answer_is_in_the_prompt(tiny_model_dir, tmp_path):
    from nslora_plugin.apps.cli import main

    row = make_facts_task(3, probe_size=4).held_out[0]
    with pytest.raises(AnswerInPrompt) as stop:
        main(["compare", "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "leak"),
              "--arms", "symbolic", *TINY,
              "--set", f"system_prompt=You are a helpful assistant. ({row['final_answer']})"])
    assert stop.value.code != 0 and row["id"] in str(stop.value)


# ------------------------------------------------------------------ the gate, the interventions
def test_gate_counts_read_the_gate_verdict():
    from nslora_plugin.apps.harness.compare import gate_counts
    from nslora_plugin.core.config import NSLoRAConfig
    from nslora_plugin.core.loop import gate_verdict
    from nslora_plugin.core.records import ProbeReport, ProbeResult

    def report(reward, nll):
        return ProbeReport(step=2, prompt_version=0, results=[
            ProbeResult(example_id="a", completion="x", rewards={"format": reward}, reward=reward,
                        ref_nll=nll, signals={})])

    def edit(before, after, **cfg):
        ok, reason = gate_verdict(before, after, NSLoRAConfig(**cfg))
        return {"accepted": ok, "reason": reason, "reward_before": before.mean_reward,
                "reward_after": after.mean_reward}

    edits = [edit(report(0.5, 3.0), report(1.0, 3.0)),                        # a gain
             edit(report(0.5, 3.0), report(0.5, 2.0)),                        # tie, NLL falls
             edit(report(0.5, 3.0), report(0.5, 2.0), gate_tie_break="accept"),
             edit(report(0.5, 3.0), report(0.5, 2.0), gate_tie_break="reject"),
             edit(report(0.5, 3.0), report(0.4, 2.0), acceptance_margin=-0.2),  # a loss let in
             edit(report(0.5, 3.0), report(0.4, 2.0))]
    assert gate_counts(edits) == {"accepted_on_gain": 1, "accepted_on_tie_break": 2,
                                  "accepted_without_gain": 1, "rejected": 2}


def test_the_truth_of_a_failure_is_the_branch_that_fixes_it():
    from nslora_plugin.apps.harness.interventions import summarize, true_kind

    assert true_kind(True, False, True) == "symbolic"
    assert true_kind(False, True, True) == "numerical"
    assert true_kind(True, True, True) == "either"
    assert true_kind(False, False, True) == "both"
    assert true_kind(False, False, False) == "neither"
    rows = [{"label": "symbolic", "truth": "symbolic"}, {"label": "numerical", "truth": "symbolic"},
            {"label": "numerical", "truth": "either"}, {"label": "symbolic", "truth": "neither"}]
    checks = [{"step": 2, "action": "symbolic", "prompt_tried": True, "candidate_source": "x",
               "failures": rows},
              {"step": 4, "action": "numerical", "prompt_tried": False, "candidate_source": "none",
               "failures": [{"label": "numerical", "truth": "numerical"}]}]
    s = summarize(checks, 3)
    assert s["failures"] == 4 and s["single_update_failures"] == 3 and s["label_right"] == 2
    assert s["label_accuracy_vs_interventions"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["confusion_truth_by_label"]["symbolic"] == {"numerical": 1, "symbolic": 1}
    assert s["failures_without_a_prompt_candidate"] == 1 and s["checks"] == 1


# ------------------------------------------------------------------ one real run
def test_task_seeds_one_mix_the_strict_gate_and_interventions(tiny_model_dir, tmp_path, capsys):
    """Two task instances × one training seed; the pool upsampled for plain LoRA as the NSLoRA
    arms mix it; the strict arm rejects ties; every neurosymbolic check branches three ways."""
    from nslora_plugin.apps.cli import main

    out = tmp_path / "fair"
    arms = "lora_upsampled,neurosymbolic,neurosymbolic_strict"
    code = main(["compare", "--model", str(tiny_model_dir), "--output-dir", str(out), "--arms", arms,
                 "--task-seeds", "0,1", "--pool-size", "3", "--intervention-steps", "1", *TINY,
                 "--set", "nll_threshold=100", "--set", "gate_tie_break=accept",
                 "--set", "style_share_threshold=0"])
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "compare.json").read_text())

    # task instances apart from training seeds, results keyed by both
    tasks = {ts: make_facts_task(3, seed=ts, probe_size=4, pool_size=3) for ts in (0, 1)}
    assert result["settings"]["task_seeds"] == [0, 1] and result["settings"]["seeds"] == [0]
    assert list(result["runs"]) == ["0", "1"] and all(list(r) == ["0"] for r in result["runs"].values())
    for ts, task in tasks.items():
        inst = result["task_instances"][str(ts)]
        assert inst["splits"]["held_out"]["ids"] == [r["id"] for r in task.held_out]
        runs = result["runs"][str(ts)]["0"]
        assert set(runs["lora_upsampled"]["held_out_passed"]) == {r["id"] for r in task.held_out}
    assert tasks[0].held_out != tasks[1].held_out
    n_items = sorted(len(t.held_out) for t in tasks.values())
    items = f"{n_items[0]}" if n_items[0] == n_items[1] else f"{n_items[0]}–{n_items[1]}"
    levels = f"2 task seeds × 1 seed × {items} items"
    for arm in arms.split(","):
        a = result["arms"][arm]
        assert a["runs"] == 2 and a["task_seeds"] == 2 and a["seeds"] == 1
        assert a["held_out"]["accuracy_interval95"]["levels_text"] == levels
        assert [(r["task_seed"], r["seed"]) for r in a["held_out"]["accuracy_per_run"]] == [(0, 0), (1, 0)]
    assert levels in printed and result["verdict"]["margin_levels"] == levels

    # one mix: plain LoRA's uniform pool, the upsampled pool at augment_share from step 0, and the
    # NSLoRA arms at augment_share from their first accepted edit (none for the strict arm: ties)
    mix = {arm: result["arms"][arm]["mix"] for arm in arms.split(",")}  # `lora`: test_compare.py
    assert mix["lora_upsampled"]["pool_share"] == 0.25 and mix["lora_upsampled"]["from_step"] == 0
    assert mix["lora_upsampled"]["pool_share_measured"] == pytest.approx(0.25, abs=0.1)
    assert mix["neurosymbolic"]["pool_share"] == 0.25 and mix["neurosymbolic"]["from_step_per_run"] == [2, 2]
    assert mix["neurosymbolic_strict"]["from_step_per_run"] == [None, None]
    from nslora_plugin.apps.harness.compare import markdown_table

    table = markdown_table(result)
    assert "| lora_upsampled |" in table and "25 % from step 0" in table and "25 % from step 2" in table
    assert "pool mix:" in printed

    # the gate: neurosymbolic's constraint edit is kept on the tie-break, the strict arm's never
    ns, strict = result["arms"]["neurosymbolic"], result["arms"]["neurosymbolic_strict"]
    assert ns["gate"]["accepted_on_tie_break"] == 2 and ns["gate"]["accepted_on_gain"] == 0
    assert strict["gate"]["accepted_on_tie_break"] == 0 and strict["edits_accepted"] == 0
    assert strict["gate"]["rejected"] >= 2
    tie = result["verdict"]["tie_break_effect"]
    assert tie["arms"] == ["neurosymbolic", "neurosymbolic_strict"] and tie["levels"] == levels
    assert "edits accepted on a reward gain 0, on the tie-break 2" in printed

    # the router against interventions: every failure of every check branched; the old
    # feature/rule comparison is agreement, never "accuracy"
    study = ns["interventions"]
    assert study["k_steps"] == 1 and study["failures"] + study["failures_without_a_prompt_candidate"] > 0
    assert sum(study["truth_counts"].values()) == study["failures"]
    checks = [json.loads(x) for x in (out / "task-0" / "neurosymbolic" / "interventions.jsonl").open()]
    assert checks and checks[0]["step"] == 2 and checks[0]["candidate_source"].startswith("constraint")
    for row in checks[0]["failures"]:
        assert row["truth"] in ("symbolic", "numerical", "either", "both", "neither")
        assert row["label"] in ("symbolic", "numerical") and row["weights_fix"] in (True, False)
    assert "router vs interventions" in printed
    assert ns["router"]["label_rule_agreement"] is not None and "label_accuracy" not in ns["router"]
    assert "router_accuracy" not in result["verdict"]


def test_the_branches_leave_the_run_as_it_was(tiny_model_dir, tmp_path):
    """The same arm with and without interventions trains on the same batches to the same
    losses and takes the same decisions: every branch is put back."""
    from nslora_plugin.apps.cli import main

    logs = {}
    for steps in ("2", "0"):
        out = tmp_path / f"k{steps}"
        assert main(["compare", "--model", str(tiny_model_dir), "--output-dir", str(out),
                     "--arms", "neurosymbolic", "--pool-size", "3", "--intervention-steps", steps,
                     *TINY, "--set", "nll_threshold=100", "--set", "gate_tie_break=accept",
                     "--set", "style_share_threshold=0"]) == 0
        folder = out / "neurosymbolic" / "nslora"
        losses = [r["loss"] for r in map(json.loads, (folder / "train_log.jsonl").open()) if "loss" in r]
        decisions = [(d["kind"], d["step"], d.get("action"), d.get("accepted"), (d.get("probe") or {}).get("reward"))
                     for d in map(json.loads, (folder / "decisions.jsonl").open())]
        result = json.loads((out / "compare.json").read_text())["arms"]["neurosymbolic"]
        logs[steps] = (losses, decisions, result["held_out_passed"], result["system_prompt"])
    assert logs["2"] == logs["0"] and logs["2"][0]


def test_the_aggregate_mix_describes_a_run_that_mixed_the_pool_in():
    # seed 0 accepted no edit (no pool), seed 1 did from step 8: the table must not say "none"
    from nslora_plugin.apps.harness.compare import _mix_cell, aggregate_runs

    def run(mix: dict) -> dict:
        held = {"accuracy": 0.5, "fact_accuracy": 0.5, "format_compliance": 0.5, "reward": 0.5, "n": 4}
        return {"held_out": held, "probe_after": None, "mix": mix, "edits_proposed": 1,
                "edits_accepted": int(bool(mix["pool_share"])), "editor_calls": 0, "editor_tokens": 0,
                "router": {"label_rule_agreement": None, "failures": 0}, "wall_seconds": 1.0}

    how = "prompts as data: pool rows replace augment_share of every batch from the first accepted edit"
    never = {"how": how + " (no edit was accepted: the pool was never mixed in)", "pool_share": 0.0,
             "from_step": None}
    later = {"how": how, "pool_share": 0.25, "from_step": 8}
    mix = aggregate_runs({"0": {"0": {"neurosymbolic": run(never)},
                                "1": {"neurosymbolic": run(later)}}})["neurosymbolic"]["mix"]
    assert mix["pool_share"] == 0.25 and mix["runs_with_pool"] == 1
    assert mix["from_step_per_run"] == [None, 8] and "1 of 2 runs accepted no edit" in mix["how"]
    assert _mix_cell({"mix": mix}) == "25 % from step –/8"
    none = aggregate_runs({"0": {"0": {"neurosymbolic": run(never)}}})["neurosymbolic"]["mix"]
    assert none["runs_with_pool"] == 0 and _mix_cell({"mix": none}) == "none"
