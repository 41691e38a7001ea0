"""Make accepted prompt edits reach the training batches, in any framework.

TRL, Axolotl and LLaMA-Factory all tokenize the data before training starts, so the system prompt
is baked into `input_ids`. `NSLoRACollator` wraps the framework's own collator and, at batch time:

1. swaps the token span of the *initial* system prompt for the tokens of the *current* one in
   every example (and splices every per-token field alongside: labels get -100, attention 1,
   position ids are renumbered) — except, with a `reply_ok` check (`prompt_swap: compliant`, the
   default when `answer_format` is set), examples whose text breaks the constraint: an edited
   prompt that asks for a format, paired with a reply that ignores it, would train the adapter
   to ignore the prompt, so such examples keep the initial prompt they were written under, and
2. replaces a share of the examples (`augment_share`) with augmented rows from symbolic rounds
   ("prompts as data"), rendered with the current prompt and masked like the base examples.

Spans are computed *in context* (tokenizing a rendered chat and keeping the tokens that cover the
prompt's characters), so BPE merges at the template's boundaries match what the framework produced.
Requires the collator to run in the training process (`dataloader_num_workers=0`, the default).
`stats["with_current"]` counts the training examples (augmented rows aside, dropped segments
taken off) that went into batches with the prompt of version `stats["current_version"]` in their
tokens since that version took effect: at the end of a run, how many trained under the final one.

Packed batches are spliced per segment, so every packed example trains on the current prompt:

- TRL `packing=True` (strategies "bfd" / "bfd_split"): each row carries `seq_lengths`; the row is
  split into its segments, each segment is swapped like an example (its labels, masks and
  position ids with it), a share of the segments is replaced with augmented rows, and the row is
  joined again with new `seq_lengths` (TRL's collator then builds the per-segment position ids).
  "wrapped" packing cuts examples across rows and keeps no boundaries: it is refused by the TRL
  adapter, and a row holding the initial prompt twice is reported here. With "bfd_split" the
  continuation of a split example has no prompt and is left as it is.
- Axolotl `sample_packing: true`: the multipack sampler hands the collator one list of examples
  per pack, which its collator concatenates itself; each inner example is swapped and a share of
  them replaced, pack by pack.
- TRL `padding_free=True` without packing: the collator gets ordinary examples and flattens them
  itself, so the per-example splice applies as it is.

A longer prompt can push a pack past its length: with `max_length` known, a pack may use up to
`max_length` times the number of `max_length` blocks it filled before (its capacity in TRL and in
Axolotl's bins), and segments that no longer fit are *dropped* from that batch (counted in
`stats["dropped"]`), never truncated — a cut reply would lose the format line the edited prompt
asks for. A segment longer than `max_length` on its own is cut, as the frameworks do.
"""

from __future__ import annotations

import logging
import collections
import random
import threading
from typing import Any, Callable, Sequence

from nslora_plugin.core.chat import chat_messages, render
from nslora_plugin.core.prompt_state import PromptState

log = logging.getLogger("nslora")

_USER_SENTINEL = "\ue001nslora-user\ue001"
_SYSTEM_SENTINEL = "\ue002nslora-system\ue002"
_ZERO_FILL = {"completion_mask", "assistant_masks", "token_type_ids"}


def template_default_system_prompt(tokenizer: Any) -> str | None:
    """The system prompt a chat template inserts when the conversation has none (SmolLM2 and Qwen
    templates do), or None."""
    with_sys = render(tokenizer, chat_messages(_SYSTEM_SENTINEL, _USER_SENTINEL), generation_prompt=False)
    without = render(tokenizer, chat_messages(None, _USER_SENTINEL), generation_prompt=False)
    i = with_sys.find(_SYSTEM_SENTINEL)
    if i < 0:
        return None
    prefix = with_sys[:i]
    after = with_sys[i + len(_SYSTEM_SENTINEL):]
    bridge = after[:after.find(_USER_SENTINEL)]
    if not without.startswith(prefix):
        return None
    rest = without[len(prefix):]
    j = rest.find(bridge)
    if j <= 0:
        return None
    return rest[:j]


