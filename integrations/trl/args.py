"""`--nslora` for any TRL script: a dataclass for `TrlParser` / `HfArgumentParser`.

    from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser
    from nslora_plugin.integrations.trl import NSLoRAArguments, maybe_attach

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, NSLoRAArguments))
    script_args, training_args, model_args, nslora_args = parser.parse_args_and_config()
    trainer = SFTTrainer(...)
    maybe_attach(trainer, nslora_args)      # does nothing unless --nslora was given
    trainer.train()

Flags (all in the "NSLoRA" group of `--help`):

    --nslora                     the switch (default off: the script is plain TRL)
    --nslora_config PATH         a YAML with NSLoRA settings (top level or under `nslora:`)
    --nslora_<field> VALUE       one flag per `NSLoRAConfig` field (check_every, probe_path, ...)

The per-field flags are generated from `NSLoRAConfig`'s dataclass fields, so a field added to the
core config becomes a flag here without touching this file. Every generated flag defaults to
None ("not given"), so the order of precedence is: flag > `--nslora_config` file > the
`NSLoRAConfig` default printed in the help. The same keys work in a TRL `--config` YAML
(`nslora: true`, `nslora_check_every: 20`, ...), and `nslora:` there may also be a mapping of
unprefixed settings (`nslora: {probe_path: probe.jsonl, check_every: 20}`).

With `--nslora` on, the settings are validated when the arguments are parsed, so a bad value stops
the script before any model is loaded. With it off, `maybe_attach` returns None and touches
nothing: no callback, no collator wrapping, no import of the NSLoRA callback.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, get_type_hints

from nslora_plugin.config import (EDITORS, FALLBACKS, ON_EDITOR_DOWN, TIE_BREAKS, NSLoRAConfig,
                                  NSLoRAConfigError)

__all__ = ["NSLoRAArguments", "maybe_attach", "config_from_args", "PREFIX", "SWITCH",
           "check_trainer_args", "unknown_nslora_flags"]

log = logging.getLogger("nslora")

SWITCH = "nslora"
PREFIX = "nslora_"
# `enabled` is what `--nslora` switches; every other NSLoRAConfig field gets a flag.
_SKIPPED = {"enabled"}

# One line per field for `--help`; a field missing here still gets a flag (and its group's name).
_HELP: dict[str, str] = {
    "output_dir": "Folder for the NSLoRA artifacts; None means <output_dir>/nslora.",
    "system_prompt": "The system message of the training rows: the prompt NSLoRA starts from and rewrites.",
    "seed": "Seed for probe sampling and batch mixing.",
    "monitor_window": "Optimizer steps in the loss / gradient-norm window.",
    "loss_change_threshold": "|C1| (relative change of the windowed loss) below this counts as flat.",
    "grad_norm_threshold": "C2 (windowed mean gradient norm) below this counts as small.",
    "saturation_patience": "Checks in a row with flat loss and small gradients = numerical saturation.",
    "check_every": "Run a check (probe + routing decision) every N optimizer steps.",
    "warmup_steps": "No check before this optimizer step.",
    "nll_threshold": "A failure whose reference NLL per token is above this looks factual (-> LoRA).",
    "style_share_threshold": "Share of style/constraint failures that triggers a symbolic round.",
    "max_symbolic_rounds": "At most this many prompt-rewrite rounds in the run.",
    "stall_patience": "Symbolic rounds in a row without an accepted gain before a cooldown.",
    "cooldown_checks": "Checks that stay numerical after a stall.",
    "probe_path": "JSONL of held-out probe rows (messages, question/answer or prompt/completion).",
    "probe_size": "Probe examples scored at each check.",
    "probe_max_new_tokens": "Greedy tokens generated per probe example.",
    "probe_batch_size": "Probe examples per generation batch (bounds the probe's KV-cache memory).",
    "probe_stop_at_answer": "End a probe reply at its first complete line matching answer_format "
                            "(when no length/JSON/exact-match reward needs the whole reply).",
    "editor": "Which editor proposes prompt rewrites first.",
    "editor_fallback": "What runs when the editor's candidate fails the gate or the endpoint is down.",
    "editor_base_url": "OpenAI-compatible endpoint of the editor LLM (vLLM, Ollama, OpenAI, ...).",
    "editor_model": "Model name to ask the editor endpoint for.",
    "editor_api_key_env": "NAME of the environment variable holding the editor's API key (never the key).",
    "editor_timeout": "Seconds per editor request.",
    "editor_temperature": "Sampling temperature of the editor LLM.",
    "editor_max_tokens": "Token cap of one editor reply.",
    "editor_batch_size": "Failures shown to the editor per round.",
    "on_editor_down": "If the editor endpoint is unreachable at startup: keep training or fail.",
    "acceptance_margin": "The gate accepts a candidate prompt if probe reward >= old + this margin.",
    "gate_tie_break": "On an exact reward tie: 'nll' accepts if the reference NLL falls.",
    "max_prompt_chars": "Longest system prompt accepted.",
    "answer_format": "Regex a compliant answer matches (first group: the final answer).",
    "format_instruction": "The format constraint in words, for the editors.",
    "answer_pattern": "Regex extracting the final answer (default: the last number).",
    "augment_share": "Share of each batch replaced by augmented rows once there are some.",
    "augment_max_examples": "Cap on the augmented pool.",
    "plugins": "Extra NSLoRA plugins by dotted path (package.module.Name).",
}

_CHOICES: dict[str, Sequence[str]] = {
    "editor": EDITORS, "editor_fallback": FALLBACKS, "on_editor_down": ON_EDITOR_DOWN,
    "gate_tie_break": TIE_BREAKS,
}

_TYPE_HINTS = get_type_hints(NSLoRAConfig)


def _optional(tp: Any) -> Any:
    """`X` -> `Optional[X]` (HfArgumentParser reads `Optional[X]` as "a flag of type X, default None")."""
    args = getattr(tp, "__args__", ())
    if type(None) in args:
        return tp
    return Optional[tp]


def _flag_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _generated_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    out = []
    for f in dataclasses.fields(NSLoRAConfig):
        if f.name in _SKIPPED:
            continue
        tp = _TYPE_HINTS[f.name]
        # The flag's own default is None ("not given"); the help shows the NSLoRAConfig default.
        # `%(default).0s` renders as nothing but stops argparse's defaults formatter from
        # appending a misleading "(default: None)".
        text = f"{_HELP.get(f.name, f'NSLoRA setting {f.name!r}.')} (default: {_flag_default(f)!r})"
        metadata: dict[str, Any] = {"help": text.replace("%", "%%") + "%(default).0s"}
        if tp is bool:
            # `--nslora_x` alone means true (HfArgumentParser only does that for non-None defaults)
            metadata.update(nargs="?", const=True)
        if f.name in _CHOICES:
            metadata["choices"] = list(_CHOICES[f.name])
        out.append((PREFIX + f.name, _optional(tp), field(default=None, metadata=metadata)))
    return out


@dataclass
class _NSLoRASwitch:
    """The two hand-written flags and the methods; the per-field flags are added below."""

    _argument_group_name = "NSLoRA"

    nslora: bool = field(default=False, metadata={
        "help": "Turn on neurosymbolic LoRA (NSLoRA). Off: the script runs as plain TRL."})
    nslora_config: Optional[str] = field(default=None, metadata={
        "help": "YAML file with NSLoRA settings (keys at top level or under 'nslora:'); "
                "--nslora_* flags override it."})

    def __post_init__(self) -> None:
        self._inline: dict[str, Any] = {}
        switch = self.nslora
        if isinstance(switch, Mapping):  # `nslora: {probe_path: ..., ...}` in a TRL --config YAML
            self._inline = dict(switch)
            switch = self._inline.pop("enabled", self._inline.pop(SWITCH, True))
        if isinstance(switch, str):
            low = switch.strip().lower()
            if low not in {"true", "false", "1", "0", "yes", "no", "on", "off"}:
                raise NSLoRAConfigError(f"Invalid value nslora={switch!r}: expected true or false")
            switch = low in {"true", "1", "yes", "on"}
        self.nslora = bool(switch)
        if self.nslora:
            self.to_config()  # validate now: a bad value stops the script before the model loads
        elif self.given():
            log.warning("NSLoRA: %s given without --nslora; NSLoRA stays off (plain TRL run)",
                        ", ".join("--" + k for k in sorted(self.given())))

    def given(self) -> dict[str, Any]:
        """The `nslora_*` values set on the command line or in a --config YAML (not None)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name.startswith(PREFIX) and f.name != "nslora_config"
                and getattr(self, f.name) is not None}

    def to_config(self) -> NSLoRAConfig | None:
        """The validated `NSLoRAConfig`, or None when `--nslora` is off."""
        if not self.nslora:
            return None
        flags = {k[len(PREFIX):]: v for k, v in self.given().items()}
        overrides = {**self._inline, **flags}
        if self.nslora_config:
            return NSLoRAConfig.from_yaml(self.nslora_config, **overrides)
        return NSLoRAConfig.from_dict(overrides)


