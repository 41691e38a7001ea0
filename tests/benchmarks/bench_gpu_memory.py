"""GPU memory of the 8B QLoRA recipe, measured: plain TRL vs NSLoRA attached, next to `nslora doctor`.

`recipes/trl/llama3-8b-qlora-24gb.yaml` claims QLoRA + NSLoRA on Llama-3.1-8B fits one 24 GB card,
on the strength of `nslora doctor`'s estimate. This script checks that claim on a real GPU:

1. It builds a Llama model with RANDOM weights and exactly the shape of the doctor's preset for the
   recipe's model (`llama-3-8b`: h 4096, 32 layers, 32/8 heads, MLP 14336, vocabulary 128256;
   8.03B parameters), saves it once in bf16 to `<workdir>/model` with a tokenizer, in its own
   process. Random weights take the same memory as the real ones; the real ones are gated and
   there is no network on the GPU machine.
2. It runs the recipe itself, twice, each in a fresh process: the recipe YAML is parsed with
   `TrlParser` exactly as `recipes/trl/sft.py --config <yaml>` does, and the model is loaded and
   trained the way `sft.py` does it (`get_quantization_config`: NF4 + double quantization with
   bf16 compute; `get_peft_config`: LoRA r 16 on all linear layers; `SFTTrainer` with the recipe's
   batch size, max_length, gradient checkpointing, optimizer and gradient accumulation). Only
   the data, the output folder and the run length are overridden on the command line, plus, for
   the NSLoRA run, settings that need no editor LLM (see below).
   - `plain`:  `--nslora false`
   - `nslora`: `maybe_attach(trainer, nslora_args)` as in `sft.py`, with `editor=constraint`
     (deterministic, no endpoint), `check_every=2` and `warmup_steps=0`, so a check with a probe
     falls INSIDE the measured steps (step 2, and step 4 of 4 if run that long), plus the
     baseline probe at the start and the final probe at the end. The probe keeps the recipe's
     `probe_batch_size` (8) and `probe_max_new_tokens` (256), which is what sets the probe's
     memory; `probe_size` is 8 (one generation batch) instead of 32 to keep the run short.
3. The training rows are long synthetic chat rows that fill `max_length` (2048) after
   truncation, so activation memory is the real one. Probe rows have a prompt of about 256
   tokens (the doctor's `probe_prompt_len`) and a reference reply of about 256 tokens.

Recorded per run: `torch.cuda.max_memory_allocated()` / `max_memory_reserved()` in GiB over the
whole training run, and separately for the training steps and for the probes (the peak counters
are reset around each probe evaluation), the peak while loading, what stays allocated after
loading (weights + adapter) and after the first optimizer step, device-level use from
`torch.cuda.mem_get_info` (which also sees the CUDA context and bitsandbytes' paged optimizer
memory, invisible to the PyTorch allocator), and seconds per optimizer step (probe time
excluded). Printed next to the doctor's estimate for the same settings.

    python tests/benchmarks/bench_gpu_memory.py --tokenizer .gpucarry/tokenizer \\
        --workdir runs/nslora-gpu-bench --json gpu-qlora-8b.json
    python tests/benchmarks/bench_gpu_memory.py --variants plain --steps 2     # one variant only
    python tests/benchmarks/bench_gpu_memory.py --tiny ...   # 2-layer model: a CPU smoke test of
                                                             # the script itself, numbers meaningless

Not a test (pytest collects `test_*.py` only): nothing is asserted. Needs CUDA and bitsandbytes
for meaningful numbers (about 16 GB of disk in the workdir for the bf16 checkpoint).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
try:  # an installed nslora-plugin (editable or not) maps integrations/ to nslora_plugin.integrations
    import nslora_plugin.integrations  # noqa: F401
except ImportError:  # not installed: the core package from the checkout (no framework adapters)
    sys.path.insert(0, str(REPO))

RECIPE = REPO / "recipes" / "trl" / "llama3-8b-qlora-24gb.yaml"
DEFAULT_TOKENIZER = REPO / ".cache" / "nslora-test" / "SmolLM2-135M-Instruct"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "tokenizer.model")
GiB = 1024 ** 3

_WORDS = ("apple river stone window garden number silver table orange winter music paper bridge "
          "forest candle mirror planet rocket yellow castle engine island letter market needle "
          "ocean pencil question rabbit signal thunder valley wagon basket circle dragon feather "
          "harbor jacket kitten ladder meadow noodle pepper quartz saddle tunnel violet walnut").split()


# ------------------------------------------------------------------------------ shared helpers
def recipe_model_shape(recipe: Path, tiny: bool) -> Any:
    """The doctor's ModelShape for the recipe's model (or a 2-layer stand-in for --tiny)."""
    from nslora_plugin.apps.tools.doctor import ModelShape, resolve_model, settings_from_trl_config

    model, _ = settings_from_trl_config(recipe)
    shape = resolve_model(model)
    if tiny:
        return ModelShape("tiny-llama", 64, 2, 4, 2, 128, shape.vocab_size)
    return shape


def filler(tok: Any, n_tokens: int, rng: random.Random) -> str:
    """Random words, cut to exactly `n_tokens` tokens of this tokenizer."""
    words: list[str] = []
    while True:
        words.extend(rng.choice(_WORDS) for _ in range(max(n_tokens // 2, 8)))
        ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            return tok.decode(ids[:n_tokens]).strip()


def n_tokens(encoded: Any) -> int:
    """Length of `apply_chat_template(..., tokenize=True)`: a list of ids or a BatchEncoding."""
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return len(encoded)


def gpu_state() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {}
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return {"allocated_gib": torch.cuda.memory_allocated() / GiB,
            "reserved_gib": torch.cuda.memory_reserved() / GiB,
            "max_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
            "max_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
            "device_used_gib": (total - free) / GiB}


def reset_peaks() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------ 1. the model
def make_model(args: argparse.Namespace) -> dict[str, Any]:
    """Random-weight Llama of the preset's shape, saved in bf16 with the tokenizer (own process)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    shape = recipe_model_shape(Path(args.recipe), args.tiny)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    out = Path(args.workdir) / "model"
    config = LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.hd, tie_word_embeddings=shape.tie_embeddings, attention_bias=shape.qkv_bias,
        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(out), max_shard_size="5GB")
    tok.save_pretrained(str(out))
    for name in TOKENIZER_FILES:  # the chat template travels as a file in recent transformers
        src = Path(args.tokenizer) / name
        if src.is_file() and not (out / name).is_file():
            shutil.copyfile(src, out / name)
    info = {"preset": shape.name, "params": params, "doctor_params": shape.num_params,
            "built_on": device, "seconds": round(time.perf_counter() - t0, 1),
            "bytes_on_disk": sum(f.stat().st_size for f in out.glob("*.safetensors"))}
    (out / "bench_model.json").write_text(json.dumps(info, indent=2))
    return info


