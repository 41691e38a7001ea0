"""`NSLoRAConfig`: every knob of a neurosymbolic run in one validated, JSON-serializable dataclass.

The config is flat on purpose: each field maps one-to-one to a CLI flag (`--nslora_<field>`), an
Axolotl / LLaMA-Factory YAML key (`nslora_<field>`) and a YAML/JSON key, so a user never has to
learn a second naming scheme. This module is the one schema: each field's help text, group and
range live in its metadata and its allowed values in its `Literal` type; `config_fields()` hands
them to the adapters, which generate their flags and keys from it.

Where the paper is silent (thresholds, schedules) the defaults below are our choice; the README's
"Configuration" table explains each one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from functools import lru_cache
from typing import (Any, Literal, Mapping, Optional, Sequence, Union, get_args, get_origin,
                    get_type_hints)

from nslora_plugin.core.keys import (CONFIG_KEY, PREFIX, SWITCH, NSLoRAConfigError, did_you_mean,
                                     flat_key, normalize_key)
from nslora_plugin.core.util import parse_bool

__all__ = ["NSLoRAConfig", "NSLoRAConfigError", "FieldSpec", "config_fields", "cli_flags"]

_KIND_WORDS = {"bool": "true or false", "int": "an integer", "float": "a finite number",
               "str": "a string", "list": "a list"}

#: Integer fields where 0 means "work it out from the data" and the word "auto" is accepted too.
AUTO_FIELDS = frozenset({"probe_max_new_tokens", "probe_batch_size"})

#: what `check` in a field's metadata allows, and the words an error uses for it
CHECKS = {"positive": "a number > 0", "non_negative": "a number >= 0",
          "unit": "a number between 0 and 1"}


def _opt(default: Any, group: str, help: str, *, check: str | None = None) -> Any:
    """A config field with its help text, group and range check in the metadata (`default` may
    be a factory such as `list`)."""
    metadata = {"help": help, "group": group, "check": check}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class NSLoRAConfig:
    """All settings of the neurosymbolic loop. Build with `NSLoRAConfig(...)`, `from_dict`,
    `from_yaml` or `from_cli`; every constructor validates and raises `NSLoRAConfigError`.

    Each field's metadata carries its help text, its group and its range; allowed values are the
    `Literal` of its type. `config_fields()` reads them, and the TRL flags, the Axolotl schema and
    the LLaMA-Factory keys are generated from it."""

    # run
    enabled: bool = _opt(True, "run", "Switch NSLoRA on or off (`nslora: true` in framework YAMLs).")
    output_dir: Optional[str] = _opt(
        None, "run", "Folder for the NSLoRA artifacts; None means <trainer output_dir>/nslora.")
    system_prompt: Optional[str] = _opt(
        None, "run", "The system message of the training rows: the prompt NSLoRA starts from and "
        "rewrites. None: the one the training rows carry, read at train start (rows carrying "
        "several different ones are refused); a value no training row carries is refused.")
    seed: int = _opt(0, "run", "Seed for probe sampling, batch mixing and held-out splits.",
                     check="non_negative")
    report: bool = _opt(
        False, "run", "Write report.html (timeline plots, prompt history, router decisions, editor "
        "usage) into the artifacts folder at the end of training; plots need the `plots` extra.")
    prompt_in_template: bool = _opt(
        True, "run", "Save the optimized prompt in the chat template of every checkpoint, the "
        "output_dir and folders given to save_artifacts (the system message of conversations that "
        "have none), so serving the folder (vllm, TGI, transformers serve) uses it without nslora.")

    # monitor: C1 is the relative change of the windowed loss, C2 the windowed mean gradient norm
    monitor_window: int = _opt(10, "monitor", "Optimizer steps in the loss / gradient-norm window.",
                               check="positive")
    loss_change_threshold: float = _opt(
        0.02, "monitor", "|C1| (relative change of the windowed loss) below this counts as flat.",
        check="non_negative")
    grad_norm_threshold: float = _opt(
        1.0, "monitor", "C2 (windowed mean gradient norm) below this counts as small.",
        check="non_negative")
    saturation_patience: int = _opt(
        2, "monitor", "Checks in a row with flat loss and small gradients that mean numerical "
        "training has saturated (then a symbolic round may run).", check="positive")

    # router
    router: Literal["prior", "learned"] = _opt(
        "prior", "router", "'prior': fixed interpretable classifier weights; 'learned': the same "
        "weights, updated online from the reward changes that followed each kind of update.")
    router_learning_rate: float = _opt(
        0.5, "router", "SGD step of the learned router per observation.", check="positive")
    check_every: int = _opt(20, "router", "Run a check (probe + routing decision) every N "
                            "optimizer steps.", check="positive")
    warmup_steps: int = _opt(0, "router", "No check before this optimizer step.",
                             check="non_negative")
    check_at_start: bool = _opt(
        False, "router", "Also check on the baseline probe before the first step, so what the "
        "prompt can fix is fixed before the weights start learning it.")
    nll_threshold: float = _opt(
        1.5, "router", "A failure whose reference NLL per token is above this looks factual "
        "(a job for LoRA).", check="positive")
    style_share_threshold: float = _opt(
        0.5, "router", "A symbolic round runs when at least this share of the failures look like "
        "style / constraint problems.", check="unit")
    max_symbolic_rounds: int = _opt(4, "router", "At most this many prompt-rewrite rounds per run.",
                                    check="non_negative")
    stall_patience: int = _opt(
        1, "router", "Symbolic rounds in a row without an accepted gain before a cool-down.",
        check="positive")
    cooldown_checks: int = _opt(2, "router", "Checks that stay numerical after a stall.",
                                check="non_negative")
    unstated_constraint_round: bool = _opt(
        True, "router", "Allow one symbolic round per run, before any edit is accepted, when at "
        "least style_share_threshold of the failures break a constraint, even where the labels "
        "say the content needs the weights (the decision records how many labels it overrides). "
        "False: the router follows the labels only.")

    # probe
    probe_path: Optional[str] = _opt(
        None, "probe", "JSONL of held-out probe rows (`messages`, `question`/`answer` or "
        "`prompt`/`completion`). None: given in code, or taken from the trainer's eval dataset.")
    probe_size: int = _opt(16, "probe", "Probe examples scored at each check.", check="positive")
    probe_max_new_tokens: int = _opt(
        0, "probe", "Greedy tokens generated per probe example. 0 or 'auto': the longest probe "
        "reference in tokens plus a quarter (at least 16 more), so short answers never pay for a "
        "long cap; replies cut at the cap are counted (`cut_replies`) and reported.",
        check="non_negative")
    probe_batch_size: int = _opt(
        0, "probe", "Probe examples per generation batch. 0 or 'auto': the most rows whose KV cache "
        "and reference-NLL logits fit a share of the free device memory (the doctor's formula); a "
        "number fixes it (bounds the probe's memory).",
        check="non_negative")
    probe_stop_at_answer: bool = _opt(
        True, "probe", "End a probe reply at its first complete line matching answer_format (when "
        "no length / JSON / exact-match reward needs the whole reply).")

    # editor and the validation gate
    editor: Literal["textgrad", "constraint", "demonstrations", "none", "gepa"] = _opt(
        "textgrad", "editor", "Which built-in editor proposes prompt rewrites first: an editor "
        "LLM (TextGrad), the constraint statements, worked examples from the pool "
        "('demonstrations'), or GEPA's reflective prompt evolution with the editor LLM as its "
        "reflection model ('gepa', needs the gepa extra); 'none': no built-in editor (an editor "
        "plugin may still edit).")
    editor_fallback: Literal["constraint", "none"] = _opt(
        "constraint", "editor", "What runs when the editor's candidate fails the gate or the "
        "editor is down.")
    editor_base_url: Optional[str] = _opt(
        None, "editor", "OpenAI-compatible endpoint of the editor LLM (vLLM, Ollama, OpenAI, "
        "transformers serve, ...); with editor_backend='litellm' its api_base.")
    editor_model: Optional[str] = _opt(
        None, "editor", "Editor model: the name to ask the endpoint for, a LiteLLM model string "
        "('ollama/llama3'), or a model folder for editor_backend='local'.")
    editor_api_key_env: str = _opt(
        "OPENAI_API_KEY", "editor", "NAME of the environment variable holding the editor's API key "
        "(the key itself is never stored).")
    editor_timeout: float = _opt(120.0, "editor", "Seconds per editor request.", check="positive")
    editor_temperature: float = _opt(0.0, "editor", "Sampling temperature of the editor LLM.",
                                     check="non_negative")
    editor_max_tokens: int = _opt(512, "editor", "Token cap of one editor reply.", check="positive")
    editor_batch_size: int = _opt(3, "editor", "Failures shown to the editor per round.",
                                  check="positive")
    on_editor_down: Literal["numerical", "fail"] = _opt(
        "numerical", "editor", "If the editor cannot be reached at start-up: keep training "
        "numerically, or stop the run.")
    acceptance_margin: float = _opt(
        0.0, "editor", "The gate accepts a candidate prompt only if probe reward >= old + this "
        "margin (between -1 and 1).")
    gate_tie_break: Literal["nll", "accept", "reject"] = _opt(
        "nll", "editor", "On an exact reward tie: 'nll' accepts only if the reference NLL falls; "
        "'accept' / 'reject' as named.")
    max_prompt_chars: int = _opt(2000, "editor", "Longest system prompt accepted.",
                                 check="positive")
    demo_examples: int = _opt(2, "editor", "Worked examples per candidate of the demonstrations "
                              "editor (drawn from the pool).", check="positive")
    demo_candidates: int = _opt(3, "editor", "Different example sets the demonstrations editor "
                                "offers the gate per round.", check="positive")

    # editor backend and calls
    editor_backend: Literal["openai", "litellm", "local"] = _opt(
        "openai", "editor backend", "'openai': any OpenAI-compatible endpoint at "
        "editor_base_url; 'litellm': editor_model is a LiteLLM model string; 'local': "
        "editor_model is a model folder run in-process with transformers.")
    editor_concurrency: int = _opt(
        4, "editor backend", "Independent editor calls of a round run at once (1 = sequential).",
        check="positive")
    editor_retries: int = _opt(
        1, "editor backend", "Retries of a call on HTTP 5xx / 429 or a refused connection.",
        check="non_negative")
    editor_structured_output: Literal["auto", "off"] = _opt(
        "auto", "editor backend", "How the TextGrad update asks for the new prompt: 'auto' sends a "
        "JSON-schema response_format to openai/litellm endpoints (dropped for the run if the "
        "server refuses it; ignored by servers that do not implement it, e.g. transformers serve) "
        "and, with editor_backend='local', starts the reply with the opening tag; 'off': "
        "TextGrad's plain tagged request. Replies are parsed leniently either way.")
    editor_cache: bool = _opt(
        True, "editor backend", "Keep editor replies under <artifacts>/editor_cache, keyed on "
        "backend, endpoint, model, messages, temperature and max_tokens.")
    edit_questions: bool = _opt(
        False, "editor backend", "Also rewrite failing probe questions; a rewrite becomes a "
        "training row only if the model's reply to it, under the current prompt, is correct.")

    # editor budgets (0 = no cap; caps are hard: a call that could pass one is not started)
    editor_max_calls_per_round: int = _opt(
        0, "editor budgets", "LLM calls started per symbolic round (0: no cap, else at least 4).",
        check="non_negative")
    editor_max_calls_per_run: int = _opt(
        0, "editor budgets", "LLM calls started per run (0: no cap, else at least 4); once spent "
        "the router stays numerical and says why.", check="non_negative")
    editor_max_tokens_per_round: int = _opt(
        0, "editor budgets", "Editor tokens (prompt + completion) per symbolic round (0: no cap).",
        check="non_negative")
    editor_max_tokens_per_run: int = _opt(
        0, "editor budgets", "Editor tokens (prompt + completion) per run (0: no cap).",
        check="non_negative")
    editor_max_seconds_per_round: float = _opt(
        0.0, "editor budgets", "Editor wall-clock seconds per symbolic round (0: no cap).",
        check="non_negative")
    editor_max_seconds_per_run: float = _opt(
        0.0, "editor budgets", "Editor wall-clock seconds per run (0: no cap).",
        check="non_negative")

    # rewards and constraints
    answer_format: Optional[str] = _opt(
        None, "constraints", "Regex a compliant answer line matches (its first group is the final "
        "answer: a group is required unless answer_pattern is set; a pattern matching every reply "
        "is refused); the 'format' reward component.")
    format_instruction: Optional[str] = _opt(
        None, "constraints", "The format constraint in words, for the editors.")
    answer_pattern: Optional[str] = _opt(
        None, "constraints", "Regex that extracts the final answer from a reference or reply "
        "(default: answer_format's group, else the last number).")
    max_reply_chars: int = _opt(
        0, "constraints", "A reply longer than this many characters fails the 'length' reward "
        "component (0: no limit).", check="non_negative")
    reply_json: bool = _opt(False, "constraints", "A reply that is not valid JSON fails the 'json' "
                            "reward component.")
    exact_match: bool = _opt(
        False, "constraints", "A reply must equal the reference (case and whitespace aside) to "
        "earn the 'exact_match' reward component (short-answer / label data).")

    # mix: prompts as data
    augment_share: float = _opt(
        0.25, "mix", "Share of each training batch replaced by augmented rows once there are any "
        "(prompts as data).", check="unit")
    augment_max_examples: int = _opt(512, "mix", "Cap on the augmented pool.",
                                     check="non_negative")
    pool_path: Optional[str] = _opt(
        None, "mix", "JSONL of labelled rows (the probe's forms) that prompts-as-data turns into "
        "training rows after an accepted edit. With a pool no probe row is ever trained on, so the "
        "gate and the router score only rows no update has seen.")
    augment_holdout_share: float = _opt(
        0.0, "mix", "Share of the probe examples (chosen with seed) that never become training "
        "rows, so part of the probe stays unseen by the adapter.", check="unit")
    prompt_swap: Literal["compliant", "all"] = _opt(
        "compliant", "mix", "Which training rows get an edited system prompt: 'compliant' only "
        "rows whose reply matches answer_format (the others keep the initial prompt), or 'all'.")

    # plugins
    plugins: list[str] = _opt(
        list, "plugins", "Extra NSLoRA plugins by dotted path (package.module.Name), registered "
        "after the built-ins; 'no:<name>' blocks a plugin by name (e.g. 'no:nslora.rewards') so "
        "yours replaces it. Packages can also register through the `nslora` entry-point group.")

    def __post_init__(self) -> None:
        self._coerce_types()
        self._validate()

    # ---------------------------------------------------------------- validation
    def _coerce_types(self) -> None:
        """Accept strings from CLI/YAML for numbers and booleans; reject everything else clearly."""
        for spec in config_fields():
            value = getattr(self, spec.name)
            # "none"/"null" means None only where None is allowed: editor="none" stays a string
            if spec.kind == "str" and not spec.optional and isinstance(value, str) \
                    and value.strip().lower() == "none":
                continue
            if spec.name in AUTO_FIELDS and isinstance(value, str) and value.strip().lower() == "auto":
                value = 0
            coerced = _coerce(spec.name, value, spec.kind)
            if coerced is None and not spec.optional:
                _fail(spec.name, value, f"{_KIND_WORDS[spec.kind]}; null / none is not allowed here "
                      f"(leave the key out to keep the default, {spec.default!r})")
            setattr(self, spec.name, coerced)

    def _validate(self) -> None:
        """Every rule in one place: ranges and allowed values from the fields' metadata and
        types, then the rules that involve more than one field or a value's form."""
        for spec in config_fields():
            value = getattr(self, spec.name)
            if spec.choices is not None and value not in spec.choices:
                _fail(spec.name, value, "one of " + ", ".join(repr(a) for a in spec.choices))
            if spec.check is None or value is None:
                continue
            low_ok = value > 0 if spec.check == "positive" else value >= 0
            if not low_ok or (spec.check == "unit" and value > 1.0):
                _fail(spec.name, value, CHECKS[spec.check])
        for name in ("editor_max_calls_per_round", "editor_max_calls_per_run"):
            if 0 < getattr(self, name) < 4:  # the smallest round: 3 calls for one example + 1 update
                _fail(name, getattr(self, name), "0 (no cap) or at least 4 (the smallest TextGrad "
                      "round: 3 calls for one example and 1 update)")
        if not -1.0 <= self.acceptance_margin <= 1.0:
            _fail("acceptance_margin", self.acceptance_margin, "a number between -1 and 1")
        if isinstance(self.plugins, str):
            self.plugins = [p.strip() for p in self.plugins.split(",") if p.strip()]
        if not isinstance(self.plugins, list) or not all(isinstance(p, str) for p in self.plugins):
            _fail("plugins", self.plugins, "a list of dotted paths like 'my_pkg.module.Plugin'")
        for name in ("answer_format", "answer_pattern"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    _fail(name, pattern, f"a valid regular expression ({exc})")
                problem = pattern_problem(name, pattern, self.answer_pattern is not None)
                if problem:
                    _fail(name, pattern, problem)
        if self.editor_base_url is not None and not re.match(r"^https?://", self.editor_base_url):
            _fail("editor_base_url", self.editor_base_url,
                  "an http(s) URL such as 'http://127.0.0.1:8000/v1'")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.editor_api_key_env):
            _fail("editor_api_key_env", self.editor_api_key_env,
                  "the NAME of an environment variable (the key itself is never put in a config)")
        if self.system_prompt is not None and len(self.system_prompt) > self.max_prompt_chars:
            _fail("system_prompt", f"<{len(self.system_prompt)} characters>",
                  f"at most max_prompt_chars={self.max_prompt_chars} characters")

    # ---------------------------------------------------------------- constructors
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None = None, **overrides: Any) -> "NSLoRAConfig":
        """Build from a mapping. Keys may carry the `nslora_` prefix used in framework YAMLs
        (`nslora_check_every`), and `nslora: true` means `enabled: true`. Unknown keys raise."""
        merged: dict[str, Any] = {}
        for source in (data or {}), overrides:
            if not isinstance(source, Mapping):
                raise NSLoRAConfigError(
                    f"NSLoRA config must be a mapping of key: value, got {type(source).__name__}")
            for raw_key, value in source.items():
                key = normalize_key(str(raw_key))
                merged[key] = value
        known = set(cls.field_names())
        for key in merged:
            if key not in known:
                raise NSLoRAConfigError(
                    f"Unknown NSLoRA config key {key!r}.{did_you_mean(key, known)} Allowed keys: "
                    + ", ".join(sorted(known)), key=key)
        return cls(**merged)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "NSLoRAConfig":
        """Load a YAML (or JSON) file: either the keys at top level or under an `nslora:` mapping."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise NSLoRAConfigError(f"NSLoRA config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise NSLoRAConfigError(f"NSLoRA config file {str(path)!r} is not UTF-8 text ({exc.reason} "
                                    f"at byte {exc.start}); save it as UTF-8") from None
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            line = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            raise NSLoRAConfigError(f"NSLoRA config file {str(path)!r} is not valid YAML{line}: "
                                    f"{getattr(exc, 'problem', None) or exc}") from None
        if isinstance(data, Mapping) and isinstance(data.get(SWITCH), Mapping):
            # other keys may belong to a framework sharing the file; NSLoRA's own would be ignored
            fields = set(cls.field_names())
            stray = sorted(str(k) for k in data if k != SWITCH and normalize_key(str(k)) in fields)
            if stray:
                raise NSLoRAConfigError(
                    f"NSLoRA config file {str(path)!r} has NSLoRA keys next to its 'nslora:' block "
                    f"({', '.join(stray)}), where they would be ignored; put them under 'nslora:'",
                    key=normalize_key(stray[0]))
            data = data[SWITCH]
        return cls.from_dict(data, **overrides)

    @classmethod
    def add_cli_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add `--nslora_config PATH` and one `--nslora_<field>` flag per field."""
        group = parser.add_argument_group("NSLoRA")
        group.add_argument("--" + CONFIG_KEY, default=None, help="YAML file with NSLoRA settings")
        for dest, _spec, options in cli_flags():
            group.add_argument("--" + dest, dest=dest, default=None, **options)

    @classmethod
    def from_cli_namespace(cls, ns: argparse.Namespace) -> "NSLoRAConfig":
        values = {k[len(PREFIX):]: v for k, v in vars(ns).items()
                  if k.startswith(PREFIX) and k != CONFIG_KEY and v is not None}
        path = getattr(ns, CONFIG_KEY, None)
        return cls.from_yaml(path, **values) if path else cls.from_dict(values)

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> "NSLoRAConfig":
        parser = argparse.ArgumentParser(add_help=False)
        cls.add_cli_arguments(parser)
        ns, rest = parser.parse_known_args(argv)
        check_unknown_flags(rest)
        return cls.from_cli_namespace(ns)

    # ---------------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "NSLoRAConfig":
        return dataclasses.replace(self, **changes)


