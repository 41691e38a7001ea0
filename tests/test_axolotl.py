"""The Axolotl adapter, for real: `axolotl train <recipe>` with the NSLoRA plugin in the YAML.

Axolotl pins its own transformers / trl / peft, so it lives in a venv of its own, built by
`.ci/venvs/axolotl.sh` (at `$NSLORA_AXOLOTL_VENV`, else `<repo>/.venvs/axolotl`). Without it the
end-to-end tests skip — or fail when `NSLORA_REQUIRE_FRAMEWORK_VENVS=1` (CI jobs that built it).

The end-to-end runs use the committed CPU recipes, shortened (4 steps, check every 2 steps, a tiny
probe) and tuned like tests/tiny.py so the first check is symbolic: the real SmolLM2-135M-Instruct
fails every probe item on format, `nll_threshold` is high, the constraint editor proposes the
format instruction, the gate accepts it, and the batches of steps 4+ carry the new prompt.

The first tests need no Axolotl: the plugin's config model (`args.py`) imports pydantic and the
core only, so key validation is checked in the main environment in milliseconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from nslora_plugin import load_artifacts

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "axolotl"
SYSTEM = "You are a helpful assistant."
FORMAT_INSTRUCTION = "End your reply with a final line 'Answer: <number>'."

# Shortened runs: what changes against the committed recipes (everything else is the recipe).
RUN_OVERRIDES = dict(max_steps=4, micro_batch_size=2, sequence_len=256, warmup_steps=0,
                     save_steps=100, logging_steps=1)
NSLORA_OVERRIDES = dict(check_every=2, probe_size=4, probe_max_new_tokens=8, probe_batch_size=4,
                        nll_threshold=100.0, max_symbolic_rounds=1, editor="constraint")


# ------------------------------------------------------------------------------------------------
# Config validation (main environment, no Axolotl needed)
# ------------------------------------------------------------------------------------------------


@pytest.fixture()
def probe_file(tmp_path: Path) -> str:
    path = tmp_path / "probe.jsonl"
    path.write_text('{"question": "1+1?", "answer": "Answer: 2"}\n')
    return str(path)


def _validate(data: dict[str, Any]) -> dict[str, Any]:
    from nslora_plugin.integrations.axolotl.args import NSLoRAArgs

    return NSLoRAArgs(**data).model_dump(exclude_none=True)


def test_flat_and_mapping_forms_validate_to_the_same_keys(probe_file):
    flat = _validate({"nslora": True, "nslora_probe_path": probe_file, "nslora_check_every": "5"})
    nested = _validate({"nslora": {"probe_path": probe_file, "check_every": 5}})
    assert flat == nested == {"nslora": True, "nslora_probe_path": probe_file,
                              "nslora_check_every": 5}
    assert _validate({"nslora": {"probe_path": probe_file, "enabled": False}})["nslora"] is False


@pytest.mark.parametrize("data, needles", [
    ({"nslora_check_every": "often"}, ["nslora_check_every", "often", "integer"]),
    ({"nslora": {"check_every": "often"}}, ["nslora.check_every", "integer"]),
    ({"nslora_chek_every": 3}, ["nslora_chek_every", "Did you mean 'nslora_check_every'"]),
    ({"nslora_editor": "gpt"}, ["nslora_editor", "'textgrad', 'constraint', 'demonstrations', 'none'"]),
    ({"dataloader_num_workers": 2}, ["dataloader_num_workers: 2", "set dataloader_num_workers: 0"]),
    ({"rl": "dpo"}, ["rl: dpo"]),
    ({"nslora_probe_path": "missing.jsonl"}, ["nslora_probe_path", "missing.jsonl", "no such file"]),
])
def test_bad_settings_are_rejected_naming_the_key(probe_file, data, needles):
    from pydantic import ValidationError

    base = {"nslora": True, "nslora_probe_path": probe_file}
    if isinstance(data.get("nslora"), dict):
        base = {"nslora": {"probe_path": probe_file, **data.pop("nslora")}}
    with pytest.raises(ValidationError) as info:
        _validate({**base, **data})
    message = str(info.value)
    for needle in needles:
        assert needle in message


def test_switched_off_means_no_config(probe_file):
    from nslora_plugin.integrations.axolotl.args import config_from_axolotl

    assert config_from_axolotl({"nslora_probe_path": probe_file}) is None  # keys alone: off
    assert config_from_axolotl({"nslora": False, "nslora_check_every": 3}) is None
    cfg = config_from_axolotl({"nslora": True, "nslora_probe_path": probe_file,
                               "nslora_check_every": 3})
    assert cfg is not None and cfg.check_every == 3 and cfg.probe_path == probe_file


def test_args_cover_every_core_setting():
    import dataclasses

    from nslora_plugin import NSLoRAConfig
    from nslora_plugin.integrations.axolotl.args import NSLoRAArgs

    expected = {"nslora"} | {f"nslora_{f.name}" for f in dataclasses.fields(NSLoRAConfig)
                             if f.name != "enabled"}
    assert set(NSLoRAArgs.model_fields) == expected


def test_recipes_parse_and_validate(tmp_path, monkeypatch):
    """The committed recipes pass the plugin's own validation (with their data in place)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "nslora").mkdir(parents=True)
    (tmp_path / "data" / "nslora" / "probe.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    for name in ("smollm2-lora-cpu.yaml", "smollm2-qlora-cpu.yaml", "llama3-8b-qlora-24gb.yaml"):
        raw = yaml.safe_load((RECIPES / name).read_text())
        assert raw["plugins"] == ["nslora_plugin.integrations.axolotl.NSLoRAPlugin"], name
        assert raw.get("sample_packing") is False, name
        out = _validate(raw)
        assert out["nslora"] is True and out["nslora_probe_path"].endswith("probe.jsonl"), name


# ------------------------------------------------------------------------------------------------
# End to end in Axolotl's venv
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def axolotl_venv() -> Path:
    venv = Path(os.environ.get("NSLORA_AXOLOTL_VENV") or REPO / ".venvs" / "axolotl").expanduser()
    build = f".ci/venvs/axolotl.sh {venv}"
    problem = None
    if not (venv / "bin" / "python").is_file() or not (venv / "bin" / "axolotl").is_file():
        problem = (f"no Axolotl venv at {venv}: build it with `{build}` (about 3-5 min, 7 GB; "
                   "or point NSLORA_AXOLOTL_VENV at one)")
    else:
        where = subprocess.run(
            [str(venv / "bin" / "python"), "-c",
             "import importlib.util as u; print(u.find_spec('nslora_plugin').origin)"],
            capture_output=True, text=True, timeout=60)
        origin = where.stdout.strip()
        if where.returncode != 0 or not Path(origin).resolve().is_relative_to(REPO):
            problem = (f"the Axolotl venv at {venv} does not run this checkout's nslora_plugin "
                       f"({origin or where.stderr.strip()[-200:]}): rerun `{build}`")
    if problem:
        if os.environ.get("NSLORA_REQUIRE_FRAMEWORK_VENVS") == "1":
            pytest.fail(problem)
        pytest.skip(problem)
    return venv


def _load_prepare():
    spec = importlib.util.spec_from_file_location("nslora_axolotl_prepare", RECIPES / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, default_model_dir) -> Path:
    """A working folder laid out the way the recipes expect (recipes/axolotl/prepare.py)."""
    folder = tmp_path_factory.mktemp("axolotl-run")
    _load_prepare().prepare(folder, n_train=64, n_probe=8, seed=3, model=str(default_model_dir))
    return folder


def _short_recipe(folder: Path, recipe: str, name: str, **extra_nslora: Any) -> Path:
    cfg = yaml.safe_load((RECIPES / recipe).read_text())
    cfg.update(RUN_OVERRIDES, output_dir=f"./{name}", dataset_prepared_path=f"./{name}/prepared")
    settings = {**NSLORA_OVERRIDES, **extra_nslora}
    if isinstance(cfg.get("nslora"), dict):  # keep the recipe's own form
        cfg["nslora"].update(settings)
    else:
        cfg.update({f"nslora_{k}": v for k, v in settings.items()})
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _run(venv: Path, folder: Path, command: list[str], timeout: int) -> tuple[int, str]:
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1",
           # One thread unless told otherwise: on a shared 2-core box, OpenMP threads competing
           # with other jobs made each step 3-10x slower than a single thread.
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
           "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("PYTHONPATH", "VIRTUAL_ENV"):  # nothing from the main environment leaks in
        env.pop(name, None)
    started = time.monotonic()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True,
                          timeout=timeout)
    print(f"{' '.join(command[:3])[:80]}: exit {done.returncode} in "
          f"{time.monotonic() - started:.0f} s")
    return done.returncode, done.stdout + done.stderr


