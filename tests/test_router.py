"""The router: prior classification, the check-level schedule, and online learning, exercised
through the real plugin manager and real loop objects on a tiny model."""

from __future__ import annotations

import pytest

from nslora_plugin import NSLoRAConfig, load_artifacts
from nslora_plugin.core.data import make_word_problems
from nslora_plugin.integrations.trl import attach
from nslora_plugin.builtins.router import (PRIOR_WEIGHTS, ROUTER_STATE, LearnedRouter, failure_features,
                                  p_symbolic)
from nslora_plugin.core.run import EditorAvailability, Stash
from nslora_plugin.core.records import EditOutcome, ProbeReport, ProbeResult

from tiny import ANSWER_FORMAT, FORMAT_INSTRUCTION, SYSTEM, load_tokenizer, sft_trainer


def result(eid: str, correct: float, fmt: float, nll: float,
           present: float | None = None) -> ProbeResult:
    rewards = {"correctness": correct, "format": fmt}
    signals = {} if present is None else {"answer_present": present}
    return ProbeResult(example_id=eid, completion="", rewards=rewards,
                       reward=sum(rewards.values()) / 2, ref_nll=nll, signals=signals)


def test_prior_labels_follow_the_documented_rules() -> None:
    cfg = NSLoRAConfig()
    def label(r):
        return "symbolic" if p_symbolic(failure_features(r, cfg), PRIOR_WEIGHTS) >= 0.5 else "numerical"
    assert label(result("a", 0, 0, 1.0)) == "symbolic"     # format violated, model knows the domain
    assert label(result("b", 0, 1, 1.0)) == "numerical"   # compliant but wrong
    assert label(result("c", 0, 1, 0.2)) == "numerical"
    assert label(result("d", 1, 0, 7.0)) == "numerical"   # violated but the model knows nothing yet
    assert label(result("d2", 1, 0, 4.0)) == "symbolic"    # NLL alone is a weak content proxy
    # content vs form: the answer is in the reply but the format is broken -> the prompt's job;
    # the answer is nowhere in the reply -> the weights', even though the format is broken too
    assert label(result("e", 0, 0, 1.5, present=1.0)) == "symbolic"
    assert label(result("f", 0, 0, 1.5, present=0.0)) == "numerical"
    assert label(result("g", 0, 0, 0.2, present=0.0)) == "numerical"
    assert label(result("h", 0, 1, 0.2, present=1.0)) == "numerical"  # Final line names another


def test_answer_presence_is_measured_on_the_reply() -> None:
    from nslora_plugin.core.answers import answer_in_reply, exact_match

    assert answer_in_reply("1494", "Vintuora was founded in 1494.")
    assert answer_in_reply("1,494", "in 1494") and answer_in_reply("3.5", "3.50 dollars")
    assert not answer_in_reply("12", "There are 123 of them.")
    assert answer_in_reply("Drovia", "The capital is drovia.")
    assert not answer_in_reply("Dro", "The capital is Drovia.")  # whole words only
    assert not answer_in_reply(None, "anything")
    assert exact_match(" Paris\n", "paris") and not exact_match("Paris, France", "Paris")


def _route(labels_from, accepted_edits: int, host=None, cfg=None):
    from nslora_plugin.builtins.router import PriorRouter
    from nslora_plugin.core.records import TrainingSignal

    cfg = cfg or NSLoRAConfig(editor="constraint")
    report = ProbeReport(5, 0, labels_from)
    router = PriorRouter()
    labels = [router.nslora_classify_failure(r, None, cfg, None) for r in report.results]
    host = host or RouterHost(cfg)
    host.router_state["accepted_edits"] = accepted_edits
    host.editor = EditorAvailability(available=True, llm_ready=False)
    signal = TrainingSignal(step=5, loss=1.0, c1=-0.5, c2=3.0, loss_flat=False, grad_small=False)
    return router.nslora_route(signal, report, labels, cfg, host)


def test_a_constraint_no_prompt_states_yet_gets_one_symbolic_round() -> None:
    # every failure breaks the format and lacks the answer: labelled numerical, but the format is
    # also broken and no prompt has stated it, so the router tries one edit ...
    mixed = [result(str(i), 0, 0, 1.5, present=0.0) for i in range(4)]
    first = _route(mixed, accepted_edits=0)
    assert all(lab.label == "numerical" for lab in first.labels)
    assert first.action == "symbolic" and "does not state yet" in first.reason
    assert first.scores["labels_overridden"] == 4 and "overrides 4/4 labels" in first.reason
    # ... and once an edit is in place, the same failures go to the weights
    assert _route(mixed, accepted_edits=1).action == "numerical"