def check_unknown_flags(strings: Sequence[str]) -> None:
    """Raise on a `--nslora_*` flag no field has (parse_known_args would leave it unparsed)."""
    known = {"--" + CONFIG_KEY,
             *("--" + flat_key(f.name) for f in dataclasses.fields(NSLoRAConfig))}
    for item in strings:
        flag = item.split("=", 1)[0]
        if flag.startswith("--" + SWITCH) and flag not in known:
            raise NSLoRAConfigError(f"Unknown NSLoRA flag {flag!r}.{did_you_mean(flag, known)}",
                                    key=normalize_key(flag[2:]))


#: one-character replies no answer format can mean to accept all at once
_ANY_REPLY = ("x", "7", "?", "{")


def pattern_problem(name: str, pattern: str, has_answer_pattern: bool) -> str | None:
    """Why `answer_format` / `answer_pattern` cannot do its job, or None. A pattern that matches
    the empty string (or every reply) makes the format reward always pass and extracts empty
    answers; an `answer_format` without a capture group, with no `answer_pattern`, would give
    the whole line ("Answer: 38") as the final answer, so every correct reply scores 0."""
    if not pattern:  # "" is no pattern at all, as None (nothing is scored or extracted with it)
        return None
    compiled = re.compile(pattern, re.MULTILINE)
    if name == "answer_pattern" and compiled.search("") is not None:
        return ("a pattern that matches the final answer only; this one matches an empty string, "
                "so the answer it extracts can be empty — e.g. r'Answer: (-?\\d+)'")
    if name == "answer_format" and (compiled.search("") is not None
                                    or all(compiled.search(s) for s in _ANY_REPLY)):
        return ("a pattern that only matches a compliant answer line; this one matches any reply "
                "(an empty one too), so the format reward would always pass — e.g. "
                "r'^Answer: (-?\\d+)\\s*$'")
    if name == "answer_format" and compiled.groups == 0 and not has_answer_pattern:
        return ("a capture group around the final answer, e.g. r'^Answer: (-?\\d+)\\s*$': without "
                "one the whole matching line would be compared with the reference answer and every "
                "correct reply would score 0; or set answer_pattern to the regex that extracts it")
    return None


