"""Use a trained run: the LoRA adapter and the system prompt that belongs with it, in one call.

    from nslora_plugin.apps.tools.inference import generate, load_for_inference

    model, tokenizer = load_for_inference("runs/my-run")     # or runs/my-run/checkpoint-500
    print(generate(model, tokenizer, "A farmer has 17 cows and buys 5 more. How many now?"))

    # the optimized prompt is now the chat template's default system message:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "..."}], tokenize=False,
                                         add_generation_prompt=True)    # contains the prompt

From the shell: `nslora generate runs/my-run "question"`.

`path` is any folder a run leaves with an adapter and `nslora/prompt.json` next to it: the
trainer's `output_dir` (after `trainer.save_model(output_dir)`, as the TRL recipes do; without it,
its latest `checkpoint-N`), a `checkpoint-N/` folder, or a folder given to `trainer.save_model`
(with `save_artifacts`). The base model is the one named in `adapter_config.json` (override with
`base_model=`); a folder holding a full model (`config.json`, no adapter) also works.

How the prompt is put in place: the tokenizer's chat template is wrapped with a few lines of Jinja
that insert `{"role": "system", "content": <optimized prompt>}` in front of any conversation that
does not start with a system message, so `apply_chat_template`, `transformers` pipelines and
`tokenizer.save_pretrained` (the template is saved with it) all use the optimized prompt, and a
conversation that brings its own system message keeps it. `set_default_system_prompt` does the
same for any tokenizer; calling it again replaces the previous prompt instead of stacking.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from nslora_plugin.core.artifacts import load_artifacts
# one implementation of the template preamble, shared with what training saves
from nslora_plugin.trainer.template import set_default_system_prompt, wrap_chat_template

__all__ = ["load_for_inference", "generate", "set_default_system_prompt", "optimized_prompt",
           "wrap_chat_template"]

log = logging.getLogger("nslora")

def optimized_prompt(path: str | Path) -> str | None:
    """The system prompt a run ended with (None if the run kept the template's default)."""
    return load_artifacts(path).system_prompt


def _locate_base(name: str | None, folder: Path) -> str | None:
    """The base model named in adapter_config.json. A relative local path there is relative to the
    folder training ran in, so it is also looked for next to each folder above the adapter."""
    if not name:
        return None
    path = Path(name).expanduser()
    if path.is_absolute() or path.exists():
        return str(path)
    for parent in folder.resolve().parents:
        if (parent / path / "config.json").is_file():
            return str(parent / path)
    return name  # a Hub id


def _model_folder(folder: Path) -> Path:
    """`folder` itself, or — for a run folder whose final model was not saved there — its latest
    `checkpoint-N` (adapter and prompt of the same step, never mixed across steps)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is not a folder")
    if (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return folder
    checkpoints = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
                   and ((p / "adapter_config.json").is_file() or (p / "config.json").is_file())]
    if checkpoints:
        latest = max(checkpoints, key=lambda p: int(p.name.split("-")[-1]))
        log.info("NSLoRA: no model in %s; loading its latest checkpoint %s", folder, latest.name)
        return latest
    return folder


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()


def load_for_inference(path: str | Path, *, base_model: str | None = None, dtype: Any = "auto",
                       device_map: Any = None, load_in_4bit: bool = False, merge: bool = False,
                       trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) from a run folder, checkpoint or saved adapter: the base model with the
    LoRA adapter applied, in eval mode, and the tokenizer whose chat template defaults to the
    optimized system prompt.

    `load_in_4bit` loads the base in NF4 (bitsandbytes), as in QLoRA training; `merge` folds the
    adapter into the weights (not with 4-bit); `device_map` is passed to `from_pretrained`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _model_folder(Path(path))
    artifacts = load_artifacts(folder)  # FileNotFoundError with a clear message if none
    adapter_cfg = folder / "adapter_config.json"
    is_adapter = adapter_cfg.is_file()
    if is_adapter:
        base = base_model or _locate_base(json.loads(adapter_cfg.read_text()).get(
            "base_model_name_or_path"), folder)
        if not base:
            raise ValueError(f"{adapter_cfg} names no base model: pass base_model=...")
    elif (folder / "config.json").is_file():
        base = str(folder)
    else:
        raise FileNotFoundError(f"{str(folder)!r} holds neither a LoRA adapter (adapter_config.json) "
                                "nor a model (config.json)")

    tokenizer = AutoTokenizer.from_pretrained(str(folder) if _has_tokenizer(folder) else base,
                                              trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "device_map": device_map}
    if isinstance(dtype, str) and dtype not in ("auto",):
        dtype = getattr(torch, dtype)
    kwargs["dtype"] = dtype
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = dtype if isinstance(dtype, torch.dtype) else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    if is_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder))
        if merge:
            if load_in_4bit:
                raise ValueError("merge=True needs full-precision base weights; drop load_in_4bit")
            model = model.merge_and_unload()
    model.eval()
    if artifacts.system_prompt is not None:
        set_default_system_prompt(tokenizer, artifacts.system_prompt)
    return model, tokenizer


def generate(model: Any, tokenizer: Any, question: str, *, system_prompt: str | None = None,
             max_new_tokens: int = 256, do_sample: bool = False, **generate_kwargs: Any) -> str:
    """One answer to `question` (a user message), greedy by default. Without `system_prompt`,
    the chat template's default — after `load_for_inference`, the optimized prompt — is used."""
    import torch

    from nslora_plugin.core.chat import chat_messages, render

    text = render(tokenizer, chat_messages(system_prompt, question), generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    try:
        device = next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        device = torch.device("cpu")
    enc = {k: v.to(device) for k, v in enc.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             pad_token_id=pad, **generate_kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
