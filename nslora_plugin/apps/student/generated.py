"""Many generated warm-up rules: the same eight kinds, each instance with its own surface strings.

The fixed warm-up family (`rules.WARMUP_RULES`) has two or three rules a kind, so a 135M student
warmed on it partly learns *those* markers and wrappers and follows a new one only when it looks
like them (`recipes/results/student.md`). Here every rule instance draws its own marker word and
separator, prefix, tag name, bracket pair, JSON keys, bullet symbol and count, word or character
cap, or unit word, and its phrasings from templates, so the only thing the rows have in common
is *do what the system prompt says*. That is the skill the evaluation family measures.

Every vocabulary below avoids the evaluation family's surface strings and the words they are
made of (`_BANNED`): `generated_warmup_rules` refuses to return a rule that would share one, and
the tests scan the rows as they do for the fixed family. Deterministic from a seed.
"""

from __future__ import annotations

import random
import re
from typing import Sequence

from nslora_plugin.apps.student.rules import (
    EVAL_RULES,
    WARMUP,
    FormatRule,
    Plain,
    bullets,
    casing,
    char_cap,
    inline_wrap,
    json_keys,
    marker,
    prefix,
    surface_strings_in,
    title_case,
    unit,
    whole_tag,
    word_cap,
)

__all__ = ["GENERATED_VERSION", "GENERATED_VERSIONS", "first_line_upper", "generated_warmup_rules",
           "last_line_upper", "vocabulary_clashes"]

#: The version `rule_set="generated"` draws, part of the warmed student's cache key: a changed
#: vocabulary, template or way of drawing is a new version, and every version stays drawable
#: (`generated_warmup_rules(version=...)`) so a student built on one can be rebuilt under its key.
GENERATED_VERSION = 1
#: Every version `generated_warmup_rules` can draw. Version 2 (`rule_set="generated-v2"`) draws
#: more instances from larger vocabularies; measured on fresh items it followed the evaluation
#: rules no better than version 1 (recipes/results/student.md), so it is not the default.
GENERATED_VERSIONS = (1, 2)

#: Words of the evaluation family's surface strings; no generated surface string contains one.
_BANNED = ("answer", "final", "verdict", "quick", "take", "response", "reasoning", "unit", "{{",
           "}}", "•")

_MARK_WORDS = ("RESULT", "OUTCOME", "SOLVED", "TOTAL", "SUMMARY", "Result", "Outcome", "Summary",
               "Conclusion", "Bottom line", "In short", "Output", "Solution", "Upshot", "Gist",
               "Tally", "Net result", "Short version", "Therefore", "DONE", "Key fact", "So",
               "Reply", "Finding", "Value", "Hence", "REPLY", "OUT", "Found", "It is")
_MARK_SEPS = (":", " =", " ->", " -", " >", " |", " ::", " >>", "::", " ~")
_PREFIXES = ("Working it out:", "Here you go.", "Sure thing:", "Okay!", "Let me see.", "In brief:",
             "Right, so", "Good question.", "Here is my reply:", "Short version:", "Happy to help:",
             "Let's go:", "Hello!", "Straight to it:", "Thanks for asking.", "Alright:",
             "To put it simply:", "Noted:", "Sure:", "Of course!", "Hmm, let me think.", "Well,",
             "Got it:", "Look:", "Easy one:", "OK:")
_TAGS = ("reply", "out", "msg", "text", "result", "body", "note", "output", "solution", "say",
         "content", "r", "data", "card", "block", "info")
_PAIRS = (("<val>", "</val>"), ("<v>", "</v>"), ("<res>", "</res>"), ("<num>", "</num>"),
          ("<key>", "</key>"), ("<b>", "</b>"), ("[[", "]]"), ("((", "))"), ("<<", ">>"),
          ("**", "**"), ("__", "__"), ("##", "##"), ("|", "|"), ("<hit>", "</hit>"),
          ("<x>", "</x>"), ("[", "]"), ("%%", "%%"), ("~~", "~~"))
_KEY_PAIRS = (("result", "steps"), ("value", "why"), ("output", "explanation"), ("total", "work"),
              ("solution", "notes"), ("reply", "details"), ("result", "because"),
              ("value", "explanation"), ("out", "how"), ("res", "method"), ("key_fact", "support"),
              ("result", "justification"), ("conclusion", "evidence"), ("value", "context"),
              ("outcome", "workings"), ("fact", "source"))
_SYMBOLS = ("-", "*", "+", ">", "–", "→", "▪", "◦", "#", "=")
_COUNTS = (2, 3, 4)
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                 9: "nine", 10: "ten", 11: "eleven", 12: "twelve", 14: "fourteen", 15: "fifteen"}
_WORD_CAPS = (6, 7, 8, 9, 10, 11, 12, 14, 15)
_CHAR_CAPS = (40, 45, 50, 70, 80, 90, 100, 120)
_CODES = ("pcs", "ea", "items", "pieces", "ct", "qty", "nos", "pc", "lots", "objects", "things")

