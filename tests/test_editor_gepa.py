"""The GEPA editor (`editor: gepa`, issue 27 point 3): GEPA's reflective prompt evolution over the
probe rows, with the editor LLM as its reflection model and the run's own model and rewards as its
metric, its Pareto pool going through NSLoRA's gate, the editor budgets mapped onto its metric
calls, and editor faults handled as for TextGrad.

Rounds run through a real `NeurosymbolicLoop` (tiny model, real tokenizer, probe → router →
editor → gate → artifacts) without a trainer, against the loopback `FaultServer` (a real HTTP
server; it answers a reflection request, which carries the `<IMPROVED_VARIABLE>` tags, with
`server.improved`). A tiny random model never answers right under any prompt, so where a test needs
a student that follows the prompt it replaces the loop's one-row generation (what GEPA scores
candidates with) by a scripted one; the gate still scores with the tiny model itself.
"""

from __future__ import annotations

import json
import math
import socket
import sys

import pytest

pytest.importorskip("gepa", reason="the gepa extra is not installed (pip install 'nslora-plugin[gepa]')")

from nslora_plugin import NSLoRAConfig
from nslora_plugin.builtins.editors.budget import Budget, Usage
from nslora_plugin.builtins.editors.errors import EditorBudgetSpent
from nslora_plugin.builtins.editors.gepa import (DEFAULT_REFLECTIONS, GEPAEditor, metric_calls_for,
                                                 plan_round, row_feedback)
from nslora_plugin.core.data import make_word_problems
from nslora_plugin.core.records import ProbeExample, ProbeResult

from fault_server import OPTIMIZER_MARK, FaultServer, editor_config, round_loop
from tiny import ANSWER_FORMAT, FORMAT_INSTRUCTION, SYSTEM


@pytest.fixture(scope="module")
def rows():
    return make_word_problems(8, seed=7)


def gepa_config(server, **overrides):
    return editor_config(server, **{"editor": "gepa", "editor_cache": False, **overrides})


def decisions(folder):
    return [json.loads(line) for line in (folder / "decisions.jsonl").open()]


def listening_student(loop):
    """A student that follows the prompt: the right final line when the system prompt asks for
    'Answer:', else a reply that fails. Counts the replies it generates."""
    asked: list[str | None] = []

    def reply(system_prompt, question):
        asked.append(system_prompt)
        ex = next(e for e in loop.examples.values() if e.question == question)
        return f"Answer: {ex.answer}" if system_prompt and "Answer:" in system_prompt else "I do not know."

    loop.generate_one = reply
    return asked


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# a round: GEPA's pool reaches the gate
# ------------------------------------------------------------------------------------------------


def test_a_gepa_round_proposes_a_pool_candidate_that_reaches_the_gate(tmp_path, monkeypatch,
                                                                       tokenizer, rows, server):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    stdout = sys.stdout
    loop, model = round_loop(tokenizer, tmp_path / "run", gepa_config(server), rows)
    assert loop.editor_availability().llm_ready
    asked = listening_student(loop)
    loop.check(1, model)

    # the pool's best candidate went through NSLoRA's gate (tiny model: a tie, accepted by the
    # config's gate_tie_break) and is the prompt now
    (edit,) = [d for d in decisions(tmp_path / "run") if d["kind"] == "edit"]
    assert edit["editor"] == "gepa:1" and edit["accepted"] and edit["candidate"] == server.improved
    assert loop.prompt == server.improved and loop.prompt_version == 1
    meta = edit["meta"]["gepa"]
    assert meta["val_score"] == 1.0 and meta["seed_val_score"] == 0.0 and meta["pareto_rows"] == 3
    assert meta["metric_calls"] <= meta["max_metric_calls"] == metric_calls_for(DEFAULT_REFLECTIONS, 3, 3)
    assert "GEPA Pareto pool" in edit["meta"]["rationale"]

    # the reflection model is the editor endpoint, through our client: per-row feedback from the
    # reward components, the constraints in words, every call counted
    (summary,) = [d for d in decisions(tmp_path / "run") if d["kind"] == "gepa"]
    bodies = server.chat_bodies()
    assert len(bodies) == summary["reflections"] == loop.usage()["calls"] >= 1
    text = bodies[0]["messages"][-1]["content"]
    assert OPTIMIZER_MARK in text and SYSTEM in text
    assert "Wrong final answer: the expected answer is" in text and FORMAT_INSTRUCTION in text
    ex = loop.examples[sorted(loop.examples)[0]]
    assert ex.question in text and ex.reference in text
    assert all(b["model"] == server.model and b["max_tokens"] == 48 for b in bodies)
    # the student scored candidates; the current prompt's replies came from the probe, not again
    assert asked and SYSTEM not in asked
    assert summary["generations"] == len(asked) and loop.usage()["last_round"]["metric_calls"] > 0
    assert summary["stopped"].startswith("a candidate scores 1")

    # GEPA's run folder is under the run's artifacts; nothing in the working directory, stdout kept
    folder = tmp_path / "run" / meta["run_dir"]
    assert meta["run_dir"] == "editor_logs/gepa/step-000001"
    assert (folder / "gepa_state.bin").is_file() and "Iteration" in (folder / "gepa_log.txt").read_text()
    assert list(cwd.iterdir()) == [] and sys.stdout is stdout


