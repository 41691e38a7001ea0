"""The format-rule registry and the generated rows the student warms up on.

A `FormatRule` is one format constraint a system prompt can state: its instruction in several
phrasings, a `transform` that turns a plain reply (a `Plain`) into one that obeys it, and a `check`
(reply -> bool). Rules come in eight kinds (`KINDS`): final-line markers, prefixes, tag or bracket
wrappers, casing, length caps, JSON with named keys, a number of bullet points, and units.

The registry is split *by construction* into two families with separate vocabularies:

- `WARMUP_RULES`: what the student is trained on (markers RESULT / OUTCOME / SOLVED, tags
  `<reply>` / `<val>`, `[[...]]`, JSON keys result/steps/value/why, dash and star bullets,
  units pcs / ea, lowercase, word caps);
- `EVAL_RULES`: what the demo, `nslora compare`, `nslora sweep` and the benchmarks measure
  (markers `Answer:` / `Final:` / `VERDICT:`, tags `<answer>` / `<response>`, `{{...}}`, JSON
  keys answer/reasoning, `•` bullets, the unit `units`, uppercase, a character cap).

Every rule lists its `surface` strings (markers, wrappers, keys, prefixes, bullet symbols, unit
codes); `surface_strings_in(text, rules)` finds them, and the tests check that no evaluation
rule's surface string occurs anywhere in the warm-up rows (system prompts, questions, replies)
and that the two families' definitions do not borrow each other's. So a warmed student that obeys
an evaluation rule learned to *follow a stated format*, not that format.

Everything here is plain Python and deterministic from a seed. Bump `REGISTRY_VERSION` whenever a
rule, a phrasing or the row generator changes: it is part of the warmed student's cache key.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "EVAL",
    "EVAL_RULES",
    "KINDS",
    "NEUTRAL_SYSTEM_PROMPTS",
    "QUESTION_KINDS",
    "REGISTRY_VERSION",
    "RULES",
    "WARMUP",
    "WARMUP_RULES",
    "FormatRule",
    "Plain",
    "get_rule",
    "make_questions",
    "make_warmup_rows",
    "rule_system_prompt",
    "surface_strings_in",
]

#: Part of the warmed student's cache key: bump it when rules, phrasings or rows change.
REGISTRY_VERSION = 1

WARMUP = "warmup"
EVAL = "eval"
KINDS = ("marker", "prefix", "wrapper", "casing", "length", "json", "bullets", "units")
QUESTION_KINDS = ("arithmetic", "lookup", "definition")

#: The system prompt an evaluation states a rule under (the rule follows it), and the neutral
#: prompt the no-rule measurements use.
EVAL_PERSONA = "You are a helpful assistant."


# ------------------------------------------------------------------------------------------------
# Plain replies
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plain:
    """A question with its plain reply, in the pieces the rule transforms need.

    `text` is the plain reply (a few sentences, no format of any rule); `answer` the short final
    answer as it appears in `text` ("15", "Ilse", "a shape with three sides"); `short` a reply of
    at most 6 words and 40 characters stating the answer; `detail` the explanation without the
    concluding sentence; `points` at least four short statements (for bullet rules). `numeric`
    says the answer is a number, `count` that it counts things (unit rules apply to those only).
    """

    kind: str
    question: str
    answer: str
    text: str
    short: str
    detail: str
    points: tuple[str, ...]
    numeric: bool = False
    count: bool = False


# ------------------------------------------------------------------------------------------------
# Rules
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FormatRule:
    """One format constraint: how a system prompt states it, how to obey it, how to check it."""

    name: str
    family: str
    kind: str
    phrasings: tuple[str, ...]
    transform: Callable[[Plain], str] = field(repr=False, compare=False)
    check: Callable[[str], bool] = field(repr=False, compare=False)
    #: The distinctive strings of the rule (markers, wrappers, keys, prefixes, bullets, units).
    surface: tuple[str, ...] = ()
    #: Applies to questions whose answer counts things only (unit rules).
    needs_count: bool = False
    #: A regex whose first group is the final answer (`NSLoRAConfig.answer_format`), when the rule
    #: puts the answer somewhere findable.
    answer_format: str | None = None

    def instruction(self, index: int = 0) -> str:
        """The `index`-th phrasing (cycling)."""
        return self.phrasings[index % len(self.phrasings)]

    def applies_to(self, item: Plain) -> bool:
        return item.count or not self.needs_count

    def apply(self, item: Plain) -> str:
        """A reply to `item` that obeys this rule."""
        return self.transform(item)


def _last_line(reply: str) -> str:
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _wrap_last(text: str, answer: str, left: str, right: str) -> str:
    """`text` with the last occurrence of `answer` wrapped in `left` / `right` (appended as a
    closing sentence if `answer` does not occur)."""
    at = text.rfind(answer)
    if at < 0:
        return f"{text} {left}{answer}{right}"
    return f"{text[:at]}{left}{answer}{right}{text[at + len(answer):]}"


def _as_points(item: Plain, n: int) -> list[str]:
    """Exactly `n` statements: the leading ones merged when there are more."""
    points = list(item.points)
    if len(points) <= n:
        return points
    extra = len(points) - n + 1
    return [" ".join(points[:extra])] + points[extra:]


def _json_value(item: Plain) -> Any:
    return int(item.answer) if item.numeric and re.fullmatch(r"-?\d+", item.answer) else item.answer


def _parse_json_object(reply: str) -> dict | None:
    body = reply.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", body, flags=re.DOTALL)
    if fenced:
        body = fenced.group(1)
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def marker(name: str, family: str, mark: str, phrasings: Sequence[str]) -> FormatRule:
    """The reply's last line is `mark` followed by the answer."""
    line = re.compile(rf"^{re.escape(mark)}\s*\S")
    return FormatRule(
        name, family, "marker", tuple(phrasings),
        transform=lambda p: f"{p.text}\n{mark} {p.answer}",
        check=lambda r: bool(line.match(_last_line(r))),
        surface=(mark,), answer_format=rf"^{re.escape(mark)} *(.+?)\s*$")