# ------------------------------------------------------------------------------ 2. the data
def make_data(args: argparse.Namespace, system: str, answer_format_line: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    rng = random.Random(0)
    data = Path(args.workdir) / "data"
    data.mkdir(parents=True, exist_ok=True)
    n_train = args.steps * args.batch_size_hint * args.grad_accum_hint + 8
    train = []
    for i in range(n_train):
        question = filler(tok, args.question_tokens, rng) + "?"
        answer = filler(tok, args.answer_tokens, rng) + "\n" + answer_format_line.format(n=i)
        train.append({"messages": [{"role": "system", "content": system},
                                   {"role": "user", "content": question},
                                   {"role": "assistant", "content": answer}]})
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    # probe: a prompt of ~probe_prompt_tokens (system + user + template) and a reference of
    # ~probe_reference_tokens, as the doctor assumes (P = 256, reference ~ G = 256)
    template = n_tokens(tok.apply_chat_template([{"role": "system", "content": system},
                                                 {"role": "user", "content": "x"}],
                                                tokenize=True, add_generation_prompt=True))
    probe = []
    for i in range(args.probe_size):
        question = filler(tok, max(args.probe_prompt_tokens - template, 8), rng) + "?"
        reference = filler(tok, args.probe_reference_tokens - 8, rng) + "\n" + answer_format_line.format(n=i)
        probe.append({"id": f"p{i}", "question": question, "answer": reference, "final_answer": str(i)})
    (data / "probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in probe))
    lens = [n_tokens(tok.apply_chat_template(r["messages"], tokenize=True)) for r in train[:4]]
    plens = [n_tokens(tok.apply_chat_template([{"role": "system", "content": system},
                                               {"role": "user", "content": r["question"]}],
                                              tokenize=True, add_generation_prompt=True))
             for r in probe]
    return {"train_rows": n_train, "train_row_tokens_before_truncation": lens,
            "probe_rows": len(probe), "probe_prompt_tokens": plens}


# ------------------------------------------------------------------------------ 3. one run (child)
def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from nslora_plugin.integrations.trl import NSLoRAArguments, maybe_attach
    from transformers import TrainerCallback
    from trl import (
        ModelConfig,
        ScriptArguments,
        SFTConfig,
        SFTTrainer,
        TrlParser,
        get_peft_config,
        get_quantization_config,
    )

    from nslora_plugin.core.data import read_jsonl
    from nslora_plugin.core.probe import ProbeEvaluator

    if args.gpu_limit_gib and torch.cuda.is_available():
        # emulate a smaller card: the caching allocator frees its cache and retries before it
        # raises out-of-memory at this cap, as it would at the end of a real card's memory
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(args.gpu_limit_gib * GiB / total, 1.0))
    started = {}
    if torch.cuda.is_available():
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # the CUDA context exists now; nothing else is allocated
        started = gpu_state()  # device_used - reserved = this process's CUDA context
    work = Path(args.workdir)
    argv = ["--config", str(args.recipe), "--model_name_or_path", str(work / "model"),
            "--dataset_name", str(work / "data"), "--output_dir", str(work / f"run-{args.variant}"),
            "--max_steps", str(args.steps), "--save_strategy", "no", "--logging_steps", "1",
            "--report_to", "none", "--disable_tqdm", "true"]
    argv += args.override
    if args.variant == "plain":
        argv += ["--nslora", "false"]
    else:
        argv += ["--nslora", "true", "--nslora_probe_path", str(work / "data" / "probe.jsonl"),
                 "--nslora_probe_size", str(args.probe_size), "--nslora_editor", args.editor,
                 "--nslora_editor_fallback", "constraint" if args.editor != "none" else "none",
                 "--nslora_check_every", str(args.check_every), "--nslora_warmup_steps", "0",
                 "--nslora_max_symbolic_rounds", "1",
                 "--nslora_output_dir", str(work / f"run-{args.variant}" / "nslora")]
    # ---- exactly recipes/trl/sft.py from here on (data from a list instead of load_dataset)
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, NSLoRAArguments))
    _script_args, training_args, model_args, nslora_args = parser.parse_args_and_config(args=argv)
    model_init_kwargs = dict(revision=model_args.model_revision,
                             trust_remote_code=training_args.trust_remote_code,
                             attn_implementation=model_args.attn_implementation, dtype=model_args.dtype)
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        model_init_kwargs["quantization_config"] = quantization_config
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    dataset = Dataset.from_list(read_jsonl(work / "data" / "train.jsonl"))
    reset_peaks()
    t0 = time.perf_counter()
    trainer = SFTTrainer(model=model_args.model_name_or_path, args=training_args, train_dataset=dataset,
                         peft_config=get_peft_config(model_args))
    load_seconds = time.perf_counter() - t0
    after_load = gpu_state()  # max_* here = the peak while loading and quantizing
    callback = maybe_attach(trainer, nslora_args)
    assert (callback is None) == (args.variant == "plain")

    # ---- instrumentation: peaks of training segments vs probe evaluations, step times
    segments: list[dict[str, Any]] = []
    probe_seconds = {"total": 0.0, "in_step": 0.0}
    original_evaluate = ProbeEvaluator.evaluate

    def measured_evaluate(self: Any, *a: Any, **k: Any) -> Any:
        state = gpu_state()
        segments.append({"kind": "train", "max_allocated_gib": state.get("max_allocated_gib"),
                         "max_reserved_gib": state.get("max_reserved_gib")})
        reset_peaks()
        t = time.perf_counter()
        try:
            return original_evaluate(self, *a, **k)
        finally:
            state = gpu_state()
            seconds = time.perf_counter() - t
            probe_seconds["total"] += seconds
            probe_seconds["in_step"] += seconds
            segments.append({"kind": "probe", "step": k.get("step"), "seconds": round(seconds, 2),
                             "max_allocated_gib": state.get("max_allocated_gib"),
                             "max_reserved_gib": state.get("max_reserved_gib")})
            reset_peaks()

    ProbeEvaluator.evaluate = measured_evaluate

    shapes: list[list[int]] = []

    def record_shape(module: Any, a: Any, k: Any) -> None:
        ids = k.get("input_ids") if k else None
        if ids is None and a:
            ids = a[0]
        if module.training and ids is not None:
            shapes.append(list(ids.shape))

    hook = trainer.model.register_forward_pre_hook(record_shape, with_kwargs=True)

    class Steps(TrainerCallback):
        def __init__(self) -> None:
            self.rows: list[dict[str, Any]] = []
            self.begin = 0.0

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            probe_seconds["in_step"] = 0.0
            self.begin = time.perf_counter()

        def on_step_end(self, args_: Any, state: Any, control: Any, **k: Any) -> None:
            # runs after NSLoRA's on_step_end (NSLoRA's callback is first): a check is inside
            s = gpu_state()
            wall = time.perf_counter() - self.begin
            self.rows.append({"step": state.global_step, "wall_seconds": round(wall, 3),
                              "probe_seconds": round(probe_seconds["in_step"], 3),
                              "train_seconds": round(wall - probe_seconds["in_step"], 3),
                              "allocated_gib": s.get("allocated_gib"),
                              "device_used_gib": s.get("device_used_gib")})

    steps = Steps()
    trainer.add_callback(steps)
    reset_peaks()
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    end = gpu_state()
    hook.remove()
    segments.append({"kind": "train", "max_allocated_gib": end.get("max_allocated_gib"),
                     "max_reserved_gib": end.get("max_reserved_gib")})

    def peak(kind: str, key: str) -> float | None:
        values = [s[key] for s in segments if s["kind"] == kind and s.get(key) is not None]
        return max(values) if values else None

    timed = [r["train_seconds"] for r in steps.rows[1:]] or [r["train_seconds"] for r in steps.rows]
    log = [h for h in trainer.state.log_history if "loss" in h]
    result: dict[str, Any] = {
        "variant": args.variant, "argv": argv, "versions": versions(), "at_start": started,
        "load_seconds": round(load_seconds, 1), "train_seconds": round(train_seconds, 1),
        "after_load": after_load, "end": end,
        "peak_allocated_gib": max(filter(None, [peak("train", "max_allocated_gib"),
                                                peak("probe", "max_allocated_gib")]), default=None),
        "peak_reserved_gib": max(filter(None, [peak("train", "max_reserved_gib"),
                                               peak("probe", "max_reserved_gib")]), default=None),
        "train_peak_allocated_gib": peak("train", "max_allocated_gib"),
        "train_peak_reserved_gib": peak("train", "max_reserved_gib"),
        "probe_peak_allocated_gib": peak("probe", "max_allocated_gib"),
        "probe_peak_reserved_gib": peak("probe", "max_reserved_gib"),
        "device_used_max_at_step_end_gib": max((r["device_used_gib"] for r in steps.rows
                                                if r["device_used_gib"] is not None), default=None),
        "steps": steps.rows, "segments": segments,
        "median_step_seconds": statistics.median(timed) if timed else None,
        "probe_seconds_total": round(probe_seconds["total"], 1),
        "micro_batch_shapes": {str(tuple(x)): shapes.count(x) for x in
                               [list(t) for t in sorted({tuple(x) for x in shapes})]},
        "micro_batches_seen": len(shapes),
        "losses": [h["loss"] for h in log],
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters() if p.requires_grad}),
        "model_footprint_gib": trainer.model.get_memory_footprint() / GiB,
        "settings": {k: getattr(training_args, k) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
            "gradient_checkpointing", "optim", "bf16", "packing", "max_steps")},
        "gradient_checkpointing_kwargs": training_args.gradient_checkpointing_kwargs,
        "quantization": quantization_config.to_dict() if quantization_config is not None else None,
        "lora": {"r": model_args.lora_r, "alpha": model_args.lora_alpha,
                 "dropout": model_args.lora_dropout, "targets": model_args.lora_target_modules},
    }
    if callback is not None:
        loop = callback.loop
        result["nslora"] = {
            "config": {k: getattr(loop.config, k) for k in (
                "editor", "editor_fallback", "check_every", "warmup_steps", "probe_size",
                "probe_batch_size", "probe_max_new_tokens", "max_symbolic_rounds")},
            "probe_evaluations": [s.get("step") for s in segments if s["kind"] == "probe"],
            "decisions": dict(loop.decision_counts),
            "probe_report_steps": [r.step for r in loop.reports],
            "faults": dict(loop.faults),
        }
    return result