# Version 2 adds words (version 1's first, so its draws stay what they were): the version-1 student
# followed a new marker far more often than a new whole-reply tag or prefix, having seen 7 tag
# names and 10 prefixes, so version 2 draws more instances of the kinds with few and small
# vocabularies (and a cap of 150 characters, which most plain replies already meet).
_PREFIXES_V2 = _PREFIXES + (
    "Here it is:", "Let me help.", "In a nutshell:", "Heads up:", "My view:", "First off,",
    "Brief note:", "Very well:", "Plainly put:", "Glad you asked.", "Summing up:", "In a word:",
    "Consider this:", "As asked:", "Simple:", "Hey there.", "Greetings.", "Ready?", "So then:",
    "Let us see:", "Alright then,", "Right away:", "With pleasure:", "Here goes:")
_TAGS_V2 = _TAGS + (
    "memo", "entry", "post", "part", "section", "item", "span", "para", "frame", "panel", "box",
    "chunk", "field", "slot", "cell", "record", "doc", "page", "letter", "speech", "talk",
    "words", "main", "core", "full", "whole", "all", "message", "writeup")
_PAIRS_V2 = _PAIRS + (("<n>", "</n>"), ("<ok>", "</ok>"), ("<i>", "</i>"), ("<em>", "</em>"),
                      ("<|", "|>"), ("^^", "^^"), ("@@", "@@"), ("[:", ":]"), ("<:", ":>"))
_MARK_WORDS_V2 = _MARK_WORDS + ("Score", "Count", "Thus", "Net", "Sum", "Readout", "Report",
                                "Closing", "End", "Wrap-up", "Point", "Bottom")
_CODES_V2 = _CODES + ("bits", "heads", "kits", "sets", "bunches", "packs", "tokens", "bags")
_CHAR_CAPS_V2 = _CHAR_CAPS + (35, 55, 65, 75, 110, 150)
_SYMBOLS_V2 = _SYMBOLS + ("~", "◆", "»", "x", "%", "$")

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "marker": (
        "End your reply with one more line: {m} followed by the answer.",
        "The last line must begin with '{m}' and give the answer.",
        "After explaining, write a closing line of the form '{m} 42'.",
        "Restate the answer at the bottom, on its own line, after '{m}'.",
        "Sign off with a line that starts {m} and holds the answer.",
        "Your reply ends on a line reading {m} and then the answer.",
    ),
    "prefix": (
        "Begin your reply with '{s}'.",
        "The very first words you write must be {s}",
        "Start off with {s} and then reply.",
        "Open every reply with the phrase '{s}'.",
        "Put {s} at the start of the reply, before anything else.",
    ),
    "tag": (
        "Wrap the complete reply in <{t}> ... </{t}>.",
        "Put all of your reply between <{t}> and </{t}>.",
        "Everything you write must sit inside a <{t}></{t}> element.",
        "Enclose your full reply in {t} tags: <{t}> at the start, </{t}> at the end.",
    ),
    "pair": (
        "Put the answer between {l} and {r}.",
        "Mark the answer like this: {l}42{r}.",
        "When you state the answer, surround it with {l}...{r}.",
        "Write the answer itself enclosed in {l}{r}, e.g. {l}7{r}.",
    ),
    "json": (
        'Reply with a JSON object with the keys "{a}" and "{d}" only.',
        'Return only JSON, like {{"{a}": ..., "{d}": ...}}.',
        'Format your reply as JSON: the answer under "{a}", the explanation under "{d}".',
        'Output one JSON object; put the answer in "{a}" and how you got it in "{d}".',
    ),
    "bullets": (
        "Reply with exactly {n} lines, each starting with '{b} '.",
        "Give {w} bullet points that begin with {b}",
        "Make a list of exactly {n} items, each line opening with the {b} symbol.",
        "Use {w} lines, no more and no fewer, each one starting with '{b} '.",
    ),
    "words": (
        "Use no more than {n} words.",
        "Keep the reply to {w} words or fewer.",
        "At most {n} words, please.",
        "Reply briefly: {n} words maximum.",
    ),
    "chars": (
        "Keep the whole reply under {n} characters.",
        "No more than {n} characters in total.",
        "The reply may be at most {n} characters long.",
    ),
    "units": (
        "Write '{c}' right after the final number, as in '9 {c}'.",
        "Label the final count with {c}.",
        "After the last number, add the word {c}.",
        "Give the final number followed by {c}, like 14 {c}.",
    ),
}
_CASING = {
    "lower": ("Write your whole reply in lowercase letters only.", "Use no capital letters anywhere.",
              "Reply entirely in lower case.", "Every letter you write must be lowercase."),
    "title": ("Capitalize the first letter of every word in your reply.",
              "Write the reply in title case: Every Word Starts With A Capital.",
              "Start each word you write with a capital letter."),
    "upper_first": ("Write the first line of your reply in capital letters, the rest as usual.",
                    "Open with one line in CAPITALS, then continue normally.",
                    "Your opening sentence must be all capital letters."),
    "upper_last": ("Put the conclusion on a last line written in capital letters.",
                   "End with one line in CAPITAL LETTERS that states the conclusion.",
                   "Your closing line must be all capitals."),
}