def prefix(name: str, family: str, start: str, phrasings: Sequence[str]) -> FormatRule:
    """The reply starts with `start`."""
    return FormatRule(
        name, family, "prefix", tuple(phrasings),
        transform=lambda p: f"{start} {p.text}",
        check=lambda r: r.lstrip().startswith(start) and len(r.strip()) > len(start),
        surface=(start,))


def whole_tag(name: str, family: str, tag: str, phrasings: Sequence[str]) -> FormatRule:
    """The whole reply sits between `<tag>` and `</tag>`."""
    left, right = f"<{tag}>", f"</{tag}>"

    def check(reply: str) -> bool:
        body = reply.strip()
        return (body.startswith(left) and body.endswith(right)
                and bool(body[len(left):-len(right)].strip()))

    return FormatRule(name, family, "wrapper", tuple(phrasings),
                      transform=lambda p: f"{left}\n{p.text}\n{right}", check=check,
                      surface=(left, right))


def inline_wrap(name: str, family: str, left: str, right: str,
                phrasings: Sequence[str]) -> FormatRule:
    """The answer, where the reply states it, sits between `left` and `right`."""
    found = re.compile(re.escape(left) + r"\s*([^\s<>\[\]{}](?:[^<>\[\]{}]*?))\s*" + re.escape(right))
    return FormatRule(
        name, family, "wrapper", tuple(phrasings),
        transform=lambda p: _wrap_last(p.text, p.answer, left, right),
        check=lambda r: found.search(r) is not None, surface=(left, right),
        answer_format=found.pattern)


def casing(name: str, family: str, upper: bool, phrasings: Sequence[str]) -> FormatRule:
    """Every letter upper case (or lower case); at least three letters."""
    wrong = re.compile("[a-z]" if upper else "[A-Z]")

    def check(reply: str) -> bool:
        return sum(c.isalpha() for c in reply) >= 3 and wrong.search(reply) is None

    return FormatRule(name, family, "casing", tuple(phrasings),
                      transform=lambda p: p.text.upper() if upper else p.text.lower(), check=check)


def title_case(name: str, family: str, phrasings: Sequence[str]) -> FormatRule:
    """Every word that starts with a letter starts with a capital; at least three words."""
    lower_start = re.compile(r"\b[a-z]")

    def check(reply: str) -> bool:
        return len(reply.split()) >= 3 and lower_start.search(reply) is None

    return FormatRule(name, family, "casing", tuple(phrasings),
                      transform=lambda p: lower_start.sub(lambda m: m.group().upper(), p.text),
                      check=check)


def _conclusion(item: Plain) -> str:
    """The concluding sentence without its leading 'So'."""
    last = item.points[-1]
    return last[3].upper() + last[4:] if last.startswith("So ") else last


def word_cap(name: str, family: str, words: int, phrasings: Sequence[str]) -> FormatRule:
    """At most `words` words."""
    def transform(p: Plain) -> str:
        last = _conclusion(p)
        return last if len(last.split()) <= words else p.short

    return FormatRule(name, family, "length", tuple(phrasings), transform=transform,
                      check=lambda r: 1 <= len(r.split()) <= words)


def char_cap(name: str, family: str, chars: int, phrasings: Sequence[str]) -> FormatRule:
    """At most `chars` characters (surrounding whitespace not counted)."""
    def transform(p: Plain) -> str:
        last = _conclusion(p)
        return last if len(last) <= chars else p.short

    return FormatRule(name, family, "length", tuple(phrasings), transform=transform,
                      check=lambda r: 1 <= len(r.strip()) <= chars)