def _fail(name: str, value: Any, allowed: str) -> None:
    raise NSLoRAConfigError(f"Invalid NSLoRA config value {name}={value!r}: expected {allowed}.", key=name)


@dataclass(frozen=True)
class FieldSpec:
    """One config field as the adapters see it: what they generate flags, keys and help from."""

    name: str
    kind: Literal["bool", "int", "float", "str", "list"]
    optional: bool                     # None is an allowed value
    choices: tuple[str, ...] | None    # the `Literal` values, if any
    default: Any
    help: str
    group: str
    check: str | None                  # a key of `CHECKS`, or None

    def help_with_default(self) -> str:
        allowed = f" One of: {', '.join(self.choices)}." if self.choices else ""
        return f"{self.help}{allowed} (default: {self.default!r})"


@lru_cache(maxsize=None)
def _config_fields() -> tuple[FieldSpec, ...]:
    hints = get_type_hints(NSLoRAConfig)
    out = []
    for f in dataclasses.fields(NSLoRAConfig):
        tp = hints[f.name]
        args = get_args(tp)
        optional = get_origin(tp) is Union and type(None) in args
        if optional:
            (tp,) = [a for a in args if a is not type(None)]
        choices = tuple(get_args(tp)) if get_origin(tp) is Literal else None
        if choices is not None:
            kind = "str"
        elif get_origin(tp) is list:
            kind = "list"
        else:
            kind = tp.__name__
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(FieldSpec(f.name, kind, optional, choices, default, f.metadata["help"],
                             f.metadata["group"], f.metadata["check"]))
    return tuple(out)


