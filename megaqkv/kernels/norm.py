"""LayerNorm that runs apex's fused kernel on CUDA when apex is importable."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .detect import apex_layer_norm, on_accelerator


class LayerNorm(torch.nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = apex_layer_norm()
        if fused is not None and on_accelerator(x):
            return fused(input=x, weight=self.weight, bias=self.bias,
                         normalized_shape=self.normalized_shape, eps=self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
