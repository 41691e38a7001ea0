"""Score the current adapter + current system prompt on the held-out probe set.

For each probe example we compute two things the router needs:
- the reward components of a greedy completion (batched generation, left padding), and
- the per-token negative log-likelihood of the reference reply (teacher forcing), which tells
  "the model does not know this" (high NLL) from "the model knows it but answers in the wrong
  form" (low NLL).
The model is put in eval mode for the duration and restored afterwards.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator, Sequence

from nslora_plugin.core.chat import chat_messages, render
from nslora_plugin.core.config import NSLoRAConfig
from nslora_plugin.core.ranks import RankAbort, Ranks, generation_ready
from nslora_plugin.core.records import ProbeExample, ProbeReport, ProbeResult


def release_cuda_cache(model: Any) -> None:
    """Hand the probe's cached CUDA blocks back. The probe's KV cache and logits have other shapes
    than a training step's tensors; left in PyTorch's cache they fragment it, and reserved memory
    grows from probe to probe while allocated memory does not (recipes/results/gpu-qlora-8b.md).
    Probes are rare, so the cost is negligible."""
    import torch

    device = getattr(model, "device", None)
    if torch.cuda.is_available() and getattr(device, "type", "cuda") == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


class CutReply(str):
    """A reply that reached the token cap without ending. A `str` like any reply, so it travels
    through every path a reply takes (ranks gather them by pickling) and `score` can count it."""


#: The KV cache `generate` builds for the probe (`ProbeEvaluator.cache_implementation`).
DYNAMIC, STATIC = "dynamic", "static"
#: Rows per batch when the memory estimate cannot be made (a model config without the sizes).
FALLBACK_BATCH_ROWS = 8
#: Share of the free accelerator memory one probe batch may plan for (the rest: allocator slack,
#: per-layer transients, what the estimate leaves out).
GPU_MEMORY_SHARE = 0.5
#: Share of the available RAM one probe batch may plan for on a CPU, and its cap in bytes.
CPU_MEMORY_SHARE = 0.25
CPU_MEMORY_CAP = 8 * 2**30


def probe_kv_bytes(layers: int, kv_dim: int, tokens: int, dtype_bytes: int) -> int:
    """KV cache of one probe row of `tokens` tokens: keys and values of every layer."""
    return 2 * layers * kv_dim * tokens * dtype_bytes


def probe_logits_bytes(vocab: int, tokens: int, dtype_bytes: int) -> int:
    """Reference-NLL logits of one row of `tokens` tokens: the logits, their fp32 upcast and
    the per-token loss (an upper bound: the probe keeps only the reference positions)."""
    return tokens * vocab * (dtype_bytes + 8)


def probe_row_bytes(model: Any, tokens: int) -> int | None:
    """Memory of one probe row (KV cache + reference-NLL logits, as `nslora doctor` counts them)
    for `model`, or None when its config lacks a size the estimate needs."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    try:
        layers = int(cfg.num_hidden_layers)
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads)
        vocab = int(cfg.vocab_size)
        embeddings = model.get_input_embeddings().weight
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None
    c = embeddings.element_size()  # the compute dtype (quantized linears keep embeddings in it)
    return probe_kv_bytes(layers, kv_heads * head_dim, tokens, c) + probe_logits_bytes(vocab, tokens, c)


