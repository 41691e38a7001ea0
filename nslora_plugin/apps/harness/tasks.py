"""Built-in tasks for measuring *why and when* each kind of update helps (`nslora compare`).

A task is training rows, probe rows and held-out rows in one shape (`question` / `answer` /
`final_answer` + `id`), a system prompt, an output-format rule the training replies do not show
(`answer_format`, `format_instruction`, `answer_pattern`, passed to `NSLoRAConfig`), and a rule
that says, for each failure, which kind of update it needs.

Synthetic "facts + format" (`make_facts_task`), right answer known by construction
-------------------------------------------------------------------------------------
- Facts the base model cannot know: fictional countries whose names are built from syllables with
  a seeded RNG, each with a capital (a fictional city), a founder (a fictional person), a founding
  year and a main export. Every name in a task is unique, and no name contains another one, so a
  question about one entity never carries the answer of another.
- Several paraphrases of each question. Training rows use the first `train_paraphrases`
  templates, probe rows the next one, held-out rows the last one: the probe and held-out rows ask
  about facts the training rows teach, in words the training rows never used, so what the weights
  learned has to transfer. Held-out facts are none of the probe's (the gate) or the pool's, nor
  share an answer with them: editors quote those rows (failing probe rows, pool demonstrations),
  and a quoted answer in the prompt would hand the held-out row its answer.
- `answer_leaks` / `check_no_answer_in_prompt`: the run-time check that no held-out answer sits in
  a prompt the row is evaluated under (the system prompt, demonstrations included, and the
  question); `nslora compare` and `nslora demo` stop, naming the row, when one does.
- A format rule the model does not follow unless told: a correct reply ends with a line
  `Final: <answer>`. Training replies are one plain sentence *without* that line, so only the
  prompt (a symbolic update) can bring the format; probe and held-out references include it.
- The kind of update a failure needs (`failure_kind`) is computed per failure, at evaluation time,
  from the completion: if the right fact does not appear in the reply (or the `Final:` line names
  a wrong one) the failure is **"numerical"** — only weights can learn a fictional fact; if the fact
  is in the reply but the `Final:` line is missing, it is **"symbolic"** — a prompt can fix it. A
  passing reply has no kind (None). Each probe / held-out row carries `kind_rule` naming this rule
  and the fact (`final_answer`) the rule checks.

GSM8K and other JSONL (`load_jsonl_task`)
-----------------------------------------
`question` / `answer` rows; a GSM8K answer (`... #### n`) loses its calculator annotations. The
same rule applies: training replies end with "The answer is n." and no `Final:` line, probe and
held-out references end with `Final: n`; a failure is "numerical" when the last number in the reply
(or the `Final:` number) is wrong, "symbolic" when the number is right but the line is missing.
Splits are seeded and disjoint (held-out first, then probe, then training).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from nslora_plugin.core.data import split_gsm8k
from nslora_plugin.core.answers import answers_match, extract_final_answer, format_compliant, normalize_answer, phrase_in_text

__all__ = [
    "ATTRIBUTES",
    "AnswerInPrompt",
    "FACTS_SYSTEM_PROMPT",
    "FINAL_FORMAT",
    "FINAL_INSTRUCTION",
    "Task",
    "answer_leaks",
    "check_no_answer_in_prompt",
    "fact_stated",
    "failure_kind",
    "load_jsonl_task",
    "load_task",
    "make_facts_task",
]

FINAL_FORMAT = r"^Final: *(.+?)\s*$"
FINAL_INSTRUCTION = ("End every reply with a last line of the form 'Final: <answer>', where <answer> "
                     "is only the short answer (a name, a year or a number).")
FACTS_SYSTEM_PROMPT = "You are a helpful assistant."
KIND_RULE = ("numerical if the fact (final_answer) is missing from the reply or the Final line names "
             "another; symbolic if the fact is there but the Final line is missing")

Kind = Literal["numerical", "symbolic"]


@dataclass
class Task:
    """Rows and rules of one comparison task. Rows: `id`, `question`, `answer` (the reference
    reply), `final_answer`, plus task-specific fields."""

    name: str
    train: list[dict[str, Any]]
    probe: list[dict[str, Any]]
    held_out: list[dict[str, Any]]
    system_prompt: str = FACTS_SYSTEM_PROMPT
    answer_format: str = FINAL_FORMAT
    format_instruction: str = FINAL_INSTRUCTION
    answer_pattern: str = FINAL_FORMAT
    fact_match: Literal["contains", "number"] = "contains"
    meta: dict[str, Any] = field(default_factory=dict)
    #: labelled rows outside training that prompts-as-data and every baseline may train on; the
    #: probe (the gate split) is never trained on when there is a pool
    pool: list[dict[str, Any]] = field(default_factory=list)

    def config_overrides(self) -> dict[str, Any]:
        """The `NSLoRAConfig` keys this task sets."""
        return {"system_prompt": self.system_prompt, "answer_format": self.answer_format,
                "format_instruction": self.format_instruction, "answer_pattern": self.answer_pattern}

    def failure_kind(self, answer: str | None, completion: str) -> Kind | None:
        return failure_kind(answer, completion, answer_format=self.answer_format,
                            answer_pattern=self.answer_pattern, fact_match=self.fact_match)

    def scoring_plugins(self) -> list[Any]:
        """NSLoRA plugins that score held-out rows besides the built-in rewards (none here)."""
        return []

    def training_rows(self, rows: Sequence[dict[str, Any]], *, max_steps: int, batch_size: int,
                      seed: int) -> tuple[list[dict[str, Any]], bool]:
        """The rows a trainer gets and whether it must read them in order (a data schedule);
        here the rows as they are, shuffled by the trainer."""
        return list(rows), False

    def describe(self) -> str:
        pool = f", {len(self.pool)} pool" if self.pool else ""
        return (f"{self.name}: {len(self.train)} training rows, {len(self.probe)} probe (gate)"
                f"{pool}, {len(self.held_out)} held-out")

    def splits(self) -> dict[str, Any]:
        """Sizes and ids of each split, for the results file."""
        return {name: {"n": len(rows), "ids": [r["id"] for r in rows]}
                for name, rows in (("train", self.train), ("gate", self.probe),
                                   ("pool", self.pool), ("held_out", self.held_out))}


# ------------------------------------------------------------------ the ground-truth rule
def fact_present(answer: str, completion: str, fact_match: str = "contains") -> bool:
    """Does the reply state the fact anywhere? `contains`: the answer as a whole word/phrase,
    case-insensitive; `number`: the last number in the reply equals the answer."""
    if fact_match == "number":
        return answers_match(extract_final_answer(completion), answer)
    return phrase_in_text(answer, completion)


def failure_kind(answer: str | None, completion: str, *, answer_format: str = FINAL_FORMAT,
                 answer_pattern: str | None = FINAL_FORMAT,
                 fact_match: str = "contains") -> Kind | None:
    """Which update a reply needs: None (it passes), "numerical" (the weights) or "symbolic" (the prompt; see module docstring)."""
    if answer is None:
        return None
    compliant = format_compliant(completion, answer_format)
    if compliant:
        final = extract_final_answer(completion, answer_pattern or answer_format)
        return None if answers_match(final, answer) else "numerical"
    return "symbolic" if fact_present(answer, completion, fact_match) else "numerical"


# ------------------------------------------------------------------ no answers in prompts
class AnswerInPrompt(SystemExit):
    """A held-out answer appears in a prompt the row is evaluated under: the run stops (exit
    status 1), naming the row; its score would measure copying, not learning."""

    def __init__(self, leaks: list[dict[str, Any]], where: str) -> None:
        self.leaks = leaks
        first = leaks[0]
        more = f" (and {len(leaks) - 1} more held-out rows)" if len(leaks) > 1 else ""
        super().__init__(
            f"held-out answer in an evaluated prompt ({where}): row {first['row']!r} — its "
            f"{first['what']} {first['needle']!r} appears in the {first['in']}: "
            f"...{first['context']}...{more}. No held-out answer may appear in a prompt it is "
            "evaluated under (demonstrations, rewritten questions, editor rationales).")


def answer_leaks(rows: list[dict[str, Any]], system_prompt: str | None, *,
                 fact_match: str = "contains",
                 questions: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Held-out rows whose answer appears in the system prompt (as a whole word or phrase,
    case-insensitive) or in the question they are asked (`questions[row id]` when rewritten,
    else the row's own). Numeric answers (`fact_match="number"`: GSM8K) are too common to look
    for alone: there the row's question or its reference reply in the prompt counts. A synthetic
    row whose question states its fact by design (`fact_in_question`, the sweep's knob) is not
    checked against its own question."""
    leaks: list[dict[str, Any]] = []
    prompt = system_prompt or ""
    for i, r in enumerate(rows):
        row_id = str(r.get("id", f"#{i}"))
        question = (questions or {}).get(row_id, r.get("question", ""))
        if fact_match == "number":
            body = str(r.get("answer", "")).split("\nFinal:")[0].strip()
            needles = [("question", str(r.get("question", "")).strip()), ("reference reply", body)]
            places = [("system prompt", prompt)]
        else:
            needles = [("answer", str(r.get("final_answer") or "").strip())]
            places = [("system prompt", prompt)]
            if not r.get("fact_in_question") or question != r.get("question"):
                places.append(("question", question))
        for what, needle in needles:
            if not needle:
                continue
            for where, text in places:
                found = (" ".join(needle.casefold().split()) in " ".join(text.casefold().split())
                         if fact_match == "number" else phrase_in_text(needle, text))
                if text and found:
                    at = text.casefold().find(needle.casefold())
                    context = text[max(at - 40, 0):at + len(needle) + 40].replace("\n", " ")
                    leaks.append({"row": row_id, "what": what, "needle": needle, "in": where,
                                  "context": context})
                    break
            else:
                continue
            break
    return leaks


