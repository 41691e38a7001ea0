"""Prompts as data: what an accepted edit adds to the training mix, through the real plugin."""

from __future__ import annotations

from nslora_plugin import NSLoRAConfig
from nslora_plugin.core.registry import make_plugin_manager
from nslora_plugin.core.records import ProbeExample, ProbeReport, ProbeResult

from types import SimpleNamespace

NO_POOL = SimpleNamespace(pool={})  # the part of the run view prompts-as-data reads: no pool here


def res(eid, ok, completion=""):
    return ProbeResult(example_id=eid, completion=completion, rewards={"correctness": float(ok)},
                       reward=float(ok), ref_nll=1.0)


def test_rows_come_from_failures_and_fixed_examples():
    cfg = NSLoRAConfig(editor="constraint", answer_format=r"^Answer: (\d+)$")
    pm = make_plugin_manager(cfg)
    examples = {
        "a": ProbeExample("a", "Q a?", "work\nAnswer: 1", "1"),
        "b": ProbeExample("b", "Q b?", "work\nAnswer: 2", "2"),
        "c": ProbeExample("c", "Q c?", "no format here", "3"),   # its reference breaks the format
        "d": ProbeExample("d", "Q d?", "work\nAnswer: 4", "4"),   # passed already: nothing to add
    }
    before = ProbeReport(0, 0, [res("a", 0), res("b", 0), res("c", 0), res("d", 1)])
    after = ProbeReport(0, 1, [res("a", 1, "mine\nAnswer: 1"), res("b", 0), res("c", 0), res("d", 1)])
    rows = [r for part in pm.hook.nslora_augment_examples(
        prompt="p", report=after, before=before, examples=examples, config=cfg, run=NO_POOL) for r in part or []]
    got = sorted((r["example_id"], r["source"], r["messages"][1]["content"]) for r in rows)
    assert got == [("a", "reference", "work\nAnswer: 1"), ("a", "self", "mine\nAnswer: 1"),
                   ("b", "reference", "work\nAnswer: 2")]
    assert all(r["messages"][0] == {"role": "user", "content": examples[r["example_id"]].question}
               for r in rows)
    assert all(r["prompt_version"] == 1 for r in rows)


def test_holdout_share_keeps_a_seeded_part_of_the_probe_out_of_training():
    from nslora_plugin.builtins.augment import holdout_ids

    ids = [f"e{i}" for i in range(10)]
    held = holdout_ids(ids, 0.3, seed=4)
    assert len(held) == 3 and held <= set(ids)
    assert holdout_ids(list(reversed(ids)), 0.3, seed=4) == held  # order-free, stable under seed
    assert holdout_ids(ids, 0.0, seed=4) == set()

    cfg = NSLoRAConfig(editor="constraint", augment_holdout_share=0.3, seed=4)
    pm = make_plugin_manager(cfg)
    examples = {i: ProbeExample(i, f"Q {i}?", f"ref {i}", None) for i in ids}
    before = ProbeReport(0, 0, [res(i, 0) for i in ids])
    after = ProbeReport(0, 1, [res(i, 1, f"mine {i}") for i in ids])
    rows = [r for part in pm.hook.nslora_augment_examples(
        prompt="p", report=after, before=before, examples=examples, config=cfg, run=NO_POOL)
        for r in part or []]
    sources = {r["example_id"] for r in rows}
    assert sources == set(ids) - held  # every failure contributes, except the held-back ones
