"""Forward multiply-accumulates of the model's parts, one formula for everything that counts them: the
analysis tables and MFU (`megaqkv.analysis`) and the pipeline's stage balance (`model.pipeline`).

Conventions (the analysis module's docstring says which paper table each matches):

* paper: per layer p·T·H² + 2·T²·H + T·H² + 2·T·H·FFN with p the number of distinct projections and the
  full T×T score matrix;
* exact: the fused projection by its real rows (GQA/MQA-aware), scores and attention-times-V over the
  causal triangle T(T+1)/2 only, output projection and MLP; biases, LayerNorm and softmax excluded.

The LM head is T·H·V in both.
"""
from __future__ import annotations

from .config import ModelConfig
from .variants import AttentionLayout

CONVENTIONS = ("paper", "exact")


def block_macs(cfg: ModelConfig, seq_len: int, convention: str = "exact") -> int:
    """One transformer block's forward over one sequence of `seq_len` tokens."""
    t, h = seq_len, cfg.hidden_size
    layout = AttentionLayout.of(cfg)
    if convention == "paper":
        projections, core = layout.num_projections * t * h * h, 2 * t * t * h
    elif convention == "exact":
        projections, core = t * h * layout.rows, h * t * (t + 1)  # q·k and p·v over the causal triangle
    else:
        raise ValueError(f"unknown convention {convention!r}; use one of {CONVENTIONS}")
    return projections + core + t * h * h + 2 * t * h * cfg.ffn_hidden_size


def head_macs(cfg: ModelConfig, seq_len: int) -> int:
    """The LM head's logits over one sequence (the loss's softmax is not counted)."""
    return seq_len * cfg.hidden_size * cfg.vocab_size