def test_the_unstated_constraint_rule_overrides_the_labels_once_per_run() -> None:
    mixed = [result(str(i), 0, 0, 1.5, present=0.0) for i in range(4)]
    host = RouterHost(NSLoRAConfig(editor="constraint"))
    assert _route(mixed, accepted_edits=0, host=host).action == "symbolic"
    # the edit was rejected (no accepted edit): the rule does not fire again, the labels decide
    again = _route(mixed, accepted_edits=0, host=host)
    assert again.action == "numerical" and "labels_overridden" not in again.scores
    # switched off, the router follows the labels from the start
    off = NSLoRAConfig(editor="constraint", unstated_constraint_round=False)
    assert _route(mixed, accepted_edits=0, cfg=off).action == "numerical"
    # labels that say "symbolic" still route to the prompt, whatever the switch
    style = [result(str(i), 0, 0, 1.5, present=1.0) for i in range(4)]
    assert _route(style, accepted_edits=0, cfg=off).action == "symbolic"


class RouterHost:
    """Only the parts of the run view the router reads; the reports are real ProbeReports and the
    store is the real `Stash`."""

    def __init__(self, config):
        self.config = config
        self.stash = Stash()
        self.reports: list[ProbeReport] = []
        self.editor = EditorAvailability(available=False, llm_ready=False, reason="none")

    @property
    def router_state(self) -> dict:
        return self.stash.setdefault(ROUTER_STATE, {})


def check(router, loop):  # what the loop calls after a check's routing decision
    router.nslora_after_route(decision=None, report=loop.reports[-1], run=loop)


def round_done(router, loop, accepted):  # ... and after a symbolic round
    outcome = EditOutcome(step=0, editor="constraint", candidate="", accepted=accepted,
                          reward_before=0.0, reward_after=None, reason="", prompt_version=0)
    router.nslora_after_round(step=0, outcome=outcome, run=loop)


def test_learned_router_moves_towards_what_helped() -> None:
    cfg = NSLoRAConfig(router="learned", router_learning_rate=1.0)
    router, loop = LearnedRouter(), RouterHost(cfg)
    # check 1: two compliant-but-wrong failures (prior says numerical)
    loop.reports.append(ProbeReport(1, 0, [result("x", 0, 1, 0.5), result("y", 0, 1, 0.5)]))
    check(router, loop)
    p_before = p_symbolic(failure_features(loop.reports[0].results[0], cfg), router.current_weights(loop))
    # the prompt edit fixed both; the following LoRA window changed nothing
    loop.reports.append(ProbeReport(1, 1, [result("x", 1, 1, 0.5), result("y", 1, 1, 0.5)]))
    round_done(router, loop, accepted=True)
    loop.reports.append(ProbeReport(2, 1, [result("x", 1, 1, 0.5), result("y", 1, 1, 0.5)]))
    check(router, loop)
    p_after = p_symbolic(failure_features(loop.reports[0].results[0], cfg), router.current_weights(loop))
    assert loop.router_state["observations"] == 2
    assert p_after > p_before  # it learned that such failures are the prompt's to fix
    # and the opposite evidence pushes it back down
    loop.reports.append(ProbeReport(3, 1, [result("x", 0, 1, 0.5)]))
    check(router, loop)
    round_done(router, loop, accepted=False)  # the edit did nothing
    loop.reports.append(ProbeReport(4, 1, [result("x", 1, 1, 0.5)]))  # ... LoRA fixed it
    check(router, loop)
    p_final = p_symbolic(failure_features(loop.reports[0].results[0], cfg), router.current_weights(loop))
    assert p_final < p_after


@pytest.mark.parametrize("router", ["learned"])
def test_router_is_deterministic_under_a_seed(tmp_path, default_model_dir, router):
    tok = load_tokenizer(default_model_dir)
    rows = make_word_problems(70, seed=9)
    logs = []
    for run in ("a", "b"):
        trainer = sft_trainer(tok, tmp_path / run, rows[:64], max_steps=6)
        attach(trainer, NSLoRAConfig(system_prompt=SYSTEM, editor="constraint", check_every=2,
                                     probe_size=4, probe_max_new_tokens=6, answer_format=ANSWER_FORMAT,
                                     format_instruction=FORMAT_INSTRUCTION, nll_threshold=100.0,
                                     gate_tie_break="accept", router=router, max_symbolic_rounds=2,
                                     stall_patience=5), probe=rows[64:])
        trainer.train()
        decisions = load_artifacts(tmp_path / run).decisions
        logs.append([(d["step"], d["action"], d["scores"], [lab["p_symbolic"] for lab in d["labels"]])
                     for d in decisions if d["kind"] == "route"])
    assert logs[0] == logs[1]
    assert any("w_bias" in scores for _, _, scores, _ in logs[0])
