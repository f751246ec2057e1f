"""GPT-2 architecture (DESIGN §1) built from layers that a pipeline can also stack one by one."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import Attention
from .kernels import LayerNorm


class Embedding(nn.Module):
    """Token plus learned absolute position embedding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.embedding_dropout)
        self.max_positions = cfg.max_position_embeddings

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        if seq > self.max_positions:
            raise ValueError(f"sequence length {seq} exceeds max_position_embeddings={self.max_positions}")
        positions = torch.arange(seq, device=tokens.device)
        return self.dropout(self.wte(tokens) + self.wpe(positions))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc_in = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=cfg.bias)
        self.fc_out = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))  # exact (erf) GELU, as GPT-2 trained with


class Block(nn.Module):
    """Pre-LayerNorm transformer block; residual dropout after attention and after the MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln_1(x)))
        return x + self.dropout(self.mlp(self.ln_2(x)))


def init_weights(module: nn.Module, std: float) -> None:
    """N(0, std) for every Linear and Embedding weight, zero biases, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32, shaped like `labels`."""
    flat = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="none")
    return flat.view_as(labels)


def masked_mean(losses: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Token-weighted mean: masked positions (padding) count neither in the sum nor the count."""
    if loss_mask is None:
        return losses.mean()
    mask = loss_mask.to(losses.dtype)
    return (losses * mask).sum() / mask.sum().clamp(min=1.0)


class GPTOutput(NamedTuple):
    logits: torch.Tensor
    loss: torch.Tensor | None


class GPT(nn.Module):
    """The plain (single-device) model used for evaluation, generation and as the TP=1 reference."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std)

    def head_weight(self) -> torch.Tensor:
        return self.embed.wte.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None) -> GPTOutput:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        logits = F.linear(self.ln_f(x), self.head_weight())
        loss = None if labels is None else masked_mean(token_losses(logits, labels), loss_mask)
        return GPTOutput(logits, loss)
