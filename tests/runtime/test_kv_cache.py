"""Block manager accounting and paged attention against plain causal attention over whole sequences."""
from __future__ import annotations

import math

import pytest
import torch

from scaleswap.runtime.attention import PagedAttention
from scaleswap.runtime.config import EngineConfig, ModelConfig, SamplingParams
from scaleswap.runtime.kv_cache import BlockManager, KVCache, kv_bytes_per_block, num_blocks_for
from scaleswap.runtime.sequence import Sequence


def _seq(n_prompt: int, rid: str = "r") -> Sequence:
    return Sequence(rid, list(range(1, n_prompt + 1)), SamplingParams(), None, None, [], lambda o: None, 0)


def _tiny_config(layers: int = 2, heads: int = 6, kv_heads: int = 2, head_dim: int = 8) -> ModelConfig:
    return ModelConfig(vocab_size=50, hidden_size=heads * head_dim, intermediate_size=16, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256)


def test_block_manager_grow_and_free():
    bm = BlockManager(num_blocks=5, block_size=4)
    a, b = _seq(3, "a"), _seq(9, "b")
    assert bm.num_new_blocks(a, 3) == 1 and bm.num_new_blocks(b, 9) == 3
    bm.grow(a, 3)
    bm.grow(b, 9)
    assert bm.num_used_blocks == 4 and bm.num_free_blocks == 1
    assert len(set(a.block_table) | set(b.block_table)) == 4  # no block shared
    assert bm.can_grow(a, 8) and not bm.can_grow(a, 9)
    bm.grow(a, 4)  # still one block: no new block
    assert bm.num_free_blocks == 1
    bm.free(b)
    assert b.block_table == [] and bm.num_free_blocks == 4
    bm.free(a)
    assert bm.num_free_blocks == 5


def test_num_blocks_from_budget():
    cfg = _tiny_config()
    per_block = kv_bytes_per_block(cfg, 16)
    assert per_block == 2 * 2 * 16 * 2 * 8 * 4
    assert num_blocks_for(EngineConfig(kv_cache_memory_bytes=10 * per_block + 7), cfg) == 10
    assert num_blocks_for(EngineConfig(num_kv_blocks=3), cfg) == 3
    with pytest.raises(ValueError, match="below one block"):
        num_blocks_for(EngineConfig(kv_cache_memory_bytes=per_block - 1), cfg)


def _reference(q, k, v):
    """q (T, H, D), k/v (T, KVH, D) of ONE sequence, causal -> (T, H, D), GQA by repeating heads."""
    T, H, D = q.shape
    rep = H // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    s = torch.einsum("thd,shd->hts", q.double(), k.double()) / math.sqrt(D)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hts,shd->thd", s.softmax(-1), v.double()).float()


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("lens", [[5, 1, 13], [17, 3], [2]])
def test_paged_attention_matches_reference_over_chunks(block_size, lens):
    """Prefill in two chunks (second one with a cached prefix), then 3 decode steps, all sequences batched."""
    torch.manual_seed(0)
    cfg = _tiny_config()
    H, KVH, D = 6, 2, 8
    cache = KVCache(cfg, num_blocks=40, block_size=block_size)
    bm = BlockManager(40, block_size)
    total = [n + 3 for n in lens]
    full = [(torch.randn(t, H, D), torch.randn(t, KVH, D), torch.randn(t, KVH, D)) for t in total]
    seqs = [_seq(t, f"s{i}") for i, t in enumerate(total)]
    # schedule: chunk 1 = first half of the prompt, chunk 2 = rest, then 3 single tokens
    plan = []
    for n in lens:
        first = max(1, n // 2)
        plan.append([first, n - first, 1, 1, 1])
    computed = [0] * len(seqs)
    outs = [torch.zeros(t, H, D) for t in total]
    for step in range(5):
        chunks = []
        order = sorted(range(len(seqs)), key=lambda i: plan[i][step] != 1)  # single-token chunks first
        order = [i for i in order if plan[i][step] > 0]
        rows = []
        for i in order:
            n = plan[i][step]
            bm.grow(seqs[i], computed[i] + n)
            chunks.append((seqs[i].block_table, computed[i], n))
            rows.append((i, computed[i], n))
        attn = PagedAttention.build(cache, chunks, None)
        for layer in range(2):
            q = torch.cat([full[i][0][s:s + n] for i, s, n in rows])
            k = torch.cat([full[i][1][s:s + n] * (layer + 1) for i, s, n in rows])
            v = torch.cat([full[i][2][s:s + n] for i, s, n in rows])
            o = attn.forward(layer, q, k, v)
            if layer == 1:
                r = 0
                for i, s, n in rows:
                    outs[i][s:s + n] = o[r:r + n]
                    r += n
        for i, s, n in rows:
            computed[i] += n
    for i in range(len(seqs)):
        q, k, v = full[i]
        torch.testing.assert_close(outs[i], _reference(q, k * 2, v), atol=2e-5, rtol=1e-4)
