"""`nslora-trl sft`: TRL's `trl sft` with the NSLoRA flags.

    nslora-trl sft --model_name_or_path ... --dataset_name ... --output_dir ... [--use_peft ...] \\
        --nslora --nslora_probe_path probe.jsonl --nslora_system_prompt "..."
    nslora-trl sft --config recipe.yaml [--flag value ...]     # a TRL YAML; nslora_* keys work in it
    nslora-trl sft --help                                      # every TRL flag + the NSLoRA group
    nslora-trl version

Without the console script: `python -m nslora_plugin.integrations.trl.cli sft ...`.

How it mirrors `trl sft` (trl/cli/commands/training.py, trl 1.16): the arguments are parsed once
here with the same dataclasses as `trl sft` (ScriptArguments, SFTConfig, ModelConfig,
DatasetMixtureConfig) plus `NSLoRAArguments`, with the `--config` YAML applied as defaults. Strings
that no dataclass consumes — from the command line or the YAML — are `accelerate launch` options
(`--num_processes 2`, `--mixed_precision bf16`, `--accelerate_config multi_gpu`, ...), so they are
given to accelerate, and the rest is passed on to the training entry point, which accelerate starts
in every process. `trl sft` launches `trl/scripts/sft.py`; `nslora-trl sft` launches this module
(`accelerate launch -m nslora_plugin.integrations.trl.cli _sft-worker ...`), whose `run_sft` is
TRL's SFT script with `maybe_attach(trainer, nslora_args)` after the trainer is built — the same
flow as `recipes/trl/sft.py`, which is the copy-and-edit version for your own scripts.

The NSLoRA settings are validated in the launching process, before accelerate starts anything: a
bad `--nslora_*` value or a misspelled `--nslora...` flag exits with status 2 and one message.
`NSLORA_TRL_LAUNCHER=python` runs the training in this process instead of through accelerate
(one process; handy under a debugger).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from typing import Any, Sequence

from nslora_plugin.core.config import NSLoRAConfigError

from .args import NSLoRAArguments, config_from_args, maybe_attach, unknown_nslora_flags

__all__ = ["main", "make_parser", "run_sft", "split_launch_args"]

PROG = "nslora-trl"
MODULE = "nslora_plugin.integrations.trl.cli"
WORKER = "_sft-worker"
COMMANDS = ("sft",)

log = logging.getLogger("nslora")


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def dataclass_types() -> tuple[type, ...]:
    """`trl sft`'s dataclasses, in `trl sft`'s order, then NSLoRA's."""
    import trl

    types: list[type] = [trl.ScriptArguments, trl.SFTConfig, trl.ModelConfig]
    mixture = getattr(trl, "DatasetMixtureConfig", None)  # trl >= 0.20
    if mixture is not None:
        types.append(mixture)
    return (*types, NSLoRAArguments)


def make_parser(prog: str | None = f"{PROG} sft") -> Any:
    from trl import TrlParser

    return TrlParser(dataclass_types(), prog=prog)


def _split(parsed: tuple[Any, ...]) -> tuple[Any, Any, Any, Any, Any]:
    """(script, training, model, dataset-mixture or None, nslora) from a parse result."""
    if len(parsed) == 5:
        return parsed  # type: ignore[return-value]
    script_args, training_args, model_args, nslora_args = parsed
    return script_args, training_args, model_args, None, nslora_args


# ------------------------------------------------------------------------------------ launching
def _subtract_in_order(strings: Sequence[str], taken: Sequence[str]) -> list[str]:
    """`strings` without the ordered subsequence `taken` (the strings no dataclass consumed)."""
    rest, pending = [], list(taken)
    for s in strings:
        if pending and s == pending[0]:
            pending.pop(0)
        else:
            rest.append(s)
    return rest


def split_launch_args(argv: Sequence[str]) -> tuple[list[str], list[str], tuple[Any, ...]]:
    """Parse `nslora-trl sft ARGS` like `trl sft` does: (accelerate launch args, training script
    args, parsed dataclasses). `--help` prints the help and exits; NSLoRA errors raise."""
    parser = make_parser()
    *parsed, config_remaining, cli_remaining = parser.parse_args_and_config(
        list(argv), return_remaining_strings=True, separate_remaining_strings=True)
    problems = unknown_nslora_flags(list(config_remaining) + list(cli_remaining))
    if problems:
        raise NSLoRAConfigError("; ".join(problems))
    launch_args = list(config_remaining) + list(cli_remaining)
    try:
        from trl.cli.accelerate_config import resolve_accelerate_config_argument

        launch_args = resolve_accelerate_config_argument(launch_args)
    except ImportError:  # older trl: --accelerate_config is not known there either
        pass
    return launch_args, _subtract_in_order(argv, cli_remaining), tuple(parsed)


