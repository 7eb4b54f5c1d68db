"""Configuration dataclasses: model architecture, quantization, engine, sampling.

All are validated at construction (``__post_init__``) and raise ``ValueError``
with a message that names the valid choices. Nothing here imports torch.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (-1, 32, 64, 128)


@dataclass
class ModelConfig:
    """A Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2), in HF terms."""

    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v have biases
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # -- HF config.json round trip -------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        archs = d.get("architectures") or [d.get("model_type", "?")]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            mt = d.get("model_type")
            by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
            arch = by_type.get(mt, arch)
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope_theta = d.get("rope_theta")
        rope_scaling = d.get("rope_scaling")
        rope_params = d.get("rope_parameters")  # transformers >= 5 spelling
        if isinstance(rope_params, dict):
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = dict(rope_params)
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", arch == "Qwen2ForCausalLM")),
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=d.get("sliding_window") if d.get("use_sliding_window", True) else None,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
        d = asdict(self)
        arch = d.pop("architecture")
        d["architectures"] = [arch]
        d["model_type"] = model_type[arch]
        d["hidden_act"] = "silu"
        d["torch_dtype"] = "float32"
        if d["rope_scaling"] is None:
            d.pop("rope_scaling")
        if d["sliding_window"] is None:
            d.pop("sliding_window")
        return d

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_hf_dict(json.loads(Path(path).read_text()))


@dataclass
class QuantConfig:
    """How the linears of a base model are quantized. ``group_size == -1``: one scale per output channel."""

    bits: int = 4
    group_size: int = 64
    # Linear layers (by HF suffix) that are quantized. Embeddings, norms and the LM head stay float.
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(f"group size must be one of {SUPPORTED_GROUP_SIZES} (-1 = per channel), got {self.group_size}")
        self.targets = tuple(self.targets)

    def num_groups(self, in_features: int) -> int:
        if self.group_size == -1:
            return 1
        if in_features % self.group_size:
            raise ValueError(
                f"group size {self.group_size} does not divide in_features={in_features}; "
                f"choose a group size that divides it or -1 (per channel)"
            )
        return in_features // self.group_size


@dataclass
class SamplingParams:
    """Per-request decoding parameters (OpenAI semantics where OpenAI defines one)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None  # None: off; k >= 0: chosen token + top-k alternatives
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5


@dataclass
class EngineConfig:
    """Serving-engine sizing (runtime/engine.py). Memory budgets are in bytes.

    - KV cache: ``num_kv_blocks`` blocks of ``block_size`` tokens; when None it is
      ``kv_cache_memory_bytes // bytes_per_block`` with bytes_per_block =
      2 (K, V) * layers * block_size * kv_heads * head_dim * 4 (fp32).
    - Scale bank: at most ``max_resident_tenants`` tenant scale sets resident besides the
      base (slot 0); when None it is ``scale_bank_memory_bytes // bytes_per_scale_set``.
      The bank grows on demand (doubling) up to that bound, so an idle engine holds little.
    """

    block_size: int = 16
    kv_cache_memory_bytes: int = 512 * 2**20
    num_kv_blocks: int | None = None
    max_model_len: int | None = None  # None: min(model max positions, KV capacity)
    max_num_seqs: int = 64  # running sequences per step
    max_num_batched_tokens: int = 512  # token budget per step (prefill chunks + decodes)
    max_waiting: int = 256  # waiting-queue bound; beyond it submit raises QueueFullError
    scale_bank_memory_bytes: int = 512 * 2**20
    max_resident_tenants: int | None = None
    seed: int = 0  # engine generator for unseeded sampling
    device: str = "cpu"
    num_threads: int | None = None  # torch intra-op threads for the step loop; None: leave as is
    # LM head for decode batches of <= 16 rows: "int8" (per-row int8 copy, ~1 % logit error, 4x fewer bytes),
    # "bfloat16" or "float32" (exact). Prefill and training always use the float32 head.
    lm_head: str = "int8"
    # Arithmetic of the CPU steps. "fast": bf16 activations in the int4 matmul for small batches and the
    # ``lm_head`` copy above (logits within ~1.5 of float32, perplexity within 0.3 %; a near-tied greedy token
    # may differ between a request alone and the same request in a batch). "fp32": float32 throughout and a
    # float32 LM head, so results depend on the batch only through float32 rounding; slower small batches.
    precision: str = "fast"

    def __post_init__(self) -> None:
        if self.precision not in ("fast", "fp32"):
            raise ValueError(f"precision must be 'fast' or 'fp32'; got {self.precision!r}")
        if self.lm_head not in ("float32", "bfloat16", "int8"):
            raise ValueError(f"lm_head must be one of float32, bfloat16, int8; got {self.lm_head!r}")
        if self.block_size not in (8, 16, 32, 64):
            raise ValueError(f"block_size must be one of (8, 16, 32, 64), got {self.block_size}")
        for name in ("kv_cache_memory_bytes", "max_num_seqs", "max_num_batched_tokens", "scale_bank_memory_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1 or None (from the memory budget), got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 or None, got {self.max_model_len}")
        if self.max_resident_tenants is not None and self.max_resident_tenants < 1:
            raise ValueError(f"max_resident_tenants must be >= 1 or None (from the memory budget), got {self.max_resident_tenants}")