def json_keys(name: str, family: str, answer_key: str, detail_key: str,
              phrasings: Sequence[str]) -> FormatRule:
    """The reply is one JSON object with exactly the keys `answer_key` and `detail_key`, both
    non-empty (a ```json fence around it is tolerated)."""
    keys = {answer_key, detail_key}

    def check(reply: str) -> bool:
        obj = _parse_json_object(reply)
        return (obj is not None and set(obj) == keys
                and all(str(v).strip() for v in obj.values()))

    return FormatRule(
        name, family, "json", tuple(phrasings),
        transform=lambda p: json.dumps({answer_key: _json_value(p), detail_key: p.detail}),
        check=check, surface=(f'"{answer_key}"', f'"{detail_key}"'))


def bullets(name: str, family: str, symbol: str, count: int, phrasings: Sequence[str]) -> FormatRule:
    """Exactly `count` lines start with `symbol` and a space."""
    start = f"{symbol} "

    def check(reply: str) -> bool:
        lines = [line.strip() for line in reply.splitlines()]
        return sum(line.startswith(start) and len(line) > len(start) for line in lines) == count

    return FormatRule(name, family, "bullets", tuple(phrasings),
                      transform=lambda p: "\n".join(start + s for s in _as_points(p, count)),
                      check=check, surface=(start,))


def unit(name: str, family: str, code: str, phrasings: Sequence[str]) -> FormatRule:
    """The last number in the reply is followed by the unit `code`."""
    after = re.compile(rf"\s*{re.escape(code)}\b")

    def check(reply: str) -> bool:
        numbers = list(_NUMBER.finditer(reply))
        return bool(numbers) and after.match(reply, numbers[-1].end()) is not None

    return FormatRule(name, family, "units", tuple(phrasings),
                      transform=lambda p: f"{p.detail} In total that is {p.answer} {code}.",
                      check=check, surface=(code,), needs_count=True,
                      answer_format=rf"(-?\d[\d,]*)\s*{re.escape(code)}\b")


W, E = WARMUP, EVAL

WARMUP_RULES: tuple[FormatRule, ...] = (
    marker("result_line", W, "RESULT:", (
        "Finish with one last line that reads 'RESULT: ' followed by the answer.",
        "Put the answer on a separate final line, written as RESULT: and then the answer.",
        "Your last line must be 'RESULT: 42' style: the word RESULT, a colon, the answer.",
    )),
    marker("outcome_line", W, "OUTCOME =", (
        "After your explanation, add a closing line of the form 'OUTCOME = ' plus the answer.",
        "Close every reply with the line OUTCOME = followed by the answer.",
        "State the answer once more at the very end, on its own line, as in: OUTCOME = 42",
    )),
    marker("solved_line", W, "SOLVED ->", (
        "End with the line 'SOLVED -> ' and the answer.",
        "The closing line of the reply should be SOLVED -> followed by the answer.",
        "Conclude with a line starting 'SOLVED ->' that gives the answer.",
    )),
    prefix("working_prefix", W, "Working it out:", (
        "Begin your reply with the words 'Working it out:'.",
        "Start every reply with Working it out: and then answer.",
        "The first words of your reply must be: Working it out:",
    )),
    prefix("herego_prefix", W, "Here you go.", (
        "Open your reply with 'Here you go.' before anything else.",
        "Always start with the sentence Here you go.",
        "Your reply has to begin with: Here you go.",
    )),
    whole_tag("reply_tag", W, "reply", (
        "Wrap your whole reply between <reply> and </reply> tags.",
        "Put everything you write inside a <reply>...</reply> block.",
        "Enclose the complete reply in <reply></reply>.",
    )),
    inline_wrap("val_tag", W, "<val>", "</val>", (
        "Mark the answer by writing it inside <val></val> tags, e.g. <val>42</val>.",
        "Where you state the answer, wrap it in a <val> tag: <val>the answer</val>.",
        "Surround the answer itself with <val> and </val>.",
    )),
    inline_wrap("square_brackets", W, "[[", "]]", (
        "Put the answer in double square brackets, like [[42]].",
        "Write the answer wrapped in [[ and ]].",
        "Highlight the answer by enclosing it in [[...]].",
    )),
    casing("lowercase", W, False, (
        "Write your whole reply in lowercase letters only.",
        "Use no capital letters anywhere in the reply.",
        "Reply entirely in lower case.",
    )),
    title_case("title_case", W, (
        "Capitalize the first letter of every word in your reply.",
        "Write the reply in title case: Every Word Starts With A Capital.",
        "Start each word you write with a capital letter.",
    )),
    word_cap("ten_words", W, 10, (
        "Reply in at most 10 words.",
        "Keep it short: no more than ten words.",
        "Your reply must not exceed 10 words.",
    )),
    word_cap("six_words", W, 6, (
        "Answer in six words or fewer.",
        "Use at most 6 words.",
        "Be extremely brief: a reply of up to six words.",
    )),
    json_keys("json_result_steps", W, "result", "steps", (
        'Reply only with a JSON object with the keys "result" and "steps".',
        'Return JSON and nothing else: {"result": ..., "steps": ...}.',
        'Format the reply as a JSON object: the answer under "result", the working under "steps".',
    )),
    json_keys("json_value_why", W, "value", "why", (
        'Respond with a single JSON object holding two keys, "value" and "why".',
        'Output JSON only, shaped like {"value": ..., "why": ...}.',
        'Give a JSON object where "value" is the answer and "why" explains it.',
    )),
    bullets("dash_two", W, "-", 2, (
        "Write exactly two bullet points, each on its own line starting with '- '.",
        "Give your reply as a list of 2 lines, each beginning with a dash.",
        "Use exactly 2 dash bullets and nothing more.",
    )),
    bullets("star_three", W, "*", 3, (
        "Answer as exactly three bullet points starting with '* '.",
        "Lay the reply out as 3 lines, each one opening with an asterisk.",
        "Make it a list: three lines, each starting with '* '.",
    )),
    bullets("dash_four", W, "-", 4, (
        "Break the reply into exactly four dash bullets ('- ').",
        "Use a list of 4 lines, each beginning with '- '.",
        "Write four points, one per line, each starting with a dash.",
    )),
    unit("pcs_unit", W, "pcs", (
        "State the final count followed by the unit code 'pcs', as in '12 pcs'.",
        "Write pcs right after the final number.",
        "Give the final number with the label pcs after it.",
    )),
    unit("ea_unit", W, "ea", (
        "After the final number, add the code 'ea' (each), as in '30 ea'.",
        "Label the final count with ea, like 8 ea.",
        "Put ea directly after the last number you give.",
    )),
)

