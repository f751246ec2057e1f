"""The model as DeepSpeed pipeline layer specs: tied token embedding, position embedding, blocks, final
LayerNorm, head. Built for any PP (including 1) from the same layer classes as the plain GPT."""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..config import ModelConfig
from ..flops import block_macs, head_macs
from ..parallel.grid import NO_SP, ProcessGrid, SPGroup, TPGroup
from ..parallel.layers import VocabParallelEmbedding
from ..parallel.sharding import init_parameters
from .gpt import Block, PositionEmbedding, head_loss, token_weights
from ..kernels.norm import LayerNorm


class LMHead(VocabParallelEmbedding):
    """An untied output head as a pipeline layer (see `head_inputs`)."""

    def forward(self, hidden: torch.Tensor):
        return head_inputs(self, hidden)


def head_inputs(head: VocabParallelEmbedding, hidden: torch.Tensor):
    """The last layer hands the loss the final hidden states, the head's weight and the head (its vocabulary
    slice): the fused loss computes the logits block by block (`kernels.cross_entropy`), so no layer ever
    returns [tokens, vocab] logits.

    The weight leaves as a tensor output (an alias), not only inside the module: DeepSpeed runs its backward
    prologue from hooks on a layer's outputs, and the bf16 optimizer's prologue zeroes the gradients. A weight
    reached only from outside the outputs would take the loss's gradient before that prologue and lose it: at
    PP=2 in bf16 the LM head's gradient vanished (gradient norm 5.6% low; bench/gpu_check.sh found it)."""
    return hidden, head.weight.view_as(head.weight), head


class PipelineLoss:
    """Loss of the last stage, from (hidden, head weight, head); labels arrive as a tensor or as (labels, loss_mask).

    `sums=True` returns [sum of token losses, token count] instead of the mean, so that evaluation can
    weight every token equally across micro-batches and ranks.
    """

    def __init__(self, sums: bool = False, sp: SPGroup = NO_SP):
        self.sums, self.sp = sums, sp
        self.__name__ = "fused vocab-parallel linear cross-entropy"

    def __call__(self, outputs, labels) -> torch.Tensor:
        hidden, weight, head = outputs
        labels, loss_mask = labels if isinstance(labels, (tuple, list)) else (labels, None)
        weights = token_weights(labels, loss_mask, mean=not self.sums, sp=self.sp)
        loss = head_loss(head, hidden, labels, weights, weight)
        return torch.stack([loss, weights.sum()]) if self.sums else loss


def layer_specs(cfg: ModelConfig, tp: TPGroup, checkpointed: bool = False, compiled: bool = False,
                sp: SPGroup = NO_SP) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    embed_args = (cfg.vocab_size, cfg.hidden_size, tp)
    if cfg.tie_embeddings:
        first = TiedLayerSpec("wte", VocabParallelEmbedding, *embed_args, tied_weight_attr="weight")
        last = TiedLayerSpec("wte", VocabParallelEmbedding, *embed_args, forward_fn=head_inputs,
                             tied_weight_attr="weight")
    else:
        first, last = LayerSpec(VocabParallelEmbedding, *embed_args), LayerSpec(LMHead, *embed_args)
    return ([first, LayerSpec(PositionEmbedding, cfg, sp)]
            + [LayerSpec(Block, cfg, tp, checkpointed, compiled, sp) for _ in range(cfg.num_layers)]
            + [LayerSpec(LayerNorm, cfg.hidden_size, eps=cfg.layernorm_eps), last])


def layer_costs(cfg: ModelConfig, seq_length: int, checkpointed: bool = False) -> list[int]:
    """Estimated training MACs per sequence of each layer spec: 3× forward (backward is 2×), a checkpointed
    block 4× (its forward runs again in backward); the head with its fused loss is one more costly layer
    (at vocab 50,304 and hidden 1,024 about 3.5 blocks). Embeddings and LayerNorm are lookups and
    elementwise work, counted as nothing."""
    block = (4 if checkpointed else 3) * block_macs(cfg, seq_length)
    return [0, 0] + [block] * cfg.num_layers + [0, 3 * head_macs(cfg, seq_length)]


