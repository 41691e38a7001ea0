"""The NSLoRA section of an adapter's model card (`README.md` next to the adapter).

An adapter trained with NSLoRA was trained and gated under a system prompt that is not in its
weights; without that prompt a user of the adapter gets a worse model. So the card PEFT (or TRL)
writes gains a section with the prompt itself, how to load the adapter with it, the decisions the
run took and its probe numbers — and `push_to_hub`, which uploads the folder, carries it all.

The section sits between two HTML comments, so writing it again replaces it (idempotent) and the
rest of the card — PEFT's and TRL's text, the YAML metadata — is left as it was. Writing it never
raises: a card is documentation, and must not break a save.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from nslora_plugin.core.artifacts import ARTIFACT_DIR, NSLoRAArtifacts, _atomic_write, load_artifacts

log = logging.getLogger("nslora")

BEGIN = "<!-- nslora:begin (written by nslora-plugin; replaced on every save) -->"
END = "<!-- nslora:end -->"
CARD = "README.md"

#: Hub tags the card's metadata carries (beside PEFT's and TRL's), so NSLoRA runs can be found.
TAGS = ("nslora", "arxiv:2601.12711")

#: probe summary keys shown in the card, with the words used for them
PROBE_ROWS = (("reward", "probe reward"), ("correctness", "accuracy"),
              ("format", "format compliance"), ("ref_nll", "reference NLL (nats/token)"))


def _fence(text: str) -> str:
    """A Markdown code fence longer than any run of backticks in `text`."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _number(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "–"


def _base_model(folder: Path) -> str | None:
    try:
        return json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def _probe_table(summary: dict[str, Any], arts: NSLoRAArtifacts) -> list[str]:
    before = summary.get("probe_before") or (arts.probe_reports[0] if arts.probe_reports else {})
    after = summary.get("probe_after") or (arts.probe_reports[-1] if arts.probe_reports else {})
    if not before and not after:
        return []
    n = (after or before).get("n")
    lines = [f"Probe set ({n} examples the validation gate scores), before training and at the end:", "",
             "| measure | before | after |", "|---|---|---|"]
    for key, words in PROBE_ROWS:
        if key in before or key in after:
            lines.append(f"| {words} | {_number(before.get(key))} | {_number(after.get(key))} |")
    held_before, held_after = summary.get("held_out_before"), summary.get("held_out_after")
    if held_before and held_after:  # the demo also scores a separate held-out split
        for key, words in (("correctness", "held-out accuracy"), ("format", "held-out format compliance")):
            if key in held_after:
                lines.append(f"| {words} (n={held_after.get('n')}) | {_number(held_before.get(key))} "
                             f"| {_number(held_after.get(key))} |")
    return lines + [""]


def _decisions(arts: NSLoRAArtifacts) -> list[str]:
    counts = arts.summary.get("decisions") or arts.state.get("decision_counts") or {}
    usage = arts.summary.get("editor_usage") or arts.state.get("usage") or {}
    faults = arts.summary.get("faults") or arts.state.get("faults") or {}
    steps = arts.summary.get("steps")
    lines = [f"- checks: {counts.get('numerical', 0)} kept training the adapter (numerical), "
             f"{counts.get('symbolic', 0)} ran a prompt rewrite (symbolic)"
             + (f", over {steps} optimizer steps" if steps is not None else ""),
             f"- candidate prompts: {counts.get('accepted', 0)} accepted by the validation gate, "
             f"{counts.get('rejected', 0)} rejected; the prompt is at version {arts.prompt_version}",
             f"- prompts-as-data rows added to training: {len(arts.augmented_rows)}"]
    if usage:
        tokens = usage.get("total_tokens", usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0))
        calls = usage.get("calls", 0)
        lines.append(f"- editor LLM: {calls} call{'' if calls == 1 else 's'}, {tokens} tokens, "
                     f"{usage.get('failed_calls', 0)} failed")
    if faults:
        lines.append("- editor faults (training went on): "
                     + ", ".join(f"{k} × {v}" for k, v in sorted(faults.items())))
    return lines + [""]