EVAL_RULES: tuple[FormatRule, ...] = (
    marker("answer_line", E, "Answer:", (
        "Give the answer on a line of its own at the very end, starting with 'Answer:'.",
        "The last line of your reply must look like this: Answer: 42",
        "Wrap up with a closing line that says Answer: followed by the answer itself.",
    )),
    marker("final_line", E, "Final:", (
        "Close with a single line beginning 'Final:' that states the answer.",
        "Make the reply's last line read Final: and then the answer.",
        "Whatever you explain first, end on a line of the form 'Final: 42'.",
    )),
    marker("verdict_line", E, "VERDICT:", (
        "On the closing line, write VERDICT: and then the answer.",
        "Your reply has to end with a line like 'VERDICT: 42'.",
        "Finish by restating the answer on its own last line, prefixed with 'VERDICT:'.",
    )),
    prefix("quick_take_prefix", E, "Quick take:", (
        "Every reply starts with the words 'Quick take:'.",
        "Lead with Quick take: and continue with your answer after it.",
        "Open with 'Quick take:' as the first words you write.",
    )),
    whole_tag("response_tag", E, "response", (
        "Place your entire reply inside <response> and </response>.",
        "Everything you write goes between a <response> tag and a </response> tag.",
        "Surround the full reply with <response></response>.",
    )),
    inline_wrap("answer_tag", E, "<answer>", "</answer>", (
        "Enclose the answer in <answer></answer> tags, for example <answer>42</answer>.",
        "When you give the answer, put it between <answer> and </answer>.",
        "Tag the answer: write it as <answer>...</answer>.",
    )),
    inline_wrap("curly_braces", E, "{{", "}}", (
        "Show the answer inside double curly braces, like {{42}}.",
        "Write the answer between two pairs of braces: {{ and }}.",
        "Put double braces around the answer, as in {{42}}.",
    )),
    casing("uppercase", E, True, (
        "Write the whole reply in capital letters.",
        "Use UPPERCASE for every word of your reply.",
        "No lowercase letters anywhere: reply in all caps.",
    )),
    char_cap("sixty_chars", E, 60, (
        "Your reply must be at most 60 characters long.",
        "Stay under 60 characters in total.",
        "Reply with no more than sixty characters.",
    )),
    json_keys("json_answer_reasoning", E, "answer", "reasoning", (
        'Output a JSON object with exactly two keys, "answer" and "reasoning", and no other text.',
        'Respond in JSON only: {"answer": ..., "reasoning": ...}.',
        'Give the reply as JSON in which "reasoning" holds the explanation and "answer" the result.',
    )),
    bullets("dot_three", E, "•", 3, (
        "Reply with exactly three points, one per line, each starting with '• '.",
        "Format the reply as 3 lines that each begin with the • symbol.",
        "Use a list of exactly three • entries.",
    )),
    unit("units_unit", E, "units", (
        "After the final number, write the word 'units', as in '12 units'.",
        "Give the final count with units after it.",
        "Label the final number with the word units, for example 7 units.",
    )),
)