def stage_bounds(costs: list[int], num_layers: int, stages: int) -> list[int]:
    """Layer-spec index where each stage starts, and the end: stages of equal estimated compute (`layer_costs`)
    that each hold at least one block. The embeddings go with the first block and the final LayerNorm and head
    with the last, so no stage is the head alone: such a stage does no useful work, and its only parameter, the
    tied embedding, is counted on the first stage, which left DeepSpeed's bf16 optimizer no gradient to take a
    norm of. DeepSpeed's own balancer (`partition_balanced`) splits the blocks."""
    from deepspeed.runtime.utils import partition_balanced

    blocks = costs[2:2 + num_layers]
    blocks[0] += sum(costs[:2])
    blocks[-1] += sum(costs[2 + num_layers:])
    parts = [int(p) for p in partition_balanced(weights=blocks, num_parts=stages)]
    if any(hi <= lo for lo, hi in zip(parts, parts[1:])):  # the balancer left a stage empty: equal block counts
        parts = [num_layers * i // stages for i in range(stages + 1)]
    return [0] + [2 + p for p in parts[1:-1]] + [len(costs)]


class CostBalancedPipeline:
    """Mixin for deepspeed.pipe.PipelineModule: `partition_method="cost"` splits the layers by `stage_bounds`,
    so that stages carry equal estimated compute, not equal block counts: the last stage also runs the LM head
    and loss, so it gets fewer blocks."""

    def _partition_layers(self, method="uniform"):
        if method != "cost":
            return super()._partition_layers(method)
        self.parts = stage_bounds(self.costs, self.num_blocks, self.num_stages)
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])


def stage_summary(module, cfg: ModelConfig) -> str:
    """One line per pipeline stage: its layers, and its share of the parameters (a tied embedding counts
    on both stages that hold it) and of the estimated compute."""
    specs, parts, costs = module._layer_specs, module.parts, module.costs
    with torch.device("meta"):
        params = [sum(p.numel() for p in spec.build().parameters()) for spec in specs]
    total_params = sum(params) - (params[-1] if cfg.tie_embeddings else 0)
    lines = ["pipeline stages (balanced by estimated compute: blocks, LM head and loss):"]
    for stage in range(len(parts) - 1):
        lo, hi = parts[stage], parts[stage + 1]
        blocks = sum(1 for i in range(lo, hi) if 2 <= i < 2 + cfg.num_layers)
        extra = [name for i, name in ((0, "embeddings"), (len(specs) - 1, "LM head + loss")) if lo <= i < hi]
        lines.append(f"  stage {stage}: {blocks} blocks{''.join(' + ' + e for e in extra)} | "
                     f"{100 * sum(params[lo:hi]) / total_params:.1f}% of parameters, "
                     f"{100 * sum(costs[lo:hi]) / sum(costs):.1f}% of compute")
    return "\n".join(lines)


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


def build_pipeline(cfg: ModelConfig, grid: ProcessGrid, seed: int = 1234, checkpointed: bool = False,
                   compiled: bool = False, seq_length: int | None = None):
    """A deepspeed.pipe.PipelineModule for this rank's stage, initialised exactly like GPT(cfg, seed=seed);
    stages are balanced by `layer_costs` at `seq_length` (default: max_position_embeddings)."""
    from deepspeed.pipe import PipelineModule

    class Pipeline(CostBalancedPipeline, PipelineModule):
        costs = layer_costs(cfg, seq_length or cfg.max_position_embeddings, checkpointed)
        num_blocks = cfg.num_layers

    module = Pipeline(layers=layer_specs(cfg, grid.tp, checkpointed, compiled, grid.sp), topology=grid.topology,
                      loss_fn=PipelineLoss(sp=grid.sp), partition_method="cost", activation_checkpoint_interval=0)
    init_parameters(named_plain_parameters(module, cfg), cfg, grid.tp, seed)
    return module