# ------------------------------------------------------------------------------ versions
def versions(cuda: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"python": platform.python_version()}
    import importlib.metadata as md

    for name in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets",
                 "pyarrow", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
        if cuda and torch.cuda.is_available():  # the parent keeps CUDA uninitialised
            p = torch.cuda.get_device_properties(0)
            out["gpu"] = p.name
            out["gpu_total_gib"] = round(p.total_memory / GiB, 2)
    except (RuntimeError, AssertionError) as exc:  # pragma: no cover - reporting only
        out["torch_error"] = repr(exc)
    return out


# ------------------------------------------------------------------------------ the comparison
def doctor_estimates(recipe: Path, run_overrides: dict[str, Any], probe_prompt_len: int | None) -> dict[str, Any]:
    from nslora_plugin.apps.tools.doctor import (
        TrainSettings,
        estimate,
        resolve_model,
        settings_from_trl_config,
    )

    model, settings = settings_from_trl_config(recipe)
    shape = resolve_model(model)
    as_recipe = estimate(shape, TrainSettings(**settings))  # = `nslora doctor --config <recipe>`
    run = dict(settings, **run_overrides)
    if probe_prompt_len:
        run["probe_prompt_len"] = probe_prompt_len
    as_run = estimate(shape, TrainSettings(**run))
    return {"recipe": as_recipe.to_dict(), "as_run": as_run.to_dict()}