def last_line_upper(name: str, family: str, phrasings: Sequence[str]) -> FormatRule:
    """The reply's last line is in capital letters (at least three letters, none lower case).

    A casing rule of the warm-up only: it asks for capitals somewhere, which the whole-reply
    upper-case rule of the evaluation family also needs, without being that rule.
    """
    lower = re.compile("[a-z]")

    def check(reply: str) -> bool:
        lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        return len(lines) >= 2 and sum(c.isalpha() for c in last) >= 3 and not lower.search(last)

    def transform(p: Plain) -> str:
        last = p.points[-1]
        return f"{p.detail}\n{last.upper()}"

    return FormatRule(name, family, "casing", tuple(phrasings), transform=transform, check=check)


def first_line_upper(name: str, family: str, phrasings: Sequence[str]) -> FormatRule:
    """The reply's first line is in capital letters and at least one more line follows.

    Like `last_line_upper`, capitals on part of the reply, never the whole reply (the evaluation
    family's rule).
    """
    lower = re.compile("[a-z]")

    def check(reply: str) -> bool:
        lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
        first = lines[0] if lines else ""
        return (len(lines) >= 2 and sum(c.isalpha() for c in first) >= 3 and not lower.search(first)
                and any(lower.search(line) for line in lines[1:]))

    def transform(p: Plain) -> str:
        return f"{p.points[0].upper()}\n{' '.join(p.points[1:])}"

    return FormatRule(name, family, "casing", tuple(phrasings), transform=transform, check=check)


def vocabulary_clashes() -> list[tuple[str, str]]:
    """`(word, banned)` for every vocabulary word that holds a word of the evaluation family.

    Checked over the whole vocabulary, not only the words a seed happens to draw, so a bad word
    fails every seed alike instead of some `--seed` values only.
    """
    words: list[str] = [x for pair in _KEY_PAIRS for x in pair]
    for version in GENERATED_VERSIONS:
        v = _vocabulary(version)
        words += [*v["marks"], *v["prefixes"], *v["tags"], *v["codes"], *v["symbols"],
                  *(x for pair in v["pairs"] for x in pair)]
    return sorted({(w, banned) for w in words for banned in _BANNED if banned in w.casefold()})


def _name(kind: str, i: int) -> str:
    """`gen_<kind, 3 letters>_<i>`: no evaluation word (like "units") even in a rule's name."""
    return f"gen_{kind[:3]}_{i}"


def _phrasings(rng: random.Random, templates: Sequence[str], k: int = 3, **slots: object) -> tuple[str, ...]:
    return tuple(t.format(**slots) for t in rng.sample(list(templates), min(k, len(templates))))


def _vocabulary(version: int) -> dict[str, tuple]:
    if version == 1:
        return {"marks": _MARK_WORDS, "prefixes": _PREFIXES, "tags": _TAGS, "pairs": _PAIRS,
                "codes": _CODES, "char_caps": _CHAR_CAPS, "symbols": _SYMBOLS,
                "casings": ("lower", "title", "upper_last")}
    return {"marks": _MARK_WORDS_V2, "prefixes": _PREFIXES_V2, "tags": _TAGS_V2, "pairs": _PAIRS_V2,
            "codes": _CODES_V2, "char_caps": _CHAR_CAPS_V2, "symbols": _SYMBOLS_V2,
            "casings": ("lower", "title", "upper_last", "upper_first")}


