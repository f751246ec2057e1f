"""LayerNorm that runs apex's fused kernel on CUDA when apex and its CUDA extension import."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .detect import apex_layer_norm, on_accelerator


def fused_layer_norm(x: torch.Tensor):
    """apex's fused LayerNorm when it runs on `x`, else None (F.layer_norm). Under torch.compile always None:
    inductor fuses F.layer_norm with its neighbours, and an opaque extension call would break the graph."""
    if torch.compiler.is_compiling():
        return None
    fused = apex_layer_norm()
    return fused if fused is not None and on_accelerator(x) else None


class LayerNorm(torch.nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_layer_norm(x)
        if fused is not None:
            return fused(input=x, weight=self.weight, bias=self.bias,
                         normalized_shape=self.normalized_shape, eps=self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