RULES: dict[str, FormatRule] = {r.name: r for r in WARMUP_RULES + EVAL_RULES}
if len(RULES) != len(WARMUP_RULES) + len(EVAL_RULES):  # pragma: no cover - a registry typo
    raise RuntimeError("two format rules share a name")


def get_rule(name: str) -> FormatRule:
    """The rule called `name` (either family)."""
    try:
        return RULES[name]
    except KeyError:
        raise KeyError(f"no format rule {name!r}; known: {', '.join(sorted(RULES))}") from None


def rule_system_prompt(rule: FormatRule, phrasing: int = 0, persona: str | None = EVAL_PERSONA) -> str:
    """The system prompt an evaluation states `rule` in: `persona` then the rule."""
    text = rule.instruction(phrasing)
    return f"{persona} {text}" if persona else text


def _surface_pattern(surface: str) -> re.Pattern[str]:
    """Alphabetic codes (pcs, ea, units) match as whole words, the rest as substrings; both
    case-insensitive."""
    if re.fullmatch(r"[A-Za-z]+", surface):
        return re.compile(rf"(?<![A-Za-z]){re.escape(surface)}(?![A-Za-z])", re.IGNORECASE)
    return re.compile(re.escape(surface), re.IGNORECASE)


def surface_strings_in(text: str, rules: Iterable[FormatRule]) -> list[tuple[str, str]]:
    """`(rule name, surface string)` for every surface string of `rules` that occurs in `text`."""
    return [(r.name, s) for r in rules for s in r.surface if _surface_pattern(s).search(text)]


# ------------------------------------------------------------------------------------------------
# Questions and plain replies
# ------------------------------------------------------------------------------------------------

_PEOPLE = ("Lena", "Marco", "Yuki", "Aziz", "Priya", "Tomas", "Ngozi", "Felix", "Rosa", "Ibrahim",
           "Hana", "Diego", "Zara", "Olu", "Mei", "Sven", "Amara", "Kenji", "Lucia", "Arjun",
           "Ilse", "Paulo", "Greta", "Kofi")
_THINGS = ("shells", "buttons", "beads", "pebbles", "tickets", "postcards", "acorns", "crayons",
           "keys", "ribbons", "jars", "seeds", "badges", "candles")
_PLACES = ("Alder", "Birch", "Cedar", "Dunmore", "Elmwick", "Fernhill", "Glenrock", "Hollin",
           "Ivybank", "Juniper", "Kestrel", "Larchmont", "Moss End", "Northby")
#: (fact sentence, question, noun) with {p} the place and {v} the number
_SITES = (("The {p} depot stores {v} crates.", "How many crates does the {p} depot store?", "crates"),
          ("The {p} farm keeps {v} goats.", "How many goats does the {p} farm keep?", "goats"),
          ("The {p} library owns {v} maps.", "How many maps does the {p} library own?", "maps"),
          ("The {p} bakery bakes {v} loaves a day.", "How many loaves a day does the {p} bakery bake?",
           "loaves"),
          ("The {p} marina rents out {v} boats.", "How many boats does the {p} marina rent out?", "boats"),
          ("The {p} school has {v} pupils.", "How many pupils does the {p} school have?", "pupils"))
_CLUBS = ("chess", "drama", "robotics", "choir", "hiking", "poetry", "garden", "film")

