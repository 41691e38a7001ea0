"""Data in and out: probe examples from any common row shape, chat rows for training, and the
built-in arithmetic word-problem generator used by `nslora demo`.

Accepted row shapes (JSONL file, `datasets.Dataset`, or list of dicts):
- `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}` (last assistant turn
  is the reference),
- `{"question": ..., "answer": ...}` (GSM8K: the final answer follows `#### `),
- `{"prompt": ..., "completion": ...}` (strings or chat lists, as TRL accepts).

Every row needs a non-empty answer (the reference reply, or `final_answer` when given). A system
message in a row is kept on its example (`ProbeExample.system`): every row is probed under the
run's prompt, so the loop refuses one that differs from it rather than drop it without a word.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from nslora_plugin.core.chat import chat_messages
from nslora_plugin.core.answers import extract_final_answer
from nslora_plugin.core.records import ProbeExample


def data_file_problem(path: str | Path) -> str | None:
    """Why `path` cannot be read as a probe / pool file, in the words every adapter uses, or
    None when it is a file."""
    path = Path(path)
    if path.is_file():
        return None
    if path.is_dir():
        return ("it is a folder, not a file; point it at the JSONL file inside (rows with messages, "
                "question/answer or prompt/completion)")
    return f"no such file (relative paths are read from {str(Path.cwd())!r})"


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    problem = data_file_problem(path)
    if problem:
        raise FileNotFoundError(f"data file {str(path)!r}: {problem}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as "
                         "UTF-8") from None
    if text.lstrip().startswith("["):
        raise ValueError(f"{path} holds a JSON array; NSLoRA reads JSONL, one JSON object per line "
                         "(e.g. `python -c \"import json,sys; [print(json.dumps(r)) for r in "
                         "json.load(sys.stdin)]\" < in.json > out.jsonl`)")
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i} is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{i} is a JSON {type(row).__name__}, not an object with keys")
            rows.append(row)
    return rows


def _content(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # chat-style list
        return "\n".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    return str(value)


def row_to_example(row: dict[str, Any], index: int, id_prefix: str = "") -> ProbeExample:
    """One probe example from any accepted row shape (see module docstring); a row without an
    `id` gets `id_prefix` + its index."""
    rid = str(row["id"]) if "id" in row else f"{id_prefix}{index}"
    system: str | None = None
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise ValueError(f"row {rid}: 'messages' must be a list of {{'role', 'content'}} "
                             f"objects, got {type(msgs).__name__}")
        for m in msgs:
            if not isinstance(m.get("content"), str):
                raise ValueError(f"row {rid}: a {m.get('role', '?')!r} message has no text 'content'")
        users = [m["content"] for m in msgs if m.get("role") == "user"]
        assistants = [m["content"] for m in msgs if m.get("role") == "assistant"]
        if not users or not assistants:
            raise ValueError(f"row {rid}: 'messages' needs a user and an assistant turn")
        reference = assistants[-1]
        question = users[-1]
        systems = [m["content"] for m in msgs if m.get("role") == "system"]
        system = systems[-1] if systems else None
        where = "the last assistant message"
    elif "question" in row and "answer" in row:
        for key in ("question", "answer"):
            if row[key] is None:
                raise ValueError(f"row {rid}: {key!r} is null; give the text (or drop the row)")
        question, reference = str(row["question"]), str(row["answer"])
        where = "'answer'"
    elif "prompt" in row and "completion" in row:
        question, reference = _content(row["prompt"]), _content(row["completion"])
        if isinstance(row["prompt"], list):  # a chat-style prompt may carry a system message
            systems = [m.get("content") for m in row["prompt"]
                       if isinstance(m, dict) and m.get("role") == "system"]
            system = str(systems[-1]) if systems else None
            question = "\n".join(str(m.get("content", "")) for m in row["prompt"]
                                  if isinstance(m, dict) and m.get("role") != "system")
        where = "'completion'"
    else:
        raise ValueError(f"row {rid} has none of the accepted shapes: messages, question/answer, "
                         f"prompt/completion (keys: {sorted(row)})")
    final = row.get("final_answer")
    if not reference.strip() or (final is not None and not str(final).strip()):
        what = where if not reference.strip() else "'final_answer'"
        raise ValueError(f"row {rid}: the answer ({what}) is empty; every probe row needs its "
                         "reference answer, or nothing it is scored against can be right (give the "
                         "answer, or drop the row)")
    answer = str(final) if final is not None else extract_final_answer(reference)
    return ProbeExample(id=rid, question=question, reference=reference, answer=answer,
                        system=system)


def load_probe_examples(source: Any, limit: int | None = None, seed: int = 0,
                        id_prefix: str = "") -> list[ProbeExample]:
    """Probe examples from a path (JSONL), a `datasets.Dataset`, or a list of rows / examples.
    More rows than `limit` are subsampled with `seed`, so the probe set is stable across runs."""
    where = f"{source}: " if isinstance(source, (str, Path)) else ""
    if isinstance(source, (str, Path)):
        rows: Sequence[Any] = read_jsonl(source)
        if not rows:
            raise ValueError(f"{source} has no rows; a probe or pool file needs JSONL rows with "
                             "messages, question/answer or prompt/completion")
    elif hasattr(source, "to_list"):
        rows = source.to_list()
    else:
        rows = list(source)
    try:
        examples = [r if isinstance(r, ProbeExample) else row_to_example(r, i, id_prefix)
                    for i, r in enumerate(rows)]
    except ValueError as exc:
        raise ValueError(f"{where}{exc}") from None
    if limit is not None and len(examples) > limit:
        examples = random.Random(seed).sample(examples, limit)
    return examples



def fit_to_length(examples: Sequence[ProbeExample], tokenizer: Any,
                  max_length: int) -> list[ProbeExample]:
    """Probe / pool rows cut to `max_length` tokens (question at most half of it, the reference
    the rest), each cut named in one warning: one oversized row must not make the probe try to
    allocate a batch the size of the longest row."""
    import dataclasses
    import logging

    log = logging.getLogger("nslora")
    out = []
    for ex in examples:
        q = tokenizer(ex.question, add_special_tokens=False)["input_ids"]
        r = tokenizer(ex.reference, add_special_tokens=False)["input_ids"]
        if len(q) + len(r) <= max_length:
            out.append(ex)
            continue
        q_keep = min(len(q), max_length // 2)
        r_keep = max(max_length - q_keep, 1)
        log.warning("NSLoRA: probe row %s has %d tokens (question %d, reference %d), more than "
                    "max_length=%d; cut to question %d and reference %d tokens", ex.id,
                    len(q) + len(r), len(q), len(r), max_length, q_keep, min(len(r), r_keep))
        out.append(dataclasses.replace(ex, question=tokenizer.decode(q[:q_keep]),
                                       reference=tokenizer.decode(r[:r_keep])))
    return out


def split_gsm8k(answer: str) -> tuple[str, str]:
    """(worked solution without calculator annotations, final answer as written) of a GSM8K
    answer `... #### n`."""
    body, _, final = answer.partition("####")
    return re.sub(r"<<[^>]*>>", "", body).strip(), final.strip()


def gsm8k_reference(answer: str, answer_line: str = "Answer: {n}") -> str:
    """A GSM8K answer with calculator annotations removed and the final line rewritten."""
    body, final = split_gsm8k(answer)
    return f"{body}\n{answer_line.format(n=final)}"


# ------------------------------------------------------------------ arithmetic word problems
_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elif", "Finn", "Gita", "Hugo", "Ines", "Jomo", "Kira",
          "Liam", "Mina", "Noor", "Omar", "Pia", "Quinn", "Ravi", "Sara", "Tariq"]
_ITEMS = ["apples", "stickers", "marbles", "pencils", "coins", "cookies", "stamps", "shells",
          "books", "cards"]


def _problem(rng: random.Random) -> tuple[str, str, int]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    kind = rng.randrange(4)
    a, b = rng.randint(3, 40), rng.randint(2, 20)
    if kind == 0:
        c = rng.randint(1, a + b - 1)
        q = (f"{name} has {a} {item}. {name} gets {b} more and then gives away {c}. "
             f"How many {item} does {name} have now?")
        steps, n = f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}.", a + b - c
    elif kind == 1:
        q = f"{name} buys {a} boxes with {b} {item} in each box. How many {item} is that in total?"
        steps, n = f"{a} * {b} = {a * b}.", a * b
    elif kind == 2:
        total = a * b
        q = f"{name} shares {total} {item} equally among {b} friends. How many {item} does each friend get?"
        steps, n = f"{total} / {b} = {a}.", a
    else:
        c = rng.randint(2, 5)
        q = (f"{name} has {a} {item} and buys {c} packs of {b} {item}. "
             f"How many {item} does {name} have in total?")
        steps, n = f"{c} * {b} = {c * b}. {a} + {c * b} = {a + c * b}.", a + c * b
    return q, steps, n


def make_word_problems(n: int, seed: int = 0, answer_line: str = "Answer: {n}") -> list[dict[str, Any]]:
    """`n` distinct grade-school arithmetic problems with a worked reference whose last line is
    `answer_line` (the format constraint the demo asks the model to follow)."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        q, steps, value = _problem(rng)
        if q in seen:
            continue
        seen.add(q)
        rows.append({"id": f"wp{len(rows)}", "question": q,
                     "answer": f"{steps}\n{answer_line.format(n=value)}", "final_answer": str(value)})
    return rows


def chat_rows(rows: Iterable[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """Training rows in TRL's conversational form, system prompt first (a row's own
    `system_prompt`, when it has one, else `system_prompt`)."""
    out = []
    for i, row in enumerate(rows):
        ex = row_to_example(row, i)
        prompt = row.get("system_prompt", system_prompt) if isinstance(row, dict) else system_prompt
        out.append({"messages": chat_messages(prompt, ex.question, ex.reference)})
    return out