def test_the_next_pool_candidate_follows_a_rejection_then_the_fallback(tmp_path, tokenizer, rows,
                                                                      server):
    """Rejected by the gate: the editor offers the next candidate of the same round (never a
    second GEPA run), then the fallback editor has its turn."""
    server.reset(improved="Give only the final line 'Answer: <number>'.")
    cfg = gepa_config(server, gate_tie_break="reject", editor_fallback="constraint",
                      system_prompt="You are terse.")
    loop, model = round_loop(tokenizer, tmp_path / "run", cfg, rows)
    listening_student(loop)
    loop.check(1, model)
    edits = [d for d in decisions(tmp_path / "run") if d["kind"] == "edit"]
    assert [e["editor"] for e in edits] == ["gepa:1", "constraint"]
    assert not edits[0]["accepted"] and "tie" in edits[0]["reason"]
    assert len([d for d in decisions(tmp_path / "run") if d["kind"] == "gepa"]) == 1


@pytest.mark.parametrize("mode,fault,why", [
    ("inject", "EditorUnsafeCandidate", "candidate contains chat-template tokens"),
    ("overlong", "EditorOverlongCandidate", "candidate longer than max_prompt_chars=2000"),
    ("notags", "EditorNoTags", "no new prompt in the reply"),
])
def test_unusable_reflections_cost_no_generation_and_are_faults(mode, fault, why, tmp_path,
                                                                tokenizer, rows, server):
    server.reset(mode=mode)  # role tokens in the new prompt / 60k characters / plain prose
    loop, model = round_loop(tokenizer, tmp_path / "run", gepa_config(server, editor_cache=True),
                             rows)
    asked = listening_student(loop)
    loop.check(1, model)
    assert asked == []  # the gate's own check ran first: no student reply for it
    assert not [d for d in decisions(tmp_path / "run") if d["kind"] == "edit"]
    (summary,) = [d for d in decisions(tmp_path / "run") if d["kind"] == "gepa"]
    assert summary["unusable"] == {why: 1} and summary["reflections"] == DEFAULT_REFLECTIONS
    assert loop.faults[f"gepa:{fault}"] == 1 and loop.prompt == SYSTEM
    message = next(d for d in decisions(tmp_path / "run") if d["kind"] == "fault")["message"]
    assert "gave no usable system prompt" in message and "<|im_start|>" not in message
    # the unusable replies are not replayed from the reply cache
    assert loop.usage()["calls"] >= 1 and not list((tmp_path / "run" / "editor_cache").rglob("*.json"))


# ------------------------------------------------------------------------------------------------
# budgets → GEPA's metric calls
# ------------------------------------------------------------------------------------------------


