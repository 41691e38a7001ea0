"""Editor budgets (issue 3): calls, tokens and seconds, per round and per run.

Budgets are hard caps: a call that could pass one is not started, a round plans its batch to fit
the calls left, a call's timeout is cut to the time left. A spent run budget keeps the router
numerical, with the reason in its decision; usage and limits are in state.json and summary.json.
Rounds run through a real loop (tiny model, no trainer) against the loopback `FaultServer`.
"""

from __future__ import annotations

import json
import time

import pytest

from nslora_plugin import NSLoRAConfig, NSLoRAConfigError
from nslora_plugin.core.data import make_word_problems
from nslora_plugin.builtins.editors.budget import Budget, Usage
from nslora_plugin.builtins.editors.errors import EditorBudgetSpent

from fault_server import editor_config, round_loop


@pytest.fixture(scope="module")
def rows():
    return make_word_problems(8, seed=9)


def decisions(folder):
    return [json.loads(x) for x in (folder / "decisions.jsonl").open()]


def test_budget_unit_rules():
    cfg = NSLoRAConfig(editor_max_calls_per_round=5, editor_max_tokens_per_run=1000,
                       editor_max_tokens=100)
    usage = Usage()
    budget = Budget(cfg, usage)
    assert usage.budget_limits == {"editor_max_calls_per_round": 5.0, "editor_max_tokens_per_run": 1000.0}
    budget.start_round()
    assert budget.plan_batch(3, 3, 1) == 1  # (5 - 1) // 3
    held = [budget.reserve(200) for _ in range(3)]  # 3 x (200 + 100) = 900 reserved
    with pytest.raises(EditorBudgetSpent, match="editor_max_tokens_per_run=1000") as err:
        budget.reserve(50)
    assert err.value.scope == "run"
    for r in held:
        usage.calls += 1
        usage.prompt_tokens += 100
        budget.settle(r, 100)
    budget.reserve(100)
    budget.reserve(1)  # the 5th call of the round
    with pytest.raises(EditorBudgetSpent, match="editor_max_calls_per_round=5") as err:
        budget.reserve(1)
    assert err.value.scope == "round"
    assert budget.run_spent(4) is None
    usage.prompt_tokens = 950
    assert "tokens used" in budget.run_spent(4)


@pytest.mark.parametrize("key", ["editor_max_calls_per_round", "editor_max_calls_per_run"])
def test_call_caps_below_one_round_are_refused(key):
    with pytest.raises(NSLoRAConfigError, match=f"{key}=3.*at least 4"):
        NSLoRAConfig(**{key: 3})
    assert getattr(NSLoRAConfig(**{key: 0}), key) == 0


def test_run_call_budget_shrinks_the_batch_then_keeps_the_router_numerical(tmp_path, tokenizer,
                                                                          rows, server, caplog):
    cfg = editor_config(server, editor_max_calls_per_run=9, editor_cache=False)
    loop, model = round_loop(tokenizer, tmp_path / "run", cfg, rows)
    with caplog.at_level("WARNING", logger="nslora"):
        first = loop.check(1, model)
        second = loop.check(2, model)
        third = loop.check(3, model)
    assert first.action == "symbolic"
    assert len(server.requests) == 7  # batch planned down from 3 to 2: 3*2+1 calls
    edit = next(d for d in decisions(tmp_path / "run") if d["kind"] == "edit")
    assert edit["meta"]["batch"] == sorted(loop.examples)[:2]
    for d in (second, third):
        assert d.action == "numerical"
        assert "no editor available (editor budget spent: 7/9 calls used" in d.reason
    assert not loop.editor_availability().available and loop.editor_availability().budget_spent
    logged = [r.getMessage() for r in caplog.records if "editor fault (budget)" in r.getMessage()]
    assert len(logged) == 1 and "the router stays numerical" in logged[0]

    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["usage"]["budget_spent"].startswith("7/9 calls")
    assert state["usage"]["budget_limits"] == {"editor_max_calls_per_run": 9.0}
    summary = loop.finish(model, 3)
    assert summary["editor_usage"]["calls"] == 7 and summary["editor_usage"]["budget_spent"]

    # a resumed run (usage restored from state.json) starts with the budget spent
    from nslora_plugin.core.data import load_probe_examples
    from nslora_plugin.core.loop import NeurosymbolicLoop

    resumed = NeurosymbolicLoop(cfg, tokenizer, load_probe_examples(rows), output_dir=tmp_path / "resumed")
    resumed.pm.get_plugin("nslora.editor.textgrad").usage.load(state["usage"])
    resumed.start(model)
    assert not resumed.editor_availability().llm_ready and resumed.check(4, model).action == "numerical"
    assert len(server.requests) == 7