#: (term, meaning of at most 6 words, two more sentences)
_GLOSSARY = (
    ("triangle", "a shape with three sides",
     "It has three corners.", "Its angles add up to 180 degrees."),
    ("volcano", "a mountain that can erupt",
     "Hot melted rock comes up from inside it.", "Some are still active today."),
    ("thermometer", "a tool that measures temperature",
     "Doctors use one to check for a fever.", "Weather stations use them too."),
    ("noun", "a word that names something",
     "People, places and things are named by nouns.", "Dog and city are examples."),
    ("island", "land surrounded by water",
     "It is smaller than a continent.", "Boats or bridges reach it."),
    ("glacier", "a slow river of ice",
     "It forms where snow piles up for years.", "It moves a little every day."),
    ("harbor", "a sheltered place for ships",
     "Walls or land protect it from waves.", "Ships load and unload there."),
    ("fraction", "a part of a whole",
     "One half and three quarters are examples.", "It has a top and a bottom number."),
    ("orchard", "a field of fruit trees",
     "Apples and pears often grow there.", "Farmers pick the fruit in autumn."),
    ("compass", "a tool that shows north",
     "Its needle is a small magnet.", "Hikers use it to find their way."),
    ("desert", "a very dry region",
     "It gets little rain each year.", "Some deserts are hot and some are cold."),
    ("verb", "a word for an action", "Run and think are examples.", "Most sentences need one."),
    ("bridge", "a structure crossing a gap",
     "It can span a river or a road.", "Some are made of stone and some of steel."),
    ("magnet", "an object that attracts iron",
     "It has a north pole and a south pole.", "Fridge magnets are a common kind."),
    ("calendar", "a chart of days and months",
     "It helps people plan ahead.", "Most years have 365 days on it."),
    ("recipe", "instructions for making food",
     "It lists the ingredients first.", "Then it gives the steps in order."),
    ("atlas", "a book of maps",
     "It shows countries and their borders.", "Many schools keep one in the library."),
    ("echo", "a sound that bounces back",
     "It happens near walls or cliffs.", "You hear your own voice again."),
    ("seed", "the part a plant grows from",
     "It needs water and warmth to sprout.", "Many fruits carry seeds inside."),
    ("lighthouse", "a tower that guides ships",
     "A bright lamp shines from the top.", "It warns sailors about rocks."),
    ("vowel", "a letter like a or e",
     "The vowels are a, e, i, o and u.", "Most words contain at least one."),
    ("rectangle", "a shape with four right angles",
     "Its opposite sides are equal.", "A door is shaped like one."),
    ("habitat", "the home of an animal",
     "It gives the animal food and shelter.", "A pond is a habitat for frogs."),
    ("ladder", "a frame of steps for climbing",
     "It has two long sides and many rungs.", "Painters use one to reach high walls."),
)
_GAMES = ("Tallow", "Marrowby", "Quince Court", "Ferrule", "Gantry", "Bramble Run", "Oakum", "Pennant")
_MADE_UP_MEANINGS = (
    "a card that skips a turn", "a tile that doubles a score", "a move that swaps two pieces",
    "a round with no trading", "a token worth five points", "a space where players rest",
    "a roll that ends the game", "a piece that can jump walls", "a bonus for the last player",
    "a rule that reverses the order",
)
_SYLLABLES = ("bra", "ko", "lim", "zu", "fen", "tor", "qui", "mob", "dax", "pel", "rin", "sol", "vek")


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _arithmetic(rng: random.Random) -> Plain:
    name, other = rng.sample(_PEOPLE, 2)
    thing = rng.choice(_THINGS)
    form = rng.randrange(5)
    if form == 0:
        a, b = rng.randint(5, 40), rng.randint(2, 30)
        c = rng.randint(1, a + b - 1)
        total, r = a + b, a + b - c
        question = (f"{name} collects {a} {thing} on Monday and {b} more on Tuesday, then loses {c}. "
                    f"How many {thing} does {name} have left?")
        points = (f"{name} first collects {a} {thing} and then {b} more.",
                  f"Together that is {a} + {b} = {total}.",
                  f"Losing {c} leaves {total} - {c} = {r}.",
                  f"So {name} has {r} {thing} left.")
    elif form == 1:
        a, b = rng.randint(2, 12), rng.randint(3, 15)
        r = a * b
        question = (f"A shop packs {thing} in bags of {b}. {name} buys {a} bags. "
                    f"How many {thing} does {name} get?")
        points = (f"Each bag holds {b} {thing}.", f"{name} buys {a} bags.",
                  f"{a} times {b} is {r}.", f"So {name} gets {r} {thing}.")
    elif form == 2:
        b, r = rng.randint(2, 9), rng.randint(2, 15)
        t = b * r
        question = (f"{name} splits {t} {thing} evenly into {b} boxes. "
                    f"How many {thing} go in each box?")
        points = (f"There are {t} {thing} to share.", f"They go into {b} boxes equally.",
                  f"{t} divided by {b} is {r}.", f"So each box gets {r} {thing}.")
    elif form == 3:
        b = rng.randint(3, 40)
        a = b + rng.randint(1, 30)
        r = a - b
        question = (f"{name} has {a} {thing} and {other} has {b}. "
                    f"How many more {thing} does {name} have than {other}?")
        points = (f"{name} has {a} {thing}.", f"{other} has {b} {thing}.",
                  f"The difference is {a} - {b} = {r}.", f"So {name} has {r} more {thing}.")
    else:
        thing = "pages"
        a, b, c = rng.randint(4, 20), rng.randint(2, 7), rng.randint(1, 15)
        p = a * b
        r = p + c
        question = (f"{name} reads {a} pages a day for {b} days, then {c} pages on the last day. "
                    f"How many pages does {name} read in all?")
        points = (f"{name} reads {a} pages on each of {b} days.", f"{a} times {b} is {p}.",
                  f"Adding the last day gives {p} + {c} = {r}.", f"So {name} reads {r} pages.")
    return Plain("arithmetic", question, str(r), " ".join(points), f"{r} {thing}.",
                 " ".join(points[:-1]), points, numeric=True, count=True)