def test_budget_mapping_onto_reflections_and_metric_calls():
    def plan(usage=None, tokens_per_call=500, **caps):
        cfg = NSLoRAConfig(editor_batch_size=3, **caps)
        budget = Budget(cfg, usage or Usage())
        budget.start_round()
        return plan_round(budget, cfg, valset=16, failing=5, tokens_per_call=tokens_per_call)

    free = plan()
    assert (free.reflections, free.limited_by, free.minibatch) == (DEFAULT_REFLECTIONS, "default", 3)
    assert free.max_metric_calls == 16 + DEFAULT_REFLECTIONS * (2 * 3 + 16)
    assert plan(editor_max_calls_per_round=6).reflections == 6
    assert plan(Usage(calls=7), editor_max_calls_per_run=10).reflections == 3
    by_tokens = plan(tokens_per_call=1000, editor_max_tokens_per_round=3500)
    assert (by_tokens.reflections, by_tokens.limited_by) == (3, "editor_max_tokens_per_round")
    assert by_tokens.max_metric_calls == 16 + 3 * 22
    assert plan(editor_max_calls_per_round=6, editor_max_tokens_per_run=2500).reflections == 5
    with pytest.raises(EditorBudgetSpent, match="editor_max_calls_per_run") as info:
        plan(Usage(calls=10), editor_max_calls_per_run=10)
    assert info.value.scope == "run"
    # fewer failing rows than editor_batch_size: the minibatch is the failing rows
    cfg = NSLoRAConfig(editor_batch_size=8)
    assert plan_round(Budget(cfg, Usage()), cfg, valset=4, failing=2, tokens_per_call=1).minibatch == 2
    assert math.isinf(Budget(cfg, Usage()).calls_left())


def test_budgets_cap_gepa_metric_calls_and_reflections(tmp_path, tokenizer, rows, server):
    # the tiny model never improves: GEPA spends its whole plan, R reflections and no more
    cfg = gepa_config(server, editor_max_calls_per_round=4, probe_size=4, editor_batch_size=2)
    loop, model = round_loop(tokenizer, tmp_path / "round", cfg, rows)
    loop.check(1, model)
    loop.check(2, model)
    rounds = [d for d in decisions(tmp_path / "round") if d["kind"] == "gepa"]
    assert len(rounds) == 2 and len(server.requests) == 8  # 4 reflection calls a round
    for r in rounds:
        assert r["plan"] == {"reflections": 4, "minibatch": 2, "valset": 4,
                             "max_metric_calls": 4 + 4 * (2 * 2 + 4),
                             "limited_by": "editor_max_calls_per_round"}
        assert r["reflections"] == 4 and r["stopped"].startswith("4 reflection calls made")
        # the seed's 4 rows, then per iteration the parent and the child on 2 rows
        assert r["metric_calls"] == 4 + 4 * (2 + 2) <= r["plan"]["max_metric_calls"]
    assert loop.editor_availability().available

    # per run: once a round has spent it the router stays numerical, saying why
    server.reset()
    cfg = gepa_config(server, editor_max_calls_per_run=4, probe_size=4, editor_batch_size=2)
    loop, model = round_loop(tokenizer, tmp_path / "run", cfg, rows)
    assert loop.check(1, model).action == "symbolic"
    second = loop.check(2, model)
    assert len(server.requests) == 4 and second.action == "numerical"
    assert "editor budget spent: 4/4 calls used" in second.reason
    assert loop.usage()["budget_spent"] and loop.faults["budget:EditorBudgetSpent"] == 1


def test_token_budget_shrinks_the_round(tmp_path, tokenizer, rows, server):
    cfg = gepa_config(server, editor_max_tokens_per_round=2000, editor_max_tokens=48)
    loop, model = round_loop(tokenizer, tmp_path / "run", cfg, rows)
    loop.check(1, model)
    (r,) = [d for d in decisions(tmp_path / "run") if d["kind"] == "gepa"]
    assert r["plan"]["limited_by"] == "editor_max_tokens_per_round"
    assert 1 <= r["plan"]["reflections"] < DEFAULT_REFLECTIONS
    assert loop.usage()["last_round"]["tokens"] <= 2000


# ------------------------------------------------------------------------------------------------
# faults: as for the TextGrad editor
# ------------------------------------------------------------------------------------------------


