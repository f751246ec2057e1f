"""The model as DeepSpeed pipeline layer specs: tied token embedding, position embedding, blocks, final
LayerNorm, head. Built for any PP (including 1) from the same layer classes as the plain GPT."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..config import ModelConfig
from ..parallel.grid import ProcessGrid, TPGroup
from ..parallel.layers import VocabParallelEmbedding, vocab_parallel_cross_entropy, vocab_partition
from ..parallel.sharding import init_parameters
from .gpt import Block, PositionEmbedding, masked_mean
from ..kernels.norm import LayerNorm


class LMHead(VocabParallelEmbedding):
    """An untied output head as a pipeline layer: hidden -> this rank's logit slice."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits(hidden)


def tied_logits(embedding: VocabParallelEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    return embedding.logits(hidden)


class PipelineLoss:
    """Loss of the last stage: labels arrive as a tensor or as (labels, loss_mask).

    `sums=True` returns [sum of token losses, token count] instead of the mean, so that evaluation can
    weight every token equally across micro-batches and ranks.
    """

    def __init__(self, vocab_size: int, tp: TPGroup, sums: bool = False):
        self.vocab_start, self.tp, self.sums = vocab_partition(vocab_size, tp)[0], tp, sums
        self.__name__ = "vocab_parallel_cross_entropy"

    def __call__(self, logits: torch.Tensor, labels) -> torch.Tensor:
        labels, loss_mask = labels if isinstance(labels, (tuple, list)) else (labels, None)
        losses = vocab_parallel_cross_entropy(logits, labels, self.vocab_start, self.tp)
        if not self.sums:
            return masked_mean(losses, loss_mask)
        mask = torch.ones_like(losses) if loss_mask is None else loss_mask.to(losses.dtype)
        return torch.stack([(losses * mask).sum(), mask.sum()])


def layer_specs(cfg: ModelConfig, tp: TPGroup, checkpointed: bool = False) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    embed_args = (cfg.vocab_size, cfg.hidden_size, tp)
    if cfg.tie_embeddings:
        first = TiedLayerSpec("wte", VocabParallelEmbedding, *embed_args, tied_weight_attr="weight")
        last = TiedLayerSpec("wte", VocabParallelEmbedding, *embed_args, forward_fn=tied_logits,
                             tied_weight_attr="weight")
    else:
        first, last = LayerSpec(VocabParallelEmbedding, *embed_args), LayerSpec(LMHead, *embed_args)
    return ([first, LayerSpec(PositionEmbedding, cfg)]
            + [LayerSpec(Block, cfg, tp, checkpointed) for _ in range(cfg.num_layers)]
            + [LayerSpec(LayerNorm, cfg.hidden_size, eps=cfg.layernorm_eps), last])


def plain_name(pipe_name: str, cfg: ModelConfig) -> str:
    """Pipeline parameter name -> the plain GPT's name (`tied_modules.wte.weight` -> `wte.weight`, ...)."""
    if pipe_name.startswith("tied_modules.wte."):
        return pipe_name[len("tied_modules."):]
    idx, rest = pipe_name.split(".", 1)
    idx, layers = int(idx), cfg.num_layers
    if idx == 0:
        return "wte." + rest
    if idx == 1:
        return "wpe." + rest
    if idx < 2 + layers:
        return f"layers.{idx - 2}.{rest}"
    return ("ln_f." if idx == 2 + layers else "lm_head.") + rest


def pipe_name(plain: str, cfg: ModelConfig) -> str:
    """Inverse of plain_name."""
    head, rest = plain.split(".", 1)
    if head == "layers":
        idx, rest = rest.split(".", 1)
        return f"{int(idx) + 2}.{rest}"
    if head == "wte":
        return ("tied_modules.wte." if cfg.tie_embeddings else "0.") + rest
    return {"wpe": "1.", "ln_f": f"{cfg.num_layers + 2}.", "lm_head": f"{cfg.num_layers + 3}."}[head] + rest


def named_plain_parameters(module: nn.Module, cfg: ModelConfig) -> Iterator[tuple[str, nn.Parameter]]:
    for name, p in module.named_parameters():
        yield plain_name(name, cfg), p


def build_pipeline(cfg: ModelConfig, grid: ProcessGrid, seed: int = 1234, checkpointed: bool = False):
    """A deepspeed.pipe.PipelineModule for this rank's stage, initialised exactly like GPT(cfg, seed=seed)."""
    from deepspeed.pipe import PipelineModule

    specs = layer_specs(cfg, grid.tp, checkpointed)
    module = PipelineModule(layers=specs, topology=grid.topology, loss_fn=PipelineLoss(cfg.vocab_size, grid.tp),
                            partition_method="type:Block", activation_checkpoint_interval=0)
    init_parameters(named_plain_parameters(module, cfg), cfg, grid.tp, seed)
    return module