def prompt_span_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of `prompt` as the chat template + tokenizer produce them inside a conversation."""
    text = render(tokenizer, chat_messages(prompt, _USER_SENTINEL), generation_prompt=False)
    start = text.find(prompt)
    if start < 0:
        raise ValueError("the chat template does not render the system prompt verbatim; "
                         "NSLoRA cannot locate it in the training data")
    end = start + len(prompt)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [tid for tid, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])
                if b > start and a < end and b > a]
    except (NotImplementedError, TypeError, KeyError):
        # Slow tokenizers have no offsets: diff against a render with another prompt.
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        other = tokenizer(text[:start] + "\ue003" + text[end:], add_special_tokens=False)["input_ids"]
        lo = 0
        while lo < min(len(ids), len(other)) and ids[lo] == other[lo]:
            lo += 1
        hi = 0
        while hi < min(len(ids), len(other)) - lo and ids[-1 - hi] == other[-1 - hi]:
            hi += 1
        return ids[lo:len(ids) - hi]


def find_subsequence(haystack: Sequence[int], needle: Sequence[int]) -> int:
    if not needle:
        return -1
    first, n = needle[0], len(needle)
    limit = len(haystack) - n
    i = 0
    while i <= limit:
        if haystack[i] == first and list(haystack[i:i + n]) == list(needle):
            return i
        i += 1
    return -1


class NSLoRACollator:
    """Wraps a framework collator; see the module docstring. Thread-safe reads of the prompt."""

    def __init__(self, base: Callable[[list[dict[str, Any]]], Any], tokenizer: Any,
                 prompt_state: PromptState, *, augment_share: float = 0.0, seed: int = 0,
                 max_length: int | None = None,
                 reply_ok: Callable[[str], bool] | None = None) -> None:
        self.base = base
        self.reply_ok = reply_ok
        self.tokenizer = tokenizer
        self.prompt_state = prompt_state
        self.augment_share = augment_share
        self.max_length = max_length
        self.augmented: list[dict[str, Any]] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._span_cache: dict[str, list[int]] = {}
        # with_current: training examples (augmented rows not counted) that went into batches
        # with the prompt of version current_version in their tokens, since that version began
        self.stats = {"examples": 0, "swapped": 0, "augmented": 0, "no_span": 0,
                      "kept_initial": 0, "batches": 0, "packed_rows": 0, "dropped": 0,
                      "current_version": 0, "with_current": 0}
        self._carrying: set[int] = set()  # ids of this batch's examples counted in with_current
        self._warned: set[str] = set()
        # before each batch: what it was collated with (a data loader collates ahead of training,
        # so a checkpoint must go back to the first batch not yet trained on)
        self._before: collections.deque[dict[str, Any]] = collections.deque(maxlen=16)
        self._replay: dict[str, Any] | None = None

    # ---------------------------------------------------------------- resume
    def state(self, trained_batches: int | None = None) -> dict[str, Any]:
        """What a checkpoint needs to go on with the same batches (JSON-able): the mixing RNG and
        counters as they were before batch `trained_batches` (the first one not trained on yet:
        it may already be collated, ahead of training), and the prompt and augmented pool that
        batch was collated with."""
        with self._lock:
            snap = next((s for s in self._before if s["stats"]["batches"] == trained_batches), None)
            if snap is None:  # nothing collated ahead: the current state is the one to go on from
                version, internal, gauss = self._rng.getstate()
                return {"stats": dict(self.stats), "rng": [version, list(internal), gauss]}
            version, internal, gauss = snap["rng"]
            return {"stats": dict(snap["stats"]), "rng": [version, list(internal), gauss],
                    "replay": {"prompt": snap["prompt"], "pool": snap["pool"]}}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's `state()`: the same batches as an uninterrupted run."""
        with self._lock:
            if state.get("rng"):
                version, internal, gauss = state["rng"]
                self._rng.setstate((version, tuple(internal), gauss))
            self.stats.update(state.get("stats", {}))
            self._replay = dict(state["replay"]) if state.get("replay") else None

    # ---------------------------------------------------------------- data in
    def add_augmented(self, rows: Sequence[dict[str, Any]], cap: int) -> None:
        with self._lock:
            self.augmented.extend(rows)
            del self.augmented[:-cap]

    def replace_augmented(self, rows: Sequence[dict[str, Any]]) -> None:
        with self._lock:
            self.augmented = list(rows)

    # ---------------------------------------------------------------- batch time
    def __call__(self, features: list[dict[str, Any]]) -> Any:
        prompt, version = self.prompt_state.snapshot()
        initial = self.prompt_state.initial
        with self._lock:
            pool_size = len(self.augmented)
            replay, self._replay = self._replay, None
            if replay is not None:  # the batch an uninterrupted run had collated before its checkpoint
                prompt, pool_size = replay["prompt"], replay["pool"]
            self._before.append({"stats": dict(self.stats), "rng": self._rng.getstate(),
                                 "prompt": prompt, "pool": pool_size})
        self.stats["batches"] += 1
        if self.stats.get("current_version") != version:
            self.stats["current_version"], self.stats["with_current"] = version, 0
        self._carrying = set()
        if features and isinstance(features[0], (list, tuple)):
            # Axolotl's multipack sampler: one list of examples per pack, concatenated by its collator
            packs = [list(pack) for pack in features]
            spliced = self._splice_packs(packs, prompt, initial, pool_size)
            return self.base([type(features[i])(pack) for i, pack in enumerate(spliced)])
        if features and "seq_lengths" in features[0]:
            # TRL's bfd packing: segments of each row are told apart by seq_lengths
            packs = [_split_row(row) for row in features]
            spliced = self._splice_packs(packs, prompt, initial, pool_size)
            return self.base([_join_row(row, pack) for row, pack in zip(features, spliced)])
        out = [self._swap_one(feature, prompt, initial) for feature in features]
        out = self._mix(out, prompt, pool_size)
        if self.max_length:
            out = [_truncate(f, self.max_length) for f in out]
        return self.base(out)

    def _swap_one(self, feature: dict[str, Any], prompt: str | None,
                  initial: str | None) -> dict[str, Any]:
        self.stats["examples"] += 1
        if prompt is not None and initial is not None and prompt != initial:
            feature, outcome = self._swap(feature, initial, prompt)
            self.stats[outcome] += 1
            carries = outcome == "swapped"
        else:
            carries = prompt is not None and self._carries(feature, prompt)
        if carries:
            self.stats["with_current"] = self.stats.get("with_current", 0) + 1
            self._carrying.add(id(feature))
        return feature

    def _splice_packs(self, packs: list[list[dict[str, Any]]], prompt: str | None,
                      initial: str | None, pool_size: int) -> list[list[dict[str, Any]]]:
        """Swap every segment of every pack, replace a share of all segments with augmented rows,
        and fit each pack back into its length (see the module docstring)."""
        self.stats["packed_rows"] += len(packs)
        before = [sum(len(seg["input_ids"]) for seg in pack) for pack in packs]
        swapped = [[self._swap_one(seg, prompt, initial) for seg in pack] for pack in packs]
        flat = self._mix([seg for pack in swapped for seg in pack], prompt, pool_size)
        out, at = [], 0
        for pack, length in zip(swapped, before):
            out.append(self._fit(flat[at:at + len(pack)], length))
            at += len(pack)
        return out

    def _fit(self, pack: list[dict[str, Any]], length_before: int) -> list[dict[str, Any]]:
        if not self.max_length or not pack:
            return pack
        capacity = self.max_length * max(1, -(-length_before // self.max_length))
        first_carries = id(pack[0]) in self._carrying
        kept, used = [], 0
        for seg in pack:
            n = len(seg["input_ids"])
            if used + n <= capacity:
                kept.append(seg)
                used += n
            else:
                self.stats["dropped"] += 1
                if id(seg) in self._carrying:
                    self._carrying.discard(id(seg))
                    self.stats["with_current"] -= 1
        if not kept:  # one segment longer than the pack on its own: cut it, as the frameworks do
            self.stats["dropped"] -= 1
            if first_carries:
                self.stats["with_current"] += 1
            kept = [_truncate(pack[0], capacity)]
        return kept

    def _carries(self, feature: dict[str, Any], prompt: str) -> bool:
        try:
            return find_subsequence(_as_list(feature["input_ids"]), self._span(prompt)) >= 0
        except ValueError:  # a template that does not render the prompt verbatim
            return False

    def _span(self, prompt: str) -> list[int]:
        if prompt not in self._span_cache:
            self._span_cache[prompt] = prompt_span_ids(self.tokenizer, prompt)
        return self._span_cache[prompt]

    def _swap(self, feature: dict[str, Any], old: str, new: str) -> tuple[dict[str, Any], str]:
        """Returns the example and what happened: "swapped", "no_span" or "kept_initial"."""
        ids = _as_list(feature["input_ids"])
        old_ids = self._span(old)
        at = find_subsequence(ids, old_ids)
        if at < 0:
            self._warn_once("no_span", "a training example does not contain the initial system prompt "
                            "in its tokens, so prompt edits cannot reach it; put the initial prompt "
                            "(NSLoRAConfig.system_prompt) in every row's system message (with TRL's "
                            "packing_strategy='bfd_split', the rest of a split example has none)")
            return feature, "no_span"
        if find_subsequence(ids[at + len(old_ids):], old_ids) >= 0:
            self._warn_once("wrapped", "a training row holds the initial system prompt more than once: "
                            "several examples packed without boundaries (TRL packing_strategy="
                            "'wrapped'?); only the first prompt in each row is swapped — use "
                            "packing_strategy='bfd' so every packed example gets the edit")
        if self.reply_ok is not None:
            rest = self.tokenizer.decode(ids[at + len(old_ids):], skip_special_tokens=True)
            if not self.reply_ok(rest):
                return feature, "kept_initial"
        new_ids = self._span(new)
        n = len(ids)
        spliced: dict[str, Any] = {}
        for key, value in feature.items():
            seq = _as_list(value) if _is_sequence(value) else None
            if seq is None or len(seq) != n:
                spliced[key] = value
                continue
            if key == "input_ids":
                fill = list(new_ids)
            elif key == "labels":
                fill = [-100] * len(new_ids)
            elif key == "attention_mask":
                fill = [1] * len(new_ids)
            elif key == "position_ids":
                merged = seq[:at] + [0] * len(new_ids) + seq[at + len(old_ids):]
                spliced[key] = _like(value, list(range(len(merged))) if seq == list(range(n)) else merged)
                continue
            else:
                fill = [0] * len(new_ids)
            spliced[key] = _like(value, seq[:at] + fill + seq[at + len(old_ids):])
        return spliced, "swapped"

    def _mix(self, features: list[dict[str, Any]], prompt: str | None,
             pool_size: int) -> list[dict[str, Any]]:
        with self._lock:
            pool = list(self.augmented[:pool_size])
        if not pool or self.augment_share <= 0 or not features:
            return features
        expected = self.augment_share * len(features)
        k = int(expected) + (1 if self._rng.random() < expected - int(expected) else 0)
        if k == 0:
            return features
        positions = self._rng.sample(range(len(features)), k)
        template = features[0]
        for pos in positions:
            if id(features[pos]) in self._carrying:  # replaced: it trains on nothing
                self._carrying.discard(id(features[pos]))
                self.stats["with_current"] -= 1
            row = pool[self._rng.randrange(len(pool))]
            features[pos] = self._render_augmented(row, prompt, template)
            self.stats["augmented"] += 1
        return features

    def _render_augmented(self, row: dict[str, Any], prompt: str | None,
                          template: dict[str, Any]) -> dict[str, Any]:
        messages = [m for m in row["messages"] if m["role"] != "system"]
        if prompt is not None:
            messages = [{"role": "system", "content": prompt}] + messages
        tok = self.tokenizer
        full = tok(render(tok, messages, generation_prompt=False), add_special_tokens=False)["input_ids"]
        prefix = tok(render(tok, messages[:-1], generation_prompt=True), add_special_tokens=False)["input_ids"]
        start = min(len(prefix), len(full))
        feature: dict[str, Any] = {}
        width = len(template["input_ids"])
        for key, value in template.items():
            if not _is_sequence(value) or len(value) != width:
                continue  # only per-token fields; others (images, ids, ...) are not invented
            if key == "input_ids":
                seq = full
            elif key == "labels":
                seq = [-100] * start + full[start:]
            elif key == "attention_mask":
                seq = [1] * len(full)
            elif key == "position_ids":
                seq = list(range(len(full)))
            elif key in ("completion_mask", "assistant_masks"):
                seq = [0] * start + [1] * (len(full) - start)
            else:
                seq = [0] * len(full)
            feature[key] = _like(value, seq)
        return feature

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("NSLoRA: %s", message)


def _split_row(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A TRL packed row -> one example per segment (its per-token fields cut at `seq_lengths`)."""
    lengths = [int(n) for n in _as_list(row["seq_lengths"])]
    width = len(row["input_ids"])
    if sum(lengths) != width:
        raise ValueError(f"a packed row's seq_lengths sum to {sum(lengths)}, but it has {width} tokens")
    keys = [k for k, v in row.items() if k != "seq_lengths" and _is_sequence(v) and len(v) == width]
    segments, at = [], 0
    for n in lengths:
        segments.append({k: _like(row[k], _as_list(row[k])[at:at + n]) for k in keys})
        at += n
    return segments


def _join_row(row: dict[str, Any], segments: list[dict[str, Any]]) -> dict[str, Any]:
    """Segments -> a TRL packed row with new `seq_lengths`; other fields of the row are kept."""
    width = len(row["input_ids"])
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key == "seq_lengths":
            out[key] = _like(value, [len(seg["input_ids"]) for seg in segments])
        elif _is_sequence(value) and len(value) == width:
            out[key] = _like(value, [t for seg in segments for t in _as_list(seg[key])])
        else:
            out[key] = value
    return out


def _truncate(feature: dict[str, Any], max_length: int) -> dict[str, Any]:
    """Right-truncate every per-token field, as the frameworks do (a longer prompt can push a
    spliced example past the trainer's max length)."""
    n = len(feature["input_ids"])
    if n <= max_length:
        return feature
    return {k: (v[:max_length] if _is_sequence(v) and len(v) == n else v) for k, v in feature.items()}


def _is_sequence(value: Any) -> bool:
    if isinstance(value, list):
        return True
    return hasattr(value, "dim") and value.dim() == 1


def _as_list(value: Any) -> list[int]:
    return value.tolist() if hasattr(value, "tolist") else list(value)


def _like(original: Any, values: list[int]) -> Any:
    if hasattr(original, "new_tensor"):
        return original.new_tensor(values)
    return values
