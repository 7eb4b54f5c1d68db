"""Paged KV cache: a block manager (free list + per-sequence block tables) and the cache tensors.

Layout (vLLM's PagedAttention, Kwon et al. 2023): per layer one K and one V tensor of shape
``(num_blocks, block_size, num_kv_heads, head_dim)``; a sequence's token at position ``p`` lives in
block ``block_table[p // block_size]`` at offset ``p % block_size``, i.e. at flat row
``block_table[p // block_size] * block_size + p % block_size`` of the ``(num_blocks * block_size, KVH, D)`` view.
Blocks are allocated on demand as a sequence grows and all freed at once when it finishes,
is cancelled or is preempted.
"""
from __future__ import annotations

import torch

from .config import EngineConfig, ModelConfig
from .sequence import Sequence


def kv_bytes_per_block(model_config: ModelConfig, block_size: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one block takes over all layers, K and V."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * model_config.num_hidden_layers * block_size * model_config.num_key_value_heads * model_config.head_dim * elem


def num_blocks_for(engine_config: EngineConfig, model_config: ModelConfig) -> int:
    """Number of KV blocks: explicit ``num_kv_blocks`` or ``kv_cache_memory_bytes // bytes_per_block``."""
    if engine_config.num_kv_blocks is not None:
        return engine_config.num_kv_blocks
    n = engine_config.kv_cache_memory_bytes // kv_bytes_per_block(model_config, engine_config.block_size)
    if n < 1:
        raise ValueError(
            f"kv_cache_memory_bytes={engine_config.kv_cache_memory_bytes} is below one block "
            f"({kv_bytes_per_block(model_config, engine_config.block_size)} bytes); raise it"
        )
    return int(n)


class BlockManager:
    """Free list of KV blocks and the block tables of sequences (block ids are ints in [0, num_blocks))."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks >= 1 and block_size >= 1
        self.num_blocks = num_blocks
        self.block_size = block_size
        # NOTE: a stack, so recently freed (cache-warm) blocks are reused first.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks ``seq`` must gain to hold ``num_tokens`` tokens in total."""
        return max(0, self.blocks_needed(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Extend ``seq.block_table`` to cover ``num_tokens`` tokens. Caller checked ``can_grow``."""
        n = self.num_new_blocks(seq, num_tokens)
        assert n <= len(self._free), f"need {n} blocks, {len(self._free)} free"
        for _ in range(n):
            seq.block_table.append(self._free.pop())

    def free(self, seq: Sequence) -> None:
        """Return all of ``seq``'s blocks to the free list."""
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
        assert len(self._free) <= self.num_blocks, "double free"


class KVCache:
    """The cache tensors: ``k[layer]``, ``v[layer]`` each ``(num_blocks * block_size, KVH, D)`` float32.

    Zero-filled: padded rows of a gathered context are masked out of the softmax, but their V still
    enters ``weights @ V`` with weight 0, and 0 * NaN from uninitialised memory would be NaN.
    """

    def __init__(self, model_config: ModelConfig, num_blocks: int, block_size: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.num_layers = model_config.num_hidden_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = model_config.num_key_value_heads
        self.head_dim = model_config.head_dim
        shape = (num_blocks * block_size, self.num_kv_heads, self.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
