"""LLaMA-Factory adapter (`nslora-lf`), for real, in LLaMA-Factory's own virtual environment.

LLaMA-Factory 0.9.5 pins transformers<=5.6, trl<=0.24, peft<=0.18.1, accelerate<=1.11 and
datasets<=4.0, so it cannot share the main venv. The real tests run `nslora-lf` in a subprocess
with the python of `$NSLORA_LLAMAFACTORY_VENV` (default `<repo>/.venvs/llamafactory`, built by
`.ci/venvs/llamafactory.sh`); without it they skip, unless NSLORA_REQUIRE_FRAMEWORK_VENVS=1.

Each training run uses the CPU recipe with the real SmolLM2-135M-Instruct and a few steps; the
settings below make the first check symbolic (the 135M model misses the answer format within 8
new tokens; a high NLL threshold makes those misses count as style problems) and accept the
constraint editor's candidate, so one run shows a symbolic round end to end. The subprocesses
run torch on one thread: on a shared 2-core machine that is several times faster than two.

The tests at the top need no LLaMA-Factory: they check the config handling in the main venv.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nslora_plugin import NSLoRAConfigError, load_artifacts
from nslora_plugin.integrations.llamafactory import dataset_info, prepare, split_config
from nslora_plugin.integrations.llamafactory.args import check_lf_settings, read_config
from nslora_plugin.integrations.llamafactory.cli import MODULE, torchrun_command

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "llamafactory"
LORA = RECIPES / "smollm2-lora-cpu.yaml"
QLORA = RECIPES / "smollm2-qlora-cpu.yaml"
BIG = RECIPES / "llama3-8b-qlora-24gb.yaml"
BUILD_SCRIPT = ".ci/venvs/llamafactory.sh"
SYSTEM = "You are a helpful assistant."
FORMAT_INSTRUCTION = "End your reply with a final line 'Answer: <number>'."


# ------------------------------------------------------------------------------------------------
# Config handling (main venv, no LLaMA-Factory)
# ------------------------------------------------------------------------------------------------


def lf_base(**extra):
    return {"stage": "sft", "do_train": True, "template": "smollm2", "finetuning_type": "lora",
            "output_dir": "out", **extra}


def test_split_keeps_lf_keys_and_validates_nslora_keys(tmp_path):
    probe = tmp_path / "probe.jsonl"
    probe.write_text('{"question": "1+1?", "answer": "Answer: 2"}\n')
    cfg = lf_base(nslora=True, nslora_probe_path=str(probe), nslora_check_every="5",
                  nslora_system_prompt=SYSTEM)
    prepared = prepare(cfg, lookup_template_default=False)
    assert not any(k.startswith("nslora") for k in prepared.lf_args)
    assert prepared.nslora.check_every == 5 and prepared.nslora.enabled
    # rows without a system message get the prompt NSLoRA edits
    assert prepared.lf_args["default_system"] == SYSTEM
    # without nslora_system_prompt, the rows say (read at train start: core/row_prompts.py);
    # default_system is what rows without a system message carry
    cfg = lf_base(default_system="Be brief.", nslora_probe_path=str(probe))
    unset = prepare(cfg, lookup_template_default=False)
    assert unset.nslora.system_prompt is None and "'Be brief.'" in " ".join(unset.notes)
    # a nested mapping works too
    cfg = lf_base(nslora={"probe_path": str(probe), "editor": "constraint"})
    assert prepare(cfg, lookup_template_default=False).nslora.editor == "constraint"
    assert split_config({"a": 1, "nslora_x": 2, "nslora": True}) == ({"a": 1}, {"nslora_x": 2, "nslora": True})


@pytest.mark.parametrize("keys, fragments", [
    ({"nslora_chek_every": 3}, ["'nslora_chek_every'", "Did you mean 'nslora_check_every'?"]),
    ({"nslora_editor": "gpt"}, ["nslora_editor='gpt'", "'textgrad', 'constraint', 'demonstrations', 'none'"]),
    ({"nslora_check_every": "often"}, ["nslora_check_every='often'", "an integer"]),
    ({"nslora_probe_path": "missing.jsonl"}, ["nslora_probe_path='missing.jsonl'", "no such file"]),
    ({"nslora_editor": "constraint"}, ["nslora_probe_path is required"]),
])
def test_bad_nslora_settings_name_the_key(keys, fragments):
    with pytest.raises(NSLoRAConfigError) as err:
        prepare(lf_base(**keys), lookup_template_default=False)
    for fragment in fragments:
        assert fragment in str(err.value)
    assert f"nslora_{err.value.key}" in str(err.value)  # .key: the field, without the prefix


@pytest.mark.parametrize("extra, fragment", [
    ({"packing": True}, "packing: true"),
    ({"neat_packing": True}, "neat_packing: true"),
    ({"dataloader_num_workers": 2}, "dataloader_num_workers: 2"),
    ({"stage": "dpo"}, "stage: dpo"),
    ({"do_train": False}, "do_train: true"),
])
def test_lf_settings_that_would_hide_edits_are_rejected(extra, fragment):
    with pytest.raises(NSLoRAConfigError, match=re.escape(fragment)):
        check_lf_settings(lf_base(**extra))


def test_no_nslora_keys_and_nslora_false():
    with pytest.raises(NSLoRAConfigError, match="no nslora_\\* keys"):
        prepare(lf_base())
    prepared = prepare(lf_base(nslora=False, packing=True))  # off: nothing else is checked
    assert not prepared.nslora.enabled and "nslora" not in prepared.lf_args


def test_overrides_merge_like_llamafactory_cli(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 60\nnslora_check_every: 10\nlearning_rate: 2.0e-4\n")
    data = read_config(cfg, ["max_steps=4", "nslora_check_every=2", "nslora_system_prompt=Hi there"])
    assert data == {"max_steps": 4, "nslora_check_every": 2, "learning_rate": 2.0e-4,
                    "nslora_system_prompt": "Hi there"}
    with pytest.raises(NSLoRAConfigError, match="key=value"):
        read_config(cfg, ["--max_steps", "4"])


def test_recipes_parse_and_dataset_info_pattern_matches_generator(tmp_path, monkeypatch):
    pattern = json.loads((RECIPES / "dataset_info.json").read_text())
    assert pattern["nslora_word_problems"] == dataset_info()["nslora_word_problems"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nslora_runs" / "lf-data").mkdir(parents=True)
    (tmp_path / "nslora_runs" / "lf-data" / "probe.jsonl").write_text('{"question": "q", "answer": "1"}\n')
    for recipe in (LORA, QLORA, BIG):
        lf, keys = split_config(read_config(recipe))
        assert lf["stage"] == "sft" and lf["finetuning_type"] == "lora" and keys
        check_lf_settings(lf)
        if recipe is not BIG:  # the 8B recipe's probe file is the user's own
            assert prepare(read_config(recipe), lookup_template_default=False).nslora.enabled
    assert read_config(QLORA)["quantization_bit"] == 4 and read_config(QLORA)["quantization_method"] == "bnb"


def test_torchrun_command_relaunches_this_module_with_every_rank_getting_the_callback(monkeypatch):
    monkeypatch.setenv("NPROC_PER_NODE", "4")
    monkeypatch.setenv("MASTER_PORT", "29511")
    cmd = torchrun_command("cfg.yaml", ["max_steps=3"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "4" and "29511" in cmd
    assert cmd[-5:] == ["-m", MODULE, "train", str(Path("cfg.yaml").resolve()), "max_steps=3"]


# ------------------------------------------------------------------------------------------------
# For real, in the LLaMA-Factory venv
# ------------------------------------------------------------------------------------------------


def lf_python() -> Path:
    explicit = os.environ.get("NSLORA_LLAMAFACTORY_VENV")
    venv = Path(explicit).expanduser() if explicit else REPO / ".venvs" / "llamafactory"
    python = venv / "bin" / "python"
    complete = (venv / ".nslora-venv-complete").is_file() or explicit
    if not python.is_file() or not complete:
        message = (f"LLaMA-Factory venv not found or unfinished at {venv}. Build it with "
                   f"`{BUILD_SCRIPT} {venv}` (about 4 minutes), or set NSLORA_LLAMAFACTORY_VENV.")
        if os.environ.get("NSLORA_REQUIRE_FRAMEWORK_VENVS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return python


@pytest.fixture(scope="module")
def lf(tmp_path_factory):
    """(python, env, data dir) for subprocess runs in the LLaMA-Factory venv."""
    python = lf_python()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               LITELLM_LOCAL_MODEL_COST_MAP="True", PYTHONUNBUFFERED="1")
    for name in ("FORCE_TORCHRUN", "NPROC_PER_NODE", "USE_RAY", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    data = tmp_path_factory.mktemp("lf-data")
    out = subprocess.run([str(python), "-m", MODULE, "make-data", str(data), "--train", "64", "--probe", "8",
                          "--system-prompt", SYSTEM], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return python, env, data


def tiny_overrides(model_dir: Path, data: Path, output: Path) -> list[str]:
    """A 4-step run whose check at step 2 is symbolic and whose edit is accepted (margin -1 makes
    acceptance deterministic; the gate itself is tested in the core); the check at step 4 is
    numerical (symbolic budget spent)."""
    return [f"model_name_or_path={model_dir}", f"dataset_dir={data}", f"output_dir={output}",
            "max_steps=4", "save_steps=100", "per_device_train_batch_size=2", "logging_steps=1",
            f"nslora_probe_path={data / 'probe.jsonl'}", "nslora_probe_size=4",
            "nslora_probe_max_new_tokens=8", "nslora_check_every=2", "nslora_editor=constraint",
            "nslora_nll_threshold=100", "nslora_max_symbolic_rounds=1", "nslora_acceptance_margin=-1",
            "nslora_monitor_window=2"]


def run_lf(python: Path, env: dict, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([str(python), *args], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        print(out.stdout[-4000:], out.stderr[-8000:], sep="\n")
    return out


def assert_symbolic_round_reached_training(run_dir: Path) -> None:
    arts = load_artifacts(run_dir)
    routes = [d for d in arts.decisions if d["kind"] == "route"]
    assert [(d["step"], d["action"]) for d in routes] == [(2, "symbolic"), (4, "numerical")]
    edits = [d for d in arts.decisions if d["kind"] == "edit"]
    assert len(edits) == 1 and edits[0]["editor"] == "constraint" and edits[0]["accepted"]
    prompt = json.loads((run_dir / "nslora" / "prompt.json").read_text())
    assert prompt == {"system_prompt": f"{SYSTEM}\n{FORMAT_INSTRUCTION}", "version": 1,
                      "initial_system_prompt": SYSTEM}
    stats = arts.state["collator"]
    assert stats["swapped"] > 0 and stats["no_span"] == 0
    assert (run_dir / "adapter_model.safetensors").is_file()  # LLaMA-Factory saved the adapter
    assert (run_dir / "checkpoint-4" / "nslora" / "prompt.json").is_file()


def test_bad_nslora_key_fails_before_any_model_loads(lf, tmp_path):
    python, env, data = lf
    for override, fragments in (
            ("nslora_chek_every=3", ["'nslora_chek_every'", "Did you mean 'nslora_check_every'?"]),
            ("nslora_editor=gpt", ["nslora_editor='gpt'", "one of 'textgrad', 'constraint', 'demonstrations', 'none'"])):
        # A model path that does not exist: reaching the model loader would fail differently.
        out = run_lf(python, env, ["-m", MODULE, "train", str(LORA), "model_name_or_path=/nonexistent",
                                   f"dataset_dir={data}", f"output_dir={tmp_path / 'run'}",
                                   f"nslora_probe_path={data / 'probe.jsonl'}", override], timeout=60)
        assert out.returncode == 2, out.stderr
        assert out.stderr.startswith("nslora-lf: error: ")
        for fragment in fragments:
            assert fragment in out.stderr
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_lora_cli_symbolic_round_reaches_training(lf, tmp_path, default_model_dir):
    """`nslora-lf train` (as `python -m ...cli`) on the CPU LoRA recipe with overrides."""
    python, env, data = lf
    run_dir = tmp_path / "run"
    out = run_lf(python, env, ["-m", MODULE, "train", str(LORA),
                               *tiny_overrides(default_model_dir, data, run_dir)])
    assert out.returncode == 0
    assert "NSLoRA step 2: symbolic" in out.stderr + out.stdout
    assert_symbolic_round_reached_training(run_dir)


TRACE_DRIVER = """
import json, sys
from transformers import TrainerCallback
from nslora_plugin.integrations.llamafactory import run

