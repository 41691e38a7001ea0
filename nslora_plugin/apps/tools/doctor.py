"""`nslora doctor`: will this LoRA / QLoRA + NSLoRA run fit on the GPU? An estimate, before loading.

    nslora doctor --model llama-3-8b --load-in-4bit --seq-len 2048 --lora-r 16 --batch-size 2
    nslora doctor --config recipes/trl/llama3-8b-qlora-24gb.yaml      # read a TRL recipe YAML
    nslora doctor --model path/to/model_folder ...                      # its config.json

The model is a folder (or a config.json) or a preset for a common architecture (`--list-presets`);
Hub ids of those families map to their preset (`meta-llama/Llama-3.1-8B-Instruct` -> llama-3-8b).
Nothing is downloaded and no framework is imported: this is arithmetic on the architecture.

The formula (bytes; T = batch x seq_len training tokens; h hidden size, L layers, V vocabulary,
I MLP intermediate size, q = heads x head_dim, kv = kv_heads x head_dim, c = bytes of the compute
dtype: 2 for bf16/fp16, 4 for fp32):

  parameters   per layer q_proj h*q, k_proj h*kv, v_proj h*kv, o_proj q*h, gate/up/down 3*h*I
               (+ biases, + 2 norms of h); embeddings V*h; lm_head V*h unless tied; final norm h.
  weights      linear layers: 4-bit NF4 0.5 B/param + absmax per 64-block (fp32: +1/16 B; with
               double quantization 8-bit absmax + fp32 per 256 blocks: +1/64 + 1/4096 B);
               8-bit: 1 B/param; 16-bit: 2; 32-bit: 4. Embeddings, lm_head, norms stay in c.
  adapter      LoRA r on each targeted linear (in, out): r*(in+out) params, kept in fp32 (PEFT
               upcasts adapters) = 4 B/param.  Full fine-tuning (r=0): every parameter trains.
  gradients    one per trainable parameter, same dtype (4 B for LoRA).
  optimizer    AdamW: 2 fp32 states = 8 B/trainable param; 8-bit AdamW (adamw_8bit,
               paged_adamw_8bit, adamw_bnb_8bit): 2 B; Lion: 4; 8-bit Lion: 1; Adafactor ~1
               (factored second moment, no momentum); SGD: 0.
  activations  saved for backward per token and layer (SDPA/flash attention: no T^2 score matrix):
               attention 2h + 3q + 3kv, MLP 2h + 4I, in c bytes; the two RMSNorms' fp32 upcast 4h*4;
               per targeted linear the LoRA-A output (r) and, with lora_dropout > 0, the dropout
               output (in) in c plus its 1-byte mask. Without gradient checkpointing: T*L*that.
               With it (HF checkpoints each decoder layer): T*L*h*c for the layer inputs plus one
               layer's full set, recomputed during backward.
  logits       lm_head "full": T*V*(c + 4 + 4): the logits, their fp32 upcast for the loss and
               its gradient. lm_head "fused" (TRL >= 1.16's SFTTrainer never builds the logits:
               it projects tiles of min(T, 4096) tokens x 32768 vocabulary columns): two tiles,
               forward and backward, 2*min(T,4096)*min(V,32768)*c, plus 16 B per token of
               per-token outputs. An upper bound: the tiles barely show at the step peak
               (recipes/results/gpu-qlora-8b.md).
  probe        NSLoRA's probe runs between optimizer steps under no_grad, after the gradients are
               freed: KV cache 2*L*kv*(P+G)*B*c for B = probe_batch_size rows of P prompt tokens +
               G = probe_max_new_tokens, plus the reference-NLL pass over B rows of P+G tokens,
               whose logits cost B*(P+G)*V*(c+4+4).
  overhead     CUDA context + allocator fragmentation: 0.75 GiB + 10% of the transient part.
  peak         max(training step, probe) where
               training step = weights + adapter + gradients + optimizer + activations + logits,
               probe = weights + adapter + optimizer + KV cache + NLL logits (+ overhead each).
  editor LLM   0 on this card: the editor is an external OpenAI-compatible endpoint.

Several GPUs (`--gpus N --shard fsdp|zero3|none`, or `--accelerate-config PATH` to read them from an
accelerate config): the table is per rank. FSDP and ZeRO-3 shard the base weights, the adapter, its
gradients and the optimizer states: each /N. Each rank keeps whole what it computes itself: its
activations and logits (per_device_train_batch_size is per rank), and the probe's KV cache and NLL
logits for its share of the probe rows, min(probe_batch_size, ceil(probe_size / N)) rows. Sharded
forwards (training and the probe's generation alike) all-gather one unit at a time; counted:
the largest unit (embeddings or lm_head, in c) + 2 decoder layers (the current one, the prefetched
next one). With parameter offload (fsdp_offload_params, ZeRO-3 offload_param_device: cpu) the
shards live in CPU RAM and count 0 on the GPU. `--shard none` with N > 1 is DDP: every rank holds
everything, only the probe rows are split. Loading (4-bit quantization before sharding) can peak
higher than the steady state estimated here.

Expect the real peak within about +-20%: kernels, attention implementation and allocator
behaviour move it. Lower `per_device_train_batch_size` / `max_length` for the training peak and
`nslora_probe_batch_size` for the probe peak.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from nslora_plugin.core.probe import probe_kv_bytes, probe_logits_bytes

__all__ = ["ModelShape", "TrainSettings", "MemoryEstimate", "PRESETS", "resolve_model",
           "shape_from_config", "estimate", "format_table", "settings_from_trl_config",
           "settings_from_accelerate_config", "main"]

GiB = 1024 ** 3
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a decoder-only transformer (Llama / Mistral / Qwen / Gemma)."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int | None = None
    tie_embeddings: bool = False
    qkv_bias: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.hd

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i),
                "down_proj": (i, h)}

    def param_counts(self) -> dict[str, int]:
        h, v, layers = self.hidden_size, self.vocab_size, self.num_layers
        linear = sum(a * b for a, b in self.linear_shapes().values())
        bias = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return {
            "linear": linear * layers,
            "embeddings": v * h,
            "lm_head": 0 if self.tie_embeddings else v * h,
            "norms_and_biases": (2 * h + bias) * layers + h,
        }

    @property
    def num_params(self) -> int:
        return sum(self.param_counts().values())


# Published architecture numbers (config.json of each family's base model).
PRESETS: dict[str, ModelShape] = {s.name: s for s in (
    ModelShape("llama-3-8b", 4096, 32, 32, 8, 14336, 128256),          # Llama 3 / 3.1 8B
    ModelShape("llama-3-70b", 8192, 80, 64, 8, 28672, 128256),         # Llama 3 / 3.1 / 3.3 70B
    ModelShape("llama-2-7b", 4096, 32, 32, 32, 11008, 32000),
    ModelShape("mistral-7b", 4096, 32, 32, 8, 14336, 32768),           # v0.3 (v0.1/0.2: 32000)
    ModelShape("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, qkv_bias=True),
    ModelShape("qwen3-8b", 4096, 36, 32, 8, 12288, 151936, head_dim=128),
    ModelShape("gemma-7b", 3072, 28, 16, 16, 24576, 256000, head_dim=256, tie_embeddings=True),
    ModelShape("smollm2-135m", 576, 30, 9, 3, 1536, 49152, tie_embeddings=True),
)}

# Hub ids (lower case, any org) -> preset
_ALIASES: tuple[tuple[str, str], ...] = (
    (r"llama-?3(\.\d)?-8b", "llama-3-8b"),
    (r"llama-?3(\.\d)?-70b", "llama-3-70b"),
    (r"llama-?2-7b", "llama-2-7b"),
    (r"mistral-7b", "mistral-7b"),
    (r"qwen2(\.5)?-7b", "qwen2.5-7b"),
    (r"qwen3-8b", "qwen3-8b"),
    (r"gemma-7b", "gemma-7b"),
    (r"smollm2-135m", "smollm2-135m"),
)


def shape_from_config(config: Mapping[str, Any] | str | Path, name: str | None = None) -> ModelShape:
    """A ModelShape from a transformers config.json (a path, a folder holding one, or a dict)."""
    if not isinstance(config, Mapping):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        name = name or path.parent.name
        config = json.loads(path.read_text())
    cfg = dict(config)
    cfg = {**cfg.get("text_config", {}), **{k: v for k, v in cfg.items() if k != "text_config"}} \
        if "hidden_size" not in cfg else cfg
    try:
        heads = int(cfg["num_attention_heads"])
        return ModelShape(
            name=name or str(cfg.get("_name_or_path") or cfg.get("model_type") or "model"),
            hidden_size=int(cfg["hidden_size"]), num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            intermediate_size=int(cfg["intermediate_size"]), vocab_size=int(cfg["vocab_size"]),
            head_dim=int(cfg["head_dim"]) if cfg.get("head_dim") else None,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", False)) or cfg.get("model_type") == "qwen2")
    except KeyError as exc:
        raise ValueError(f"config has no {exc.args[0]!r}: not a decoder-only transformer config "
                         "this estimate understands (Llama, Mistral, Qwen, Gemma, SmolLM...)") from None


def resolve_model(model: str) -> ModelShape:
    """A preset name, a Hub id of a preset family, a model folder or a config.json path."""
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file() or path.is_file():
        return shape_from_config(path)
    key = model.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    for pattern, preset in _ALIASES:
        if re.search(pattern, key.split("/")[-1]):
            return PRESETS[preset]
    raise ValueError(f"unknown model {model!r}: give a folder with config.json, a config.json "
                     f"path, or a preset ({', '.join(PRESETS)})")


_OPTIMIZER_BYTES = (  # bytes of state per trainable parameter; first match wins
    ("8bit", 2.0), ("lion", 4.0), ("adafactor", 1.0), ("sgd", 0.0), ("adam", 8.0),
)


def optimizer_bytes(name: str) -> float:
    low = name.lower()
    if "lion" in low and "8bit" in low:
        return 1.0
    for key, value in _OPTIMIZER_BYTES:
        if key in low:
            return value
    return 8.0


@dataclass
class TrainSettings:
    weight_bits: int = 16              # 4 (NF4 QLoRA), 8, 16 (bf16/fp16) or 32
    double_quant: bool = False         # bnb_4bit_use_double_quant (--use_bnb_nested_quant)
    compute_bytes: int = 2             # 2 for bf16/fp16 compute, 4 for fp32
    lora_r: int = 16                   # 0 = full fine-tuning
    target_modules: Sequence[str] | str = "all-linear"
    lora_dropout: float = 0.05
    optimizer: str = "adamw_torch"
    batch_size: int = 1                # per device
    seq_len: int = 1024
    gradient_checkpointing: bool = True
    probe_batch_size: int = 8
    probe_prompt_len: int = 256        # system prompt + question tokens of a probe row
    probe_max_new_tokens: int = 96
    gpu_gib: float = 24.0
    lm_head: str = "full"              # "full" logits, or "fused" (TRL >= 1.16 SFTTrainer)
    num_ranks: int = 1                 # GPUs / processes in all, every machine together
    shard: str = "none"                # "fsdp", "zero3" (weights, adapter, grads, optimizer / N) or "none"
    offload_params: bool = False       # sharded weights (+ adapter) in CPU RAM (FSDP / ZeRO-3 offload)
    offload_optimizer: bool = False    # gradients + optimizer states in CPU RAM
    probe_size: int | None = None      # probe rows in all (nslora_probe_size), split across the ranks

    @property
    def sharded(self) -> bool:
        return self.shard in ("fsdp", "zero3")

    @property
    def multi(self) -> bool:
        """Is this a per-rank estimate (several ranks, or a sharding strategy given)?"""
        return self.num_ranks > 1 or self.sharded

    def probe_rows_per_rank(self) -> int:
        """Rows one rank generates at once: its share of the probe rows, batched."""
        batch = self.probe_batch_size or self.probe_size or 16  # 0, auto: every row at once (at most)
        if self.probe_size is None or not self.multi:
            return batch
        share = -(-self.probe_size // self.num_ranks)
        return max(1, min(batch, share))

    def targets(self) -> list[str]:
        t = self.target_modules
        if isinstance(t, str):
            if t in ("all-linear", "all_linear", "all"):
                return list(LINEARS)
            t = [x.strip() for x in t.split(",") if x.strip()]
        unknown = [x for x in t if x not in LINEARS]
        if unknown:
            raise ValueError(f"unknown LoRA target module(s) {unknown}: use all-linear or names "
                             f"from {', '.join(LINEARS)}")
        return list(t)


@dataclass
class MemoryEstimate:
    model: ModelShape
    settings: TrainSettings
    rows: list[tuple[str, float, str]] = field(default_factory=list)  # (component, bytes, formula)
    params: int = 0
    trainable_params: int = 0
    train_peak: float = 0.0
    probe_peak: float = 0.0

    @property
    def total(self) -> float:
        return max(self.train_peak, self.probe_peak)

    @property
    def fits(self) -> bool:
        return self.total <= self.settings.gpu_gib * GiB

    def row(self, name: str) -> float:
        for n, b, _ in self.rows:
            if n == name:
                return b
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        extra = ({"per_rank": True, "num_ranks": self.settings.num_ranks, "shard": self.settings.shard}
                 if self.settings.multi else {})
        settings = asdict(self.settings)
        if not self.settings.multi:  # one GPU: the settings as before the per-rank keys existed
            for key in ("num_ranks", "shard", "offload_params", "offload_optimizer", "probe_size"):
                settings.pop(key)
        return {"model": asdict(self.model), "settings": settings, **extra,
                "params": self.params, "trainable_params": self.trainable_params,
                "components_gib": {n: round(b / GiB, 3) for n, b, _ in self.rows},
                "train_peak_gib": round(self.train_peak / GiB, 3),
                "probe_peak_gib": round(self.probe_peak / GiB, 3),
                "total_gib": round(self.total / GiB, 3), "gpu_gib": self.settings.gpu_gib,
                "fits": self.fits}


def _quant_bytes_per_param(bits: int, double_quant: bool) -> float:
    if bits == 4:
        return 0.5 + ((1 / 64 + 4 / (64 * 256)) if double_quant else 4 / 64)
    if bits == 8:
        return 1.0
    if bits in (16, 32):
        return bits / 8
    raise ValueError(f"weight bits must be 4, 8, 16 or 32, got {bits}")


def _check_ranks(s: TrainSettings) -> None:
    if not isinstance(s.num_ranks, int) or s.num_ranks < 1:
        raise ValueError(f"--gpus (number of ranks) must be a whole number >= 1, got {s.num_ranks!r}")
    if s.shard not in ("none", "fsdp", "zero3"):
        raise ValueError(f"--shard {s.shard!r}: use fsdp, zero3 or none")
    if s.probe_size is not None and s.probe_size < 1:
        raise ValueError(f"--probe-size must be >= 1, got {s.probe_size}")


def estimate(model: ModelShape, s: TrainSettings) -> MemoryEstimate:
    _check_ranks(s)
    m, c = model, s.compute_bytes
    counts = m.param_counts()
    n = s.num_ranks if s.sharded else 1            # the divisor of the sharded terms
    per = f" / {n} ranks ({'FSDP' if s.shard == 'fsdp' else 'ZeRO-3'} shard)" if s.sharded else ""

    def on_gpu(value: float, offloaded: bool) -> float:
        return 0.0 if (s.sharded and offloaded) else value / n

    def where(offloaded: bool) -> str:
        return (f" / {n} ranks, in CPU RAM (offload)" if s.sharded and offloaded else per)
    est = MemoryEstimate(model=m, settings=s, params=m.num_params)
    dense_bytes = c if s.weight_bits in (4, 8) else s.weight_bits / 8
    linear_w = counts["linear"] * _quant_bytes_per_param(s.weight_bits, s.double_quant)
    other_w = (counts["embeddings"] + counts["lm_head"] + counts["norms_and_biases"]) * dense_bytes
    quant = {4: "NF4" + (" + double quant" if s.double_quant else ""), 8: "int8"}.get(
        s.weight_bits, f"{s.weight_bits}-bit")
    weights = on_gpu(linear_w + other_w, s.offload_params)
    est.rows.append(("base weights", weights,
                     f"{counts['linear'] / 1e9:.2f}B linear params in {quant}, "
                     f"{(m.num_params - counts['linear']) / 1e9:.2f}B embeddings/head/norms in "
                     f"{int(dense_bytes * 8)}-bit{where(s.offload_params)}"))

    shapes = m.linear_shapes()
    targets = s.targets()
    if s.lora_r > 0:
        trainable = s.lora_r * sum(sum(shapes[t]) for t in targets) * m.num_layers
        grad_bytes = 4.0
        est.rows.append(("LoRA adapter", on_gpu(trainable * 4.0, s.offload_params),
                         f"r={s.lora_r} on {','.join(targets) if len(targets) < 7 else 'all-linear'}: "
                         f"{trainable / 1e6:.1f}M params x 4 B (fp32){where(s.offload_params)}"))
    else:
        trainable = m.num_params
        grad_bytes = dense_bytes
    est.trainable_params = trainable
    gradients = on_gpu(trainable * grad_bytes, s.offload_optimizer)
    est.rows.append(("gradients", gradients, f"{trainable / 1e6:.1f}M x {grad_bytes:g} B"
                     f"{where(s.offload_optimizer)}"))
    opt = on_gpu(trainable * optimizer_bytes(s.optimizer), s.offload_optimizer)
    est.rows.append(("optimizer states", opt,
                     f"{s.optimizer}: {optimizer_bytes(s.optimizer):g} B x {trainable / 1e6:.1f}M"
                     f"{where(s.offload_optimizer)}"))
    gathered = 0.0
    if s.sharded:  # the units a sharded forward holds whole for a moment
        layer = (counts["linear"] * _quant_bytes_per_param(s.weight_bits, s.double_quant)
                 + counts["norms_and_biases"] * dense_bytes) / m.num_layers
        if s.lora_r > 0:
            layer += trainable * 4.0 / m.num_layers
        biggest = max(counts["embeddings"], counts["lm_head"]) * dense_bytes
        gathered = biggest + 2 * layer
        est.rows.append(("all-gathered layers", gathered,
                         f"largest unit (embeddings/lm_head {biggest / GiB:.2f} GiB) + 2 decoder layers "
                         f"({layer / GiB:.2f} GiB each: current + prefetched), whole on every rank"))

    # activations
    tokens = s.batch_size * s.seq_len
    h, i = m.hidden_size, m.intermediate_size
    per_layer = (4 * h + 3 * m.q_dim + 3 * m.kv_dim + 4 * i) * c + 2 * 2 * h * 4
    if s.lora_r > 0:
        per_layer += sum(s.lora_r * c for _ in targets)
        if s.lora_dropout > 0:
            per_layer += sum(shapes[t][0] * (c + 1) for t in targets)
    if s.gradient_checkpointing:
        activations = tokens * (m.num_layers * h * c + per_layer)
        how = f"checkpointing: {m.num_layers} layer inputs + 1 layer recomputed"
    else:
        activations = tokens * m.num_layers * per_layer
        how = f"no checkpointing: all {m.num_layers} layers"
    est.rows.append(("activations", activations,
                     f"{s.batch_size} x {s.seq_len} tokens, {how} ({per_layer / 1024:.0f} KiB/token/layer)"))
    if s.lm_head == "fused":
        tile = min(tokens, 4096) * min(m.vocab_size, 32768)
        logits = 2 * tile * c + tokens * 16
        est.rows.append(("logits + loss (fused LM head)", logits,
                         f"2 tiles of {min(tokens, 4096)} x {min(m.vocab_size, 32768)} x {c} B + "
                         f"16 B/token (TRL>=1.16 never builds the full logits)"))
    elif s.lm_head == "full":
        logits = tokens * m.vocab_size * (c + 8)
        est.rows.append(("logits + loss", logits, f"{tokens} tokens x V={m.vocab_size} x {c + 8} B "
                         "(full logits; TRL>=1.16, Liger or CCE kernels need less: --lm-head fused)"))
    else:
        raise ValueError(f"lm_head {s.lm_head!r}: use 'full' or 'fused'")

    # NSLoRA probe (per rank: this rank's share of the probe rows)
    probe_tokens = s.probe_prompt_len + s.probe_max_new_tokens
    rows = s.probe_rows_per_rank()
    share = (f" (this rank's rows: {s.probe_size} / {s.num_ranks} ranks, batched by "
             f"{s.probe_batch_size})" if s.multi and s.probe_size is not None else "")
    kv = probe_kv_bytes(m.num_layers, m.kv_dim, probe_tokens, c) * rows
    est.rows.append(("probe KV cache", kv,
                     f"batch {rows} x ({s.probe_prompt_len} + {s.probe_max_new_tokens}) "
                     f"tokens x {m.num_layers} layers x 2 x kv {m.kv_dim}{share}"))
    nll = probe_logits_bytes(m.vocab_size, probe_tokens, c) * rows
    est.rows.append(("probe reference-NLL logits", nll,
                     f"batch {rows} x {probe_tokens} tokens x V x {c + 8} B"))
    est.rows.append(("editor LLM", 0.0, "offloaded to editor_base_url (no memory on this card)"))

    static = weights + (est.row("LoRA adapter") if s.lora_r > 0 else 0.0) + opt
    train_transient = gradients + activations + logits + gathered
    probe_transient = kv + nll + gathered
    overhead_train = 0.75 * GiB + 0.1 * train_transient
    overhead_probe = 0.75 * GiB + 0.1 * probe_transient
    est.rows.append(("CUDA context + allocator slack", max(overhead_train, overhead_probe),
                     "0.75 GiB + 10% of the transient part"))
    est.train_peak = static + train_transient + overhead_train
    est.probe_peak = static + probe_transient + overhead_probe
    return est


def format_table(est: MemoryEstimate) -> str:
    m, s = est.model, est.settings
    lines = [f"model {m.name}: {est.params / 1e9:.2f}B params (h={m.hidden_size}, L={m.num_layers}, "
             f"heads={m.num_heads}/{m.num_kv_heads} kv, I={m.intermediate_size}, V={m.vocab_size}"
             f"{', tied embeddings' if m.tie_embeddings else ''})",
             *([_rank_line(s)] if s.multi else []),
             "", f"{'component':<32}{'GiB':>8}  how", "-" * 100]
    for name, value, how in est.rows:
        lines.append(f"{name:<32}{value / GiB:>8.2f}  {how}")
    lines.append("-" * 100)
    gathered = " + gathered layers" if s.sharded else ""
    lines.append(f"{'peak during a training step':<32}{est.train_peak / GiB:>8.2f}  "
                 f"weights + adapter + optimizer + gradients + activations + logits{gathered} + slack")
    lines.append(f"{'peak during an NSLoRA probe':<32}{est.probe_peak / GiB:>8.2f}  "
                 f"weights + adapter + optimizer + KV cache + NLL logits{gathered} + slack")
    verdict = "fits" if est.fits else "DOES NOT FIT"
    each = " per GPU" if s.multi else ""
    lines.append(f"{'total (peak)':<32}{est.total / GiB:>8.2f}  {verdict} in {s.gpu_gib:g} GiB{each} "
                 f"({s.gpu_gib - est.total / GiB:+.2f} GiB headroom)")
    if not est.fits:
        bigger = "probe" if est.probe_peak > est.train_peak else "training step"
        tip = ("lower nslora_probe_batch_size / nslora_probe_max_new_tokens" if bigger == "probe"
               else "lower the batch size or max_length, turn on gradient checkpointing, or load in 4-bit")
        if s.multi and not s.sharded:
            tip += ", or shard the model (--shard fsdp / zero3)"
        elif s.sharded:
            tip += ", or add GPUs"
        lines.append(f"the {bigger} is the peak: {tip}")
    return "\n".join(lines)


def _rank_line(s: TrainSettings) -> str:
    how = {"fsdp": "FSDP: weights, adapter, gradients, optimizer sharded",
           "zero3": "ZeRO-3: weights, adapter, gradients, optimizer partitioned",
           "none": "DDP: a full copy on every rank"}[s.shard]
    off = [w for w, on in (("parameters", s.offload_params), ("optimizer", s.offload_optimizer)) if on]
    return (f"per rank: {s.num_ranks} rank{'s' if s.num_ranks != 1 else ''} ({how}"
            f"{'; offloaded to CPU: ' + ' + '.join(off) if off and s.sharded else ''}); "
            f"activations, logits and the probe are each rank's own")


def settings_from_accelerate_config(path: str | Path) -> dict[str, Any]:
    """TrainSettings keyword arguments (num_ranks, shard, offload, checkpointing) from an accelerate
    config YAML (recipes/accelerate/*.yaml)."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{path}: not an accelerate config (a YAML mapping)")
    kind = str(cfg.get("distributed_type", "NO")).upper()
    out: dict[str, Any] = {"num_ranks": int(cfg.get("num_processes") or 1)}
    if kind == "FSDP":
        fsdp = {k.removeprefix("fsdp_"): v for k, v in (cfg.get("fsdp_config") or {}).items()}
        out["shard"] = "fsdp"
        offload = str(fsdp.get("offload_params", False)).lower() in ("true", "1", "yes")
        out["offload_params"] = out["offload_optimizer"] = offload
        if str(fsdp.get("activation_checkpointing", False)).lower() in ("true", "1", "yes"):
            out["gradient_checkpointing"] = True
    elif kind == "DEEPSPEED":
        ds = cfg.get("deepspeed_config") or {}
        if ds.get("deepspeed_config_file"):
            raise ValueError(f"{path}: reads its DeepSpeed settings from a JSON file; give --shard zero3 "
                             "--gpus N instead")
        stage = int(ds.get("zero_stage", 0))
        if stage != 3:
            raise ValueError(f"{path}: ZeRO stage {stage}: the estimate knows stage 3 (--shard zero3) "
                             "and plain data parallel (--shard none)")
        out["shard"] = "zero3"
        out["offload_params"] = str(ds.get("offload_param_device", "none")).lower() not in ("none", "")
        out["offload_optimizer"] = str(ds.get("offload_optimizer_device", "none")).lower() not in ("none", "")
    elif kind in ("MULTI_GPU", "NO"):
        out["shard"] = "none"
    else:
        raise ValueError(f"{path}: distributed_type {kind}: use FSDP, DEEPSPEED (ZeRO-3) or MULTI_GPU")
    return out


# ---------------------------------------------------------------------------------- TRL YAML
def settings_from_trl_config(path: str | Path) -> tuple[str | None, dict[str, Any]]:
    """(model, TrainSettings keyword arguments) from a TRL `--config` YAML (recipes/trl/*.yaml)."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text()) or {}
    out: dict[str, Any] = {}
    if cfg.get("load_in_4bit"):
        out["weight_bits"] = 4
    elif cfg.get("load_in_8bit"):
        out["weight_bits"] = 8
    elif cfg.get("dtype") == "float32":
        out["weight_bits"] = 32
    if "use_bnb_nested_quant" in cfg:
        out["double_quant"] = bool(cfg["use_bnb_nested_quant"])
    if cfg.get("dtype") == "float32" or (cfg.get("dtype") is None and not (cfg.get("bf16") or cfg.get("fp16"))):
        out["compute_bytes"] = 4
    if cfg.get("use_peft") is False:
        out["lora_r"] = 0
    for src, dst in (("lora_r", "lora_r"), ("lora_dropout", "lora_dropout"), ("optim", "optimizer"),
                     ("per_device_train_batch_size", "batch_size"), ("max_length", "seq_len"),
                     ("gradient_checkpointing", "gradient_checkpointing"),
                     ("nslora_probe_batch_size", "probe_batch_size"),
                     ("nslora_probe_size", "probe_size"),
                     ("nslora_probe_max_new_tokens", "probe_max_new_tokens")):
        if cfg.get(src) is not None and not (src == "lora_r" and out.get("lora_r") == 0):
            auto = isinstance(cfg[src], str) and cfg[src].strip().lower() == "auto"
            out[dst] = 0 if auto and dst.startswith("probe_") else cfg[src]
    if cfg.get("lora_target_modules") is not None:
        t = cfg["lora_target_modules"]
        out["target_modules"] = t[0] if isinstance(t, list) and len(t) == 1 else t
    out["lm_head"] = "fused" if trl_has_fused_lm_head() else "full"
    return cfg.get("model_name_or_path"), out


def trl_has_fused_lm_head() -> bool:
    """Is the installed TRL one whose SFTTrainer never builds the full logits (>= 1.16)? Read
    from the package metadata, so nothing is imported."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        parts = version("trl").split(".")
        return (int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)) >= (1, 16)
    except (PackageNotFoundError, ValueError, IndexError):
        return False


# ---------------------------------------------------------------------------------- CLI
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="nslora doctor")
    p.description = "Estimate GPU memory for a LoRA/QLoRA run with NSLoRA (weights, adapter, " \
                    "optimizer, gradients, activations, probe KV cache) against a card's size."
    p.add_argument("--model", help="model folder, config.json, preset or Hub id of a preset family")
    p.add_argument("--config", help="a TRL recipe YAML (model and settings are read from it; "
                                    "flags given here win)")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    bits = p.add_mutually_exclusive_group()
    bits.add_argument("--load-in-4bit", dest="weight_bits", action="store_const", const=4)
    bits.add_argument("--load-in-8bit", dest="weight_bits", action="store_const", const=8)
    bits.add_argument("--weight-bits", dest="weight_bits", type=int, choices=(4, 8, 16, 32))
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=None,
                   help="bnb 4-bit double quantization (TRL: --use_bnb_nested_quant)")
    p.add_argument("--compute-dtype", choices=("bfloat16", "float16", "float32"), default=None)
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--target-modules", default=None, help="all-linear or q_proj,v_proj,...")
    p.add_argument("--lora-dropout", type=float, default=None)
    p.add_argument("--optimizer", default=None, help="adamw_torch, paged_adamw_8bit, adafactor, ...")
    p.add_argument("--batch-size", type=int, default=None, help="per-device train batch size")
    p.add_argument("--seq-len", type=int, default=None, help="training sequence length (max_length)")
    p.add_argument("--lm-head", choices=("full", "fused"), default=None,
                   help="full logits (default with --model), or TRL>=1.16's fused LM head (the "
                        "default with a TRL --config when TRL>=1.16 is installed)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--probe-batch-size", type=int, default=None)
    p.add_argument("--probe-prompt-len", type=int, default=None)
    p.add_argument("--probe-max-new-tokens", type=int, default=None)
    p.add_argument("--probe-size", type=int, default=None,
                   help="probe rows in all (nslora_probe_size); with several ranks each probes its share")
    p.add_argument("--gpu-gib", type=float, default=None, help="card memory (default 24)")
    p.add_argument("--gpus", "--num-processes", dest="gpus", type=int, default=None,
                   help="ranks in all, every machine together (accelerate's --num_processes): the "
                        "table is then per rank")
    p.add_argument("--shard", choices=("fsdp", "zero3", "none"), default=None,
                   help="fsdp / zero3: weights, adapter, gradients and optimizer states / N per rank; "
                        "none: DDP, a full copy per rank (default with --gpus)")
    p.add_argument("--accelerate-config", default=None,
                   help="an accelerate config YAML (recipes/accelerate/*.yaml): ranks, sharding, "
                        "offload and FSDP activation checkpointing from it; flags given here win")
    p.add_argument("--use-cpu", action="store_true",
                   help="the run trains on a CPU: check that its precision is not emulated there")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="the run's bf16 setting (default: the --config's, else TRL's default, true)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def run(args: argparse.Namespace) -> int:
    if args.list_presets:
        for name, shape in PRESETS.items():
            print(f"{name:<14} {shape.num_params / 1e9:6.2f}B  h={shape.hidden_size} L={shape.num_layers} "
                  f"heads={shape.num_heads}/{shape.num_kv_heads} I={shape.intermediate_size} "
                  f"V={shape.vocab_size}")
        return 0
    model, kwargs = (settings_from_trl_config(args.config) if args.config else (None, {}))
    model = args.model or model
    if not model:
        print("nslora doctor: error: give --model (or --config with model_name_or_path)")
        return 2
    if args.gpus is not None and args.gpus < 1:
        print(f"nslora doctor: error: --gpus must be >= 1 (ranks in all), got {args.gpus}")
        return 2
    if args.probe_size is not None and args.probe_size < 1:
        print(f"nslora doctor: error: --probe-size must be >= 1, got {args.probe_size}")
        return 2
    if args.accelerate_config:
        try:
            kwargs.update(settings_from_accelerate_config(args.accelerate_config))
        except (OSError, ValueError, TypeError) as exc:
            print(f"nslora doctor: error: --accelerate-config: {exc}")
            return 2
    if args.shard in ("fsdp", "zero3") and args.gpus is None and "num_ranks" not in kwargs:
        print(f"nslora doctor: error: --shard {args.shard} needs --gpus N (ranks in all) or "
              "--accelerate-config")
        return 2
    flags = {"weight_bits": args.weight_bits, "double_quant": args.double_quant,
             "lora_r": args.lora_r, "target_modules": args.target_modules,
             "lora_dropout": args.lora_dropout, "optimizer": args.optimizer,
             "batch_size": args.batch_size, "seq_len": args.seq_len,
             "gradient_checkpointing": args.gradient_checkpointing,
             "probe_batch_size": args.probe_batch_size, "probe_prompt_len": args.probe_prompt_len,
             "probe_max_new_tokens": args.probe_max_new_tokens, "gpu_gib": args.gpu_gib,
             "lm_head": args.lm_head, "probe_size": args.probe_size, "num_ranks": args.gpus,
             "shard": args.shard}
    if args.compute_dtype:
        flags["compute_bytes"] = 4 if args.compute_dtype == "float32" else 2
    kwargs.update({k: v for k, v in flags.items() if v is not None})
    try:
        est = estimate(resolve_model(model), TrainSettings(**kwargs))
    except ValueError as exc:
        print(f"nslora doctor: error: {exc}")
        return 2
    note = cpu_precision_note(args)
    if args.json:
        print(json.dumps({**est.to_dict(), "cpu_precision": note}, indent=2))
    else:
        print(format_table(est))
        if note:
            print(f"\nCPU: {note}")
    return 0 if est.fits else 1


def cpu_precision_note(args: argparse.Namespace) -> str | None:
    """The CPU slow-precision warning for a run that trains on a CPU (`use_cpu` in the --config,
    or --use-cpu), or None. TRL's `SFTConfig` defaults to bf16=True unless fp16 is set."""
    import types

    import yaml

    from nslora_plugin.trainer.precision import cpu_precision_problem

    cfg = (yaml.safe_load(Path(args.config).read_text()) or {}) if args.config else {}
    use_cpu = bool(args.use_cpu or cfg.get("use_cpu"))
    fp16 = bool(cfg.get("fp16", False))
    bf16 = cfg.get("bf16", not fp16)
    if args.bf16 is not None:
        bf16 = args.bf16
    if isinstance(bf16, str):
        bf16 = bf16.strip().lower() not in ("false", "0", "no", "off")
    return cpu_precision_problem(types.SimpleNamespace(use_cpu=use_cpu, bf16=bool(bf16), fp16=fp16))


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