def check_no_answer_in_prompt(rows: list[dict[str, Any]], system_prompt: str | None, where: str, *,
                              fact_match: str = "contains",
                              questions: dict[str, str] | None = None) -> None:
    """Raise `AnswerInPrompt`, naming the first row, if `answer_leaks` finds one."""
    leaks = answer_leaks(rows, system_prompt, fact_match=fact_match, questions=questions)
    if leaks:
        raise AnswerInPrompt(leaks, where)


# ------------------------------------------------------------------ fictional names
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr",
           "th", "sh", "tr"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["", "", "", "n", "r", "l", "s"]
_COUNTRY_ENDS = ["ia", "and", "esh", "ora", "istan", "ovia", "ur"]
_CITY_ENDS = ["grad", "holm", "mouth", "ven", "burg", "port", "dale"]
EXPORTS = ["copper", "saffron", "glass beads", "timber", "wool", "salt", "tea", "amber", "silk",
           "olive oil", "tin", "indigo", "cork", "marble", "honey", "pepper"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, syllables: int, end: str = "") -> str:
    return ("".join(_syllable(rng) for _ in range(syllables)) + end).capitalize()


class _NamePool:
    """Unique names; no name contains (or is contained in) another, case-insensitively."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: list[str] = []

    def _free(self, name: str) -> bool:
        low = name.casefold()
        parts = low.split()
        return all(low not in u and u not in low and all(p not in u and u not in p for p in parts)
                   for u in (x.casefold() for x in self.used))

    def take(self, make: Any) -> str:
        for _ in range(10_000):
            name = make()
            if self._free(name):
                self.used.append(name)
                return name
        raise RuntimeError("could not generate enough distinct fictional names")


# ------------------------------------------------------------------ templates
# attribute -> (question paraphrases, plain training reply)
ATTRIBUTES: dict[str, tuple[list[str], str]] = {
    "capital": (["What is the capital of {e}?",
                 "Which city is the capital of {e}?",
                 "Name the capital city of {e}.",
                 "From which city is {e} governed?"],
                "The capital of {e} is {v}."),
    "founder": (["Who founded {e}?",
                 "Who was the founder of {e}?",
                 "Name the person who founded {e}.",
                 "By whom was {e} founded?"],
                "{e} was founded by {v}."),
    "year": (["In what year was {e} founded?",
              "When was {e} founded?",
              "What is the founding year of {e}?",
              "In which year did {e} come into being?"],
             "{e} was founded in {v}."),
    "export": (["What is the main export of {e}?",
                "What does {e} export most?",
                "Which product is the chief export of {e}?",
                "What is {e} best known for selling abroad?"],
               "The main export of {e} is {v}."),
}
N_PARAPHRASES = 4


def fact_stated(sentence: str, question: str) -> str:
    """`question` with its fact stated before it (the tasks' `context_share`): the answer can be
    read, so only the format is left to learn."""
    return f"Note: {sentence} {question}"


def make_entities(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` fictional countries with their facts (all names distinct, none inside another)."""
    rng = random.Random(seed)
    pool = _NamePool(rng)
    years = rng.sample(range(1100, 1900), n)
    entities = []
    for i in range(n):
        country = pool.take(lambda: _word(rng, 2, rng.choice(_COUNTRY_ENDS)))
        capital = pool.take(lambda: _word(rng, 2, rng.choice(_CITY_ENDS)))
        founder = pool.take(lambda: f"{_word(rng, 2)} {_word(rng, 2)}")
        entities.append({"entity": country, "capital": capital, "founder": founder,
                         "year": str(years[i]), "export": rng.choice(EXPORTS)})
    return entities


def make_facts_task(n_entities: int = 12, *, seed: int = 0, train_paraphrases: int = 2,
                    probe_size: int = 16, held_out_size: int | None = None,
                    attributes: tuple[str, ...] = tuple(ATTRIBUTES), pool_size: int = 0,
                    context_share: float = 0.0) -> Task:
    """The synthetic "facts + format" task (see module docstring).

    Facts: `n_entities` x `attributes`. Training: every fact under templates
    `0 .. train_paraphrases-1` (reply without the `Final:` line). Probe: `probe_size` facts under
    template `train_paraphrases` (the next one). Pool: `pool_size` other facts (none of the
    probe's) under the probe's template, with `Final:`. Held-out: `held_out_size` facts (default:
    every fact left) under the last template, disjoint from the gate (probe) and the pool — the
    rows an editor may quote — and with no answer that a gate or pool row states (two countries
    may share an export). Probe and held-out references end with `Final: <answer>`.

    `context_share` is the knob of the "when" sweep: that share of the facts (seeded) is stated
    in every question about it, in every split ("Note: the capital of X is Y."), so the model can
    read the answer and only the format is left to learn — a style weakness. At 0 every fact
    must be learned (and the format too); at 1 only the format is missing.
    """
    if not 0.0 <= context_share <= 1.0:
        raise ValueError(f"context_share must be between 0 and 1, got {context_share}")
    if not 1 <= train_paraphrases <= N_PARAPHRASES - 2:
        raise ValueError(f"train_paraphrases must be between 1 and {N_PARAPHRASES - 2}")
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"unknown attributes {unknown}; choose from {sorted(ATTRIBUTES)}")
    entities = make_entities(n_entities, seed)
    facts = [(e, a) for e in entities for a in attributes]
    probe_t, held_t = train_paraphrases, N_PARAPHRASES - 1
    given = set(random.Random(seed + 4).sample(range(len(facts)), round(context_share * len(facts))))
    given_facts = {(facts[i][0]["entity"], facts[i][1]) for i in given}

    def row(e: dict[str, str], attr: str, t: int, split: str, with_final: bool) -> dict[str, Any]:
        questions, reply = ATTRIBUTES[attr]
        value = e[attr]
        text = reply.format(e=e["entity"], v=value)
        question = questions[t].format(e=e["entity"])
        in_context = (e["entity"], attr) in given_facts
        if in_context:
            question = fact_stated(reply.format(e=e["entity"], v=value), question)
        if with_final:
            text += f"\nFinal: {value}"
        out = {"id": f"{split}-{e['entity'].lower()}-{attr}-p{t}",
               "question": question, "answer": text,
               "final_answer": value, "entity": e["entity"], "attribute": attr, "paraphrase": t,
               "fact_in_question": in_context}
        if split != "train":
            out["kind_rule"] = KIND_RULE
        return out

    train = [row(e, a, t, "train", False) for e, a in facts for t in range(train_paraphrases)]
    random.Random(seed + 1).shuffle(train)
    rng = random.Random(seed + 2)
    probe_facts = rng.sample(facts, min(probe_size, len(facts)))
    others = [f for f in facts if f not in probe_facts]
    pool_facts = random.Random(seed + 3).sample(others, min(pool_size, len(others)))
    probe = [row(e, a, probe_t, "probe", True) for e, a in probe_facts]
    pool = [row(e, a, probe_t, "pool", True) for e, a in pool_facts]
    # held-out facts: none of the gate's or the pool's (an editor may quote those rows), and no
    # answer that any of those rows states (an export shared by two countries)
    quotable = " \n".join(f"{r['question']} \n{r['answer']}" for r in probe + pool)
    eligible = [(e, a) for e, a in others if (e, a) not in pool_facts
                and not phrase_in_text(e[a], quotable)]
    if not eligible:
        raise ValueError(f"no fact is left for the held-out split: {len(facts)} facts, "
                         f"{len(probe_facts)} in the gate, {len(pool_facts)} in the pool (raise "
                         "n_entities or lower probe_size / pool_size)")
    held_facts = eligible if held_out_size is None else rng.sample(eligible, min(held_out_size, len(eligible)))
    held_out = [row(e, a, held_t, "held", True) for e, a in held_facts]
    return Task(name="synthetic", train=train, probe=probe, held_out=held_out, pool=pool,
                fact_match="contains",
                meta={"entities": n_entities, "attributes": list(attributes), "seed": seed,
                      "facts": len(facts), "train_paraphrases": list(range(train_paraphrases)),
                      "probe_paraphrase": probe_t, "held_out_paraphrase": held_t,
                      "context_share": context_share, "facts_in_question": len(given),
                      "held_out_rule": "facts of neither the gate nor the pool, and no answer "
                                       "a gate or pool row states",
                      "held_out_excluded_shared_answer": len(others) - len(pool_facts) - len(eligible)})