def test_unreachable_endpoint_at_start_is_a_fault_and_the_fallback_stands_in(tmp_path, tokenizer,
                                                                           rows):
    cfg = gepa_config(None, editor_base_url=f"http://127.0.0.1:{closed_port()}/v1",
                      editor_model="m", editor_fallback="constraint")
    loop, model = round_loop(tokenizer, tmp_path / "run", cfg, rows)
    status = loop.editor_availability()
    assert status.available and not status.llm_ready
    (fault,) = [d for d in decisions(tmp_path / "run") if d["kind"] == "fault"]
    assert fault["where"] == "startup" and "editor endpoint unreachable" in fault["message"]
    assert "the constraint editor stands in" in fault["message"]
    loop.check(1, model)
    (edit,) = [d for d in decisions(tmp_path / "run") if d["kind"] == "edit"]
    assert edit["editor"] == "constraint" and edit["accepted"]
    assert not (tmp_path / "run" / "editor_logs" / "gepa").exists()


def test_endpoint_dying_mid_round_is_a_fault_and_the_fallback_stands_in(tmp_path, tokenizer, rows,
                                                                     caplog):
    with FaultServer() as dying:
        dying.die_after = 0  # the first reflection call drops the connection; the server is gone
        cfg = gepa_config(dying, editor_fallback="constraint", editor_retries=1)
        loop, model = round_loop(tokenizer, tmp_path / "run", cfg, rows)
        assert loop.editor_availability().llm_ready
        with caplog.at_level("WARNING", logger="nslora"):
            loop.check(1, model)
        assert dying.dead
    assert loop.faults["gepa:EditorUnreachable"] == 1
    fault = next(d for d in decisions(tmp_path / "run") if d["kind"] == "fault")
    assert fault["where"] == "gepa" and "cannot reach the editor endpoint" in fault["message"]
    (summary,) = [d for d in decisions(tmp_path / "run") if d["kind"] == "gepa"]
    assert summary["reflections"] == 1 and summary["stopped"] == "editor fault (EditorUnreachable)"
    (edit,) = [d for d in decisions(tmp_path / "run") if d["kind"] == "edit"]
    assert edit["editor"] == "constraint" and edit["accepted"]
    assert any("editor fault (gepa): EditorUnreachable" in r.getMessage() for r in caplog.records)
    assert not any("Traceback" in r.getMessage() for r in caplog.records)

    # the next round health-checks the endpoint first: one more fault, no GEPA run, no crash
    loop.check(2, model)
    assert len([d for d in decisions(tmp_path / "run") if d["kind"] == "gepa"]) == 1
    assert loop.faults["gepa:EditorUnreachable"] == 2


def test_missing_gepa_package_is_a_startup_fault_with_the_install_hint(tmp_path, monkeypatch,
                                                                      tokenizer, rows, server):
    from nslora_plugin.trainer.preflight import editor_problem

    monkeypatch.setitem(sys.modules, "gepa", None)  # `import gepa` raises ImportError
    cfg = gepa_config(server, editor_fallback="constraint")
    assert "pip install 'nslora-plugin[gepa]'" in editor_problem(cfg)
    loop, model = round_loop(tokenizer, tmp_path / "run", cfg, rows)
    (fault,) = [d for d in decisions(tmp_path / "run") if d["kind"] == "fault"]
    assert "nslora-plugin[gepa]" in fault["message"] and "constraint editor stands in" in fault["message"]
    loop.check(1, model)
    assert [d["editor"] for d in decisions(tmp_path / "run") if d["kind"] == "edit"] == ["constraint"]
    assert server.requests == []


# ------------------------------------------------------------------------------------------------
# feedback, registry, config
# ------------------------------------------------------------------------------------------------


