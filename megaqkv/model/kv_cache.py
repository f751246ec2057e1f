"""Preallocated KV cache for prefill + incremental decoding, holding exactly what the variant attends with.

Per layer one buffer [batch, kv_heads, max_len, head_dim] for keys and one for values — or a
single buffer when key and value are one projection (K=V: Q–K=V, Q=K=V, Q-GQA, Q-MQA), which
the attention then passes as both (and reads once). `kv_heads` is this tensor-parallel rank's share: num_kv_heads
/ TP, or the one group its query heads read when there are fewer KV heads than ranks. Prompts
of different lengths are left-padded; `valid` marks real tokens, and positions count only them.
"""
from __future__ import annotations

import torch

from ..config import ModelConfig
from ..kernels.attention import LeftPadding
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
        self.padding = None  # the prompts' left padding (LeftPadding), when some prompt has any
        self.real = torch.zeros(batch, dtype=torch.long, device=device)  # real tokens cached per sequence

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values (a shared K=V buffer counted once)."""
        buffers = {id(t): t for t in self.keys + self.values}
        return sum(t.numel() * t.element_size() for t in buffers.values())

    def bytes_per_token(self) -> float:
        return self.nbytes / (self.batch * self.max_len)

    def begin(self, valid: torch.Tensor) -> torch.Tensor:
        """Register the next `valid.shape[1]` tokens; returns their positions (counting real tokens only).
        The first call is the prompt: its padding must come first (left padding)."""
        start, n = self.length, valid.shape[1]
        if start + n > self.max_len:
            raise ValueError(f"KV cache full: {start} + {n} tokens exceed its {self.max_len} slots")
        if start == 0:
            host = valid.cpu()  # the prefill's one synchronisation
            if bool((host[:, :-1] & ~host[:, 1:]).any()):
                raise ValueError("prompt padding must be on the left: a real token is followed by padding")
            starts = n - host.sum(1)
            self.padding = LeftPadding(starts.to(valid.device)) if bool(starts.any()) else None  # None: causal
        self.valid[:, start:start + n] = valid
        positions = (self.real[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)
        self.real = self.real + valid.sum(1)
        return positions

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values ([batch, n, kv_heads, d]) into their slots; return the layer's whole
        buffers (the same tensor twice for K=V), valid up to the slots written."""
        start, stop = self.length, self.length + k.shape[1]
        self.keys[layer][:, :, start:stop] = k.transpose(1, 2)
        if self.values is not self.keys:
            self.values[layer][:, :, start:stop] = v.transpose(1, 2)
        return self.keys[layer], self.values[layer]

    def advance(self, n: int) -> None:
        self.length += n