def _axolotl_train(venv: Path, folder: Path, config: Path, timeout: int = 420) -> tuple[int, str]:
    """`axolotl train CONFIG` as a user runs it (in-process launcher: no accelerate on CPU)."""
    return _run(venv, folder, [str(venv / "bin" / "axolotl"), "train", str(config),
                               "--launcher", "python"], timeout)


def _check_symbolic_run(out: Path, output: str) -> None:
    arts = load_artifacts(out)
    assert (out / "nslora" / "prompt.json").is_file() and (out / "nslora" / "summary.json").is_file()

    routes = [d for d in arts.decisions if d["kind"] == "route"]
    assert [d["step"] for d in routes] == [2, 4]
    assert routes[0]["action"] == "symbolic", routes[0]["reason"]
    assert routes[1]["action"] == "numerical"

    edits = [d for d in arts.decisions if d["kind"] == "edit"]
    assert len(edits) == 1 and edits[0]["editor"] == "constraint" and edits[0]["accepted"], edits
    assert arts.initial_system_prompt == SYSTEM
    assert arts.prompt_version == 1 and FORMAT_INSTRUCTION in (arts.system_prompt or "")

    # The edit reached what was trained: the batch of step 4 (collated after the edit at the end
    # of step 2, one batch read ahead) carried the new prompt in every row.
    stats = arts.state["collator"]
    assert stats["swapped"] > 0 and stats["no_span"] == 0, stats
    assert arts.summary["decisions"]["symbolic"] == 1

    # The callback ran first: its metrics are in the trainer's logs; the adapter was saved.
    assert "'nslora/prompt_version': 1" in output
    assert "step 2: symbolic" in output  # the loop's own console line, through Axolotl's log
    assert (out / "adapter_model.safetensors").is_file()
    assert load_artifacts(out / "checkpoint-4").prompt_version == 1  # travels with checkpoints
    # post_train runs twice in Axolotl; the plugin reports once.
    assert output.count("NSLoRA: done") == 1
    # the callback came through Axolotl's own hook for callbacks that need the trainer
    assert "NSLoRA: callback attached first, added through add_callbacks_post_trainer" in output


