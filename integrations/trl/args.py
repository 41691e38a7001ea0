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

The per-field flags come from the core's flag generator (`cli_flags()` in `core/config.py`: type,
allowed values, help text), so a field added to the core config becomes a flag here, with its
help, without touching this file. Every generated flag defaults to `NOT_GIVEN`, so the order of
precedence is: flag > `--nslora_config` file > the `NSLoRAConfig` default printed in the help. An
explicit `none` / `null` is a value, not "not given": the config refuses it for a setting that needs
one (`--nslora_check_every none` is an error, as in every other adapter). The same keys work in a TRL `--config` YAML
(`nslora: true`, `nslora_check_every: 20`, ...), and `nslora:` there may also be a mapping of
unprefixed settings (`nslora: {probe_path: probe.jsonl, check_every: 20}`).

With `--nslora` on, the settings are validated when the arguments are parsed, so a bad value stops
the script before any model is loaded. With it off, `maybe_attach` returns None and touches
nothing: no callback, no collator wrapping, no import of the NSLoRA callback.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from nslora_plugin.core.config import NSLoRAConfig, NSLoRAConfigError, cli_flags
from nslora_plugin.core.keys import CONFIG_KEY, PREFIX, SWITCH, clean_key, did_you_mean, parse_switch

__all__ = ["NSLoRAArguments", "maybe_attach", "config_from_args", "PREFIX", "SWITCH",
           "check_trainer_args", "unknown_nslora_flags"]

log = logging.getLogger("nslora")

_TYPES: dict[str, Any] = {"bool": bool, "int": int, "float": float, "str": str, "list": list[str]}


class _NotGiven:
    """The default of every generated flag: "not given on the command line nor in a --config
    YAML". Not None, because TRL's parser turns `--nslora_check_every none` (and a YAML `null`)
    into None, and that must reach the config, which refuses it where a value is needed, rather
    than read as "not given" and silently become the default."""

    _instance: "_NotGiven | None" = None

    def __new__(cls) -> "_NotGiven":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NOT_GIVEN"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "NOT_GIVEN"

    def __copy__(self) -> "_NotGiven":
        return self

    def __deepcopy__(self, memo: Any) -> "_NotGiven":
        return self


NOT_GIVEN = _NotGiven()


def _generated_fields() -> list[tuple[str, Any, dataclasses.Field]]:
    """One `--nslora_<field>` per `NSLoRAConfig` field (the core's `cli_flags`, typed for
    HfArgumentParser); `enabled` is what `--nslora` switches, so it gets no flag of its own. The
    flag's own default is `NOT_GIVEN`; an explicit none / null is passed on to the config (which
    refuses it for a setting that needs a value); the help shows the NSLoRAConfig default."""
    return [(dest, Optional[_TYPES[spec.kind]],
             field(default=NOT_GIVEN, metadata={**options, "default": NOT_GIVEN}))
            for dest, spec, options in cli_flags(typed=True, skip=("enabled",))]


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
        self.nslora = parse_switch(switch)
        if self.nslora:
            self.to_config()  # validate now: a bad value stops the script before the model loads
        elif self.given():
            log.warning("NSLoRA: %s given without --nslora; NSLoRA stays off (plain TRL run)",
                        ", ".join("--" + k for k in sorted(self.given())))

    def given(self) -> dict[str, Any]:
        """The `nslora_*` values set on the command line or in a --config YAML, an explicit none /
        null included (the config decides whether the setting may be None)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name.startswith(PREFIX) and f.name != CONFIG_KEY
                and getattr(self, f.name) is not NOT_GIVEN}

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
    # --packing with the "bfd" / "bfd_split" strategies keeps each example's boundaries
    # (`seq_lengths`), so the collator splices every packed segment; --padding_free flattens
    # ordinary examples in the collator, after the splice. "wrapped" cuts examples across rows.
    strategy = getattr(args, "packing_strategy", "bfd")
    if getattr(args, "packing", False) and strategy == "wrapped":
        raise NSLoRAConfigError(
            "--packing_strategy wrapped cannot be combined with --nslora: it cuts examples across "
            "packed rows and keeps no boundaries, so accepted prompts cannot be spliced into each "
            "example; use --packing_strategy bfd (the default) or drop --packing")
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
        norm = "--" + clean_key(name[2:])
        if norm.startswith("--" + SWITCH):
            messages.append(f"unknown NSLoRA flag {name}{did_you_mean(norm, known, inline=True)}")
    return messages
