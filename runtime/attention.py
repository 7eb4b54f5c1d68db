"""Paged attention for one engine step, called by every layer through ``ForwardContext.attn``.

The step's tokens are flattened into one row list ``(T, ...)``: first the ``num_decode`` sequences that
have exactly one new token (decodes, or 1-token prefill chunks), then the multi-token prefill chunks.
Everything index-like is computed once per step (``PagedAttention.build``), never per layer:

- ``slot_mapping (T,)``: flat cache row of every new token; K/V are written with one ``index_copy_`` per tensor.
- decodes: their block tables padded to ``(n, max_blocks)``; K/V are gathered block-wise into
  ``(n, L, KVH, D)`` and ONE padded SDPA serves them all. GQA without repeating K/V: the H query
  heads of a row are viewed as ``(KVH, H/KVH)`` queries per KV head (head h uses KV head h // (H/KVH), as HF does),
  padding masked with a ``(n, 1, 1, L)`` boolean mask.
- prefill chunks: per sequence; with no cached prefix, causal SDPA straight on the new K/V; with a cached
  prefix (chunked prefill, recompute), the cached rows are gathered and a ``(q, L)`` offset-causal mask is used.

Semantics (reference: HF ``LlamaAttention`` with ``scale = 1/sqrt(D)``): for query token at position p of a
sequence, ``out = softmax(q·K[0..p]ᵀ / sqrt(D)) V[0..p]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_cache import KVCache


@dataclass
class PrefillChunk:
    q_start: int  # first row of this chunk in the flattened step
    q_len: int  # new tokens
    ctx_len: int  # cached prefix + new tokens
    ctx_rows: torch.Tensor | None  # (ctx_len,) int64 flat cache rows; None when there is no cached prefix
    mask: torch.Tensor | None  # (q_len, ctx_len) bool, True = attend; None when causal on the new tokens only


class PagedAttention:
    """Per-step attention metadata + the per-layer ``forward``. Build with :meth:`build`."""

    def __init__(self, cache: KVCache, slot_mapping: torch.Tensor, num_decode: int, decode_blocks: torch.Tensor | None,
                 decode_mask: torch.Tensor | None, prefills: list[PrefillChunk],
                 logits_indices: torch.Tensor | None) -> None:
        self.cache = cache
        self.slot_mapping = slot_mapping  # (T,) int64
        self.num_decode = num_decode
        self.decode_blocks = decode_blocks  # (n * max_blocks,) int64 block ids, padded with block 0
        self.decode_mask = decode_mask  # (n, 1, 1, max_blocks * block_size) bool
        self.prefills = prefills
        self.logits_indices = logits_indices  # (num_sampled,) int64 rows that reach the LM head
        self._block_view = (cache.num_blocks, cache.block_size, cache.num_kv_heads, cache.head_dim)

    @classmethod
    def build(cls, cache: KVCache, chunks: list[tuple[list[int], int, int]], logits_indices: list[int] | None,
              device: torch.device | str = "cpu") -> "PagedAttention":
        """``chunks``: per scheduled sequence ``(block_table, num_computed, num_new)`` in row order,
        all single-token chunks first. ``logits_indices``: rows to keep for the LM head."""
        bs = cache.block_size
        slots: list[int] = []
        num_decode = 0
        for block_table, start, n in chunks:
            if n != 1:
                break
            num_decode += 1
        for block_table, start, n in chunks:
            for p in range(start, start + n):
                slots.append(block_table[p // bs] * bs + p % bs)
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
        decode_blocks = decode_mask = None
        if num_decode:
            ctx_lens = [start + 1 for _, start, _ in chunks[:num_decode]]
            max_blocks = -(-max(ctx_lens) // bs)
            padded = []
            for block_table, start, _ in chunks[:num_decode]:
                nb = -(-(start + 1) // bs)
                padded.extend(block_table[:nb])
                padded.extend([0] * (max_blocks - nb))
            decode_blocks = torch.tensor(padded, dtype=torch.int64, device=device)
            lens = torch.tensor(ctx_lens, dtype=torch.int64, device=device)
            decode_mask = (torch.arange(max_blocks * bs, device=device)[None, :] < lens[:, None]).view(
                num_decode, 1, 1, max_blocks * bs)
        prefills: list[PrefillChunk] = []
        row = num_decode
        for block_table, start, n in chunks[num_decode:]:
            ctx_len = start + n
            if start == 0:
                prefills.append(PrefillChunk(row, n, ctx_len, None, None))
            else:
                pos = torch.arange(ctx_len, dtype=torch.int64)
                bt = torch.tensor(block_table, dtype=torch.int64)
                ctx_rows = (bt[pos // bs] * bs + pos % bs).to(device)
                qpos = torch.arange(start, ctx_len, device=device)
                mask = torch.arange(ctx_len, device=device)[None, :] <= qpos[:, None]  # (n, ctx_len)
                prefills.append(PrefillChunk(row, n, ctx_len, ctx_rows, mask))
            row += n
        assert row == len(slots)
        li = None if logits_indices is None else torch.tensor(logits_indices, dtype=torch.int64, device=device)
        return cls(cache, slot_mapping, num_decode, decode_blocks, decode_mask, prefills, li)

    def forward(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (T, H, D), k/v (T, KVH, D) after RoPE -> (T, H, D). Writes k/v into the cache first."""
        k_cache = self.cache.k[layer_idx]  # (num_blocks * bs, KVH, D)
        v_cache = self.cache.v[layer_idx]
        k_cache.index_copy_(0, self.slot_mapping, k)
        v_cache.index_copy_(0, self.slot_mapping, v)
        T, H, D = q.shape
        KVH = k.shape[1]
        nd = self.num_decode
        dec_out = None
        if nd:
            L = self.decode_mask.shape[-1]
            kd = k_cache.view(self._block_view).index_select(0, self.decode_blocks).view(nd, L, KVH, D).transpose(1, 2)
            vd = v_cache.view(self._block_view).index_select(0, self.decode_blocks).view(nd, L, KVH, D).transpose(1, 2)
            qd = q[:nd].view(nd, KVH, H // KVH, D)  # (n, KVH, G, D): G query heads share one KV head
            dec_out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=self.decode_mask).reshape(nd, H, D)
            if not self.prefills:
                return dec_out
        out = torch.empty_like(q)
        if nd:
            out[:nd] = dec_out
        for c in self.prefills:
            qp = q[c.q_start:c.q_start + c.q_len].transpose(0, 1).unsqueeze(0)  # (1, H, q, D)
            if c.ctx_rows is None:
                kp = k[c.q_start:c.q_start + c.q_len]
                vp = v[c.q_start:c.q_start + c.q_len]
            else:
                kp = k_cache.index_select(0, c.ctx_rows)  # (L, KVH, D)
                vp = v_cache.index_select(0, c.ctx_rows)
            kp = kp.transpose(0, 1).unsqueeze(0)  # (1, KVH, L, D)
            vp = vp.transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=c.mask, is_causal=c.mask is None,
                                               enable_gqa=True)  # (1, H, q, D)
            out[c.q_start:c.q_start + c.q_len] = o[0].transpose(0, 1)
        return out
