"""The optimized prompt in the chat template saved with the model, so serving the folder uses it.

Serving stacks (`vllm serve`, TGI, Ollama, `transformers serve`) render requests with the chat
template saved next to the weights and know nothing of NSLoRA's `prompt.json`. So the template
gets a short preamble: when a conversation does not begin with a system message, the optimized
prompt is put in front as one. Conversations that bring their own system message are rendered
exactly as before. The preamble is marked, so writing it again replaces it. `load_for_inference`
puts the same preamble into a loaded tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("nslora")

_BEGIN = "{#- nslora: default system prompt (nslora_plugin.apps.tools.inference) -#}"
_END = "{#- /nslora -#}"


def _jinja_string(text: str) -> str:
    """`text` as a double-quoted Jinja string literal (Jinja decodes Python-style escapes)."""
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               .replace("\r", "\\r").replace("\t", "\\t"))
    return f'"{escaped}"'


def strip_default_prompt(template: str) -> str:
    """The template without NSLoRA's preamble (as it was before NSLoRA touched it)."""
    start = template.find(_BEGIN)
    if start < 0:
        return template
    end = template.find(_END, start)
    if end < 0:
        return template
    return template[:start] + template[end + len(_END):]


def wrap_chat_template(template: str, prompt: str) -> str:
    """`template` with `prompt` as the system message of conversations that have none."""
    block = (
        _BEGIN
        + "{%- if messages and messages[0]['role'] != 'system' -%}"
        + "{%- set messages = [{'role': 'system', 'content': " + _jinja_string(prompt) + "}]"
        + " + (messages | list) -%}"
        + "{%- endif -%}"
        + _END
    )
    return block + strip_default_prompt(template)


def set_default_system_prompt(tokenizer: Any, prompt: str) -> Any:
    """Make `prompt` the default system message of the tokenizer's chat template (in place)."""
    inner = getattr(tokenizer, "tokenizer", None)  # a processor: set it on both
    template = getattr(tokenizer, "chat_template", None)
    if template is None and inner is not None:
        template = getattr(inner, "chat_template", None)
    if not template:
        raise ValueError("this tokenizer has no chat template, so there is nothing to put the "
                         "system prompt into; set tokenizer.chat_template first")
    if isinstance(template, dict):  # named templates (older transformers): wrap each
        wrapped: Any = {name: wrap_chat_template(t, prompt) for name, t in template.items()}
    else:
        wrapped = wrap_chat_template(template, prompt)
    tokenizer.chat_template = wrapped
    if inner is not None and getattr(inner, "chat_template", None) is not None:
        inner.chat_template = wrapped
    return tokenizer


def set_tokenizer_prompt(tokenizer: Any, prompt: str) -> bool:
    """The preamble in a trainer's tokenizer at the end of training (what `save_model` writes
    next); False when the tokenizer has no chat template."""
    try:
        set_default_system_prompt(tokenizer, prompt)
    except ValueError:
        return False
    return True


def write_prompt_into_template(folder: str | Path, prompt: str) -> bool:
    """Rewrite the chat template saved in `folder` (`chat_template.jinja`, or the
    `chat_template` entry of `tokenizer_config.json` in older layouts). Returns whether a template
    was found and rewritten; a failure is a logged warning, never an error (a save must not fail
    for it)."""
    folder = Path(folder)
    try:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            _replace(jinja, wrap_chat_template(jinja.read_text(encoding="utf-8"), prompt))
            return True
        config = folder / "tokenizer_config.json"
        if config.is_file():
            data = json.loads(config.read_text(encoding="utf-8"))
            if isinstance(data.get("chat_template"), str):
                data["chat_template"] = wrap_chat_template(data["chat_template"], prompt)
                _replace(config, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
                return True
    except Exception as exc:
        log.warning("NSLoRA: could not write the prompt into the chat template in %s: %s: %s",
                    folder, type(exc).__name__, exc)
    return False


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.nslora-tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