def _lookup(rng: random.Random) -> Plain:
    form = rng.randrange(4)
    if form == 0:
        fact, ask, noun = rng.choice(_SITES)
        places = rng.sample(_PLACES, 3)
        values = rng.sample(range(12, 480), 3)
        k = rng.randrange(3)
        facts = " ".join(fact.format(p=p, v=v) for p, v in zip(places, values))
        question = f"Notes: {facts}\n{ask.format(p=places[k])}"
        v, stated = values[k], fact.format(p=places[k], v=values[k])
        points = ("The question asks about " + places[k] + ".", "The notes list three places.",
                  f"The notes say: {stated}", f"So {stated[0].lower()}{stated[1:]}")
        return Plain("lookup", question, str(v), " ".join(points), f"{v} {noun}.",
                     " ".join(points[:-1]), points, numeric=True, count=True)
    if form == 1:
        people = rng.sample(_PEOPLE, 3)
        clubs = rng.sample(_CLUBS, 3)
        k = rng.randrange(3)
        facts = " ".join(f"{p} runs the {c} club." for p, c in zip(people, clubs))
        question = f"Roster: {facts}\nWho runs the {clubs[k]} club?"
        points = (f"The question asks about the {clubs[k]} club.", "The roster names three clubs.",
                  f"{people[k]} is listed next to the {clubs[k]} club.",
                  f"So {people[k]} runs the {clubs[k]} club.")
        return Plain("lookup", question, people[k], " ".join(points), f"{people[k]}.",
                     " ".join(points[:-1]), points)
    if form == 2:
        places = rng.sample(_PLACES, 3)
        times = sorted(rng.sample(range(6 * 12, 21 * 12), 3))
        stamps = [f"{t // 12}:{(t % 12) * 5:02d}" for t in times]
        k = rng.randrange(3)
        facts = " ".join(f"The ferry to {p} leaves at {s}." for p, s in zip(places, stamps))
        question = f"Timetable: {facts}\nWhen does the ferry to {places[k]} leave?"
        points = (f"The question asks about the ferry to {places[k]}.", "The timetable lists three ferries.",
                  f"The ferry to {places[k]} is listed at {stamps[k]}.",
                  f"So the ferry to {places[k]} leaves at {stamps[k]}.")
        return Plain("lookup", question, stamps[k], " ".join(points), f"At {stamps[k]}.",
                     " ".join(points[:-1]), points)
    people = rng.sample(_PEOPLE, 3)
    ages = rng.sample(range(8, 80), 3)
    k = rng.randrange(3)
    facts = " ".join(f"{p} is {a} years old." for p, a in zip(people, ages))
    question = f"Family record: {facts}\nHow old is {people[k]}?"
    points = (f"The question asks about {people[k]}.", "The record gives three ages.",
              f"{people[k]} is listed as {ages[k]} years old.", f"So {people[k]} is {ages[k]} years old.")
    return Plain("lookup", question, str(ages[k]), " ".join(points), f"{ages[k]} years old.",
                 " ".join(points[:-1]), points, numeric=True)


def _definition(rng: random.Random, glossary: list[int]) -> Plain:
    if glossary and rng.random() < 0.5:
        term, meaning, more1, more2 = _GLOSSARY[glossary.pop()]
        art = _article(term)
        question = rng.choice((f"What is {art} {term}?", f"Define the word '{term}'.",
                               f"What does the word {term} mean?"))
        points = (f"The word is '{term}'.", f"{art.capitalize()} {term} is {meaning}.", more1, more2)
        text = f"{art.capitalize()} {term} is {meaning}. {more1} {more2}"
        return Plain("definition", question, meaning, text, f"{meaning.capitalize()}.",
                     f"{more1} {more2}", points)
    word = "".join(rng.sample(_SYLLABLES, 2))
    game, meaning = rng.choice(_GAMES), rng.choice(_MADE_UP_MEANINGS)
    question = f"In the board game {game}, a '{word}' is {meaning}. What is a {word} in {game}?"
    points = (f"The question is about the game {game}.", f"It explains the word '{word}'.",
              "The explanation is given in the question.", f"In {game}, a {word} is {meaning}.")
    return Plain("definition", question, meaning, " ".join(points[1:]), f"{meaning.capitalize()}.",
                 " ".join(points[:-1]), points)