_SCHEMA_CHECK = r"""
import json, sys, yaml
import nslora_plugin, nslora_plugin.integrations.trl
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "axolotl")
from axolotl.cli.config import load_cfg, prepare_plugins
from axolotl.utils.config import validate_config
from axolotl.utils.dict import DictDefault
result = {"leaked": leaked, "recipes": {}}
for path in sys.argv[2:]:
    cfg = DictDefault(yaml.safe_load(open(path)))
    prepare_plugins(cfg)
    out = validate_config(cfg)
    result["recipes"][path] = {k: out.get(k) for k in ("nslora", "nslora_probe_path",
                                                       "dataloader_num_workers", "adapter")}
# Left unset, dataloader_num_workers would default to one worker per GPU; register() sets 0.
cfg = DictDefault(yaml.safe_load(open(sys.argv[2])))
cfg.pop("dataloader_num_workers", None)
prepare_plugins(cfg)
result["workers_default"] = validate_config(cfg).get("dataloader_num_workers")
try:
    load_cfg(sys.argv[1])  # what `axolotl train` does first
    result["bad"] = None
except Exception as exc:
    result["bad"] = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(result))
"""


@pytest.mark.slow
def test_axolotl_schema_accepts_recipes_and_rejects_a_bad_key(axolotl_venv, workdir):
    """In Axolotl's own config validation: every recipe passes, `nslora_check_every: often`
    is rejected naming the key, and `import nslora_plugin` imported no axolotl module."""
    bad = yaml.safe_load((RECIPES / "smollm2-lora-cpu.yaml").read_text())
    bad["nslora_check_every"] = "often"
    bad_path = workdir / "bad.yaml"
    bad_path.write_text(yaml.safe_dump(bad, sort_keys=False))
    recipes = sorted(str(p) for p in RECIPES.glob("*.yaml"))
    code, output = _run(axolotl_venv, workdir,
                        [str(axolotl_venv / "bin" / "python"), "-c", _SCHEMA_CHECK, str(bad_path),
                         *recipes], timeout=180)
    assert code == 0, output[-3000:]
    result = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
    assert result["leaked"] == []
    assert len(result["recipes"]) == len(recipes)
    for path, values in result["recipes"].items():
        assert values["nslora"] is True and values["dataloader_num_workers"] == 0, (path, values)
        assert values["adapter"] in ("lora", "qlora")
    assert result["workers_default"] == 0
    assert result["bad"] is not None
    assert "nslora_check_every" in result["bad"] and "expected an integer" in result["bad"]


@pytest.mark.slow
def test_lora_recipe_runs_a_symbolic_round(axolotl_venv, workdir):
    config = _short_recipe(workdir, "smollm2-lora-cpu.yaml", "lora")
    code, output = _axolotl_train(axolotl_venv, workdir, config)
    assert code == 0, output[-5000:]
    _check_symbolic_run(workdir / "lora", output)


