"""The warmed student (issue 25): the format-rule registry, its warm-up / evaluation split, the
generated rows, the warm-up itself on a tiny model (real SFTTrainer, merge, cache), the compliance
measurement and the `nslora student` command. All on tiny models: seconds, not minutes."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from nslora_plugin.apps.student.rules import (
    EVAL,
    EVAL_RULES,
    KINDS,
    RULES,
    WARMUP,
    WARMUP_RULES,
    get_rule,
    make_questions,
    make_warmup_rows,
    surface_strings_in,
)
from nslora_plugin.apps.student.warmup import (
    MARKER,
    WarmupSettings,
    cache_key,
    ensure_warmed_student,
    is_warmed_student,
    model_fingerprint,
    read_marker,
    student_folder,
    warm_student,
    warmup_dataset_rows,
)

TINY_SETTINGS = WarmupSettings(rows=16, steps=2, batch_size=4, lora_r=4, max_length=256)


def _all_text(rows: list[dict]) -> str:
    return "\n".join(f"{r['system_prompt'] or ''}\n{r['question']}\n{r['answer']}" for r in rows)


# ------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------


def test_both_families_cover_every_kind_with_several_phrasings():
    for family, rules in ((WARMUP, WARMUP_RULES), (EVAL, EVAL_RULES)):
        assert {r.kind for r in rules} == set(KINDS), family
        assert all(r.family == family for r in rules)
        assert all(len(set(r.phrasings)) >= 3 for r in rules)
    assert get_rule("answer_line").family == EVAL
    with pytest.raises(KeyError, match="no format rule"):
        get_rule("nope")


def test_no_surface_string_is_shared_between_the_families():
    warm = {s.casefold() for r in WARMUP_RULES for s in r.surface}
    evaluation = {s.casefold() for r in EVAL_RULES for s in r.surface}
    assert warm and evaluation and not warm & evaluation
    # ... and no family's definitions (phrasings) borrow the other's markers, wrappers or keys
    eval_text = "\n".join(p for r in EVAL_RULES for p in r.phrasings)
    warm_text = "\n".join(p for r in WARMUP_RULES for p in r.phrasings)
    assert surface_strings_in(eval_text, WARMUP_RULES) == []
    assert surface_strings_in(warm_text, EVAL_RULES) == []


@pytest.mark.parametrize("rule_set", ["generated", "generated-v2", "fixed"])
@pytest.mark.parametrize("rows,seed", [(WarmupSettings().rows, WarmupSettings().seed), (3000, 1)])
def test_no_evaluation_surface_string_appears_anywhere_in_the_warmup_data(rows, seed, rule_set):
    """System prompts, questions and replies of the warm-up rows: none carries an evaluation rule's
    marker, wrapper, JSON key, prefix, bullet symbol or unit."""
    from nslora_plugin.apps.student.generated import generated_warmup_rules

    rules = {"generated": generated_warmup_rules(seed), "fixed": WARMUP_RULES,
             "generated-v2": generated_warmup_rules(seed, version=2)}[rule_set]
    data = make_warmup_rows(rows, seed=seed, rules=rules)
    assert {r["rule"] for r in data if r["rule"]} <= {r.name for r in rules}
    assert surface_strings_in(_all_text(data), EVAL_RULES) == []
    # the rows the trainer sees are the same text
    if seed == WarmupSettings().seed:
        settings = WarmupSettings(rule_set=rule_set)
        trained = "\n".join(m["content"] for row in warmup_dataset_rows(settings)
                            for m in row["prompt"] + row["completion"])
        assert surface_strings_in(trained, EVAL_RULES) == []
        assert trained == "\n".join(m["content"] for row in warmup_dataset_rows(settings)
                                    for m in row["prompt"] + row["completion"])


def test_generated_rules_cover_every_kind_and_share_nothing_with_the_evaluation_family():
    from nslora_plugin.apps.student.generated import generated_warmup_rules

    rules = generated_warmup_rules()
    assert rules == generated_warmup_rules()
    assert [r.surface for r in rules] == [r.surface for r in generated_warmup_rules()]  # deterministic
    assert {r.kind for r in rules} == set(KINDS) and all(r.family == WARMUP for r in rules)
    assert len({r.name for r in rules}) == len(rules) > 4 * len(WARMUP_RULES)
    assert all(len(set(r.phrasings)) >= 3 for r in rules)
    evaluation = {s.casefold() for r in EVAL_RULES for s in r.surface}
    assert not {s.casefold() for r in rules for s in r.surface} & evaluation
    text = "\n".join(p for r in rules for p in r.phrasings) + "\n" + "\n".join(r.name for r in rules)
    assert surface_strings_in(text, EVAL_RULES) == []
    # another seed draws other instances
    assert [r.surface for r in generated_warmup_rules(1)] != [r.surface for r in rules]


def test_the_default_generated_rules_are_drawn_as_when_the_student_was_built():
    """The default student's cache key covers its rule set only through `GENERATED_VERSION`: the
    version-1 draw must stay exactly what it was when that student was built (a digest of names,
    surfaces and phrasings taken then). Version 2 draws other rules, more of the kinds version 1
    drew few of."""
    import hashlib

    from nslora_plugin.apps.student.generated import GENERATED_VERSION, generated_warmup_rules

    first = generated_warmup_rules(0)
    digest = hashlib.sha256(json.dumps([(r.name, r.surface, r.phrasings) for r in first]).encode())
    assert digest.hexdigest()[:16] == "6f7f71248fc38fea"
    assert len(first) == 87 and GENERATED_VERSION == 1
    wider = generated_warmup_rules(0, version=2)
    for kind in ("wrapper", "prefix", "bullets"):
        assert sum(r.kind == kind for r in wider) > sum(r.kind == kind for r in first), kind
    with pytest.raises(ValueError, match="version must be one of"):
        generated_warmup_rules(0, version=7)


def test_generated_rules_refuse_a_vocabulary_that_touches_the_evaluation_family(monkeypatch):
    import nslora_plugin.apps.student.generated as generated

    # a word of the evaluation family anywhere in the vocabulary fails every seed, drawn or not
    monkeypatch.setattr(generated, "_PREFIXES", generated._PREFIXES + ("My take:",))
    assert generated.vocabulary_clashes() == [("My take:", "take")]
    with pytest.raises(ValueError, match="vocabulary words .*My take:"):
        generated.generated_warmup_rules(per_kind={"marker": 1})
    monkeypatch.undo()
    # a drawn instance that composes an evaluation string ("Final" + ":") is refused by name
    monkeypatch.setattr(generated, "_MARK_WORDS", ("Fin",))
    monkeypatch.setattr(generated, "_MARK_SEPS", ("al:",))
    with pytest.raises(ValueError, match="gen_mar_0 shares"):
        generated.generated_warmup_rules(per_kind={"marker": 1})


def test_generated_rules_build_for_any_seed():
    """The seed is a warm-up setting (`--seed`): no seed may draw a word the evaluation family
    owns (a vocabulary word like "Takeaway" holds "take", of `Quick take:`, and once failed 78 of
    200 seeds)."""
    import nslora_plugin.apps.student.generated as generated

    assert generated.vocabulary_clashes() == []
    for seed in range(60):
        assert len(generated.generated_warmup_rules(seed)) == sum(generated.DEFAULT_PER_KIND.values())


@pytest.mark.parametrize("version", [1, 2])
def test_generated_rules_transforms_obey_their_checkers(version):
    from nslora_plugin.apps.student.generated import generated_warmup_rules

    questions = make_questions(240, seed=3)
    loose = 0
    for rule in generated_warmup_rules(version=version):
        items = [q for q in questions if rule.applies_to(q)]
        assert len(items) >= 40, rule.name
        for item in items:
            reply = rule.apply(item)
            assert rule.check(reply), (rule.name, rule.surface, item.question, reply)
        # a plain reply does not obey the rule by chance (the loosest caps, e.g. 120 characters,
        # fit the shorter plain replies: 102 of these 240)
        plain = [rule.check(item.text) for item in items]
        if rule.kind == "length":
            loose += sum(plain) >= 0.5 * len(items)
        else:
            assert not any(plain), rule.name
    # most caps bind; version 2 also draws a cap of 150 characters, which most plain replies meet
    assert loose <= (version - 1), loose


def test_surface_search_finds_what_it_should():
    assert surface_strings_in("blah\nanswer: 4", EVAL_RULES) == [("answer_line", "Answer:")]
    assert surface_strings_in("it is 12 UNITS.", EVAL_RULES) == [("units_unit", "units")]
    assert surface_strings_in("a unit of 12", EVAL_RULES) == []  # whole words only for codes
    assert ("ea_unit", "ea") not in surface_strings_in("each year", WARMUP_RULES)


@pytest.mark.parametrize("name", sorted(RULES))
def test_transform_obeys_the_checker_and_the_plain_reply_does_not(name):
    rule = get_rule(name)
    items = [q for q in make_questions(240, seed=3) if rule.applies_to(q)]
    assert len(items) >= 40
    kinds = {q.kind for q in items}
    assert kinds == ({"arithmetic", "lookup"} if rule.needs_count else {"arithmetic", "lookup", "definition"})
    for item in items:
        reply = rule.apply(item)
        assert rule.check(reply), (name, item.question, reply)
        assert not rule.check(item.text), (name, item.text)


def test_answer_format_regex_finds_the_answer():
    import re

    item = make_questions(1, seed=9, kinds=("arithmetic",))[0]
    for rule in WARMUP_RULES + EVAL_RULES:
        if rule.answer_format:
            found = list(re.finditer(rule.answer_format, rule.apply(item), flags=re.MULTILINE))
            assert found and found[-1].group(1).strip() == item.answer, rule.name


# ------------------------------------------------------------------------------------------------
# Generated rows
# ------------------------------------------------------------------------------------------------


def test_rows_are_deterministic_and_mix_rules_with_neutral_repeats():
    rows = make_warmup_rows(300, seed=0)
    assert rows == make_warmup_rows(300, seed=0)
    assert rows != make_warmup_rows(300, seed=1)
    assert make_questions(50, seed=4) == make_questions(50, seed=4)
    assert len(rows) == 300 and len({r["id"] for r in rows}) == 300
    stated = [r for r in rows if r["rule"]]
    neutral = [r for r in rows if r["rule"] is None]
    assert len(neutral) == round(300 * 0.35)
    assert {r["rule"] for r in stated} == {r.name for r in WARMUP_RULES}
    assert {r["kind"] for r in rows} == {"arithmetic", "lookup", "definition"}
    # every stated row's reply obeys its rule; neutral rows repeat stated questions, plainly
    for r in stated:
        assert get_rule(r["rule"]).check(r["answer"])
        assert r["system_prompt"]
    questions = {r["question"] for r in stated}
    distinctive = [r for r in WARMUP_RULES + EVAL_RULES
                   if r.kind in ("marker", "prefix", "wrapper", "json", "bullets", "units")]
    for r in neutral:
        assert r["question"] in questions
        assert not any(rule.check(r["answer"]) for rule in distinctive)
    assert None in {r["system_prompt"] for r in neutral}  # some rows use the template's default


def test_rows_refuse_evaluation_rules():
    with pytest.raises(ValueError, match="warm-up rules only"):
        make_warmup_rows(10, rules=EVAL_RULES)


# ------------------------------------------------------------------------------------------------
# The warm-up on a tiny model
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_base(tokenizer, tmp_path_factory) -> Path:
    from tiny import tiny_model

    folder = tmp_path_factory.mktemp("student") / "tiny-base"
    tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def warmed(tiny_base):
    cache = tiny_base.parent / "cache"
    result = warm_student(tiny_base, TINY_SETTINGS, cache_dir=cache, log=lambda m: None)
    return result, cache


def test_warmup_trains_merges_and_saves_a_loadable_folder(tiny_base, warmed):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, cache = warmed
    assert result.built and result.path.is_dir() and result.base == tiny_base
    assert result.path.parent == cache / "students" and result.path.name.startswith("tiny-base-warm-")
    assert is_warmed_student(result.path, result.key)
    marker = read_marker(result.path)
    assert marker["settings"]["steps"] == 2 and marker["key"] == result.key
    assert not (result.path / "adapter_config.json").exists()  # merged, not an adapter
    model = AutoModelForCausalLM.from_pretrained(str(result.path))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    changed = [n for n, p in model.state_dict().items()
               if not torch.equal(p, base.state_dict()[n])]
    assert changed and all("lora" not in n for n in model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(str(result.path))
    ids = tokenizer("Hello", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=2, do_sample=False).shape[1] >= ids["input_ids"].shape[1]
    assert not list(result.path.parent.glob(".*partial*"))  # no staging left behind


def test_second_call_hits_the_cache(tiny_base, warmed):
    result, cache = warmed
    weights = result.path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = warm_student(tiny_base, TINY_SETTINGS, cache_dir=cache, log=lambda m: None)
    assert not again.built and again.path == result.path and again.key == result.key
    assert weights.stat().st_mtime_ns == before
    assert ensure_warmed_student(tiny_base, TINY_SETTINGS, cache_dir=cache, log=lambda m: None) == result.path
    assert student_folder(tiny_base, TINY_SETTINGS, cache_dir=cache) == result.path


def test_cache_key_follows_settings_base_and_registry(tiny_base, tokenizer, tmp_path, monkeypatch):
    from dataclasses import replace

    from tiny import tiny_model

    fp = model_fingerprint(tiny_base)
    key = cache_key(TINY_SETTINGS, fp)
    assert key == cache_key(TINY_SETTINGS, fp) and len(key) == 16
    changes = dict(rows=17, steps=3, batch_size=2, learning_rate=1e-4, lora_r=8, seed=1,
                   neutral_share=0.2, max_length=200)
    keys = {cache_key(replace(TINY_SETTINGS, **{k: v}), fp) for k, v in changes.items()}
    assert len(keys) == len(changes) and key not in keys
    other = tmp_path / "other-base"
    tiny_model(tokenizer, seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    assert model_fingerprint(other) != fp
    import nslora_plugin.apps.student.warmup as warmup

    monkeypatch.setattr(warmup, "REGISTRY_VERSION", 999)
    assert cache_key(TINY_SETTINGS, fp) != key
    monkeypatch.undo()
    # the rule set is in the key; the fixed set keeps the key it had before rule sets existed
    import dataclasses
    import hashlib

    fixed = replace(TINY_SETTINGS, rule_set="fixed")
    old = {"settings": {k: v for k, v in dataclasses.asdict(fixed).items() if k != "rule_set"},
           "base": fp, "registry": warmup.REGISTRY_VERSION, "recipe": warmup.RECIPE_VERSION}
    assert cache_key(fixed, fp) == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    fixed_key = cache_key(fixed, fp)
    assert fixed_key != key
    # generated keys: the version, with the rule set named "generated" as when only one existed
    for rule_set, version in (("generated", 1), ("generated-v2", 2)):
        drawn = replace(TINY_SETTINGS, rule_set=rule_set)
        then = {"settings": {**dataclasses.asdict(drawn), "rule_set": "generated"}, "base": fp,
                "registry": warmup.REGISTRY_VERSION, "recipe": warmup.RECIPE_VERSION,
                "generated": version}
        assert cache_key(drawn, fp) == hashlib.sha256(json.dumps(then, sort_keys=True).encode()).hexdigest()[:16]
    wider = cache_key(replace(TINY_SETTINGS, rule_set="generated-v2"), fp)
    assert wider not in (key, fixed_key)
    monkeypatch.setattr(warmup, "GENERATED_VERSION", 999)
    assert cache_key(TINY_SETTINGS, fp) != key and cache_key(fixed, fp) == fixed_key
    assert cache_key(replace(TINY_SETTINGS, rule_set="generated-v2"), fp) == wider


def test_settings_are_validated():
    with pytest.raises(ValueError, match="steps"):
        WarmupSettings(steps=0)
    with pytest.raises(ValueError, match="neutral_share"):
        WarmupSettings(neutral_share=1.0)
    with pytest.raises(ValueError, match="rule_set must be one of generated, generated-v2, fixed, got 'nope'"):
        WarmupSettings(rule_set="nope")


# ------------------------------------------------------------------------------------------------
# Compliance measurement (smoke, tiny models)
# ------------------------------------------------------------------------------------------------


def test_bootstrap_interval():
    from nslora_plugin.apps.student.compliance import bootstrap_interval

    assert bootstrap_interval([1.0] * 10) == (1.0, 1.0)
    lo, hi = bootstrap_interval([0.0, 1.0] * 20, seed=3)
    assert 0.25 < lo < 0.5 < hi < 0.75


def test_compliance_smoke_on_tiny_models(tiny_base, warmed):
    from rich.console import Console

    from nslora_plugin.apps.student.generated import generated_warmup_rules

    from nslora_plugin.apps.student.compliance import compare_students, render_tables

    result, _ = warmed
    out = compare_students(tiny_base, result.path, rules=EVAL_RULES[:3], items_per_rule=2, neutral=2,
                           nll_rows=2, max_new_tokens=3, batch_size=4, log=lambda m: None)
    for label in ("raw", "warmed"):
        stated = out[label]["stated"]
        assert list(stated) == [r.name for r in EVAL_RULES[:3]]
        assert all(0.0 <= s["rate"] <= 1.0 and s["n"] == 2 for s in stated.values())
        assert out[label]["no_rule"]["any_eval_rule"]["n"] == 2
        # a baked-in rule of either warm-up set would show: the generated rules are checked too
        assert out[label]["no_rule"]["any_generated_rule"]["n"] == 2
        assert {r.name for r in generated_warmup_rules()} <= set(out[label]["no_rule"]["per_rule"])
        assert len(out[label]["nll"]["plain"]) == 2
    assert set(out["nll_change"]) == {"plain"}
    json.dumps(out)  # the benchmark writes it as JSON
    buffer = io.StringIO()
    render_tables(out, Console(file=buffer, width=160))
    assert "answer_line" in buffer.getvalue() and "reference NLL" in buffer.getvalue()
    assert "generated warm-up rule unasked" in buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["student", "--help"], ["student", "build", "--help"],
                                  ["student", "path", "--help"], ["student", "check", "--help"]])
def test_cli_help(argv):
    from nslora_plugin.apps.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    assert "usage: nslora student" in out.getvalue()


def test_cli_path_and_build_use_the_cache(tiny_base, warmed, capsys):
    from nslora_plugin.apps.cli import main

    result, cache = warmed
    options = ["--model", str(tiny_base), "--cache", str(cache), "--rows", "16", "--steps", "2",
               "--batch-size", "4", "--rank", "4"]
    # max_length is not a CLI option: the CLI's settings use the default, so compare with those
    expected = student_folder(tiny_base, WarmupSettings(rows=16, steps=2, batch_size=4, lora_r=4),
                              cache_dir=cache)
    assert main(["student", "path", *options]) == 1  # not built with these exact settings
    assert capsys.readouterr().out.strip() == str(expected)
    assert main(["student", "check", *options]) == 2  # refuses to build silently
    assert "not built yet" in capsys.readouterr().err
    assert main(["student", "build", *options]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(expected)
    assert main(["student", "path", *options]) == 0
    assert (expected / MARKER).is_file() and expected != result.path
    capsys.readouterr()
    assert main(["student", "check", *options, "--items", "1", "--neutral", "1",
                 "--max-new-tokens", "2", "--threads", "1"]) == 0
    shown = capsys.readouterr().out
    assert "Compliance with a stated evaluation rule" in shown and "answer_line" in shown


def test_student_option_picks_raw_for_a_given_model_and_warms_on_request(tiny_base, warmed):
    import argparse

    from nslora_plugin.apps.harness.compare import build_parser
    from nslora_plugin.apps.student.choose import choose_student

    result, cache = warmed
    quiet = {"log": lambda m: None, "settings": TINY_SETTINGS, "cache_dir": cache}
    args = build_parser(argparse.ArgumentParser()).parse_args(["--model", str(tiny_base)])
    assert args.student is None
    assert choose_student(args, **quiet) == (tiny_base, "raw")
    args = build_parser(argparse.ArgumentParser()).parse_args(
        ["--model", str(tiny_base), "--student", "warmed"])
    assert choose_student(args, **quiet) == (result.path, "warmed")
    # the first warm-up (fixed rule set): another folder, whose marker says so
    args = build_parser(argparse.ArgumentParser()).parse_args(
        ["--model", str(tiny_base), "--student", "warmed-fixed"])
    fixed, label = choose_student(args, **quiet)
    assert label == "warmed" and fixed != result.path
    assert read_marker(fixed)["settings"]["rule_set"] == "fixed"
    assert read_marker(result.path)["settings"]["rule_set"] == "generated"
    with pytest.raises(SystemExit):
        build_parser(argparse.ArgumentParser()).parse_args(["--student", "cooked"])