class Trace(TrainerCallback):  # what the weights train on: decoded input_ids of every forward
    def __init__(self, path):
        self.path, self.rows, self.layers = path, [], []
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        def hook(module, a, kw):
            if module.training:
                for row in kw.get("input_ids", a[0] if a else None):
                    self.rows.append([state.global_step, processing_class.decode(row)])
        model.register_forward_pre_hook(hook, with_kwargs=True)
        self.layers = sorted({type(m).__name__ for m in model.modules() if "4bit" in type(m).__name__})
    def on_train_end(self, args, state, control, **kwargs):
        json.dump({"layers": self.layers, "batches": self.rows}, open(self.path, "w"))

run(sys.argv[2], sys.argv[3:], callbacks=[Trace(sys.argv[1])])
"""

AUGMENT_PLUGIN = """
from nslora_plugin.core.hookspecs import hookimpl

class EveryProbeExample:  # prompts-as-data rows for every probe example, whatever it scored
    @hookimpl
    def nslora_augment_examples(self, prompt, report, before, examples, config):
        return [{"messages": [{"role": "user", "content": e.question},
                              {"role": "assistant", "content": e.reference}],
                 "source": "test", "example_id": e.id, "prompt_version": report.prompt_version}
                for e in examples.values()]
"""


@pytest.mark.slow
def test_qlora_python_api_trains_on_the_edited_prompt_and_augmented_rows(lf, tmp_path, default_model_dir):
    """QLoRA (bitsandbytes 4-bit on the CPU) through the Python API `run()`, with a callback that
    records every training forward, and a plugin that adds augmented rows."""
    python, env, data = lf
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "lf_nslora_test_plugin.py").write_text(AUGMENT_PLUGIN)
    env = {**env, "PYTHONPATH": str(tmp_path / "plug")}
    run_dir, trace = tmp_path / "run", tmp_path / "trace.json"
    out = run_lf(python, env, ["-c", TRACE_DRIVER, str(trace), str(QLORA),
                               *tiny_overrides(default_model_dir, data, run_dir),
                               "nslora_plugins=[lf_nslora_test_plugin.EveryProbeExample]",
                               "nslora_augment_share=0.5"])
    assert out.returncode == 0
    assert_symbolic_round_reached_training(run_dir)
    seen = json.loads(trace.read_text())
    assert seen["layers"] == ["Linear4bit"]  # the base model really is 4-bit
    # The edit is made at the end of step 2; the loader has already collated the batch of step 3,
    # so the new prompt trains from the 4th forward (global_step 3) on.
    new_system = f"<|im_start|>system\n{SYSTEM}\n{FORMAT_INSTRUCTION}<|im_end|>"
    before = [text for step, text in seen["batches"] if step < 2]
    after = [text for step, text in seen["batches"] if step >= 3]
    assert before and after
    assert all(f"<|im_start|>system\n{SYSTEM}<|im_end|>" in t for t in before)
    assert all(new_system in t for t in after)
    stats = load_artifacts(run_dir).state["collator"]
    assert stats["augmented"] > 0


@pytest.mark.slow
def test_torchrun_two_processes_share_the_edit(lf, tmp_path, default_model_dir):
    """FORCE_TORCHRUN=1 makes `nslora-lf train` relaunch itself under torchrun (as llamafactory-cli
    does on several GPUs); two CPU processes (gloo) stand in for two GPUs. Rank 0 runs the check,
    rank 1 gets the accepted prompt from it and splices it into its own batches."""
    python, env, data = lf
    env = {**env, "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}
    run_dir = tmp_path / "run"
    out = run_lf(python, env, ["-m", MODULE, "train", str(LORA), "ddp_backend=gloo",
                               *tiny_overrides(default_model_dir, data, run_dir)])
    assert out.returncode == 0
    log = out.stdout + out.stderr
    assert "torch.distributed.run" in log and "Process rank: 1, world size: 2" in log
    assert_symbolic_round_reached_training(run_dir)
    rank1 = re.search(r"NSLoRA rank 1: prompt version (\d+), collator (\{.*?\})", log)
    assert rank1, log[-3000:]
    assert rank1.group(1) == "1" and ast.literal_eval(rank1.group(2))["swapped"] > 0