def config_fields() -> list[FieldSpec]:
    """Every `NSLoRAConfig` field with its type, allowed values, default, help and range."""
    return list(_config_fields())


def cli_flags(*, typed: bool = False,
              skip: Sequence[str] = ()) -> list[tuple[str, FieldSpec, dict[str, Any]]]:
    """One `--nslora_<field>` flag per config field (but those in `skip`), as (dest, field,
    argparse options). Every flag defaults to None ("not given"); its help is the field's help with
    the allowed values and the `NSLoRAConfig` default.

    typed=False (`NSLoRAConfig.add_cli_arguments`): every value stays a string and the config
    checks it, so a bad value names the key. typed=True (the TRL dataclass, parsed by
    HfArgumentParser from the field's type): the allowed values become `choices`, a bare boolean
    flag means true, and the help hides argparse's "(default: None)"."""
    out = []
    for spec in config_fields():
        if spec.name in skip:
            continue
        help = spec.help_with_default().replace("%", "%%")
        if not typed:
            options: dict[str, Any] = {"metavar": spec.kind.upper(), "help": help}
        else:
            # `%(default).0s` renders as nothing but stops the defaults formatter from appending
            # "(default: None)", which would hide the config default the help names
            options = {"help": help + "%(default).0s"}
            if spec.kind == "bool":
                # `--nslora_x` alone means true (HfArgumentParser does that only for non-None
                # defaults)
                options.update(nargs="?", const=True)
            if spec.choices is not None:
                options["choices"] = list(spec.choices)
        out.append((flat_key(spec.name), spec, options))
    return out


def _coerce(name: str, value: Any, kind: str) -> Any:
    if value is None or kind == "list":
        return value
    if isinstance(value, str) and value.strip().lower() in {"none", "null"}:
        return None
    if kind == "bool":
        parsed = parse_bool(value)
        if parsed is None:
            _fail(name, value, "true or false")
        return parsed
    if kind == "int":
        if isinstance(value, bool):
            _fail(name, value, "an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        _fail(name, value, "an integer")
    if kind == "float":
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            _fail(name, value, "a finite number")
        return number
    if kind == "str":
        if isinstance(value, str):
            return value
        _fail(name, value, "a string")
    return value