def probe_memory_budget(device: Any) -> float:
    """Bytes one probe batch may plan for on `device`: a share of the accelerator's free memory
    (PyTorch's cached, unallocated blocks included), or of the available RAM on a CPU, capped."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return GPU_MEMORY_SHARE * (free + cached)
    try:
        import psutil

        available = float(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - accelerate brings psutil
        available = float(CPU_MEMORY_CAP)
    return min(CPU_MEMORY_SHARE * available, CPU_MEMORY_CAP)


def rows_that_fit(budget: float, row_bytes: int, rows: int) -> int:
    """The largest batch, at most `rows`, whose rows fit `budget` (at least 1)."""
    return max(1, min(rows, int(budget // max(row_bytes, 1))))


def auto_token_cap(tokenizer: Any, references: Sequence[str]) -> int:
    """`probe_max_new_tokens: auto`: the longest reference in tokens plus a quarter, at least 16
    tokens more (a right reply may be worded a little longer than its reference)."""
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references),
                  default=0)
    return longest + max(16, longest // 4)


class ProbeEvaluator:
    #: the KV cache of the probe's `generate` (`DYNAMIC` or `STATIC`), and whether the decoding
    #: forward is compiled (static cache only); internal switches, no config key
    cache_implementation: str = DYNAMIC
    compile_forward: bool = False

    def __init__(self, tokenizer: Any, examples: Sequence[ProbeExample], config: NSLoRAConfig,
                 plugin_manager: Any) -> None:
        self.tokenizer = tokenizer
        self.examples = list(examples)
        self.config = config
        self.pm = plugin_manager
        self.ranks = Ranks()  # the world this evaluator answers in (set by the callback)
        self.leading = False  # rank 0 inside a check, with the other ranks serving its requests
        self.rows_answered = 0  # probe / generation rows this process ran through the model
        self._token_cap: int | None = None

    @property
    def max_new_tokens(self) -> int:
        """The generation cap: `probe_max_new_tokens`, or worked out from the probe's references
        when it is 0 ("auto")."""
        if self.config.probe_max_new_tokens > 0:
            return self.config.probe_max_new_tokens
        if self._token_cap is None:
            self._token_cap = auto_token_cap(self.tokenizer, [e.reference for e in self.examples])
        return self._token_cap

    def batch_rows(self, model: Any, rows: int, tokens: int) -> int:
        """Rows per batch: `probe_batch_size`, or with 0 ("auto") the most of `rows` whose KV
        cache and NLL logits at `tokens` tokens a row fit the memory budget. Sharded ranks take
        the smallest answer of all (every rank must run as many forwards)."""
        if self.config.probe_batch_size > 0:
            return self.config.probe_batch_size
        row = probe_row_bytes(model, tokens)
        fit = (min(rows, FALLBACK_BATCH_ROWS) if row is None
               else rows_that_fit(probe_memory_budget(_device_of(model)), row, rows))
        if self.ranks.sharded and self.ranks.several:
            fit = min(self.ranks.gather([fit]))
        return max(fit, 1)

    # ---------------------------------------------------------------- public
    def evaluate(self, model: Any, prompt: str | None, *, step: int, version: int) -> ProbeReport:
        completions, nlls = self.generate_and_score(model, prompt, self.examples)
        release_cuda_cache(model)
        results = [self.score(e, c, nll) for e, c, nll in zip(self.examples, completions, nlls)]
        return ProbeReport(step=step, prompt_version=version, results=results)

    def score(self, example: ProbeExample, completion: str, nll: float) -> ProbeResult:
        merged: dict[str, float] = {}
        for part in reversed(self.pm.hook.nslora_score_probe(
                example=example, completion=completion, config=self.config)):
            if part:
                merged.update(part)
        reward = sum(merged.values()) / len(merged) if merged else 0.0
        signals: dict[str, float] = {}
        for part in reversed(self.pm.hook.nslora_probe_signals(
                example=example, completion=completion, config=self.config)):
            signals.update(part or {})
        return ProbeResult(example_id=example.id, completion=str(completion), rewards=merged,
                           reward=reward, ref_nll=nll, signals=signals,
                           cut=isinstance(completion, CutReply))

    # ---------------------------------------------------------------- model calls
    def generate(self, model: Any, prompt: str | None, questions: Sequence[str]) -> list[str]:
        """Greedy replies to `questions` under `prompt` (batched, left padding); on several
        ranks, each rank answers its share."""
        if self.leading and self.ranks.several:
            self.ranks.broadcast(("generate", prompt, list(questions)))
            return self._shared_generate(model, prompt, list(questions))
        return self._generate_here(model, prompt, questions)

    def generate_and_score(self, model: Any, prompt: str | None,
                           examples: Sequence[ProbeExample]) -> tuple[list[str], list[float]]:
        """Replies and reference NLLs of `examples`; on several ranks, each rank scores its share
        and rank 0 gets every row back in order."""
        if self.leading and self.ranks.several:
            self.ranks.broadcast(("probe", prompt, list(examples)))
            return self._shared_generate_and_score(model, prompt, list(examples))
        return self._generate_and_score_here(model, prompt, examples)

    def serve(self, model: Any) -> Any:
        """On a rank other than 0: answer rank 0's probe and generation requests with this rank's
        share until rank 0 says "done"; return what it shared (`ranks.py` has the protocol)."""
        while True:
            kind, payload, *rest = self.ranks.broadcast(None)
            if kind == "probe":
                self._shared_generate_and_score(model, payload, rest[0])
            elif kind == "generate":
                self._shared_generate(model, payload, rest[0])
            elif kind == "done":
                return payload
            elif kind == "abort":
                raise RankAbort(f"NSLoRA: rank 0's check failed ({payload}); rank "
                                f"{self.ranks.rank} stops too")
            else:  # pragma: no cover - a protocol error is a bug, not an input error
                raise RuntimeError(f"NSLoRA: unknown request {kind!r} from rank 0")

    def _shared_generate_and_score(self, model: Any, prompt: str | None,
                                   examples: list[ProbeExample]) -> tuple[list[str], list[float]]:
        mine = self.ranks.share(len(examples))
        replies, nlls = self._generate_and_score_here(model, prompt, [examples[i] for i in mine],
                                                      reuse_cache=not self.ranks.sharded)
        rows = _in_order(self.ranks.gather(list(zip(mine, replies, nlls))), len(examples))
        return [r[0] for r in rows], [r[1] for r in rows]

    def _shared_generate(self, model: Any, prompt: str | None, questions: list[str]) -> list[str]:
        mine = self.ranks.share(len(questions))
        replies = self._generate_here(model, prompt, [questions[i] for i in mine])
        return [r[0] for r in _in_order(self.ranks.gather(list(zip(mine, replies))), len(questions))]

    def _generate_here(self, model: Any, prompt: str | None, questions: Sequence[str]) -> list[str]:
        self.rows_answered += len(questions)
        return [reply for chunk in self._generated_chunks(model, prompt, questions)
                for reply in chunk[1]]

    def _generate_and_score_here(self, model: Any, prompt: str | None,
                                 examples: Sequence[ProbeExample], *,
                                 reuse_cache: bool = True) -> tuple[list[str], list[float]]:
        """Replies and reference NLLs in one pass per batch: the reference is scored on the KV
        cache of the prompt that generation already built, so only its own tokens go through the
        model (the prompt, most of each row, is not encoded twice). Falls back to a separate
        full pass for a batch whose cache cannot be reused. Without `reuse_cache` (sharded
        parameters: every rank must run the same forwards) the full pass is always taken."""
        replies: list[str] = []
        nlls: list[float] = []
        self.rows_answered += len(examples)
        chunks = self._generated_chunks(model, prompt, [e.question for e in examples],
                                        keep_cache=reuse_cache)
        for start, texts, enc, cache in chunks:
            replies.extend(texts)
            batch = examples[start:start + len(texts)]
            scored = self._nll_on_cache(model, prompt, batch, enc, cache) if reuse_cache else None
            nlls.extend(scored if scored is not None
                        else self.reference_nll(model, prompt, batch, batch_size=len(batch)))
        return replies, nlls

    def _generated_chunks(self, model: Any, prompt: str | None, questions: Sequence[str],
                          keep_cache: bool = False) -> Iterator[tuple[int, list[str], Any, Any]]:
        """Per batch: its first row's index, its replies, its left-padded prompts and (with
        `keep_cache`, on the dynamic cache) the KV cache `generate` built."""
        import torch

        tok = self.tokenizer
        texts = [render(tok, chat_messages(prompt, q), generation_prompt=True) for q in questions]
        old_side = tok.padding_side
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        device = _device_of(model)
        cap = self.max_new_tokens
        ended = {t for t in (tok.eos_token_id, tok.pad_token_id) if t is not None}
        longest = max((len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]), default=0)
        size = self.batch_rows(model, len(texts), longest + cap)
        speed = self._generation_kwargs()
        for start in range(0, len(texts), size):
            chunk = texts[start:start + size]
            tok.padding_side = "left"
            try:
                enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            finally:
                tok.padding_side = old_side
            enc = {k: v.to(device) for k, v in enc.items()}
            stop = answer_stopping_criteria(tok, self.config, enc["input_ids"].shape[1])
            with eval_mode(model), torch.no_grad(), generation_ready(model, self.ranks) as extra:
                out = model.generate(**enc, max_new_tokens=cap,
                                     do_sample=False, pad_token_id=tok.pad_token_id,
                                     use_cache=True, stopping_criteria=stop,
                                     return_dict_in_generate=True, **speed, **extra)
            new_tokens = out.sequences[:, enc["input_ids"].shape[1]:]
            replies = [CutReply(o.strip()) if len(row) >= cap and int(row[-1]) not in ended else o.strip()
                       for o, row in zip(tok.batch_decode(new_tokens, skip_special_tokens=True), new_tokens)]
            # transformers >= 5.2x calls the output's cache `cache`, older releases `past_key_values`
            cache = next((out[k] for k in ("cache", "past_key_values") if k in out), None)
            yield start, replies, enc, (cache if keep_cache and not speed else None)

    def _generation_kwargs(self) -> dict[str, Any]:
        """`generate`'s arguments for the static cache and the compiled decoding forward; empty
        on the dynamic cache (the default)."""
        if self.cache_implementation == DYNAMIC:
            return {}
        if self.cache_implementation != STATIC:
            raise ValueError(f"NSLoRA: unknown probe cache {self.cache_implementation!r}")
        extra: dict[str, Any] = {"cache_implementation": STATIC}
        if self.compile_forward:
            from transformers import CompileConfig

            compile_config = CompileConfig()
            compile_config._compile_all_devices = True  # transformers compiles on GPUs only otherwise
            extra["compile_config"] = compile_config
        else:
            extra["disable_compile"] = True
        return extra

    def _nll_on_cache(self, model: Any, prompt: str | None, examples: Sequence[ProbeExample],
                      enc: dict[str, Any], cache: Any) -> list[float] | None:
        """Reference NLLs continuing the (left-padded) prompt batch `enc` from its KV cache, or
        None when that is not possible (no croppable cache, or a reference whose tokens do not
        extend the prompt's tokens at the template boundary)."""
        import torch

        if cache is None or not hasattr(cache, "crop"):
            return None
        tok = self.tokenizer
        width = enc["input_ids"].shape[1]
        refs: list[list[int]] = []
        for row, e in enumerate(examples):
            prefix_ids = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
            full = render(tok, chat_messages(prompt, e.question, e.reference), generation_prompt=False)
            ids = tok(full, add_special_tokens=False)["input_ids"]
            if ids[:len(prefix_ids)] != prefix_ids or len(ids) <= len(prefix_ids):
                return None
            refs.append(ids[len(prefix_ids):])
        longest = max(len(r) for r in refs)
        device = enc["input_ids"].device
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        # Feed the prompt's last token again (its cache entry is cropped), then the reference:
        # position j of the output predicts reference token j.
        new_ids = torch.full((len(refs), 1 + longest), pad, dtype=torch.long, device=device)
        new_mask = torch.zeros((len(refs), 1 + longest), dtype=torch.long, device=device)
        labels = torch.full((len(refs), longest), -100, dtype=torch.long, device=device)
        new_ids[:, 0] = enc["input_ids"][:, -1]
        new_mask[:, 0] = 1
        for i, r in enumerate(refs):
            new_ids[i, 1:1 + len(r)] = torch.tensor(r, device=device)
            new_mask[i, 1:1 + len(r)] = 1
            labels[i, :len(r)] = torch.tensor(r, device=device)
        lengths = enc["attention_mask"].sum(-1, keepdim=True)
        positions = lengths - 1 + torch.arange(1 + longest, device=device).unsqueeze(0)
        try:
            # negative: drop that many trailing entries (generated tokens + the prompt's last)
            cache.crop(-(cache.get_seq_length() - (width - 1)))
            with eval_mode(model), torch.no_grad():
                logits = model(input_ids=new_ids, position_ids=positions, **_cache_kwarg(model, cache),
                               attention_mask=torch.cat([enc["attention_mask"], new_mask[:, 1:]], dim=1),
                               use_cache=True).logits
        except (TypeError, ValueError, RuntimeError, AttributeError):
            return None
        return _mean_nll(logits[:, :longest], labels)

    def reference_nll(self, model: Any, prompt: str | None, examples: Sequence[ProbeExample], *,
                      batch_size: int | None = None) -> list[float]:
        """Mean NLL per reference token under the current prompt (no gradient), `batch_size` rows
        a forward (default: `batch_rows`)."""
        import torch

        tok = self.tokenizer
        device = _device_of(model)
        rows: list[tuple[list[int], int]] = []
        for e in examples:
            prefix = render(tok, chat_messages(prompt, e.question), generation_prompt=True)
            full = render(tok, chat_messages(prompt, e.question, e.reference), generation_prompt=False)
            ids = tok(full, add_special_tokens=False)["input_ids"]
            start = len(tok(prefix, add_special_tokens=False)["input_ids"])
            rows.append((ids, min(start, len(ids) - 1)))
        nlls: list[float] = []
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        size = batch_size or self.batch_rows(model, len(rows), max((len(ids) for ids, _ in rows), default=0))
        with eval_mode(model), torch.no_grad():
            for s in range(0, len(rows), size):
                chunk = rows[s:s + size]
                nlls.extend(_chunk_nll(model, chunk, pad, device))
        return nlls


def _in_order(gathered: Sequence[tuple[Any, ...]], count: int) -> list[tuple[Any, ...]]:
    """The gathered `(row index, *answers)` tuples as a list of answers in row order (a padded
    share repeats a row: its first answer is kept)."""
    by_row: dict[int, tuple[Any, ...]] = {}
    for index, *answers in gathered:
        by_row.setdefault(int(index), tuple(answers))
    missing = [i for i in range(count) if i not in by_row]
    if missing:  # pragma: no cover - every row is in some rank's share
        raise RuntimeError(f"NSLoRA: probe rows {missing[:5]} came back from no rank")
    return [by_row[i] for i in range(count)]


def _cache_kwarg(model: Any, cache: Any) -> dict[str, Any]:
    """transformers >= 5.2x names the forward's cache argument `cache` (`past_key_values` is
    deprecated there); older releases only know `past_key_values`."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        names = inspect.signature(type(base).forward).parameters
    except (TypeError, ValueError):
        names = {}
    return {"cache": cache} if "cache" in names else {"past_key_values": cache}


def _chunk_nll(model: Any, chunk: Sequence[tuple[list[int], int]], pad: int, device: Any) -> list[float]:
    """Mean reference-token NLL of each (ids, reference start) row, from one forward pass.

    Rows are left-padded (explicit position ids keep each row's positions as if unpadded), so
    every reference ends at the last column and only the last K logits are needed, K the longest
    reference + 1 (`logits_to_keep`): the LM head, the costliest matmul of a small model,
    projects the reference tokens only instead of prompt + reference."""
    import torch

    width = max(len(ids) for ids, _ in chunk)
    keep = max(len(ids) - start for ids, start in chunk) + 1
    input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
    attention = torch.zeros((len(chunk), width), dtype=torch.long)
    labels = torch.full((len(chunk), width), -100, dtype=torch.long)
    for i, (ids, start) in enumerate(chunk):
        offset = width - len(ids)
        input_ids[i, offset:] = torch.tensor(ids)
        attention[i, offset:] = 1
        labels[i, offset + start:] = torch.tensor(ids[start:])
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                  position_ids=positions.to(device))
    try:
        logits = model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # a model whose forward has no logits_to_keep: all positions
        logits = model(**kwargs).logits
    return _mean_nll(logits[:, -keep:-1], labels[:, width - keep + 1:].to(device))


def _mean_nll(logits: Any, labels: Any) -> list[float]:
    """Per row, the mean NLL of the labelled positions (`labels[:, j]` is the token `logits[:, j]`
    predicts; -100 is ignored)."""
    import torch.nn.functional as F

    logits = logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="none").view(labels.shape)
    mask = (labels != -100).float()
    return [float(v) for v in ((loss * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu()]


def answer_stop_pattern(config: NSLoRAConfig) -> re.Pattern[str] | None:
    """The pattern whose first complete matching line ends a probe reply, or None when the whole
    reply matters: a length, JSON or exact-match reward scores all of it."""
    if not (config.probe_stop_at_answer and config.answer_format):
        return None
    if config.max_reply_chars or config.reply_json or config.exact_match:
        return None
    return re.compile(config.answer_format, re.MULTILINE)


def answer_stopping_criteria(tokenizer: Any, config: NSLoRAConfig, prompt_len: int) -> Any:
    """A `StoppingCriteriaList` that finishes each row of a batched `generate` once its reply has
    a complete line (followed by a newline) matching `answer_format`; None when not applicable.
    End of turn still stops a row as before; rows that never state the answer run to
    the probe's token cap."""
    pattern = answer_stop_pattern(config)
    if pattern is None:
        return None
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAtAnswerLine(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            done = []
            for row in input_ids[:, prompt_len:]:
                text = tokenizer.decode(row, skip_special_tokens=True)
                complete = text[:text.rfind("\n")] if "\n" in text else ""
                done.append(pattern.search(complete) is not None)
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopAtAnswerLine()])


def _device_of(model: Any) -> Any:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        import torch

        return torch.device("cpu")
