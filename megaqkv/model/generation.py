"""KV-cached generation: one prefill of the (left-padded) prompts, then one token per step per sequence."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..parallel.layers import gather_vocab
from .gpt import GPT
from .kv_cache import KVCache


# Sampling field -> (valid, what it must be); checked by Sampling and by generate.py's flags.
LIMITS = {
    "max_new_tokens": (lambda v: v >= 0, "a non-negative integer"),
    "temperature": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0: greedy)"),
    "top_k": (lambda v: v >= 0, "a non-negative integer (0: no top-k filter)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1: no nucleus filter)"),
}


@dataclass
class Sampling:
    """Decoding controls; out-of-range values are refused here, since sampling would otherwise quietly treat
    them as greedy or as no filter."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    stop_tokens: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        for name, (ok, what) in LIMITS.items():
            if not ok(getattr(self, name)):
                raise ValueError(f"Sampling.{name} must be {what}, got {getattr(self, name)!r}")


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt, without the stop token
    cache_bytes: int
    cache_bytes_per_token: float
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    stopped: list[bool] = field(default_factory=list)


def sample_next(logits: torch.Tensor, s: Sampling, generator: torch.Generator) -> torch.Tensor:
    """[batch, vocab] logits -> [batch] token ids (greedy at temperature 0)."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix reaching top_p (at least one)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], s: Sampling, cache_dtype: torch.dtype | None = None,
             vocab_size: int | None = None) -> Generation:
    """Batched generation from prompts of different lengths. Under tensor parallelism every rank runs it with
    the same seed; each caches its own heads and they agree on every sampled token.

    `vocab_size` is the tokenizer's: the model's embedding rows past it are padding and are never sampled.
    Each step computes logits for the last position only and synchronises with the host once (to stop
    when every sequence is done).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    cfg = model.cfg
    vocab = cfg.vocab_size if vocab_size is None else vocab_size
    if not 0 < vocab <= cfg.vocab_size:
        raise ValueError(f"the tokenizer's vocabulary of {vocab} does not fit the model's {cfg.vocab_size} "
                         "embedding rows; use the tokenizer the model was trained with (--tokenizer)")
    if max(max(p) for p in prompts) >= vocab:
        raise ValueError(f"prompt token id {max(max(p) for p in prompts)} is outside the vocabulary of {vocab}; "
                         "use the tokenizer the model was trained with (--tokenizer)")
    device = model.wte.weight.device
    longest = max(len(p) for p in prompts)
    if longest + s.max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt of {longest} tokens + {s.max_new_tokens} new ones exceeds the model's "
                         f"{cfg.max_position_embeddings} positions")
    batch = len(prompts)
    tokens = torch.zeros(batch, longest, dtype=torch.long)
    valid = torch.zeros(batch, longest, dtype=torch.bool)
    for i, p in enumerate(prompts):  # left padding: every sequence's next token lands in the same slot
        tokens[i, longest - len(p):] = torch.tensor(p)
        valid[i, longest - len(p):] = True
    tokens, valid = tokens.to(device), valid.to(device)
    cache = KVCache(cfg, batch, longest + s.max_new_tokens, cache_dtype or model.wte.weight.dtype, device,
                    model.wte.tp)
    generator = torch.Generator(device).manual_seed(s.seed)
    stop = torch.tensor(list(s.stop_tokens) or [-1], device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    new = torch.full((batch, s.max_new_tokens), -1, dtype=torch.long, device=device)  # -1: not generated
    started = time.perf_counter()
    logits = model(tokens, cache=cache, valid=valid, last_only=True).logits[:, -1]
    _synchronize(device)
    prefill = time.perf_counter() - started
    steps = 0
    for step in range(s.max_new_tokens):
        nxt = sample_next(gather_vocab(logits, model.head)[:, :vocab], s, generator)
        done = done | torch.isin(nxt, stop)
        new[:, step] = nxt.masked_fill(done, -1)
        if step == s.max_new_tokens - 1 or bool(done.all()):  # the step's one host synchronisation
            break
        logits = model(nxt[:, None], cache=cache, valid=~done[:, None], last_only=True).logits[:, -1]
        steps += 1
    rows = new.tolist()
    out = [[t for t in row if t >= 0] for row in rows]
    return Generation(out, cache.nbytes, cache.bytes_per_token(), prefill, time.perf_counter() - started - prefill,
                      steps, done.tolist())