@pytest.mark.slow
def test_qlora_recipe_runs_a_symbolic_round(axolotl_venv, workdir):
    """The QLoRA recipe uses the `nslora:` mapping form; bitsandbytes NF4 runs on CPU."""
    config = _short_recipe(workdir, "smollm2-qlora-cpu.yaml", "qlora")
    code, output = _axolotl_train(axolotl_venv, workdir, config)
    assert code == 0, output[-5000:]
    quant = json.loads((workdir / "qlora" / "config.json").read_text())["quantization_config"]
    assert quant["load_in_4bit"] and quant["bnb_4bit_quant_type"] == "nf4"
    assert "prepare_model_for_kbit_training" in output
    _check_symbolic_run(workdir / "qlora", output)


_HOOKS_CHECK = r"""
import json, logging, sys
from axolotl.cli.args import TrainerCliArgs
from axolotl.cli.config import load_cfg
from axolotl.common.datasets import load_datasets
from axolotl.integrations.base import PluginManager
from axolotl.train import setup_model_and_trainer
from nslora_plugin.integrations.axolotl import NSLoRAPlugin
from nslora_plugin.trainer.callback import NSLoRACallback

lines = []
handler = logging.Handler()
handler.emit = lambda record: lines.append(record.getMessage())
logging.getLogger("axolotl.integrations.nslora").addHandler(handler)

cfg = load_cfg(sys.argv[1])
meta = load_datasets(cfg=cfg, cli_args=TrainerCliArgs())
trainer, *_ = setup_model_and_trainer(cfg, meta)  # Axolotl builds the trainer and runs its hooks
manager = PluginManager.get_instance()
plugin = next(p for p in manager.plugins.values() if isinstance(p, NSLoRAPlugin))
callbacks = trainer.callback_handler.callbacks
result = {"first_is_plugins": callbacks[0] is plugin.callback,
          "nslora_callbacks": sum(isinstance(cb, NSLoRACallback) for cb in callbacks),
          "attached": [line for line in lines if "callback attached" in line],
          "collator": repr(manager.get_collator_cls_and_kwargs(cfg))}
# the hook itself, on this real cfg and trainer: it returns the callback for Axolotl to add
returned = plugin.add_callbacks_post_trainer(cfg, trainer)
result["returned"] = [type(cb).__name__ for cb in returned]
result["returned_is_plugins"] = len(returned) == 1 and returned[0] is plugin.callback
result["tokenizer_is_trainers"] = returned[0].tokenizer is trainer.processing_class
cfg_off = load_cfg(sys.argv[1], nslora=False)
result["off"] = plugin.add_callbacks_post_trainer(cfg_off, trainer)
# an Axolotl without the hook calls post_trainer_create alone: the callback is built there
old = NSLoRAPlugin()
old.post_trainer_create(cfg, trainer)
callbacks = trainer.callback_handler.callbacks
result["fallback_first"] = callbacks[0] is old.callback and old.callback is not None
result["fallback_nslora_callbacks"] = sum(isinstance(cb, NSLoRACallback) for cb in callbacks)
result["fallback_attached"] = [line for line in lines if "callback attached" in line][1:]
print("RESULT " + json.dumps(result))
"""


@pytest.mark.slow
def test_callback_comes_through_axolotls_hook(axolotl_venv, workdir):
    """Axolotl builds a real trainer from a recipe: `add_callbacks_post_trainer` returns the
    plugin's callback, which ends up first and alone; no collator class is returned (Axolotl's
    own choice stays, the callback wraps it); without the hook, `post_trainer_create` attaches it."""
    config = _short_recipe(workdir, "smollm2-lora-cpu.yaml", "hooks")
    code, output = _run(axolotl_venv, workdir,
                        [str(axolotl_venv / "bin" / "python"), "-c", _HOOKS_CHECK, str(config)],
                        timeout=300)
    assert code == 0, output[-3000:]
    result = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
    assert result["first_is_plugins"] and result["nslora_callbacks"] == 1, result
    assert len(result["attached"]) == 1 and "through add_callbacks_post_trainer" in result["attached"][0]
    assert result["collator"] == "None"
    assert result["returned"] == ["NSLoRACallback"] and result["returned_is_plugins"], result
    assert result["tokenizer_is_trainers"]
    assert result["off"] == []
    assert result["fallback_first"] and result["fallback_nslora_callbacks"] == 1, result
    fallback = result["fallback_attached"]
    assert len(fallback) == 1 and "in post_trainer_create" in fallback[0], fallback
