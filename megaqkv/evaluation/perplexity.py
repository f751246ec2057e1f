"""Validation perplexity of a model on an indexed dataset: token-weighted and exact over the chosen tokens.

Packed evaluation streams the documents in order as windows of `seq_length + 1` tokens that
overlap by one, so every token after the first is predicted exactly once (the last window may be
shorter). `paper_compatible` reproduces the paper's procedure — one document per sample, cut to
`seq_length + 1` tokens and padded — and reports the loss both over the document's own tokens and,
as the paper's code did, with the padding positions scored too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data.indexed import IndexedDataset
from ..model import GPT
from ..parallel.grid import comm_device
from ..parallel.layers import gather_vocab


@dataclass
class Result:
    tokens: int
    loss: float

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


def packed_windows(ds: IndexedDataset, docs: tuple[int, int], seq_length: int, max_tokens: int | None
                   ) -> Iterator[np.ndarray]:
    """Consecutive windows of up to seq_length + 1 tokens sharing one token; at most `max_tokens` predicted."""
    buffer: list[np.ndarray] = []
    held, predicted = 0, 0
    budget = max_tokens if max_tokens else float("inf")
    for d in range(*docs):
        buffer.append(np.asarray(ds[d]))
        held += len(buffer[-1])
        while held >= seq_length + 1 and predicted < budget:
            flat = np.concatenate(buffer)
            take = int(min(seq_length, budget - predicted))
            yield flat[:take + 1]
            predicted += take
            buffer, held = [flat[take:]], len(flat) - take
        if predicted >= budget:
            return
    flat = np.concatenate(buffer) if buffer else np.zeros(0, np.int64)
    if len(flat) > 1 and predicted < budget:
        yield flat[:int(min(len(flat), budget - predicted + 1))]


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def _token_losses(model: GPT, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, len] inputs+labels -> per-position loss [batch, len - 1], in fp32, full vocabulary."""
    logits = gather_vocab(model(tokens[:, :-1]).logits, model.head).float()
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(tokens.shape[0], -1)


def _all_reduce(values: list[float]) -> list[float]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(values, dtype=torch.float64, device=comm_device())
        dist.all_reduce(t)
        return t.tolist()
    return values


def _shard(items: list) -> list:
    """This rank's share when several processes evaluate together (data parallel)."""
    if dist.is_available() and dist.is_initialized():
        return items[dist.get_rank()::dist.get_world_size()]
    return items


def packed_perplexity(model: GPT, ds: IndexedDataset, docs: tuple[int, int], seq_length: int, batch_size: int,
                      max_tokens: int | None = None) -> Result:
    ds.check_vocab(model.cfg.vocab_size, "the model")
    device = model.wte.weight.device
    windows = _shard(list(packed_windows(ds, docs, seq_length, max_tokens)))
    total = count = 0.0
    full = [w for w in windows if len(w) == seq_length + 1]
    for group in list(_batches(full, batch_size)) + [[w] for w in windows if len(w) != seq_length + 1]:
        tokens = torch.from_numpy(np.stack(group).astype(np.int64)).to(device)
        losses = _token_losses(model, tokens)
        total += losses.double().sum().item()
        count += losses.numel()
    total, count = _all_reduce([total, count])
    return Result(int(count), total / max(count, 1))


def paper_perplexity(model: GPT, ds: IndexedDataset, docs: tuple[int, int], seq_length: int, batch_size: int,
                     pad_id: int, max_documents: int | None = None) -> tuple[Result, Result, float]:
    """(loss over real tokens, loss with padding scored, fraction of scored positions that are padding)."""
    ds.check_vocab(model.cfg.vocab_size, "the model")
    device = model.wte.weight.device
    ids = list(range(*docs))[:max_documents] if max_documents else list(range(*docs))
    real_sum = real_n = all_sum = all_n = 0.0
    for group in _batches(_shard(ids), batch_size):
        tokens = np.full((len(group), seq_length + 1), pad_id, dtype=np.int64)
        lengths = []
        for row, d in enumerate(group):
            doc = np.asarray(ds[d])[:seq_length + 1]
            tokens[row, :len(doc)] = doc
            lengths.append(len(doc))
        losses = _token_losses(model, torch.from_numpy(tokens).to(device)).double().cpu()
        mask = torch.arange(seq_length)[None, :] < (torch.tensor(lengths)[:, None] - 1)
        real_sum += losses[mask].sum().item()
        real_n += mask.sum().item()
        all_sum += losses.sum().item()
        all_n += losses.numel()
    real_sum, real_n, all_sum, all_n = _all_reduce([real_sum, real_n, all_sum, all_n])
    return (Result(int(real_n), real_sum / max(real_n, 1)), Result(int(all_n), all_sum / max(all_n, 1)),
            1 - real_n / max(all_n, 1))