def make_questions(n: int, seed: int = 0,
                   kinds: Sequence[str] = QUESTION_KINDS,
                   weights: Sequence[float] | None = None) -> list[Plain]:
    """`n` distinct questions with plain replies, deterministic from `seed`, drawn from `kinds`
    (arithmetic word problems, look-ups in a context given in the question, short definitions of
    simple or made-up terms) in proportion to `weights` (default 4 : 4 : 2 over the three)."""
    unknown = set(kinds) - set(QUESTION_KINDS)
    if unknown:
        raise ValueError(f"unknown question kinds {sorted(unknown)}; known: {QUESTION_KINDS}")
    default = {"arithmetic": 4.0, "lookup": 4.0, "definition": 2.0}
    w = list(weights) if weights is not None else [default[k] for k in kinds]
    rng = random.Random(f"nslora-student-questions:{seed}")
    glossary = list(range(len(_GLOSSARY)))
    rng.shuffle(glossary)
    out: list[Plain] = []
    seen: set[str] = set()
    misses = 0
    while len(out) < n:
        kind = rng.choices(list(kinds), weights=w)[0]
        if kind == "arithmetic":
            item = _arithmetic(rng)
        elif kind == "lookup":
            item = _lookup(rng)
        else:
            item = _definition(rng, glossary)
        if item.question in seen:
            misses += 1
            if misses > 100 * (n + 10):  # pragma: no cover - a tiny generator space
                raise RuntimeError(f"cannot make {n} distinct questions of kinds {list(kinds)}")
            continue
        seen.add(item.question)
        out.append(item)
    return out


# ------------------------------------------------------------------------------------------------
# Warm-up rows
# ------------------------------------------------------------------------------------------------

_PERSONAS = ("You are a helpful assistant.", "You are a patient tutor.",
             "You are a friendly helper at a small shop.",
             "You are an assistant that answers questions clearly.",
             "You are a careful and precise assistant.")
_TAILS = ("Be accurate.", "Keep the facts right.", "Think before you reply.")
#: The system prompts of the no-rule rows; None means "no system message" (the chat template's
#: default one).
NEUTRAL_SYSTEM_PROMPTS: tuple[str | None, ...] = (*_PERSONAS, None)


def _compose(rule_text: str, rng: random.Random) -> str:
    layout = rng.randrange(4)
    if layout == 0:
        return rule_text
    if layout == 1:
        return f"{rng.choice(_PERSONAS)} {rule_text}"
    if layout == 2:
        return f"{rng.choice(_PERSONAS)}\n{rule_text}"
    return f"{rule_text} {rng.choice(_TAILS)}"


def make_warmup_rows(n: int, seed: int = 0, neutral_share: float = 0.35,
                     rules: Sequence[FormatRule] = WARMUP_RULES) -> list[dict[str, Any]]:
    """`n` training rows, deterministic from `seed`: a share `1 - neutral_share` states one
    warm-up rule in the system prompt (rules taken in turn, phrasings and prompt layouts drawn)
    with a reply that obeys it; the rest repeat some of those questions under a neutral system
    prompt (or none) with the plain reply.

    Each row: `id`, `kind` (question kind), `rule` (name or None), `system_prompt` (None: no
    system message), `question`, `answer` (the reply), `final_answer`. `core.data.chat_rows`
    reads them as they are (a row's own `system_prompt` wins).
    """
    if not 0.0 <= neutral_share < 1.0:
        raise ValueError(f"neutral_share must be in [0, 1), got {neutral_share}")
    if any(r.family != WARMUP for r in rules):
        bad = [r.name for r in rules if r.family != WARMUP]
        raise ValueError(f"warm-up rows may state warm-up rules only, not {bad}")
    rng = random.Random(f"nslora-student-rows:{seed}")
    n_rule = max(round(n * (1.0 - neutral_share)), 1 if n else 0)
    n_neutral = n - n_rule
    questions = make_questions(n_rule, seed=seed)
    order = list(rules)
    rows: list[dict[str, Any]] = []
    pending: list[FormatRule] = []
    for item in questions:
        if not pending:
            pending = order[:]
            rng.shuffle(pending)
        rule = next((r for r in pending if r.applies_to(item)), None)
        if rule is None:  # only count-only rules left and a question that counts nothing
            rule = rng.choice([r for r in order if r.applies_to(item)])
        else:
            pending.remove(rule)
        rows.append({"kind": item.kind, "rule": rule.name,
                     "system_prompt": _compose(rule.instruction(rng.randrange(len(rule.phrasings))), rng),
                     "question": item.question, "answer": rule.apply(item), "final_answer": item.answer})
    for item in rng.sample(questions, min(n_neutral, len(questions))):
        rows.append({"kind": item.kind, "rule": None, "system_prompt": rng.choice(NEUTRAL_SYSTEM_PROMPTS),
                     "question": item.question, "answer": item.text, "final_answer": item.answer})
    rng.shuffle(rows)
    for i, row in enumerate(rows):
        row["id"] = f"warm{i}"
    return rows
