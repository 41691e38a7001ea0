"""Prompts as data: what an accepted symbolic edit contributes to the training mix.

An edit that fixes an example shows what a good reply under the refined prompt looks like. The
built-in plugin keeps, for every example that failed before the edit and passes after it, the
model's own passing reply (a self-generated, reward-checked target) and, when the example has a
reference, the reference reply too. The collator renders these rows with the *current* system
prompt at batch time, so the weights learn to give these replies under the prompt that elicited them.

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
        failed_before = {r.example_id for r in before.failures}
        rows: list[dict[str, Any]] = []
        for result in report.results:
            if result.example_id not in failed_before or not result.passed:
                continue
            example = examples[result.example_id]
            replies = [("self", result.completion)]
            if not config.answer_format or format_compliant(example.reference, config.answer_format):
                replies.append(("reference", example.reference))
            for source, reply in replies:
                rows.append({"messages": [{"role": "user", "content": example.question},
                                          {"role": "assistant", "content": reply}],
                             "source": source, "example_id": example.id,
                             "prompt_version": report.prompt_version})
        return rows
