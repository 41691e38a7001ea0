"""Prompts as data: what an accepted symbolic edit contributes to the training mix.

The refined prompt plus the examples it was refined on are new training data. For every probe
example that failed before an accepted edit, the built-in plugin adds its reference reply (when
that reply itself satisfies the configured format) and, if the edit fixed the example, the model's
own passing reply too (a self-generated, reward-checked target). The collator renders these rows
with the *current* system prompt at batch time, so the weights learn to give such replies under
the prompt that asks for them — the prompt's effect is distilled into the adapter.

Note: the rows come from probe examples, so later probe numbers are no longer fully held out;
`nslora demo` therefore also reports a separate held-out evaluation split.
"""

from __future__ import annotations

from typing import Any

from .config import NSLoRAConfig
from .hookspecs import hookimpl
from .rewards import format_compliant
from .types import ProbeExample, ProbeReport


class PromptsAsData:
    @hookimpl
    def nslora_augment_examples(self, prompt: str, report: ProbeReport, before: ProbeReport,
                                examples: dict[str, ProbeExample],
                                config: NSLoRAConfig) -> list[dict[str, Any]]:
        after = {r.example_id: r for r in report.results}
        rows: list[dict[str, Any]] = []
        for failed in before.failures:
            example = examples[failed.example_id]
            fixed = after.get(failed.example_id)
            replies = []
            if fixed is not None and fixed.passed:
                replies.append(("self", fixed.completion))
            if not config.answer_format or format_compliant(example.reference, config.answer_format):
                replies.append(("reference", example.reference))
            for source, reply in replies:
                rows.append({"messages": [{"role": "user", "content": example.question},
                                          {"role": "assistant", "content": reply}],
                             "source": source, "example_id": example.id,
                             "prompt_version": report.prompt_version})
        return rows
