"""A plain float Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) in Hugging Face module names.

Scope: inference and scale-only fine-tuning. The model file never mentions bit widths: quantization is a
module swap (``runtime/quant_linear.py`` replaces ``nn.Linear``), as in gpt-fast. Module and parameter names
match ``transformers``' ``LlamaForCausalLM`` so that HF state dicts load unchanged.

Two attention paths:
- no ``ForwardContext.attn``: ordinary causal attention over a padded-free batch ``(B, T)`` (perplexity,
  training, parity tests against transformers);
- ``ForwardContext.attn`` set (the engine): the batch is flattened to ``(1, T_total)`` tokens of many
  sequences, and each layer hands ``q, k, v`` (after RoPE) to ``ctx.attn.forward(layer_idx, q, k, v)``,
  which owns the paged KV cache. ``ctx.attn.logits_indices`` (if not None) selects the rows that reach
  the final norm and LM head (the last token of each sequence).

References: Touvron et al. 2023 (Llama), Su et al. 2021 (RoPE), Ainslie et al. 2023 (GQA).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from scaleswap.kernels.cpu_path import fp32_only_enabled

from .config import ModelConfig
from .forward_context import get_forward_context

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) and the attention scaling factor, per the config's rope_scaling."""
    dim = config.head_dim
    base = config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
        high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_freq_wavelen = old_ctx / low_freq_factor
        high_freq_wavelen = old_ctx / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    # "dynamic" NTK only changes frequencies beyond the trained context; within it, it equals default.
    return inv_freq.float(), 1.0


class RotaryEmbedding(nn.Module):
    """cos/sin tables, built lazily per device up to the longest position seen (grown by doubling)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self._cos: torch.Tensor | None = None  # (P, D)
        self._sin: torch.Tensor | None = None

    def _build(self, length: int, device: torch.device) -> None:
        inv_freq, attn_factor = rope_inv_freq(self.config)
        t = torch.arange(length, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (P, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, D)
        self._cos = (emb.cos() * attn_factor).to(device)
        self._sin = (emb.sin() * attn_factor).to(device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        need = int(positions.max()) + 1 if positions.numel() else 1
        if self._cos is None or self._cos.shape[0] < need or self._cos.device != positions.device:
            current = self._cos.shape[0] if self._cos is not None else 0
            size = max(need, min(self.config.max_position_embeddings, 8192), 2 * current)
            self._build(size, positions.device)
        return self._cos[positions], self._sin[positions]  # (..., D) each


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D), cos/sin (B, T, D)."""
    cos = cos.unsqueeze(2)
    sin = sin.unsqueeze(2)
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        ctx = get_forward_context()
        if ctx is not None and ctx.attn is not None:
            assert B == 1, "the engine path takes a flattened (1, T_total) batch"
            out = ctx.attn.forward(self.layer_idx, q[0], k[0], v[0])  # (T, H, D)
            return self.o_proj(out.reshape(1, T, self.num_heads * self.head_dim))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H|KVH, T, D)
        if self.sliding_window is not None and T > self.sliding_window:
            i = torch.arange(T, device=x.device)
            allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.sliding_window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out = out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Trainer sets this: recompute each decoder layer in backward instead of keeping activations.
        self.gradient_checkpointing = False

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, C) before the LM head."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.model.rotary_emb(positions)  # (B, T, D)
        h = self.model.embed_tokens(input_ids)  # (B, T, C)
        use_ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in self.model.layers:
            if use_ckpt:
                h = checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin)
        ctx = get_forward_context()
        idx = getattr(ctx.attn, "logits_indices", None) if ctx is not None and ctx.attn is not None else None
        if idx is not None:
            h = h[:, idx]  # (1, num_seqs, C)
        return self.model.norm(h)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V) float32 (or (1, len(logits_indices), V) in the engine)."""
        return self.lm_head(self.hidden_states(input_ids, positions)).float()


LM_HEAD_PRECISIONS = ("float32", "bfloat16", "int8")


class DecodeLMHead(nn.Module):
    """The LM head with a low-precision copy for small decode batches (inference only).

    Used only inside the engine's steps (a ForwardContext with ``attn``). At decode the tied 49152×576 fp32 head of SmolLM2 reads 113 MB per step, the largest single cost of a
    batch-1 step on a CPU. For at most ``max_rows`` rows and with autograd off, this head uses a copy:
    ``int8``: per-row symmetric int8 weights through ``aten._weight_int8pack_mm`` with bf16 activations
    (0.25× the bytes; logits within ~2 % of their range of fp32, measured up to 0.65 of ±36 on SmolLM2,
    like llama.cpp's Q8_0 output tensor);
    ``bfloat16``: bf16 weights (0.5× the bytes). Larger batches (prefill, perplexity) and training use the
    fp32 weight, which stays the source of truth (it is also the tied embedding), and so does a step inside
    :func:`scaleswap.kernels.cpu_path.fp32_only` (the engine's ``precision="fp32"``).
    """

    def __init__(self, weight: nn.Parameter, precision: str, max_rows: int = 16):
        super().__init__()
        if precision not in LM_HEAD_PRECISIONS:
            raise ValueError(f"LM head precision must be one of {', '.join(LM_HEAD_PRECISIONS)}, got {precision!r}")
        self.weight = weight  # (V, C) fp32, shared with the embedding when tied
        self.precision = precision
        self.max_rows = max_rows
        w = weight.detach().float()
        if precision == "int8":
            scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (V,)
            self.w_low = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            self.scales = scale.to(torch.bfloat16)
        elif precision == "bfloat16":
            self.w_low = w.to(torch.bfloat16).contiguous()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        C = h.shape[-1]
        rows = h.numel() // C
        ctx = get_forward_context()
        in_engine = ctx is not None and ctx.attn is not None  # only the serving engine's decode steps
        if (self.precision == "float32" or not in_engine or rows > self.max_rows or torch.is_grad_enabled()
                or h.device.type != "cpu" or fp32_only_enabled()):
            return F.linear(h, self.weight)
        x = h.reshape(rows, C).to(torch.bfloat16)
        if self.precision == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x, self.w_low, self.scales)
        else:
            y = F.linear(x, self.w_low)
        return y.float().view(*h.shape[:-1], -1)


def set_lm_head_precision(model: LlamaForCausalLM, precision: str, max_rows: int = 16) -> None:
    """Give ``model`` a :class:`DecodeLMHead` of ``precision`` (``float32`` restores the plain head)."""
    weight = model.lm_head.weight
    model.lm_head = DecodeLMHead(weight, precision, max_rows)