def card_section(arts: NSLoRAArtifacts, folder: Path) -> str:
    """The Markdown of the NSLoRA section for the adapter in `folder`."""
    prompt = arts.system_prompt
    base = _base_model(folder) or "BASE_MODEL"
    lines = [BEGIN, "## NSLoRA: the system prompt that belongs with this adapter", "",
             "This adapter was trained with [nslora-plugin](https://github.com/nslora/nslora-plugin), "
             "which rewrote the system prompt during training where a prompt could fix a weakness "
             "and kept training the adapter where it could not. Use the adapter **with this "
             "system prompt**: it is the one it was trained and validated under.", ""]
    if prompt is None:
        lines += ["The run kept the chat template's default system prompt.", ""]
    else:
        fence = _fence(prompt)
        lines += [f"System prompt (version {arts.prompt_version}, also in "
                  f"`{ARTIFACT_DIR}/prompt.json`):", "", f"{fence}text", prompt, fence, ""]
    lines += ["### Load it with its prompt", "",
              "With nslora-plugin (`pip install nslora-plugin`; for a Hub repo, download it first "
              "with `huggingface_hub.snapshot_download`), the prompt becomes the chat template's "
              "default system message:", "", "```python",
              "from nslora_plugin.apps.tools.inference import generate, load_for_inference", "",
              'model, tokenizer = load_for_inference("path/to/this/folder")',
              'print(generate(model, tokenizer, "Your question"))', "```", "",
              "Or with transformers and PEFT alone:", "", "```python", "import json", "",
              "from peft import PeftModel",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'folder = "path/to/this/folder"',
              f"base = AutoModelForCausalLM.from_pretrained({base!r})",
              "model = PeftModel.from_pretrained(base, folder).eval()",
              "tokenizer = AutoTokenizer.from_pretrained(folder)  # or the base model's",
              f'system_prompt = json.load(open(f"{{folder}}/{ARTIFACT_DIR}/prompt.json"))["system_prompt"]',
              'messages = [{"role": "system", "content": system_prompt},',
              '            {"role": "user", "content": "Your question"}]',
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,",
              '                                       return_tensors="pt", return_dict=True)',
              "out = model.generate(**inputs, max_new_tokens=256, do_sample=False)",
              'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
              "```", "", "### What the run decided", ""]
    lines += _decisions(arts)
    lines += _probe_table(arts.summary, arts)
    lines += [f"Every decision with its reason, every candidate prompt with its scores and the "
              f"augmented rows are in `{ARTIFACT_DIR}/` next to this card (`nslora show` prints "
              f"them, `nslora report` draws them).", END]
    return "\n".join(lines)


def with_tags(card: str) -> str:
    """`card` with NSLoRA's tags in its YAML metadata (added to PEFT's / TRL's `tags`, or a new
    metadata block); unchanged when they are there already."""
    import yaml

    if card.startswith("---\n"):
        close = card.find("\n---", 3)
        meta = yaml.safe_load(card[4:close]) if close >= 0 else None
        if not isinstance(meta, dict):
            return card
        tags = meta.get("tags") or []
        tags = [tags] if isinstance(tags, str) else list(tags)
        missing = [t for t in TAGS if t not in tags]
        if not missing:
            return card
        meta["tags"] = tags + missing
        return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + card[close + 1:]
    return "---\n" + yaml.safe_dump({"tags": list(TAGS)}, sort_keys=False) + "---\n\n" + card


def _insert(card: str, section: str) -> str:
    """`card` with `section` in place of its old one, or before the first `## ` heading after
    the title (after PEFT's / TRL's one-line summary), or at the end."""
    start = card.find(BEGIN)
    end = card.rfind(END)
    if start >= 0 and end > start:
        return card[:start] + section + card[end + len(END):]
    body_start = 0
    if card.startswith("---"):  # YAML metadata
        close = card.find("\n---", 3)
        body_start = close + 4 if close >= 0 else 0
    match = re.compile(r"^## ", re.M).search(card, body_start)
    if match is None:
        return card.rstrip("\n") + ("\n\n" if card.strip() else "") + section + "\n"
    return card[:match.start()] + section + "\n\n" + card[match.start():]


def write_card_section(folder: str | Path, artifacts: str | Path | NSLoRAArtifacts | None = None) -> Path | None:
    """Add (or replace) the NSLoRA section of `folder/README.md`, creating the file if needed;
    `artifacts` defaults to `folder/nslora`. Returns the card's path, or None when it could not
    be written (logged as a warning, never raised)."""
    folder = Path(folder)
    try:
        arts = artifacts if isinstance(artifacts, NSLoRAArtifacts) else load_artifacts(
            artifacts if artifacts is not None else folder)
        path = folder / CARD
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        text = with_tags(_insert(old, card_section(arts, folder)))
        if text != old:
            _atomic_write(path, text)  # whole or not at all: PEFT reads this card back on save
        return path
    except Exception as exc:  # documentation must never break a save
        log.warning("NSLoRA: could not write the model card section in %s: %s: %s",
                    folder, type(exc).__name__, exc)
        return None