def _instances(rng: random.Random, kind: str, n: int, vocab: dict[str, tuple]) -> list[FormatRule]:
    """`n` distinct rules of `kind` (`rules.KINDS`) drawn from `vocab` (`_vocabulary`)."""
    out: list[FormatRule] = []
    W = WARMUP
    if kind == "marker":
        seen: set[str] = set()
        while len(out) < n:
            mark = f"{rng.choice(vocab['marks'])}{rng.choice(_MARK_SEPS)}"
            if mark in seen:
                continue
            seen.add(mark)
            out.append(marker(_name("marker", len(out)), W, mark,
                              _phrasings(rng, _TEMPLATES["marker"], m=mark)))
    elif kind == "prefix":
        for i, start in enumerate(rng.sample(vocab["prefixes"], n)):
            out.append(prefix(_name("prefix", i), W, start, _phrasings(rng, _TEMPLATES["prefix"], s=start)))
    elif kind == "wrapper":
        tags = rng.sample(vocab["tags"], n // 2)
        pairs = rng.sample(vocab["pairs"], n - n // 2)
        for i, tag in enumerate(tags):
            out.append(whole_tag(_name("wrapper", i), W, tag, _phrasings(rng, _TEMPLATES["tag"], t=tag)))
        for i, (left, right) in enumerate(pairs, start=len(tags)):
            out.append(inline_wrap(_name("wrapper", i), W, left, right,
                                   _phrasings(rng, _TEMPLATES["pair"], l=left, r=right)))
    elif kind == "casing":
        makers = {"lower": lambda nm, ph: casing(nm, W, False, ph),
                  "title": lambda nm, ph: title_case(nm, W, ph),
                  "upper_last": lambda nm, ph: last_line_upper(nm, W, ph),
                  "upper_first": lambda nm, ph: first_line_upper(nm, W, ph)}
        styles = vocab["casings"]
        for i in range(n):
            style = styles[i % len(styles)]
            out.append(makers[style](_name("casing", i), _phrasings(rng, _CASING[style])))
    elif kind == "length":
        words = rng.sample(_WORD_CAPS, (n + 1) // 2)
        chars = rng.sample(vocab["char_caps"], n // 2)
        for i, cap in enumerate(words):
            out.append(word_cap(_name("length", i), W, cap,
                                _phrasings(rng, _TEMPLATES["words"], n=cap, w=_NUMBER_WORDS[cap])))
        for i, cap in enumerate(chars, start=len(words)):
            out.append(char_cap(_name("length", i), W, cap, _phrasings(rng, _TEMPLATES["chars"], n=cap)))
    elif kind == "json":
        for i, (a, d) in enumerate(rng.sample(_KEY_PAIRS, n)):
            out.append(json_keys(_name("json", i), W, a, d, _phrasings(rng, _TEMPLATES["json"], a=a, d=d)))
    elif kind == "bullets":
        combos = [(s, c) for s in vocab["symbols"] for c in _COUNTS]
        for i, (symbol, count) in enumerate(rng.sample(combos, n)):
            out.append(bullets(_name("bullets", i), W, symbol, count,
                               _phrasings(rng, _TEMPLATES["bullets"], n=count, w=_NUMBER_WORDS[count],
                                          b=symbol)))
    elif kind == "units":
        for i, code in enumerate(rng.sample(vocab["codes"], n)):
            out.append(unit(_name("units", i), W, code, _phrasings(rng, _TEMPLATES["units"], c=code)))
    else:
        raise ValueError(f"unknown rule kind {kind!r}")
    return out


#: How many instances of each kind each version draws (`DEFAULT_PER_KIND`: the default version's).
PER_KIND = {
    1: {"marker": 14, "prefix": 10, "wrapper": 14, "casing": 9, "length": 10, "json": 10,
        "bullets": 12, "units": 8},
    2: {"marker": 12, "prefix": 16, "wrapper": 28, "casing": 12, "length": 14, "json": 10,
        "bullets": 16, "units": 10},
}
DEFAULT_PER_KIND = PER_KIND[GENERATED_VERSION]


def generated_warmup_rules(seed: int = 0, per_kind: dict[str, int] | None = None,
                           version: int = GENERATED_VERSION) -> tuple[FormatRule, ...]:
    """Warm-up rule instances, deterministic from `seed` and `version`, `per_kind[kind]` of each
    kind (default: that version's `PER_KIND`).

    Raises `ValueError` if an instance would share a surface string, or a word of one, with the
    evaluation family: that would break the disjointness the compliance benchmark relies on.
    """
    clashes = vocabulary_clashes()
    if clashes:
        raise ValueError(f"generated-rule vocabulary words {clashes} hold words of the evaluation "
                         "family; change them")
    if version not in GENERATED_VERSIONS:
        raise ValueError(f"generated rule version must be one of {GENERATED_VERSIONS}, got {version!r}")
    counts = dict(PER_KIND[version] if per_kind is None else per_kind)
    rng = random.Random(f"nslora-generated-rules:{seed}:{version}")
    vocab = _vocabulary(version)
    rules: list[FormatRule] = []
    for kind in sorted(counts):
        rules.extend(_instances(rng, kind, counts[kind], vocab))
    for rule in rules:
        text = " ".join(rule.surface + rule.phrasings)
        shared = surface_strings_in(text, EVAL_RULES)
        banned = [w for w in _BANNED for s in rule.surface if w in s.casefold()]  # e.g. "Final" + ":"
        if shared or banned:
            raise ValueError(f"generated rule {rule.name} shares {shared or banned} with the "
                             "evaluation family; change its vocabulary")
    return tuple(rules)