# ------------------------------------------------------------------ GSM8K / JSONL
def load_jsonl_task(path: str | Path, *, n_train: int = 256, probe_size: int = 16,
                    held_out_size: int = 64, seed: int = 0, name: str | None = None,
                    pool_size: int = 0) -> Task:
    """A task from a JSONL file of `question`/`answer` rows (GSM8K's `#### n` answers are
    recognised). Seeded shuffle, then held-out, probe, pool and training rows, disjoint."""
    from nslora_plugin.core.data import read_jsonl

    rows = read_jsonl(path)
    need = probe_size + held_out_size + pool_size + 1
    if len(rows) < need:
        raise ValueError(f"{path} has {len(rows)} rows; need at least {need}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    numeric = True
    prepared: list[tuple[int, str, str, str]] = []
    for i in order[:n_train + need - 1]:
        r = rows[i]
        if "question" not in r or "answer" not in r:
            raise ValueError(f"{path}: row {i} needs 'question' and 'answer' (keys: {sorted(r)})")
        answer = str(r["answer"])
        if "####" in answer:
            body, final = split_gsm8k(answer)
            final = final.replace(",", "")
        else:
            body = answer.strip()
            final = str(r.get("final_answer") or extract_final_answer(body) or "").strip()
        if not final:
            continue
        numeric = numeric and normalize_answer(final) is not None and re.fullmatch(
            r"-?\d+(\.\d+)?", normalize_answer(final) or "") is not None
        prepared.append((i, str(r["question"]), body, final))

    def make(item: tuple[int, str, str, str], split: str) -> dict[str, Any]:
        i, question, body, final = item
        text = f"{body}\nFinal: {final}" if split != "train" else f"{body}\nThe answer is {final}."
        out = {"id": f"{split}-{i}", "question": question, "answer": text, "final_answer": final}
        if split != "train":
            out["kind_rule"] = KIND_RULE
        return out

    held = [make(x, "held") for x in prepared[:held_out_size]]
    probe = [make(x, "probe") for x in prepared[held_out_size:held_out_size + probe_size]]
    start = held_out_size + probe_size
    pool = [make(x, "pool") for x in prepared[start:start + pool_size]]
    train = [make(x, "train") for x in prepared[start + pool_size:]]
    label = name or ("gsm8k" if "gsm8k" in str(path).lower() else Path(path).stem)
    return Task(name=label, train=train, probe=probe, held_out=held, pool=pool,
                fact_match="number" if numeric else "contains",
                format_instruction=("End every reply with a last line of the form 'Final: <answer>', "
                                    "where <answer> is only the final number." if numeric
                                    else FINAL_INSTRUCTION),
                meta={"source": str(path), "rows_in_file": len(rows), "seed": seed})


def load_task(spec: str, *, seed: int = 0, probe_size: int = 16, held_out_size: int | None = None,
              n_train: int | None = None, n_entities: int = 12, train_paraphrases: int = 2,
              gsm8k_path: str | Path | None = None, pool_size: int = 0,
              context_share: float = 0.0) -> Task:
    """`synthetic`, `gsm8k` (the file at `gsm8k_path`, default `$NSLORA_GSM8K` or the shared
    data folder) or a path to a JSONL file."""
    if spec == "synthetic":
        return make_facts_task(n_entities, seed=seed, train_paraphrases=train_paraphrases,
                               probe_size=probe_size, held_out_size=held_out_size,
                               pool_size=pool_size, context_share=context_share)
    if spec == "gsm8k":
        import os

        path = Path(gsm8k_path or os.environ.get("NSLORA_GSM8K") or _default_gsm8k())
        return load_jsonl_task(path, n_train=n_train or 256, probe_size=probe_size,
                               held_out_size=held_out_size or 64, seed=seed, name="gsm8k",
                               pool_size=pool_size)
    if Path(spec).is_file():
        return load_jsonl_task(spec, n_train=n_train or 256, probe_size=probe_size,
                               held_out_size=held_out_size or 64, seed=seed, pool_size=pool_size)
    raise ValueError(f"--task {spec!r}: expected 'synthetic', 'gsm8k' or a JSONL file that exists")


def _default_gsm8k() -> Path:
    for candidate in (Path.cwd() / "../shared/data/gsm8k/train.jsonl",
                      Path(__file__).resolve().parents[2] / "shared/data/gsm8k/train.jsonl"):
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError("GSM8K not found: pass --gsm8k-path or set NSLORA_GSM8K to a JSONL file "
                            "with question/answer rows (e.g. openai/gsm8k's train split)")