def test_feedback_from_reward_components_hides_a_hidden_format_rule():
    ex = ProbeExample(id="a", question="2+3?", reference="5\nAnswer: 5", answer="5")
    result = ProbeResult("a", "it is 4", {"correctness": 0.0, "format": 0.0}, 0.0, 0.0, cut=True)
    shown = NSLoRAConfig(answer_format=ANSWER_FORMAT, format_instruction=FORMAT_INSTRUCTION)
    text = row_feedback(ex, result, shown)
    assert "expected answer is 5; the reply's final answer is 4" in text
    assert FORMAT_INSTRUCTION in text and "cut at the token limit" in text
    hidden = NSLoRAConfig(answer_format=ANSWER_FORMAT, format_instruction="")
    text = row_feedback(ex, result, hidden)
    assert "form differs from the reference reply" in text
    assert ANSWER_FORMAT not in text and "Answer:" not in text
    assert "Answer:" not in GEPAEditor.template(hidden) and FORMAT_INSTRUCTION in GEPAEditor.template(shown)
    good = ProbeResult("a", "Answer: 5", {"correctness": 1.0, "format": 1.0}, 1.0, 0.0)
    assert row_feedback(ex, good, shown).startswith("Good")


def test_registry_loads_the_gepa_editor_by_name():
    from nslora_plugin.core.registry import BUILTINS, builtin_names, load_object, make_plugin_manager

    cfg = NSLoRAConfig(editor="gepa")
    assert ("nslora.editor.gepa", "nslora.editor.gepa") in builtin_names(cfg)
    assert ("nslora.editor.constraint", "nslora.editor.constraint") in builtin_names(cfg)  # fallback
    assert isinstance(load_object(BUILTINS["nslora.editor.gepa"]), GEPAEditor)
    pm = make_plugin_manager(cfg)
    assert isinstance(pm.get_plugin("nslora.editor.gepa"), GEPAEditor)
    assert pm.get_plugin("nslora.editor.textgrad") is None
    assert make_plugin_manager(NSLoRAConfig()).get_plugin("nslora.editor.gepa") is None


def test_config_accepts_editor_gepa():
    import argparse

    from nslora_plugin.core.config import NSLoRAConfigError

    assert NSLoRAConfig(editor="gepa").editor == "gepa"
    assert NSLoRAConfig.from_dict({"nslora_editor": "gepa"}).editor == "gepa"
    parser = argparse.ArgumentParser()
    NSLoRAConfig.add_cli_arguments(parser)
    assert parser.parse_args(["--nslora_editor", "gepa"]).nslora_editor == "gepa"
    with pytest.raises(NSLoRAConfigError, match="'gepa'"):
        NSLoRAConfig(editor="gepa2")


# ------------------------------------------------------------------------------------------------
# the embedded 135M model as GEPA's reflection model
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gepa_round_with_the_embedded_135m_reflection_model(tmp_path, monkeypatch, tokenizer, rows,
                                                          editor_server):
    """The real `transformers serve` on SmolLM2-135M-Instruct as the reflection model, one
    reflection call (about a minute on 2 busy CPU cores). Its reply is either a prompt, gated like
    any candidate when it beats the current one, or no usable prompt (what it wrote in practice:
    the next example of the list, no tags), reported as an `EditorNoTags`-like fault while the
    constraint editor stands in; never a crash, never a transport fault."""
    import nslora_plugin.builtins.editors.gepa as gepa_editor

    monkeypatch.setattr(gepa_editor, "DEFAULT_REFLECTIONS", 1)
    cfg = gepa_config(None, editor_base_url=editor_server.base_url, editor_model=editor_server.model,
                      editor_max_tokens=80, editor_timeout=120.0, editor_fallback="constraint")
    loop, model = round_loop(tokenizer, tmp_path / "run", cfg, rows)
    assert loop.editor_availability().llm_ready
    listening_student(loop)
    loop.check(1, model)
    (summary,) = [d for d in decisions(tmp_path / "run") if d["kind"] == "gepa"]
    assert summary["reflections"] == 1 and summary["fault"] in (None, "EditorNoTags", "EditorBadReply",
                                                                "EditorUnsafeCandidate",
                                                                "EditorOverlongCandidate")
    assert loop.usage()["calls"] == 1 and loop.usage()["completion_tokens"] > 0
    edits = [d for d in decisions(tmp_path / "run") if d["kind"] == "edit"]
    assert edits and edits[0]["editor"] in ("gepa:1", "constraint")
