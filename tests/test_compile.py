"""`model.compile`: blocks under torch.compile (inductor on CPU, fp32) give the eager numbers: loss and every
gradient, with activation checkpointing too, and one compiled graph serves every block."""
import dataclasses

import torch

from conftest import REPO
from megaqkv.config import load_model_config
from megaqkv.model import GPT


def run(cfg, compiled: bool, checkpointed: bool = False, seed: int = 3):
    torch.manual_seed(seed)
    model = GPT(cfg, seed=seed, compiled=compiled, checkpointed=checkpointed)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    out = model(tokens, labels=tokens)
    out.loss.backward()
    return out.loss.item(), {n: p.grad for n, p in model.named_parameters()}


def diff(a, b) -> float:
    return max(abs(a[0] - b[0]), max((a[1][n] - b[1][n]).abs().max().item() for n in a[1]))


def test_compiled_blocks_equal_eager_and_survive_checkpointing():
    import torch._dynamo.utils

    cfg = dataclasses.replace(load_model_config(REPO / "model_configs" / "tiny_kv.yaml"), hidden_dropout=0.0)
    eager = run(cfg, compiled=False)
    torch._dynamo.utils.counters.clear()
    compiled = run(cfg, compiled=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    checkpointed = run(cfg, compiled=True, checkpointed=True)
    print(f"compiled vs eager {diff(eager, compiled):.1e}, checkpointed {diff(eager, checkpointed):.1e}, "
          f"{graphs} graphs for {cfg.num_layers} blocks")
    assert max(g.abs().max().item() for g in eager[1].values()) > 1e-2
    assert diff(eager, compiled) <= 1e-5 and diff(eager, checkpointed) <= 1e-5
    # with dropout, recomputation in backward replays the compiled graph's masks
    dropped = dataclasses.replace(cfg, hidden_dropout=0.1)
    assert diff(run(dropped, compiled=True), run(dropped, compiled=True, checkpointed=True)) <= 1e-5