def test_round_call_budget_limits_each_round(tmp_path, tokenizer, rows, server):
    cfg = editor_config(server, editor_max_calls_per_round=4, editor_cache=False)
    loop, model = round_loop(tokenizer, tmp_path / "run", cfg, rows)
    loop.check(1, model)
    loop.check(2, model)
    assert len(server.requests) == 8  # two rounds of batch 1 (4 calls each)
    assert loop.editor_availability().available and loop.editor_availability().llm_ready


def test_token_budgets(tmp_path, tokenizer, rows, server, caplog):
    # per round: the round stops when the next call could pass the cap; the prompt stays
    cfg = editor_config(server, editor_max_tokens_per_round=900, editor_cache=False)
    loop, model = round_loop(tokenizer, tmp_path / "round", cfg, rows)
    with caplog.at_level("WARNING", logger="nslora"):
        loop.check(1, model)
    assert loop.faults["textgrad:EditorBudgetSpent"] == 1
    fault = next(d for d in decisions(tmp_path / "round") if d["kind"] == "fault")
    assert "editor_max_tokens_per_round=900 would be passed" in fault["message"]
    assert loop.usage()["last_round"]["tokens"] <= 900
    assert loop.prompt_version == 0 and loop.editor_availability().available

    # per run: spent once the next call cannot fit; the router then stays numerical
    server.reset()
    cfg = editor_config(server, editor_max_tokens_per_run=2500, editor_cache=False, editor_batch_size=1)
    loop, model = round_loop(tokenizer, tmp_path / "run", cfg, rows)
    routes = [loop.check(step, model) for step in range(1, 8)]
    assert loop.usage()["total_tokens"] <= 2500
    assert routes[0].action == "symbolic" and routes[-1].action == "numerical"
    assert "editor_max_tokens_per_run=2500" in routes[-1].reason


def test_seconds_budgets_cut_slow_calls(tmp_path, tokenizer, rows, server):
    # per round: a slow server is cut off at the time left, reported as the budget
    server.reset(mode="timeout", slow_seconds=5.0)
    cfg = editor_config(server, editor_max_seconds_per_round=0.8, editor_timeout=30.0, editor_cache=False)
    loop, model = round_loop(tokenizer, tmp_path / "round", cfg, rows)
    t0 = time.monotonic()
    loop.check(1, model)
    assert loop.usage()["last_round"]["seconds"] < 2.0 and time.monotonic() - t0 < 10
    fault = next(d for d in decisions(tmp_path / "round") if d["kind"] == "fault")
    assert "editor_max_seconds_per_round=0.8 reached" in fault["message"]
    assert loop.editor_availability().available

    # per run: once spent, the router stays numerical and says so
    server.reset(latency=0.3)
    cfg = editor_config(server, editor_max_seconds_per_run=0.5, editor_cache=False)
    loop, model = round_loop(tokenizer, tmp_path / "run", cfg, rows)
    assert loop.check(1, model).action == "symbolic"
    second = loop.check(2, model)
    assert second.action == "numerical" and "editor_max_seconds_per_run" in second.reason
    assert loop.usage()["wall_seconds"] < 1.5
