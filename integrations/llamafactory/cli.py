"""`nslora-lf`: LLaMA-Factory's `llamafactory-cli train` with NSLoRA attached.

    nslora-lf train config.yaml [key=value ...]     # train (drop-in for llamafactory-cli train)
    nslora-lf check config.yaml [key=value ...]     # validate and print both configs, load nothing
    nslora-lf make-data DIR [--train N --probe N]   # word-problem data + dataset_info.json + probe
    nslora-lf version

Without the console script: `python -m nslora_plugin.integrations.llamafactory.cli train ...`.

`train` reads the config exactly as `llamafactory-cli` does (OmegaConf, `key=value` overrides),
removes and validates the `nslora*` keys (a bad key or value stops here, before any import of
LLaMA-Factory or any model load), then calls `llamafactory.train.tuner.run_exp(args=...,
callbacks=[NSLoRACallback(...)])`. On a machine with several GPUs it re-launches itself under
torchrun, as `llamafactory-cli train` does (same environment variables: FORCE_TORCHRUN,
NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT) — but with this module as the entry
point, so every rank gets the callback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from nslora_plugin.core.config import NSLoRAConfigError
from nslora_plugin.core.util import env_flag, free_port, parse_bool

from .args import LlamaFactoryNSLoRAArgs, nslora_keys, prepare, read_config

PROG = "nslora-lf"
MODULE = "nslora_plugin.integrations.llamafactory.cli"
log = logging.getLogger("nslora")

def _in_distributed_launch() -> bool:
    return "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ


def _print_err(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------ commands
def load(config: str, overrides: Sequence[str]) -> LlamaFactoryNSLoRAArgs:
    return prepare(read_config(config, overrides), base_dir=Path(config).resolve().parent)


def cmd_check(args: argparse.Namespace) -> int:
    prepared = load(args.config, args.overrides)
    for note in prepared.notes:
        print(f"note: {note}")
    print("# LLaMA-Factory arguments (passed to run_exp)")
    print(json.dumps(prepared.lf_args, indent=2, ensure_ascii=False, default=str))
    print("# NSLoRA configuration")
    print(prepared.nslora.to_json())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    prepared = load(args.config, args.overrides)  # NSLoRAConfigError -> exit 2, nothing loaded
    _setup_logging()
    for note in prepared.notes:
        log.log(logging.WARNING if note.startswith("WARNING") else logging.INFO, "NSLoRA: %s", note)
    if _should_launch_torchrun():
        return _launch_torchrun(args.config, args.overrides)
    if prepared.nslora.enabled:  # the editor endpoint, before LLaMA-Factory loads the model
        from nslora_plugin.trainer.preflight import preflight

        preflight(prepared.nslora)
    from . import run_prepared

    run_prepared(prepared)
    return 0


def cmd_make_data(args: argparse.Namespace) -> int:
    from . import write_word_problem_dataset

    paths = write_word_problem_dataset(args.dir, n_train=args.train, n_probe=args.probe, seed=args.seed,
                                       system_prompt=args.system_prompt, dataset_name=args.name)
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


def cmd_keys(_: argparse.Namespace) -> int:
    for key, kind, text in nslora_keys():
        print(f"{key}  ({kind})\n    {text}")
    return 0


def cmd_version(_: argparse.Namespace) -> int:
    from nslora_plugin import __version__

    try:
        from importlib.metadata import version

        lf = version("llamafactory")
    except Exception:  # noqa: BLE001
        lf = "not installed"
    print(f"nslora-plugin {__version__}, llamafactory {lf}")
    return 0


# ------------------------------------------------------------------------------------ torchrun
def _device_count() -> int:
    try:
        from llamafactory.extras.misc import get_device_count

        return int(get_device_count())
    except Exception:  # noqa: BLE001
        try:
            import torch

            return torch.cuda.device_count()
        except Exception:  # noqa: BLE001
            return 0


def _should_launch_torchrun() -> bool:
    """Mirror of `llamafactory-cli train`'s rule (launcher.py, 0.9.5)."""
    if _in_distributed_launch():
        return False
    if env_flag("USE_MCA") or env_flag("FORCE_TORCHRUN"):
        return True
    if env_flag("USE_RAY") or env_flag("USE_KT"):
        return False
    return _device_count() > 1


def torchrun_command(config: str, overrides: Sequence[str]) -> list[str]:
    """The torchrun command `nslora-lf train` runs on a multi-GPU machine."""
    nproc = os.environ.get("NPROC_PER_NODE") or str(max(_device_count(), 1))
    cmd = [sys.executable, "-m", "torch.distributed.run",
           "--nnodes", os.environ.get("NNODES", "1"),
           "--node_rank", os.environ.get("NODE_RANK", "0"),
           "--nproc_per_node", nproc,
           "--master_addr", os.environ.get("MASTER_ADDR", "127.0.0.1"),
           "--master_port", os.environ.get("MASTER_PORT") or str(free_port())]
    if os.environ.get("MAX_RESTARTS"):
        cmd += ["--max_restarts", os.environ["MAX_RESTARTS"]]
    return cmd + ["-m", MODULE, "train", str(Path(config).resolve()), *overrides]


def _launch_torchrun(config: str, overrides: Sequence[str]) -> int:
    cmd = torchrun_command(config, overrides)
    log.info("NSLoRA: launching %s", shlex.join(cmd))
    env = dict(os.environ)
    if parse_bool(env.get("OPTIM_TORCH", "1")):  # as llamafactory-cli does
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        env.setdefault("TORCH_NCCL_AVOID_RECORD_STREAMS", "1")
    return subprocess.run(cmd, env=env, check=False).returncode


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(levelname)s|%(name)s] %(message)s")
    logging.getLogger("nslora").setLevel(logging.INFO)


# ------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="LLaMA-Factory training with NSLoRA (neurosymbolic LoRA) attached.",
        epilog="Swap `llamafactory-cli train x.yaml` for `nslora-lf train x.yaml` and add nslora_* keys.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (("train", "train with NSLoRA (like llamafactory-cli train)"),
                           ("check", "validate a config and print what train would run; loads nothing")):
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.add_argument("config", help="LLaMA-Factory YAML (or JSON) config with nslora_* keys")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="overrides merged on top of the file, as for llamafactory-cli")
    data = sub.add_parser("make-data", help="write generated word-problem data for the recipes",
                          description="Write <DIR>/dataset_info.json, the training rows and a probe set "
                                      "(arithmetic word problems generated from a seed).")
    data.add_argument("dir")
    data.add_argument("--train", type=int, default=256, help="training rows (default 256)")
    data.add_argument("--probe", type=int, default=32, help="probe rows (default 32)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--system-prompt", default="You are a helpful assistant.",
                      help="system message of every row (the initial prompt NSLoRA edits)")
    data.add_argument("--name", default="nslora_word_problems", help="dataset name in dataset_info.json")
    sub.add_parser("keys", help="list every nslora_* key with its type, allowed values and default")
    sub.add_parser("version", help="print versions")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {"train": cmd_train, "check": cmd_check, "make-data": cmd_make_data,
               "keys": cmd_keys, "version": cmd_version}[args.command]
    try:
        return handler(args)
    except NSLoRAConfigError as exc:
        _print_err(str(exc))
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