def fmt(x: Any, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(RECIPE), help="TRL recipe YAML (default: the 8B 24 GB one)")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER),
                   help="folder with tokenizer.json / tokenizer_config.json / chat_template.jinja")
    p.add_argument("--workdir", default="runs/nslora-gpu-bench")
    p.add_argument("--variants", default="plain,nslora")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (max_steps)")
    p.add_argument("--check-every", type=int, default=2, help="NSLoRA check_every (optimizer steps)")
    p.add_argument("--editor", default="constraint", choices=("constraint", "none"))
    p.add_argument("--probe-size", type=int, default=8)
    p.add_argument("--probe-prompt-tokens", type=int, default=256)
    p.add_argument("--probe-reference-tokens", type=int, default=256)
    p.add_argument("--question-tokens", type=int, default=200)
    p.add_argument("--answer-tokens", type=int, default=2000,
                   help="reply length; question + reply > max_length so rows are cut to max_length")
    p.add_argument("--override", nargs=argparse.REMAINDER, default=[],
                   help="extra TRL flags after everything else, e.g. --override --max_length 512")
    p.add_argument("--gpu-limit-gib", type=float, default=None,
                   help="cap the PyTorch allocator at this many GiB (torch.cuda."
                        "set_per_process_memory_fraction) to emulate a smaller card")
    p.add_argument("--tiny", action="store_true", help="2-layer model: smoke test of this script")
    p.add_argument("--json", default=None, help="also write every number here")
    p.add_argument("--timeout", type=int, default=900, help="seconds per child process")
    p.add_argument("--worker", dest="variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--make-model", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.workdir = str(Path(args.workdir).resolve())  # child processes get the same folder

    import yaml

    cfg = yaml.safe_load(Path(args.recipe).read_text())
    args.batch_size_hint = int(cfg.get("per_device_train_batch_size", 1))
    args.grad_accum_hint = int(cfg.get("gradient_accumulation_steps", 1))
    for i, flag in enumerate(args.override[:-1]):  # run length of the data
        if flag == "--gradient_accumulation_steps":
            args.grad_accum_hint = int(args.override[i + 1])
        if flag == "--per_device_train_batch_size":
            args.batch_size_hint = int(args.override[i + 1])

    if args.make_model:
        print(json.dumps(make_model(args)))
        return
    if args.variant:
        print("BENCH-RESULT " + json.dumps(worker(args)), flush=True)
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", NSLORA_DISABLE_PLUGIN_AUTOLOAD="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    base = [sys.executable, __file__, "--recipe", args.recipe, "--tokenizer", args.tokenizer,
            "--workdir", str(work), "--steps", str(args.steps), "--check-every", str(args.check_every),
            "--editor", args.editor, "--probe-size", str(args.probe_size)] + (["--tiny"] if args.tiny else []) \
        + (["--gpu-limit-gib", str(args.gpu_limit_gib)] if args.gpu_limit_gib else [])
    summary: dict[str, Any] = {"recipe": str(Path(args.recipe).resolve().relative_to(REPO))
                               if Path(args.recipe).resolve().is_relative_to(REPO) else args.recipe,
                               "command": " ".join([Path(sys.executable).name] + sys.argv),
                               "versions": versions(cuda=False), "tiny": args.tiny,
                               "gpu_limit_gib": args.gpu_limit_gib,
                               "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                               "runs": {}}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2, default=str) + "\n")

    marker = work / "model" / "bench_model.json"
    info = json.loads(marker.read_text()) if marker.is_file() else None
    if info is None or info.get("preset") != recipe_model_shape(Path(args.recipe), args.tiny).name:
        t = time.perf_counter()
        proc = subprocess.run(base + ["--make-model"], env=env, text=True, capture_output=True,
                              timeout=args.timeout, check=False)
        if proc.returncode != 0:
            summary["error"] = {"stage": "make-model", "stderr": proc.stderr[-6000:]}
            save()
            sys.exit(f"building the model failed:\n{proc.stderr[-6000:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        info["wall_seconds"] = round(time.perf_counter() - t, 1)
    summary["model"] = info
    print(f"model: {info['preset']} random weights, {info['params'] / 1e9:.3f}B params "
          f"(doctor {info['doctor_params'] / 1e9:.3f}B), bf16 checkpoint {info['bytes_on_disk'] / GiB:.1f} GiB",
          flush=True)

    system = cfg.get("nslora_system_prompt") or "You are a helpful assistant."
    summary["data"] = make_data(args, system, "#### {n}")
    print(f"data: {summary['data']['train_rows']} train rows of "
          f"{summary['data']['train_row_tokens_before_truncation']} tokens before truncation; "
          f"probe prompts {summary['data']['probe_prompt_tokens'][:4]}... tokens", flush=True)
    save()

    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        t = time.perf_counter()
        cmd = base + ["--worker", variant] + (["--override", *args.override] if args.override else [])
        try:
            proc = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=args.timeout,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            summary["runs"][variant] = {"error": f"timed out after {args.timeout} s",
                                        "stderr": (exc.stderr or b"")[-4000:].decode(errors="replace")
                                        if isinstance(exc.stderr, bytes) else str(exc.stderr)[-4000:]}
            save()
            print(f"{variant}: TIMED OUT after {args.timeout} s", flush=True)
            continue
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH-RESULT ")]
        if proc.returncode != 0 or not lines:
            summary["runs"][variant] = {"error": f"exit {proc.returncode}", "stderr": proc.stderr[-8000:]}
            save()
            print(f"{variant}: FAILED (exit {proc.returncode})\n{proc.stderr[-8000:]}", flush=True)
            continue
        r = json.loads(lines[-1][len("BENCH-RESULT "):])
        r["process_wall_seconds"] = round(time.perf_counter() - t, 1)
        summary["versions"] = r["versions"]
        summary["runs"][variant] = r
        save()
        print(f"{variant:6s}: peak allocated {fmt(r['peak_allocated_gib'])} GiB, reserved "
              f"{fmt(r['peak_reserved_gib'])} GiB (training steps {fmt(r['train_peak_allocated_gib'])} / "
              f"{fmt(r['train_peak_reserved_gib'])}; probes {fmt(r['probe_peak_allocated_gib'])} / "
              f"{fmt(r['probe_peak_reserved_gib'])}); loading peak {fmt(r['after_load'].get('max_allocated_gib'))} "
              f"GiB, after load {fmt(r['after_load'].get('allocated_gib'))} GiB; "
              f"{fmt(r['median_step_seconds'])} s/step (median, probe time excluded), "
              f"probes {r['probe_seconds_total']} s; micro-batch shapes {r['micro_batch_shapes']}",
              flush=True)

    runs = summary["runs"]
    overrides: dict[str, Any] = {}
    plens = summary["data"]["probe_prompt_tokens"]
    doc = doctor_estimates(Path(args.recipe), overrides, round(statistics.fmean(plens)) if plens else None)
    summary["doctor"] = doc
    ok = {k: v for k, v in runs.items() if "error" not in v}
    if "plain" in ok and "nslora" in ok:
        a, b = ok["plain"], ok["nslora"]
        summary["ratios"] = {name: (b[key] / a[key] if a.get(key) and b.get(key) else None)
                             for name, key in (("peak_allocated", "peak_allocated_gib"),
                                               ("peak_reserved", "peak_reserved_gib"),
                                               ("train_peak_allocated", "train_peak_allocated_gib"),
                                               ("step_seconds", "median_step_seconds"))}
    save()

    d = doc["recipe"]
    print(f"\n{'':34}{'plain':>10}{'nslora':>10}{'ratio':>8}{'doctor':>10}")
    rows = [("peak allocated (GiB)", "peak_allocated_gib", d["total_gib"]),
            ("peak reserved (GiB)", "peak_reserved_gib", None),
            ("  training-step peak alloc", "train_peak_allocated_gib", d["train_peak_gib"]),
            ("  probe peak alloc", "probe_peak_allocated_gib", d["probe_peak_gib"]),
            ("device used at step end (GiB)", "device_used_max_at_step_end_gib", None),
            ("s / optimizer step", "median_step_seconds", None)]
    for label, key, doctor in rows:
        va = ok.get("plain", {}).get(key)
        vb = ok.get("nslora", {}).get(key)
        ratio = vb / va if va and vb else None
        print(f"{label:34}{fmt(va):>10}{fmt(vb):>10}{fmt(ratio, 3):>8}{fmt(doctor):>10}")
    print(f"doctor (nslora doctor --config {summary['recipe']}): total {d['total_gib']} GiB "
          f"(train {d['train_peak_gib']}, probe {d['probe_peak_gib']}); components "
          + ", ".join(f"{k} {v}" for k, v in d["components_gib"].items()))
    print(f"doctor with the measured probe prompt length: total {doc['as_run']['total_gib']} GiB")
    if args.json:
        print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
