"""The optimized prompt in the chat template saved with the model, so serving the folder uses it.

Serving stacks (`vllm serve`, TGI, Ollama, `transformers serve`) render requests with the chat
template saved next to the weights and know nothing of NSLoRA's `prompt.json`. So the saved
template gets a short preamble: when a conversation does not begin with a system message, the
optimized prompt is put in front as one. Conversations that bring their own system message are
rendered exactly as before. The preamble is marked, so writing it again replaces it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("nslora")

_START = "{#- nslora: default system prompt -#}"
_END = "{#- nslora: end -#}"
_PREAMBLE = re.compile(re.escape(_START) + ".*?" + re.escape(_END), re.DOTALL)


def strip_default_prompt(template: str) -> str:
    """The template without NSLoRA's preamble (as it was before NSLoRA touched it)."""
    return _PREAMBLE.sub("", template, count=1)


def with_default_prompt(template: str, prompt: str) -> str:
    """`template` with `prompt` as the system message of conversations that have none."""
    literal = json.dumps(prompt)  # a Jinja string literal: Jinja reads the same escapes
    preamble = (_START + "{%- if not messages or messages[0]['role'] != 'system' -%}"
                "{%- set messages = [{'role': 'system', 'content': " + literal + "}] + messages -%}"
                "{%- endif -%}" + _END)
    return preamble + strip_default_prompt(template)


def set_tokenizer_prompt(tokenizer: Any, prompt: str) -> bool:
    """Put the preamble into an in-memory tokenizer's template (what `save_model` writes next)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    template = getattr(tok, "chat_template", None)
    if not isinstance(template, str):
        return False
    tok.chat_template = with_default_prompt(template, prompt)
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
            _replace(jinja, with_default_prompt(jinja.read_text(encoding="utf-8"), prompt))
            return True
        config = folder / "tokenizer_config.json"
        if config.is_file():
            data = json.loads(config.read_text(encoding="utf-8"))
            if isinstance(data.get("chat_template"), str):
                data["chat_template"] = with_default_prompt(data["chat_template"], prompt)
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
