"""Prompts as data: what an accepted symbolic edit contributes to the training mix.

The refined prompt plus the examples it was refined on are new training data. For every probe
example that failed before an accepted edit, the built-in plugin adds its reference reply (when
that reply itself satisfies the configured format) and, if the edit fixed the example, the model's
own passing reply too (a self-generated, reward-checked target). The collator renders these rows
with the *current* system prompt at batch time, so the weights learn to give such replies under
the prompt that asks for them — the prompt's effect is distilled into the adapter.

With a pool (`pool_path`, or `attach(..., pool=rows)`) the rows come from the pool instead: after
an accepted edit, every pool row whose reference satisfies the format becomes a training row, and
no probe row ever does, so the gate and the router keep scoring rows no update has seen.
Without a pool the rows come from probe examples, so later probe numbers are no longer fully held
out (`nslora demo` therefore also reports a separate held-out split); `augment_holdout_share` > 0
keeps a seeded share of the probe out of the training data.
"""

from __future__ import annotations

import random
from typing import Any, Iterable, Mapping

from nslora_plugin.core.chat import chat_messages
from nslora_plugin.core.config import NSLoRAConfig
from nslora_plugin.core.hookspecs import hookimpl
from nslora_plugin.core.answers import format_compliant
from nslora_plugin.core.run import RunView
from nslora_plugin.core.records import ProbeExample, ProbeReport


def pool_rows(pool: Mapping[str, ProbeExample], prompt_version: int,
              config: NSLoRAConfig) -> list[dict[str, Any]]:
    """Every pool row whose reference meets the format, in id order (the loop drops repeats)."""
    rows = []
    for example_id in sorted(pool):
        example = pool[example_id]
        if not config.answer_format or format_compliant(example.reference, config.answer_format):
            rows.append({"messages": chat_messages(None, example.question, example.reference),
                         "source": "pool_reference", "example_id": example.id,
                         "prompt_version": prompt_version})
    return rows


def holdout_ids(example_ids: Iterable[str], share: float, seed: int) -> set[str]:
    """The probe examples kept out of prompts-as-data: `round(share * n)` of them, chosen with
    `seed` from the sorted ids, so the split is the same on every check, rank and resume."""
    ids = sorted(example_ids)
    k = round(share * len(ids))
    return set(random.Random(seed).sample(ids, k)) if k else set()


class PromptsAsData:
    @hookimpl
    def nslora_augment_examples(self, prompt: str, report: ProbeReport, before: ProbeReport,
                                examples: dict[str, ProbeExample], config: NSLoRAConfig,
                                run: RunView) -> list[dict[str, Any]]:
        if run.pool:
            return pool_rows(run.pool, report.prompt_version, config)
        after = {r.example_id: r for r in report.results}
        kept_out = holdout_ids(examples, config.augment_holdout_share, config.seed)
        rows: list[dict[str, Any]] = []
        for failed in before.failures:
            if failed.example_id in kept_out:
                continue
            example = examples[failed.example_id]
            fixed = after.get(failed.example_id)
            replies = []
            if fixed is not None and fixed.passed:
                replies.append(("self", fixed.completion))
            if not config.answer_format or format_compliant(example.reference, config.answer_format):
                replies.append(("reference", example.reference))
            for source, reply in replies:
                rows.append({"messages": chat_messages(None, example.question, reply),
                             "source": source, "example_id": example.id,
                             "prompt_version": report.prompt_version})
        return rows
