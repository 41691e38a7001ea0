"""The probe's batch follows the memory estimate and its generation cache is a switch: greedy
replies stay those of one row at a time (and of the dynamic cache), the estimate is the doctor's
formula, and an explicit `probe_batch_size` still wins."""

from __future__ import annotations

import pytest
import torch

from nslora_plugin import NSLoRAConfig
from nslora_plugin.apps.tools.doctor import TrainSettings, estimate, shape_from_config
from nslora_plugin.core import probe as probe_mod
from nslora_plugin.core.data import load_probe_examples, make_word_problems
from nslora_plugin.core.probe import (CPU_MEMORY_CAP, GPU_MEMORY_SHARE, STATIC, ProbeEvaluator,
                                     probe_memory_budget, probe_row_bytes, rows_that_fit)
from nslora_plugin.core.registry import make_plugin_manager
from tiny import SYSTEM, tiny_model

ROWS = 6


def _config(batch: int, **settings: object) -> NSLoRAConfig:
    """A probe config with `batch` rows a batch; 0 is "auto" (set after validation, which asks
    for a positive number)."""
    config = NSLoRAConfig(probe_batch_size=max(batch, 1), probe_max_new_tokens=8,
                          probe_stop_at_answer=False, **settings)
    config.probe_batch_size = batch
    return config


def _evaluator(tokenizer, config: NSLoRAConfig) -> ProbeEvaluator:
    examples = load_probe_examples(make_word_problems(ROWS, seed=11))
    return ProbeEvaluator(tokenizer, examples, config, make_plugin_manager(config))


def test_auto_batches_every_row_and_replies_equal_one_row_at_a_time(tokenizer):
    """On the tiny model the padded batch gives the same greedy replies as each row alone, and
    the same reference NLLs up to float noise."""
    model = tiny_model(tokenizer, seed=5)
    auto = _evaluator(tokenizer, _config(0))
    alone = _evaluator(tokenizer, _config(1))
    sizes: list[int] = []
    real_generate = model.generate

    def counting_generate(*a, **k):
        sizes.append(int(k["input_ids"].shape[0]))
        return real_generate(*a, **k)

    model.generate = counting_generate
    replies, nlls = auto.generate_and_score(model, SYSTEM, auto.examples)
    assert sizes == [ROWS]  # one batch: memory allows every row
    sizes.clear()
    replies_alone, nlls_alone = alone.generate_and_score(model, SYSTEM, alone.examples)
    assert sizes == [1] * ROWS
    assert replies == replies_alone
    assert torch.allclose(torch.tensor(nlls), torch.tensor(nlls_alone), atol=1e-4), (nlls, nlls_alone)


def test_the_batch_shrinks_to_the_memory_budget_and_an_explicit_size_wins(tokenizer, monkeypatch):
    model = tiny_model(tokenizer)
    row = probe_row_bytes(model, 100)
    assert row is not None and row > 0
    monkeypatch.setattr(probe_mod, "probe_memory_budget", lambda device: 2.5 * row)
    assert _evaluator(tokenizer, _config(0)).batch_rows(model, ROWS, 100) == 2
    assert _evaluator(tokenizer, _config(4)).batch_rows(model, ROWS, 100) == 4
    monkeypatch.setattr(probe_mod, "probe_memory_budget", lambda device: 0.1 * row)
    assert _evaluator(tokenizer, _config(0)).batch_rows(model, ROWS, 100) == 1
    assert rows_that_fit(1e12, row, ROWS) == ROWS

    class Sizeless(torch.nn.Module):  # no config to estimate from: the fallback batch
        pass

    assert _evaluator(tokenizer, _config(0)).batch_rows(Sizeless(), 20, 100) == probe_mod.FALLBACK_BATCH_ROWS


def test_the_budget_is_a_share_of_free_memory(monkeypatch):
    """On a GPU: free memory plus PyTorch's cached, unallocated blocks; on a CPU: a capped share
    of the available RAM."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4 * gib)
    assert probe_memory_budget(torch.device("cuda", 0)) == GPU_MEMORY_SHARE * 12 * gib
    assert 0 < probe_memory_budget(torch.device("cpu")) <= CPU_MEMORY_CAP


def test_sharded_ranks_take_the_smallest_batch(tokenizer):
    """Every rank must run as many forwards: the ranks agree on the smallest answer."""
    model = tiny_model(tokenizer)

    class Sharded:
        several = sharded = True

        @staticmethod
        def gather(items):
            return list(items) + [3]

    ev = _evaluator(tokenizer, _config(0))
    ev.ranks = Sharded()
    assert ev.batch_rows(model, ROWS, 50) == 3


def test_the_row_estimate_is_the_doctors_formula(tokenizer):
    model = tiny_model(tokenizer)
    shape = shape_from_config(model.config.to_dict(), name="tiny")
    est = estimate(shape, TrainSettings(compute_bytes=4, probe_batch_size=1, probe_prompt_len=70,
                                        probe_max_new_tokens=30))
    doctor = est.row("probe KV cache") + est.row("probe reference-NLL logits")
    assert probe_row_bytes(model, 100) == doctor


def test_static_cache_gives_the_dynamic_replies(tokenizer):
    """The static-cache switch changes how `generate` stores keys and values, not what it says;
    its NLLs come from the separate pass and equal the dynamic path's."""
    model = tiny_model(tokenizer, seed=6)
    dynamic = _evaluator(tokenizer, _config(4))
    static = _evaluator(tokenizer, _config(4))
    static.cache_implementation = STATIC
    replies, nlls = dynamic.generate_and_score(model, SYSTEM, dynamic.examples)
    replies_static, nlls_static = static.generate_and_score(model, SYSTEM, static.examples)
    assert replies_static == replies
    assert torch.allclose(torch.tensor(nlls_static), torch.tensor(nlls), atol=1e-4)


@pytest.mark.slow
def test_compiled_decoding_gives_the_dynamic_replies(tokenizer):
    """`torch.compile` of the decoding forward (static cache) on a CPU: the same greedy replies.
    One batch shape, so one compilation (about a minute on 2 cores)."""
    model = tiny_model(tokenizer, seed=6)
    dynamic = _evaluator(tokenizer, _config(ROWS))
    compiled = _evaluator(tokenizer, _config(ROWS))
    compiled.cache_implementation, compiled.compile_forward = STATIC, True
    questions = [e.question for e in dynamic.examples]
    assert compiled.generate(model, SYSTEM, questions) == dynamic.generate(model, SYSTEM, questions)