NSLoRAArguments = dataclasses.make_dataclass(
    "NSLoRAArguments", _generated_fields(), bases=(_NSLoRASwitch,),
    namespace={"__doc__": "`--nslora`, `--nslora_config` and one `--nslora_<field>` flag per "
                          "NSLoRAConfig field, for TrlParser / HfArgumentParser."})
NSLoRAArguments.__module__ = __name__


def config_from_args(nslora_args: Any) -> NSLoRAConfig | None:
    """NSLoRAArguments / NSLoRAConfig / mapping / YAML path / None -> NSLoRAConfig or None (off)."""
    if nslora_args is None:
        return None
    if isinstance(nslora_args, _NSLoRASwitch):
        config = nslora_args.to_config()
    elif isinstance(nslora_args, NSLoRAConfig):
        config = nslora_args
    elif isinstance(nslora_args, Mapping):
        config = NSLoRAConfig.from_dict(nslora_args)
    elif isinstance(nslora_args, str):
        config = NSLoRAConfig.from_yaml(nslora_args)
    else:
        raise TypeError(f"expected NSLoRAArguments, NSLoRAConfig, a dict or a YAML path, got "
                        f"{type(nslora_args).__name__}")
    if config is not None and not config.enabled:
        return None
    return config


def check_trainer_args(args: Any) -> None:
    """Refuse trainer settings under which accepted prompts could never reach the batches."""
    if getattr(args, "packing", False):
        raise NSLoRAConfigError(
            "--packing cannot be combined with --nslora: accepted prompts are spliced into each "
            "example at batch time, which packed sequences do not allow; drop --packing")
    if getattr(args, "padding_free", False):
        raise NSLoRAConfigError(
            "--padding_free cannot be combined with --nslora (same reason as packing); drop it")
    workers = getattr(args, "dataloader_num_workers", 0) or 0
    if workers > 0:
        raise NSLoRAConfigError(
            f"--dataloader_num_workers {workers} cannot be combined with --nslora: batches collated "
            "in worker processes never see prompt edits; use --dataloader_num_workers 0")


def maybe_attach(trainer: Any, nslora_args: Any, *, probe: Any = None, plugins: Sequence[Any] = (),
                 console: Any = None) -> Any:
    """Attach NSLoRA to a built trainer if `--nslora` is on; return the callback, else None.

    Off means off: the trainer is not touched at all (no callback, no collator wrapping)."""
    config = config_from_args(nslora_args)
    if config is None:
        return None
    check_trainer_args(getattr(trainer, "args", None))
    from . import attach

    return attach(trainer, config, probe=probe, plugins=plugins, console=console)


def unknown_nslora_flags(strings: Sequence[str]) -> list[str]:
    """Messages for `--nslora*` strings no parser consumed (misspelled flags), with a suggestion."""
    known = ["--" + f.name for f in dataclasses.fields(NSLoRAArguments)]
    messages = []
    for s in strings:
        if not s.startswith("--"):
            continue
        name = s.split("=", 1)[0]
        norm = "--" + name[2:].replace("-", "_")
        if norm.startswith("--" + SWITCH):
            close = difflib.get_close_matches(norm, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            messages.append(f"unknown NSLoRA flag {name}{hint}")
    return messages
