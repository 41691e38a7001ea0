"""Does a student follow a stated format? Measured on the evaluation rules, raw vs warmed.

For each model (greedy decoding, one batch pass per prompt set):

- **stated**: for every evaluation rule, `items_per_rule` fresh questions under the system prompt
  `"You are a helpful assistant. <rule, phrasings in turn>"`; compliance is the rule's checker on
  the reply, with a bootstrap interval over items; `answer kept` is whether the reply still states
  the right answer (`core.answers.answer_in_reply`);
- **no rule**: `neutral_items` arithmetic and look-up questions under `"You are a helpful
  assistant."` alone; how often a reply obeys some rule nobody asked for (the distinctive kinds:
  markers, prefixes, wrappers, JSON, bullets, units), per family (evaluation, the fixed warm-up
  rules, the generated ones of seed 0), so a warm-up rule baked into the weights shows; and
  answer accuracy on the same replies;
- **reference NLL**: mean NLL per token of neutral references under the neutral prompt: GSM8K test
  answers when a file is given (text the warm-up never saw), and the plain replies of the no-rule
  questions.

`compare_students(raw, warmed)` runs both and returns one JSON-able dict; `render_tables` prints
it. Questions come from `rules.make_questions` with seeds of their own (never the warm-up's).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nslora_plugin.apps.student.generated import generated_warmup_rules
from nslora_plugin.apps.student.rules import (
    EVAL_PERSONA,
    EVAL_RULES,
    WARMUP_RULES,
    FormatRule,
    Plain,
    make_questions,
    rule_system_prompt,
)

__all__ = [
    "DISTINCTIVE_KINDS",
    "bootstrap_interval",
    "compare_students",
    "generate_replies",
    "measure_student",
    "reference_nlls",
    "render_tables",
]

#: Rule kinds a reply does not satisfy by accident (casing and length caps it can).
DISTINCTIVE_KINDS = ("marker", "prefix", "wrapper", "json", "bullets", "units")
#: Question seeds of the measurements, far from the warm-up's (`WarmupSettings.seed`, 0 by default).
STATED_SEED = 10_001
NEUTRAL_SEED = 20_002

Log = Callable[[str], object]


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------


def bootstrap_interval(values: Sequence[float], *, reps: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling items)."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(reps))
    lo = means[int((1.0 - level) / 2 * (reps - 1))]
    hi = means[int((1.0 + level) / 2 * (reps - 1))]
    return (lo, hi)


def _summary(values: Sequence[float], seed: int = 0) -> dict[str, Any]:
    vals = [float(v) for v in values]
    lo, hi = bootstrap_interval(vals, seed=seed)
    return {"rate": sum(vals) / len(vals) if vals else float("nan"), "ci": [lo, hi], "n": len(vals)}


# ------------------------------------------------------------------------------------------------
# Model I/O
# ------------------------------------------------------------------------------------------------


def _load(folder: str | Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    return model, tokenizer


def generate_replies(model: Any, tokenizer: Any, chats: Sequence[tuple[str | None, str]], *,
                     max_new_tokens: int = 128, batch_size: int = 16,
                     on_batch: Callable[[int], object] | None = None) -> list[str]:
    """Greedy replies to `(system prompt or None, user message)` chats, batched by prompt length
    (left padding), in the order given. `on_batch(done)` is called after each batch."""
    import torch

    from nslora_plugin.core.chat import chat_messages, render

    texts = [render(tokenizer, chat_messages(s, q), generation_prompt=True) for s, q in chats]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    replies: list[str] = [""] * len(texts)
    side = tokenizer.padding_side
    device = next(model.parameters()).device
    done = 0
    for start in range(0, len(order), max(batch_size, 1)):
        picked = order[start:start + batch_size]
        tokenizer.padding_side = "left"
        try:
            enc = tokenizer([texts[i] for i in picked], return_tensors="pt", padding=True,
                            add_special_tokens=False)
        finally:
            tokenizer.padding_side = side
        enc = {k: v.to(device) for k, v in enc.items()}
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
        new = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, text in zip(picked, new):
            replies[i] = text.strip()
        done += len(picked)
        if on_batch is not None:
            on_batch(done)
    return replies


def reference_nlls(model: Any, tokenizer: Any, rows: Sequence[tuple[str | None, str, str]], *,
                   batch_size: int = 8) -> list[float]:
    """Mean NLL per reference token (end-of-turn included) of `(system, question, reference)`."""
    import torch
    import torch.nn.functional as F

    from nslora_plugin.core.chat import chat_messages, render

    encoded: list[tuple[list[int], int]] = []
    for system, question, reference in rows:
        prefix = render(tokenizer, chat_messages(system, question), generation_prompt=True)
        full = render(tokenizer, chat_messages(system, question, reference), generation_prompt=False)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        start = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        encoded.append((ids, min(start, len(ids) - 1)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.no_grad():
        for s in range(0, len(encoded), max(batch_size, 1)):
            chunk = encoded[s:s + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for i, (ids, start) in enumerate(chunk):
                input_ids[i, :len(ids)] = torch.tensor(ids)
                attention[i, :len(ids)] = 1
                labels[i, start:len(ids)] = torch.tensor(ids[start:])
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            logits, target = logits[:, :-1].float(), labels[:, 1:].to(device)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                   ignore_index=-100, reduction="none").view(target.shape)
            mask = (target != -100).float()
            out.extend(float(v) for v in (loss * mask).sum(1) / mask.sum(1).clamp(min=1))
    return out


# ------------------------------------------------------------------------------------------------
# What is asked
# ------------------------------------------------------------------------------------------------


def stated_items(rules: Sequence[FormatRule], items_per_rule: int, seed: int = 0
                 ) -> list[tuple[FormatRule, int, Plain]]:
    """`(rule, phrasing index, question)` for each rule: `items_per_rule` questions it applies to,
    each question used by one rule only, phrasings taken in turn."""
    pool = make_questions(max(items_per_rule * len(rules) * 3, 16), seed=STATED_SEED + seed)
    used: set[int] = set()
    plan: list[tuple[FormatRule, int, Plain]] = []
    for rule in rules:
        taken = 0
        for i, item in enumerate(pool):
            if taken == items_per_rule:
                break
            if i in used or not rule.applies_to(item):
                continue
            used.add(i)
            plan.append((rule, taken, item))
            taken += 1
        if taken < items_per_rule:  # pragma: no cover - the pool is three times the need
            raise RuntimeError(f"not enough questions for rule {rule.name}")
    return plan


def neutral_items(n: int, seed: int = 0) -> list[Plain]:
    """Arithmetic and look-up questions (answers gradable) for the no-rule measurements."""
    return make_questions(n, seed=NEUTRAL_SEED + seed, kinds=("arithmetic", "lookup"))


def _correct(item: Plain, reply: str) -> bool:
    from nslora_plugin.core.answers import answers_match, extract_final_answer, phrase_in_text

    if item.numeric:
        return answers_match(extract_final_answer(reply), item.answer)
    return phrase_in_text(item.answer, reply)


def _gsm8k_rows(path: str | Path | None, n: int) -> list[tuple[str | None, str, str]]:
    if not path or n <= 0 or not Path(path).is_file():
        return []
    from nslora_plugin.core.data import read_jsonl

    rows = read_jsonl(path)[:n]
    return [(EVAL_PERSONA, str(r["question"]), str(r["answer"])) for r in rows]


# ------------------------------------------------------------------------------------------------
# Measure
# ------------------------------------------------------------------------------------------------


def measure_student(folder: str | Path, *, rules: Sequence[FormatRule] = EVAL_RULES,
                    items_per_rule: int = 16, neutral: int = 32, nll_rows: int = 32,
                    gsm8k: str | Path | None = None, seed: int = 0, max_new_tokens: int = 128,
                    batch_size: int = 16, label: str = "", log: Log = print,
                    keep_replies: int = 2, threads: int | None = None) -> dict[str, Any]:
    """One model's measurements (see the module docstring); `keep_replies` example replies per
    rule are kept for inspection; `threads`: see `warmup.cpu_threads`."""
    from nslora_plugin.apps.student.warmup import cpu_threads

    with cpu_threads(threads, log) as used:
        out = _measure(folder, rules=rules, items_per_rule=items_per_rule, neutral=neutral,
                       nll_rows=nll_rows, gsm8k=gsm8k, seed=seed, max_new_tokens=max_new_tokens,
                       batch_size=batch_size, label=label, log=log, keep_replies=keep_replies)
    out["threads"] = used
    return out


def _measure(folder: str | Path, *, rules: Sequence[FormatRule], items_per_rule: int, neutral: int,
             nll_rows: int, gsm8k: str | Path | None, seed: int, max_new_tokens: int,
             batch_size: int, label: str, log: Log, keep_replies: int) -> dict[str, Any]:
    started = time.monotonic()
    model, tokenizer = _load(folder)
    plan = stated_items(rules, items_per_rule, seed)
    plain = neutral_items(neutral, seed) if neutral > 0 else []
    chats = [(rule_system_prompt(rule, k), item.question) for rule, k, item in plan]
    chats += [(EVAL_PERSONA, item.question) for item in plain]
    total = len(chats)
    step = max(total // 8, 1)
    marks = {"next": step}

    def progress(done: int) -> None:
        if done >= marks["next"] or done == total:
            log(f"  {label or folder}: {done}/{total} replies ({time.monotonic() - started:.0f} s)")
            marks["next"] = done + step

    replies = generate_replies(model, tokenizer, chats, max_new_tokens=max_new_tokens,
                               batch_size=batch_size, on_batch=progress)
    stated, loose = replies[:len(plan)], replies[len(plan):]

    per_rule: dict[str, Any] = {}
    everything: list[float] = []
    for rule in rules:
        rows = [(k, item, reply) for (r, k, item), reply in zip(plan, stated) if r is rule]
        ok = [float(rule.check(reply)) for _, _, reply in rows]
        kept = [float(_answer_anywhere(item, reply)) for _, item, reply in rows]
        everything += ok
        per_rule[rule.name] = {"kind": rule.kind, **_summary(ok, seed), "answer_kept": _mean(kept),
                               "examples": [{"system": rule_system_prompt(rule, k),
                                             "question": item.question, "reply": reply}
                                            for k, item, reply in rows[:keep_replies]]}

    no_rule: dict[str, Any] = {}
    if plain:
        generated = generated_warmup_rules()
        for family, family_rules in (("eval", rules), ("warmup", WARMUP_RULES), ("generated", generated)):
            distinct = [r for r in family_rules if r.kind in DISTINCTIVE_KINDS]
            any_ok = [float(any(r.check(reply) for r in distinct if r.applies_to(item)))
                      for item, reply in zip(plain, loose)]
            no_rule[f"any_{family}_rule"] = _summary(any_ok, seed)
        no_rule["per_rule"] = {r.name: _mean([float(r.check(reply)) for item, reply in zip(plain, loose)
                                              if r.applies_to(item)])
                               for r in list(rules) + list(WARMUP_RULES) + list(generated)}
        no_rule["examples"] = [{"question": item.question, "reply": reply}
                               for item, reply in list(zip(plain, loose))[:keep_replies]]
    accuracy = _summary([float(_correct(item, reply)) for item, reply in zip(plain, loose)], seed) \
        if plain else None

    nll: dict[str, Any] = {}
    gsm = _gsm8k_rows(gsm8k, nll_rows)
    if gsm:
        nll["gsm8k"] = reference_nlls(model, tokenizer, gsm)
    if plain and nll_rows > 0:
        nll["plain"] = reference_nlls(model, tokenizer,
                                      [(EVAL_PERSONA, item.question, item.text) for item in plain[:nll_rows]])
    del model
    return {"model": str(folder), "stated": per_rule, "stated_overall": _summary(everything, seed),
            "no_rule": no_rule, "accuracy": accuracy, "nll": nll,
            "seconds": round(time.monotonic() - started, 1)}


def _answer_anywhere(item: Plain, reply: str) -> bool:
    from nslora_plugin.core.answers import answer_in_reply

    return answer_in_reply(item.answer, reply)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def compare_students(raw: str | Path, warmed: str | Path, *, rules: Sequence[FormatRule] = EVAL_RULES,
                     items_per_rule: int = 16, neutral: int = 32, nll_rows: int = 32,
                     gsm8k: str | Path | None = None, seed: int = 0, max_new_tokens: int = 128,
                     batch_size: int = 16, log: Log = print,
                     threads: int | None = None) -> dict[str, Any]:
    """Raw vs warmed on the same prompts: the two `measure_student` results plus the NLL
    differences (warmed - raw, paired over rows, with bootstrap intervals)."""
    from nslora_plugin.trainer.precision import cpu_model_name

    settings = {"rules": [r.name for r in rules], "items_per_rule": items_per_rule,
                "neutral": neutral, "nll_rows": nll_rows, "gsm8k": str(gsm8k) if gsm8k else None,
                "seed": seed, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
                "decoding": "greedy", "persona": EVAL_PERSONA}
    out: dict[str, Any] = {"settings": settings, "cpu": cpu_model_name(),
                           "cores": os.cpu_count()}
    for label, folder in (("raw", raw), ("warmed", warmed)):
        log(f"nslora: measuring the {label} student ({folder}) ...")
        out[label] = measure_student(folder, rules=rules, items_per_rule=items_per_rule,
                                     neutral=neutral, nll_rows=nll_rows, gsm8k=gsm8k, seed=seed,
                                     max_new_tokens=max_new_tokens, batch_size=batch_size,
                                     label=label, log=log, threads=threads)
    out["nll_change"] = {}
    for name in out["raw"]["nll"]:
        a, b = out["raw"]["nll"][name], out["warmed"]["nll"].get(name, [])
        if a and len(a) == len(b):
            diffs = [y - x for x, y in zip(a, b)]
            out["nll_change"][name] = {"raw": _mean(a), "warmed": _mean(b), "diff": _mean(diffs),
                                       "diff_ci": list(bootstrap_interval(diffs, seed=seed)), "n": len(a)}
    return out


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------


def _fmt(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "-"
    lo, hi = summary["ci"]
    return f"{summary['rate']:.2f} [{lo:.2f}, {hi:.2f}]"


def render_tables(result: dict[str, Any], console: Any = None) -> None:
    """Print the comparison as rich tables: compliance per evaluation rule, then the no-rule,
    accuracy and NLL checks."""
    from rich.console import Console
    from rich.table import Table

    console = console if console is not None else Console()
    raw, warm = result["raw"], result["warmed"]
    n = result["settings"]["items_per_rule"]
    table = Table(title=f"Compliance with a stated evaluation rule ({n} items each, 95% bootstrap "
                        "interval)")
    for col in ("rule", "kind", "raw", "warmed", "answer kept raw", "answer kept warmed"):
        table.add_column(col)
    for name, w in warm["stated"].items():
        r = raw["stated"][name]
        table.add_row(name, w["kind"], _fmt(r), _fmt(w), f"{r['answer_kept']:.2f}",
                      f"{w['answer_kept']:.2f}")
    table.add_row("all evaluation rules", "", _fmt(raw["stated_overall"]), _fmt(warm["stated_overall"]),
                  "", "", style="bold")
    console.print(table)

    checks = Table(title="No rule stated (neutral system prompt), and what the warm-up may cost")
    for col in ("measure", "raw", "warmed"):
        checks.add_column(col)
    if raw["no_rule"]:
        checks.add_row("replies obeying some evaluation rule unasked",
                       _fmt(raw["no_rule"]["any_eval_rule"]), _fmt(warm["no_rule"]["any_eval_rule"]))
        checks.add_row("replies obeying some warm-up rule unasked",
                       _fmt(raw["no_rule"]["any_warmup_rule"]), _fmt(warm["no_rule"]["any_warmup_rule"]))
        checks.add_row("replies obeying some generated warm-up rule unasked",
                       _fmt(raw["no_rule"].get("any_generated_rule")),
                       _fmt(warm["no_rule"].get("any_generated_rule")))
        checks.add_row("answer accuracy (arithmetic, look-ups)", _fmt(raw["accuracy"]),
                       _fmt(warm["accuracy"]))
    for name, c in result.get("nll_change", {}).items():
        lo, hi = c["diff_ci"]
        checks.add_row(f"reference NLL, {name} ({c['n']} rows)", f"{c['raw']:.3f}",
                       f"{c['warmed']:.3f} (change {c['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}])")
    console.print(checks)
    console.print(f"CPU: {result.get('cpu')} ({result.get('cores')} cores, {raw.get('threads')} "
                  f"thread(s)); raw {raw['seconds']:.0f} s, warmed {warm['seconds']:.0f} s",
                  markup=False, highlight=False)