def launch(launch_args: Sequence[str], script_args: Sequence[str]) -> int:
    """`accelerate launch [launch_args] -m <this module> _sft-worker [script_args]`."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    ns = launch_command_parser().parse_args([*launch_args, "--module", MODULE, WORKER, *script_args])
    try:
        launch_command(ns)
    except subprocess.CalledProcessError as exc:
        return exc.returncode or 1
    return 0


def cmd_sft(argv: Sequence[str]) -> int:
    try:
        launch_args, script_args, _ = split_launch_args(argv)
    except NSLoRAConfigError as exc:
        return _error(str(exc))
    if os.environ.get("NSLORA_TRL_LAUNCHER", "accelerate").strip().lower() == "python":
        if launch_args:
            return _error(f"NSLORA_TRL_LAUNCHER=python runs one process: no launch options "
                          f"allowed, got {' '.join(launch_args)}")
        return worker(script_args)
    return launch(launch_args, script_args)


# ------------------------------------------------------------------------------------ training
def worker(argv: Sequence[str]) -> int:
    """What accelerate runs in every process: parse again (same strings), train."""
    parsed = make_parser().parse_args_and_config(list(argv), fail_with_unknown_args=False)
    run_sft(*_split(parsed))
    return 0


def run_sft(script_args: Any, training_args: Any, model_args: Any, dataset_args: Any,
            nslora_args: Any) -> Any:
    """TRL's SFT script (`trl sft`) with NSLoRA attached when `--nslora` is on. Returns the trainer."""
    config = config_from_args(nslora_args)
    if config is not None:  # files and the editor are checked before the model is loaded
        from nslora_plugin.trainer.preflight import preflight

        preflight(config)
    from datasets import load_dataset
    from trl import SFTTrainer, get_peft_config, get_quantization_config

    model_init_kwargs: dict[str, Any] = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:  # in the init kwargs: works with every trl this supports
        model_init_kwargs["quantization_config"] = quantization_config
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    mixture = getattr(dataset_args, "datasets", None) if dataset_args is not None else None
    if mixture:
        from trl import get_dataset

        if script_args.dataset_name:
            log.warning("Both `datasets` and `dataset_name` are given: `datasets` is used")
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config,
                               streaming=script_args.dataset_streaming)
    else:
        raise ValueError("Either `datasets` (in a --config YAML) or --dataset_name must be given.")

    trainer = SFTTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=(dataset[script_args.dataset_test_split]
                      if training_args.eval_strategy != "no" else None),
        peft_config=get_peft_config(model_args),
    )
    callback = maybe_attach(trainer, nslora_args)

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if callback is not None and callback.loop is not None:
        trainer.accelerator.print(f"NSLoRA artifacts (system prompt, decisions): "
                                  f"{training_args.output_dir}/nslora")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if hasattr(trainer, "end"):  # transformers >= 5.18
        trainer.end()
    return trainer


# ------------------------------------------------------------------------------------ entry point
def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="TRL's training commands with NSLoRA (neurosymbolic LoRA) flags.",
        epilog=f"'{PROG} sft --help' lists every TRL flag and the NSLoRA group.")
    sub = parser.add_subparsers(dest="command", metavar="{sft,version}")
    sub.add_parser("sft", add_help=False, help="trl sft + --nslora flags (launched with accelerate)")
    sub.add_parser("version", help="print the versions of nslora-plugin and trl")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == WORKER:
        return worker(argv[1:])
    parser = _top_parser()
    args, _ = parser.parse_known_args(argv[:1])
    if args.command == "sft":
        return cmd_sft(argv[1:])
    if args.command == "version":
        from importlib.metadata import PackageNotFoundError, version

        from nslora_plugin import __version__

        try:
            trl_version = version("trl")
        except PackageNotFoundError:
            trl_version = "not installed"
        print(f"nslora-plugin {__version__}, trl {trl_version}")
        return 0
    parser.print_help()
    return 0 if not argv else 2


if __name__ == "__main__":
    raise SystemExit(main())
