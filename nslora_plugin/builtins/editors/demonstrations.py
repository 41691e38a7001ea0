"""The demonstrations editor: worked examples in the system prompt, learned from data, not a rule.

Small models often imitate a demonstration better than they follow an instruction (the idea of
DSPy's BootstrapFewShot, written here for a system prompt). Each candidate is the current prompt
plus `demo_examples` worked examples — a question and its reference reply — drawn from the run's
pool (`pool_path`), which the gate never scores; only rows whose reply meets `answer_format` are
used, so every demonstration shows the required form. A round offers up to `demo_candidates`
different sets (seeded); the validation gate tries them in turn and keeps the first that does not
lower the probe reward. Without a pool the editor says so and does not edit.
"""

from __future__ import annotations

import random
from typing import Sequence

from nslora_plugin.core.config import NSLoRAConfig
from nslora_plugin.core.hookspecs import hookimpl
from nslora_plugin.core.answers import format_compliant
from nslora_plugin.core.run import RunView
from nslora_plugin.core.records import EditorStatus, EditProposal, ProbeExample, ProbeResult

NAME = "demonstrations"
HEADER = "Examples of good replies:"


def demonstration_block(examples: Sequence[ProbeExample]) -> str:
    parts = [HEADER]
    for ex in examples:
        parts.append(f"Question: {ex.question}\nReply: {ex.reference}")
    return "\n\n".join(parts)


def without_demonstrations(prompt: str) -> str:
    """The prompt without a block this editor added (a new set replaces the old one)."""
    head, sep, _ = (prompt or "").partition(HEADER)
    return head.rstrip() if sep else (prompt or "").rstrip()


class DemonstrationsEditor:
    name = NAME

    def _candidates(self, run: RunView) -> list[ProbeExample]:
        fmt = run.config.answer_format
        return [run.pool[k] for k in sorted(run.pool)
                if not fmt or format_compliant(run.pool[k].reference, fmt)]

    def _status(self, run: RunView) -> EditorStatus:
        if len(self._candidates(run)) < run.config.demo_examples:
            return EditorStatus(NAME, ready=False, reason=(
                f"the demonstrations editor needs a pool (pool_path) with at least "
                f"{run.config.demo_examples} rows whose reply meets answer_format"))
        return EditorStatus(NAME, ready=True)

    @hookimpl
    def nslora_editor_start(self, run: RunView) -> EditorStatus:
        return self._status(run)

    @hookimpl
    def nslora_editor_status(self, run: RunView) -> EditorStatus:
        return self._status(run)

    @hookimpl
    def nslora_propose_edit(self, prompt: str, failures: Sequence[ProbeResult],
                            config: NSLoRAConfig, tried: tuple[str, ...],
                            run: RunView) -> EditProposal | None:
        candidates = self._candidates(run)
        k = config.demo_examples
        if not failures or len(candidates) < k:
            return None
        done = sum(1 for t in tried if t.startswith(f"{NAME}:"))
        if done >= config.demo_candidates:
            return None
        base = without_demonstrations(prompt)
        rng = random.Random(f"{config.seed}:{run.step}:{done}")
        chosen = rng.sample(candidates, k)
        candidate = "\n\n".join(p for p in (base, demonstration_block(chosen)) if p)
        if len(candidate) > config.max_prompt_chars:
            run.record_fault(NAME, f"a set of {k} demonstrations would make the prompt "
                             f"{len(candidate)} characters (max_prompt_chars={config.max_prompt_chars})")
            return None
        return EditProposal(editor=f"{NAME}:{done + 1}", prompt=candidate,
                            rationale=f"{k} worked examples from the pool (set {done + 1} of "
                                      f"{config.demo_candidates})",
                            meta={"demonstrations": [ex.id for ex in chosen]})
