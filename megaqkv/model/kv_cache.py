"""Preallocated KV cache for prefill + incremental decoding, holding exactly what the variant attends with.

Per layer one buffer [batch, kv_heads, max_len, head_dim] for keys and one for values — or a
single buffer when key and value are one projection (K=V: Q–K=V, Q=K=V, Q-GQA, Q-MQA), which
the attention then passes as both. `kv_heads` is this tensor-parallel rank's share: num_kv_heads
/ TP, or the one group its query heads read when there are fewer KV heads than ranks. Prompts
of different lengths are left-padded; `valid` marks real tokens, and positions count only them.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..parallel.grid import SINGLE, TPGroup
from ..variants import AttentionLayout


class KVCache:
    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", tp: TPGroup = SINGLE):
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"cache length {max_len} exceeds max_position_embeddings={cfg.max_position_embeddings}")
        layout = AttentionLayout.of(cfg)
        g = layout.num_kv_heads
        heads = g // tp.size if g % tp.size == 0 else 1
        shape = (batch, heads, max_len, cfg.head_dim)  # heads-major: a slice of the first n slots is matmul-ready
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.values = self.keys if layout.kv_shared else [torch.empty(shape, dtype=dtype, device=device)
                                                          for _ in range(cfg.num_layers)]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.batch, self.max_len, self.length = batch, max_len, 0

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (a shared K=V buffer counted once)."""
        buffers = {id(t): t for t in self.keys + self.values}
        return sum(t.numel() * t.element_size() for t in buffers.values())

    def bytes_per_token(self) -> float:
        return self.nbytes / (self.batch * self.max_len)

    def begin(self, valid: torch.Tensor) -> torch.Tensor:
        """Register the next `valid.shape[1]` tokens; returns their positions (counting real tokens only)."""
        start, n = self.length, valid.shape[1]
        if start + n > self.max_len:
            raise ValueError(f"KV cache full: {start} + {n} tokens exceed its {self.max_len} slots")
        self.valid[:, start:start + n] = valid
        return (self.valid[:, :start + n].long().cumsum(1)[:, start:] - 1).clamp(min=0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values ([batch, n, kv_heads, d]) into their slots; return everything cached
        so far as [batch, kv_heads, length, d]."""
        start, stop = self.length, self.length + k.shape[1]
        self.keys[layer][:, :, start:stop] = k.transpose(1, 2)
        keys = self.keys[layer][:, :, :stop]
        if self.values is self.keys:
            return keys, keys
        self.values[layer][:, :, start:stop] = v.transpose(1, 2)
        return keys, self.values[layer][:, :, :stop]

    def attention_mask(self, n: int) -> torch.Tensor:
        """[batch, 1, n, length + n]: a query sees real earlier tokens and itself (padding never attends out)."""
        stop = self.length + n
        slots = torch.arange(stop, device=self.valid.device)
        query = slots[self.length:, None]
        causal = slots[None, :] <= query
        return ((self.valid[:, None, :stop] & causal) | (slots[None, :] == query))[:, None]

    def advance(self, n: int) -> None:
        self.length += n
