"""A third-party reward, router or editor replaces the built-in one with no change to the core:
each plugin below uses only the hooks and the run view, and is registered the way a user's
would be (`attach(..., plugins=[obj])`, or a dotted path in `plugins`; `no:<name>` blocks a
built-in). Each run trains a tiny real model through the real `SFTTrainer`."""

from __future__ import annotations

import json
from typing import Any

from nslora_plugin import NSLoRAConfig
from nslora_plugin.core.data import make_word_problems
from nslora_plugin.core.hookspecs import hookimpl
from nslora_plugin.integrations.trl import attach
from nslora_plugin.core.run import RunView, StashKey
from nslora_plugin.core.records import EditorStatus, EditProposal, RouteDecision

from tiny import ANSWER_FORMAT, SYSTEM, load_tokenizer, sft_trainer

ROWS = make_word_problems(40, seed=3)


def run_with(tmp_path, default_model_dir, extra: list[Any], **settings: Any) -> tuple[dict, list[dict]]:
    tok = load_tokenizer(default_model_dir)
    trainer = sft_trainer(tok, tmp_path / "out", ROWS[:32], max_steps=4)
    base = dict(system_prompt=SYSTEM, check_every=2, probe_size=4, probe_max_new_tokens=6,
                answer_format=ANSWER_FORMAT, editor="constraint")
    callback = attach(trainer, NSLoRAConfig(**{**base, **settings}), probe=ROWS[32:], plugins=extra)
    trainer.train()
    folder = callback.loop.artifacts_root
    state = json.loads((folder / "state.json").read_text())
    decisions = [json.loads(line) for line in (folder / "decisions.jsonl").open()]
    return state, decisions


class ShortReplies:
    """A reward of its own: a reply passes when it is at most 200 characters."""

    @hookimpl
    def nslora_score_probe(self, completion: str) -> dict[str, float]:
        return {"short": float(len(completion) <= 200)}


def test_a_reward_plugin_replaces_the_builtin_rewards(tmp_path, default_model_dir):
    _, decisions = run_with(tmp_path, default_model_dir, [ShortReplies()],
                            plugins=["no:nslora.rewards"], editor="none")
    probes = [d["probe"] for d in decisions if d["kind"] == "start"]
    assert probes and set(probes[0]) >= {"short"}
    assert "correctness" not in probes[0] and "format" not in probes[0]
    routes = [d for d in decisions if d["kind"] == "route"]
    assert routes and all(r["probe"].get("short") is not None for r in routes)


COUNTS: StashKey[dict[str, int]] = StashKey("always-symbolic")


class AlwaysSymbolic:
    """A router of its own: a symbolic round at every check, its state in its own stash key."""

    @hookimpl(tryfirst=True)
    def nslora_route(self, signal: Any, report: Any, labels: Any, run: RunView) -> RouteDecision:
        counts = run.stash.setdefault(COUNTS, {"checks": 0})
        counts["checks"] += 1
        return RouteDecision(step=signal.step, action="symbolic", reason="third-party router",
                             scores={"checks": float(counts["checks"])}, probe=report.summary())

    @hookimpl
    def nslora_save_state(self, run: RunView) -> dict[str, Any]:
        return {"always_symbolic": run.stash.get(COUNTS, {})}


def test_a_router_plugin_replaces_the_builtin_router(tmp_path, default_model_dir):
    state, decisions = run_with(tmp_path, default_model_dir, [AlwaysSymbolic()],
                                plugins=["no:nslora.router"])
    routes = [d for d in decisions if d["kind"] == "route"]
    assert [r["reason"] for r in routes] == ["third-party router"] * 2
    assert [r["action"] for r in routes] == ["symbolic", "symbolic"]
    assert state["always_symbolic"] == {"checks": 2}
    assert "router" not in state  # the built-in router was never registered
    assert state["decision_counts"]["symbolic"] == 2


class SuffixEditor:
    """An editor of its own, with its own start-up check, status and usage."""

    name = "suffix"

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def nslora_editor_start(self) -> EditorStatus:
        return EditorStatus(self.name, ready=True, uses_llm=True)

    @hookimpl
    def nslora_editor_status(self) -> EditorStatus:
        return EditorStatus(self.name, ready=self.calls < 1, reason="one edit per run", uses_llm=True)

    @hookimpl
    def nslora_editor_usage(self) -> dict[str, Any]:
        return {"calls": self.calls}

    @hookimpl
    def nslora_propose_edit(self, prompt: str, tried: tuple[str, ...]) -> EditProposal | None:
        if self.name in tried:
            return None
        self.calls += 1
        return EditProposal(editor=self.name, prompt=prompt + "\nEnd with 'The answer is N.'")


def test_an_editor_plugin_replaces_the_builtin_editors(tmp_path, default_model_dir):
    editor = SuffixEditor()
    state, decisions = run_with(tmp_path, default_model_dir, [editor], editor="none",
                                style_share_threshold=0.0, gate_tie_break="accept")
    start = next(d for d in decisions if d["kind"] == "start")
    assert start["llm_editor_ready"] is True
    edits = [d for d in decisions if d["kind"] == "edit"]
    assert [e["editor"] for e in edits] == ["suffix"]  # no built-in editor took part
    routes = [d for d in decisions if d["kind"] == "route"]
    assert routes[0]["action"] == "symbolic"
    assert routes[1]["action"] == "numerical" and "one edit per run" in routes[1]["reason"]
    assert state["usage"] == {"calls": 1}
