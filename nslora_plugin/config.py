"""`NSLoRAConfig`: every knob of a neurosymbolic run in one validated, JSON-serializable dataclass.

The config is flat on purpose: each field maps one-to-one to a CLI flag (`--nslora_<field>`), an
Axolotl / LLaMA-Factory YAML key (`nslora_<field>`) and a YAML/JSON key, so a user never has to
learn a second naming scheme. Fields are grouped by the concept they belong to (run, monitor,
router, probe, editor, constraints, data mix); the group is the first word of each comment.

Where the paper is silent (thresholds, schedules) the defaults below are our choice; the README's
"Configuration" table explains each one.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .util import parse_bool

__all__ = ["NSLoRAConfig", "NSLoRAConfigError"]

EDITORS = ("textgrad", "constraint", "none")
FALLBACKS = ("constraint", "none")
EDITOR_BACKENDS = ("openai", "litellm", "local")
ON_EDITOR_DOWN = ("numerical", "fail")
TIE_BREAKS = ("nll", "accept", "reject")
ROUTERS = ("prior", "learned")


class NSLoRAConfigError(ValueError):
    """A bad config key or value. The message names the key, the value and what is allowed;
    `.key` holds the offending field name (without the `nslora_` prefix)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


@dataclass
class NSLoRAConfig:
    """All settings of the neurosymbolic loop. Build with `NSLoRAConfig(...)`, `from_dict`,
    `from_yaml` or `from_cli`; every constructor validates and raises `NSLoRAConfigError`."""

    # run: switch, artifacts folder (None: `<trainer output_dir>/nslora`), initial system prompt
    # (the system message the training rows carry; None: the chat template's default one), seed.
    enabled: bool = True
    output_dir: str | None = None
    system_prompt: str | None = None
    seed: int = 0

    # monitor: number of optimizer steps in the loss / grad-norm window; `C1` (relative change of
    # the windowed loss) counts as flat when |C1| < loss_change_threshold, `C2` (windowed mean
    # gradient norm) counts as small when below grad_norm_threshold; both for `saturation_patience`
    # checks in a row mean numerical training has saturated.
    monitor_window: int = 10
    loss_change_threshold: float = 0.02
    grad_norm_threshold: float = 1.0
    saturation_patience: int = 2

    # router: "prior" (fixed interpretable weights) or "learned" (the same weights, updated online
    # with `router_learning_rate` from the reward changes that followed each kind of update);
    # check every `check_every` optimizer steps (first check not before `warmup_steps`; with
    # `check_at_start` also on the baseline probe before the first step, so what the prompt can
    # fix is fixed before the weights start learning it);
    # a failure whose reference NLL per token is above `nll_threshold` looks factual; a symbolic
    # round runs when at least `style_share_threshold` of the failures look like style/constraint
    # problems, or when numerical training saturated; at most `max_symbolic_rounds` rounds;
    # after `stall_patience` symbolic rounds in a row without an accepted gain the router stays
    # numerical for `cooldown_checks` checks.
    router: str = "prior"
    router_learning_rate: float = 0.5
    check_every: int = 20
    warmup_steps: int = 0
    check_at_start: bool = False
    nll_threshold: float = 1.5
    style_share_threshold: float = 0.5
    max_symbolic_rounds: int = 4
    stall_patience: int = 1
    cooldown_checks: int = 2

    # probe: held-out examples scored at each check (JSONL with `messages` or `question`/`answer`;
    # None: given in code, or taken from the trainer's eval dataset), generation settings;
    # probe_stop_at_answer ends a reply's generation at the first complete line that matches
    # answer_format (when no length / JSON / exact-match reward needs the whole reply).
    probe_path: str | None = None
    probe_size: int = 16
    probe_max_new_tokens: int = 96
    probe_batch_size: int = 8
    probe_stop_at_answer: bool = True

    # editor: which plugin proposes prompt edits first, and what runs when its candidate fails the
    # gate; endpoint of the editor LLM (any OpenAI-compatible server); the API key is read from the
    # environment variable *named* by editor_api_key_env, never stored. The validation gate
    # accepts a candidate only if probe reward does not drop (new >= old + acceptance_margin); on
    # an exact tie `gate_tie_break` decides: "nll" accepts only if the reference NLL falls (the
    # model finds the right replies likelier under the new prompt), "accept" / "reject" as named.
    editor: str = "textgrad"
    editor_fallback: str = "constraint"
    editor_base_url: str | None = None
    editor_model: str | None = None
    editor_api_key_env: str = "OPENAI_API_KEY"
    editor_timeout: float = 120.0
    editor_temperature: float = 0.0
    editor_max_tokens: int = 512
    editor_batch_size: int = 3
    on_editor_down: str = "numerical"
    acceptance_margin: float = 0.0
    gate_tie_break: str = "nll"
    max_prompt_chars: int = 2000

    # editor backend and calls (issue 3): `editor_backend` "openai" (any OpenAI-compatible
    # endpoint at editor_base_url), "litellm" (editor_model is a LiteLLM model string such as
    # "ollama/llama3"; editor_base_url, if set, is its api_base) or "local" (editor_model is a model
    # folder run in-process with transformers). `editor_concurrency` independent calls of a round
    # run at once (1 = sequential); `editor_retries` retries a call on HTTP 5xx/429 or a refused
    # connection; `editor_cache` keeps replies under <artifacts>/editor_cache, keyed on backend,
    # endpoint, model, messages, temperature and max_tokens. `edit_questions` also rewrites failing
    # probe questions; a rewrite becomes a training row only if, under the current prompt, the
    # model's reply to it still earns correctness 1.
    editor_backend: str = "openai"
    editor_concurrency: int = 4
    editor_retries: int = 1
    editor_cache: bool = True
    edit_questions: bool = False

    # editor budgets (0 = no cap): LLM calls started, tokens (prompt + completion, from the
    # server's usage or estimated) and seconds of editor wall time, per symbolic round and per run.
    # Caps are hard (a call that could pass one is not started). A spent run budget keeps the
    # router numerical for the rest of the run and says why.
    editor_max_calls_per_round: int = 0
    editor_max_calls_per_run: int = 0
    editor_max_tokens_per_round: int = 0
    editor_max_tokens_per_run: int = 0
    editor_max_seconds_per_round: float = 0.0
    editor_max_seconds_per_run: float = 0.0

    # constraints: regex a compliant answer matches (its first group, if any, is the final answer),
    # the instruction that states the constraint in words (used by the editors), and the regex
    # that extracts the final answer from a reference or completion (default: the last number).
    answer_format: str | None = None
    format_instruction: str | None = None
    answer_pattern: str | None = None
    # constraints (issue 3): a reply longer than `max_reply_chars` characters (0 = no limit) fails
    # the "length" reward component; with `reply_json` a reply that is not valid JSON fails "json".
    max_reply_chars: int = 0
    reply_json: bool = False
    # content (issue 4): with `exact_match` a reply must equal the reference (case and whitespace
    # aside) to earn the "exact_match" reward component — for short-answer / label data.
    exact_match: bool = False

    # mix: share of each training batch replaced by augmented examples once there are any
    # ("prompts as data"), and the cap on the augmented pool.
    augment_share: float = 0.25
    augment_max_examples: int = 512
    # share of the probe examples that never become prompts-as-data rows (chosen with `seed`), so
    # part of the probe stays unseen by the adapter and keeps informing the router and the gate.
    augment_holdout_share: float = 0.0
    # which training rows get an edited system prompt: "compliant" (default) only rows whose text
    # matches `answer_format` (the others keep the initial prompt: a prompt that asks for a format
    # next to a reply that ignores it would teach the adapter to ignore the prompt), or "all".
    # Without `answer_format` every row gets it either way.
    prompt_swap: str = "compliant"

    # plugins: extra plugin objects by dotted path (`package.module.Name`), registered after the
    # built-ins; packages can also register through the `nslora` entry-point group.
    plugins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._coerce_types()
        self._validate()

    # ---------------------------------------------------------------- validation
    def _coerce_types(self) -> None:
        """Accept strings from CLI/YAML for numbers and booleans; reject everything else clearly."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = _field_kind(f)
            # "none"/"null" means None only where None is allowed: editor="none" stays a string
            if kind == "str" and isinstance(value, str) and "None" not in str(f.type) \
                    and value.strip().lower() == "none":
                continue
            setattr(self, f.name, _coerce(f.name, value, kind))

    def _validate(self) -> None:
        def positive(name: str) -> None:
            if getattr(self, name) <= 0:
                _fail(name, getattr(self, name), "a number > 0")

        def non_negative(name: str) -> None:
            if getattr(self, name) < 0:
                _fail(name, getattr(self, name), "a number >= 0")

        def unit(name: str) -> None:
            if not 0.0 <= getattr(self, name) <= 1.0:
                _fail(name, getattr(self, name), "a number between 0 and 1")

        def one_of(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), "one of " + ", ".join(repr(a) for a in allowed))

        for name in ("monitor_window", "saturation_patience", "check_every", "probe_size",
                     "probe_max_new_tokens", "probe_batch_size", "editor_timeout",
                     "editor_max_tokens", "editor_batch_size", "stall_patience",
                     "max_prompt_chars", "nll_threshold", "router_learning_rate"):
            positive(name)
        for name in ("loss_change_threshold", "grad_norm_threshold", "warmup_steps",
                     "max_symbolic_rounds", "cooldown_checks", "editor_temperature",
                     "augment_max_examples", "seed", "editor_retries", "max_reply_chars",
                     "editor_max_calls_per_round", "editor_max_calls_per_run",
                     "editor_max_tokens_per_round", "editor_max_tokens_per_run",
                     "editor_max_seconds_per_round", "editor_max_seconds_per_run"):
            non_negative(name)
        positive("editor_concurrency")
        one_of("editor_backend", EDITOR_BACKENDS)
        for name in ("editor_max_calls_per_round", "editor_max_calls_per_run"):
            if 0 < getattr(self, name) < 4:  # the smallest round: 3 calls for one example + 1 update
                _fail(name, getattr(self, name), "0 (no cap) or at least 4 (the smallest TextGrad "
                      "round: 3 calls for one example and 1 update)")
        for name in ("style_share_threshold", "augment_share", "augment_holdout_share"):
            unit(name)
        if not -1.0 <= self.acceptance_margin <= 1.0:
            _fail("acceptance_margin", self.acceptance_margin, "a number between -1 and 1")
        one_of("editor", EDITORS)
        one_of("editor_fallback", FALLBACKS)
        one_of("on_editor_down", ON_EDITOR_DOWN)
        one_of("gate_tie_break", TIE_BREAKS)
        one_of("router", ROUTERS)
        one_of("prompt_swap", ("compliant", "all"))
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
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise NSLoRAConfigError(
                    f"Unknown NSLoRA config key {key!r}.{hint} Allowed keys: "
                    + ", ".join(sorted(known)), key=key)
        return cls(**merged)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "NSLoRAConfig":
        """Load a YAML (or JSON) file: either the keys at top level or under an `nslora:` mapping."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise NSLoRAConfigError(f"NSLoRA config file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if isinstance(data, Mapping) and isinstance(data.get("nslora"), Mapping):
            data = data["nslora"]
        return cls.from_dict(data, **overrides)

    @classmethod
    def add_cli_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add `--nslora_config PATH` and one `--nslora_<field>` flag per field."""
        group = parser.add_argument_group("NSLoRA")
        group.add_argument("--nslora_config", default=None, help="YAML file with NSLoRA settings")
        for f in dataclasses.fields(cls):
            group.add_argument(f"--nslora_{f.name}", dest=f"nslora_{f.name}", default=None,
                               metavar=_field_kind(f).upper(), help=f"(default: {_default(f)!r})")

    @classmethod
    def from_cli_namespace(cls, ns: argparse.Namespace) -> "NSLoRAConfig":
        values = {k[len("nslora_"):]: v for k, v in vars(ns).items()
                  if k.startswith("nslora_") and k != "nslora_config" and v is not None}
        path = getattr(ns, "nslora_config", None)
        return cls.from_yaml(path, **values) if path else cls.from_dict(values)

    @classmethod
    def from_cli(cls, argv: list[str] | None = None) -> "NSLoRAConfig":
        parser = argparse.ArgumentParser(add_help=False)
        cls.add_cli_arguments(parser)
        ns, _ = parser.parse_known_args(argv)
        return cls.from_cli_namespace(ns)

    # ---------------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> "NSLoRAConfig":
        return dataclasses.replace(self, **changes)


def normalize_key(key: str) -> str:
    key = key.strip().replace("-", "_")
    if key == "nslora":
        return "enabled"
    if key.startswith("nslora_"):
        key = key[len("nslora_"):]
    return key


def _fail(name: str, value: Any, allowed: str) -> None:
    raise NSLoRAConfigError(f"Invalid NSLoRA config value {name}={value!r}: expected {allowed}.", key=name)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _field_kind(f: dataclasses.Field) -> str:
    annotation = str(f.type)
    for kind in ("bool", "int", "float", "str", "list"):
        if annotation.startswith(kind):
            return kind
    return "any"


def _coerce(name: str, value: Any, kind: str) -> Any:
    if value is None or kind in ("any", "list"):
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
        if isinstance(value, bool):
            _fail(name, value, "a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        _fail(name, value, "a number")
    if kind == "str":
        if isinstance(value, str):
            return value
        _fail(name, value, "a string")
    return value
