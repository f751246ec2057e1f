"""Distributed equivalence scenarios, run under torchrun by tests/test_parallel.py.

Every scenario compares a parallel layout against the TP=1/PP=1 single-process model computed
in the same process: gradients of the pipeline module (real gloo collectives, gathered back to
canonical tensors), and training through a real DeepSpeed PipelineEngine (ZeRO-1, clipping,
AdamW) against plain torch AdamW + clip_grad_norm_. Rank 0 writes {scenario: measurements}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megaqkv.parallel import SINGLE, ProcessGrid, TPGroup, init_distributed  # noqa: E402  (sets DS_ACCELERATOR first)
from megaqkv.config import Config, ConfigError, ParallelConfig, TrainingConfig, load_model_config  # noqa: E402
from megaqkv.model import GPT  # noqa: E402
from megaqkv.kernels.cross_entropy import linear_cross_entropy  # noqa: E402
from megaqkv.model.pipeline import build_pipeline, named_plain_parameters  # noqa: E402
from megaqkv.parallel.layers import vocab_partition  # noqa: E402
from megaqkv.parallel.sharding import gather_canonical, param_spec  # noqa: E402
from megaqkv.training.engine import build_engine  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "model_configs"
SEED, VOCAB, SEQ = 7, 1000, 16  # vocab 1000 is not a multiple of 128·TP, so padding is exercised
SP_PRESETS = ["qkv", "kv", "gqa4", "qmqa", "k"]


def model_cfg(preset: str, **changes):
    cfg = load_model_config(CONFIGS / f"tiny_{preset}.yaml")
    return dataclasses.replace(cfg, **{"vocab_size": VOCAB, "hidden_dropout": 0.0, **changes})


def batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
    mask = (torch.rand(n, SEQ, generator=g) > 0.2).float()
    return tokens[:, :-1], tokens[:, 1:], mask


def max_over_world(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def max_diff(ours: dict, ref: dict) -> float:
    return max(((ours[k] - ref[k]).abs().max().item() for k in ours), default=0.0)


def replica_drift(module, cfg, grid) -> float:
    """Largest difference between TP ranks' copies of replicated parameters (must stay 0)."""
    drift = 0.0
    for name, p in named_plain_parameters(module, cfg):
        if grid.tp_size > 1 and param_spec(name, cfg, grid.tp_size).dim is None:
            copies = [torch.empty_like(p) for _ in range(grid.tp_size)]
            dist.all_gather(copies, p.detach().contiguous(), group=grid.tp.group)
            drift = max(drift, max((c - copies[0]).abs().max().item() for c in copies))
    return max_over_world(drift)


def positions(t: torch.Tensor, grid: ProcessGrid) -> torch.Tensor:
    """This SP rank's slice of the positions of [batch, seq] `t` (what training/data.collate hands it)."""
    n = t.shape[1] // grid.sp_size
    return t[:, grid.sp_rank * n:(grid.sp_rank + 1) * n]


def sp_mean(t: torch.Tensor, grid: ProcessGrid) -> torch.Tensor:
    """The mean over the SP ranks, which DeepSpeed's average over its data axis takes in training."""
    if grid.sp_size > 1:
        t = t.detach().clone()
        dist.all_reduce(t, group=grid.sp.group)
        t /= grid.sp_size
    return t


def grad_scenario(preset: str, tp: int, pp: int = 1, sp: int = 1) -> dict:
    """Loss and every gathered gradient of the TP (and SP) pipeline module vs the TP=1 model (PP=1 here)."""
    cfg = model_cfg(preset)
    grid = ProcessGrid(tp, pp, sp)
    module = build_pipeline(cfg, grid, seed=SEED)
    tokens, labels, mask = (positions(t, grid) for t in batch(3, seed=11))
    loss = module.loss_fn(module(tokens), (labels, mask))
    loss.backward()
    loss = sp_mean(loss, grid)
    grads = gather_canonical({n: sp_mean(p.grad, grid) for n, p in named_plain_parameters(module, cfg)}, cfg,
                             grid.tp)
    ref = GPT(cfg, seed=SEED)
    ref_loss = ref(*batch(3, seed=11)).loss
    ref_loss.backward()
    ref_grads = gather_canonical({n: p.grad for n, p in ref.named_parameters()}, cfg, SINGLE)
    assert grads.keys() == ref_grads.keys(), sorted(set(grads) ^ set(ref_grads))
    with torch.device("meta"):
        plain = GPT(cfg, tp=TPGroup(size=tp, rank=grid.tp_rank))
    return {"names_match": dict(named_plain_parameters(module, cfg)).keys() == dict(plain.named_parameters()).keys(),"loss_diff": max_over_world(abs(loss.item() - ref_loss.item())),
            "grad_diff": max_over_world(max_diff(grads, ref_grads)),
            "grad_max": max(g.abs().max().item() for g in ref_grads.values())}


def fused_loss_scenario(vocab: int, block: int) -> dict:
    """The fused head + loss with the vocabulary split over TP=2 (vocab 100: rank 1 holds only padding rows)
    in blocks of `block` tokens vs torch's cross-entropy on the whole vocabulary in one process."""
    grid = ProcessGrid(2, 1)
    g = torch.Generator().manual_seed(5)
    hidden, full = torch.randn(23, 8, generator=g), torch.randn(vocab, 8, generator=g)
    labels, weights = torch.randint(0, vocab, (23,), generator=g), torch.rand(23, generator=g)
    start, part, valid = vocab_partition(vocab, grid.tp)
    shard = torch.zeros(part, 8)
    shard[:valid] = full[start:start + valid]
    h, shard = hidden.clone().requires_grad_(), shard.requires_grad_()
    loss = linear_cross_entropy(h, shard, labels, weights, start, valid, grid.tp, block)
    (2 * loss).backward()
    ref_h, ref_w = hidden.clone().requires_grad_(), full.clone().requires_grad_()
    ref = (torch.nn.functional.cross_entropy(ref_h @ ref_w.t(), labels, reduction="none") * weights).sum()
    (2 * ref).backward()
    return {"valid_rows": valid, "loss_diff": max_over_world(abs(loss.item() - ref.item())),
            "grad_diff": max_over_world(max((h.grad - ref_h.grad).abs().max().item(),
                                            (shard.grad[:valid] - ref_w.grad[start:start + valid]).abs().max().item()
                                            if valid else 0.0, shard.grad[valid:].abs().max().item() if valid < part else 0.0)),
            "grad_max": ref_w.grad.abs().max().item()}


_REFERENCE: dict = {}


def reference_training(preset: str, micro: int, steps: int, global_batch: int, lr: float, clip: float, wd: float,
                       tied: bool = True):
    """Single-process TP=1 run: plain torch AdamW + clip_grad_norm_, the global batch in micro-batches."""
    key = (preset, micro, steps, global_batch, lr, clip, wd, tied)
    if key not in _REFERENCE:
        cfg = model_cfg(preset, tie_embeddings=tied)
        model = GPT(cfg, seed=SEED)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
        losses, norms = [], []
        for step in range(steps):
            tokens, labels, mask = batch(global_batch, seed=1000 + step)
            opt.zero_grad()
            total = 0.0
            for start in range(0, global_batch, micro):
                sl = slice(start, start + micro)
                loss = model(tokens[sl], labels[sl], mask[sl]).loss / (global_batch // micro)
                loss.backward()
                total += loss.item()
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
            opt.step()
            losses.append(total)
        params = gather_canonical(dict(model.named_parameters()), cfg, SINGLE)
        _REFERENCE[key] = (losses, norms, {k: v.detach() for k, v in params.items()})
    return _REFERENCE[key]


def run_steps(engine, grid, first: int, last: int, global_batch: int, micro: int) -> tuple[list, list]:
    """Training steps first..last-1 on step-indexed data (a resumed run sees what an uninterrupted one saw)."""
    gas = engine.gradient_accumulation_steps()
    losses, norms = [], []
    for step in range(first, last):
        tokens, labels, mask = (positions(t, grid) for t in batch(global_batch, seed=1000 + step))
        mine = range(grid.dp_rank * gas * micro, (grid.dp_rank + 1) * gas * micro, micro)
        losses.append(engine.train_batch(iter([(tokens[s:s + micro], (labels[s:s + micro], mask[s:s + micro]))
                                               for s in mine])).item())
        norms.append(float(engine.get_global_grad_norm()))
    return losses, norms


def train_scenario(preset: str, tp: int, pp: int, precision: str = "fp32", micro: int = 2, steps: int = 4,
                   global_batch: int = 8, lr: float = 3e-3, clip: float = 1.0, wd: float = 0.1,
                   checkpointing: bool = False, compile: bool = False, sp: int = 1, tied: bool = True) -> dict:
    """Losses, gradient norms and final parameters of a DeepSpeed PipelineEngine run vs the reference."""
    cfg = Config(model=model_cfg(preset, compile=compile, tie_embeddings=tied),
                 parallel=ParallelConfig(tp=tp, pp=pp, sp=sp, activation_checkpointing=checkpointing),
                 training=TrainingConfig(micro_batch_size=micro, global_batch_size=global_batch, seq_length=SEQ,
                                         precision=precision, lr=lr, weight_decay=wd, grad_clip=clip, seed=SEED,
                                         lr_schedule="constant", warmup_steps=0))
    cfg.validate()
    grid = ProcessGrid(tp, pp, sp)
    engine = build_engine(cfg, grid)
    losses, norms = run_steps(engine, grid, 0, steps, global_batch, micro)
    ref_losses, ref_norms, ref_params = reference_training(preset, micro, steps, global_batch, lr, clip, wd, tied)
    params = gather_canonical({n: p.detach().float() for n, p in named_plain_parameters(engine.module, cfg.model)},
                              cfg.model, grid.tp)
    return {"losses": losses, "ref_losses": ref_losses,
            "loss_diff": max_over_world(max(abs(a - b) for a, b in zip(losses, ref_losses))),
            "norm_diff": max_over_world(max(abs(a - b) for a, b in zip(norms, ref_norms))),
            "param_diff": max_over_world(max_diff(params, {k: ref_params[k] for k in params})),
            "replica_drift": replica_drift(engine.module, cfg.model, grid),
            "gas": engine.gradient_accumulation_steps(), "dp": grid.dp_size}


def rng_scenario(tp: int = 2) -> dict:
    """Dropout streams: the default one agrees across TP ranks, the TP one differs; with residual and
    attention dropout on, activation checkpointing reproduces the uncheckpointed run exactly and the
    replicated parameters stay identical across TP ranks."""
    grid = ProcessGrid(tp, 1)
    grid.seed(5)
    default = torch.rand(4)
    with grid.tp.rng.fork():
        forked = torch.rand(4)
    after = torch.rand(4)  # the fork left the default stream where it was
    both = [torch.empty(12) for _ in range(tp)]
    dist.all_gather(both, torch.cat([default, forked, after]), group=grid.tp.group)
    runs = {}
    for checkpointing in (False, True):
        cfg = Config(model=model_cfg("qmqa", hidden_dropout=0.1, attention_dropout=0.1),
                     parallel=ParallelConfig(tp=tp, activation_checkpointing=checkpointing),
                     training=TrainingConfig(micro_batch_size=2, global_batch_size=4, seq_length=SEQ,
                                             precision="fp32", lr=3e-3, seed=SEED, lr_schedule="constant",
                                             warmup_steps=0))
        cfg.validate()
        grid = ProcessGrid(tp, 1)
        engine = build_engine(cfg, grid)
        losses = []
        for step in range(3):
            tokens, labels, mask = batch(4 * grid.dp_size, seed=2000 + step)
            losses.append(engine.train_batch(iter([(tokens[i:i + 2], (labels[i:i + 2], mask[i:i + 2]))
                                                   for i in range(0, 4, 2)])).item())
        runs[checkpointing] = (losses, replica_drift(engine.module, cfg.model, grid))
    return {"default_stream_equal_across_tp": all(torch.equal(b[:4], both[0][:4]) and torch.equal(b[8:], both[0][8:])
                                                  for b in both),
            "tp_stream_differs_across_tp": not torch.equal(both[0][4:8], both[1][4:8]),
            "losses": runs[False][0], "checkpointed_losses": runs[True][0],
            "checkpoint_loss_diff": max(abs(a - b) for a, b in zip(runs[False][0], runs[True][0])),
            "replica_drift": max(runs[False][1], runs[True][1])}


def eval_scenario(preset: str, tp: int, pp: int, sp: int = 1) -> dict:
    """Validation through the pipeline engine (token-weighted, padded to the layout) vs a direct exact mean."""
    from megaqkv.training.data import eval_batches
    from megaqkv.training.loop import evaluate

    cfg = Config(model=model_cfg(preset), parallel=ParallelConfig(tp=tp, pp=pp, sp=sp),
                 training=TrainingConfig(micro_batch_size=2, gradient_accumulation_steps=1, seq_length=SEQ,
                                         precision="fp32", seed=SEED))
    cfg.validate()
    grid = ProcessGrid(tp, pp, sp)
    engine = build_engine(cfg, grid)
    g = torch.Generator().manual_seed(3)
    samples = [{"tokens": torch.randint(0, VOCAB, (SEQ + 1,), generator=g).numpy(),
                "loss_mask": (torch.rand(SEQ, generator=g) < (i + 1) / 12).float().numpy()} for i in range(11)]
    loss, tokens = evaluate(engine, cfg, grid, eval_batches(samples, 11, 2, grid.dp_size, grid.dp_rank, SEQ, grid.sp))
    ref = GPT(cfg.model, seed=SEED).eval()
    total = count = 0.0
    with torch.no_grad():
        for s in samples:
            t = torch.from_numpy(s["tokens"])[None]
            mask = torch.from_numpy(s["loss_mask"])[None]
            logits = ref(t[:, :-1]).logits
            losses = torch.nn.functional.cross_entropy(logits[0], t[0, 1:], reduction="none")
            total += (losses * mask[0]).sum().item()
            count += mask.sum().item()
    return {"loss": loss, "ref_loss": total / count, "loss_diff": max_over_world(abs(loss - total / count)),
            "tokens": tokens, "ref_tokens": int(count)}


def sp_bytes_scenario(sp: int, seq: int = 64) -> dict:
    """Bytes the sequence-parallel exchanges of one 300M-shaped attention layer send (counted in
    parallel.sequence) for every preset, forward and backward, vs analysis.sequence_exchange (fp32: 4 bytes)."""
    from megaqkv.analysis import sequence_exchange
    from megaqkv.model.attention import Attention
    from megaqkv.model.gpt import Block
    from megaqkv.parallel import sequence

    grid = ProcessGrid(1, 1, sp)
    out = {}
    for preset in ("qkv", "qk", "kv", "k", "gqa4", "gqa8", "mqa", "qgqa4", "qgqa8", "qmqa"):
        cfg = dataclasses.replace(load_model_config(CONFIGS / f"300M_{preset}.yaml"), hidden_dropout=0.0)
        attn = Attention(cfg, sp=grid.sp)
        for prm in attn.parameters():
            torch.nn.init.normal_(prm, std=0.02)
        x = torch.randn(1, seq // sp, cfg.hidden_size, generator=torch.Generator().manual_seed(grid.sp_rank))
        sequence.reset_sent()
        attn(x).square().sum().backward()
        formula = sequence_exchange(cfg, sp, seq, bytes_per_element=4)
        out[preset] = {"measured": dict(sequence.SENT),
                       "formula": {"projection": formula["projection_bytes"], "output": formula["output_bytes"]}}
    block = Block(cfg, checkpointed=True, sp=grid.sp)  # Q-MQA: the recompute runs the forward's exchanges again
    sequence.reset_sent()
    block(x.requires_grad_()).square().sum().backward()
    formula = sequence_exchange(cfg, sp, seq, bytes_per_element=4, checkpointed=True)
    checkpointed = {"measured": dict(sequence.SENT),
                    "formula": {"projection": formula["projection_bytes"], "output": formula["output_bytes"]}}
    return {"presets": out, "checkpointed qmqa": checkpointed}


def skip_scenario() -> dict:
    """Steps whose gradient norm exceeds training.skip_grad_norm_above leave weights and LR untouched."""
    cfg = Config(model=model_cfg("kv"), training=TrainingConfig(micro_batch_size=2, global_batch_size=4,
                                                                seq_length=SEQ, precision="fp32", seed=SEED,
                                                                skip_grad_norm_above=1e-3, warmup_steps=2))
    cfg.validate()
    grid = ProcessGrid(1, 1)
    engine = build_engine(cfg, grid, total_steps=10)
    before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    lrs = []
    for step in range(3):
        tokens, labels, mask = batch(4, seed=3000 + step)
        mine = range(grid.dp_rank * 2, grid.dp_rank * 2 + 2)
        lrs.append(engine.get_lr()[0])
        engine.train_batch(iter([(tokens[mine], (labels[mine], mask[mine]))]))
    changed = max((p.detach() - before[n]).abs().max().item() for n, p in engine.module.named_parameters())
    return {"skipped": engine.skipped_steps, "global_steps": engine.global_steps, "param_change": changed,
            "lrs": lrs + [engine.get_lr()[0]]}


def random_consolidated(preset: str, seed: int = 0, **changes):
    """Random weights and Adam moments for every canonical tensor (the same on every rank). LayerNorm weights
    near 1 and projections large enough that every role moves the logits far beyond the conversion tests'
    tolerance (test_convert's mutation test proves it)."""
    from megaqkv.checkpoint.consolidated import Consolidated
    from megaqkv.parallel.sharding import canonical_shapes

    cfg = model_cfg(preset, **changes)
    g = torch.Generator().manual_seed(seed)
    shapes = canonical_shapes(cfg)
    norm = lambda k: ".ln_" in k or k.startswith("ln_f")
    rand = lambda: {k: torch.randn(s, generator=g) * (0.1 if norm(k) else 0.2 if ".attn." in k else 0.05)
                    + (1.0 if norm(k) and k.endswith("weight") else 0.0) for k, s in shapes.items()}
    ck = Consolidated(cfg, rand(), {"exp_avg": rand(), "exp_avg_sq": {k: v.abs() for k, v in rand().items()}})
    ck.trainer = {"step": 7, "consumed_samples": 56, "skipped_steps": 1, "optimizer_step": 7.0}
    return ck


def write_checkpoint_scenario(preset: str, tp: int, pp: int, workdir: str) -> dict:
    """A real DeepSpeed checkpoint at TP×PP holding known random weights and optimizer state."""
    from megaqkv.checkpoint.engine_state import load_into_engine
    from megaqkv.training import checkpointing

    ck = random_consolidated(preset)
    cfg = Config(model=ck.config, parallel=ParallelConfig(tp=tp, pp=pp),
                 training=TrainingConfig(micro_batch_size=1, gradient_accumulation_steps=1, seq_length=SEQ,
                                         precision="fp32", seed=SEED))
    cfg.validate()
    grid = ProcessGrid(tp, pp)
    engine = build_engine(cfg, grid, total_steps=10)
    consumed = load_into_engine(engine, grid, cfg, ck, "random")
    out = Path(workdir) / f"{preset}_tp{tp}_pp{pp}"
    checkpointing.save(engine, out, engine.global_steps, checkpointing.client_state(
        cfg, grid, engine.global_steps, consumed, checkpointing.universal_checkpoint_info(cfg, tp)), keep_last=0)
    return {"path": str(out)}


def universal_resume_scenario(preset: str, workdir: str, steps: int = 6, cut: int = 3) -> dict:
    """Train `cut` steps at TP=2×PP=2 and save; convert with DeepSpeed's ds_to_universal; resume the universal
    folder as `checkpoint.load` (training/loop.resume, as pretrain.py does) at other layouts and train on: losses
    and gradient norms against an uninterrupted TP=2×PP=2 run in this launch."""
    from megaqkv.config import CheckpointConfig
    from megaqkv.training import checkpointing
    from megaqkv.training.loop import resume
    from megaqkv.training.schedule import align_schedule

    work = Path(workdir) / f"universal_{preset}"
    micro, global_batch = 2, 8

    def engine_at(tp: int, pp: int, load: str | None = None):
        cfg = Config(model=model_cfg(preset), parallel=ParallelConfig(tp=tp, pp=pp),
                     training=TrainingConfig(micro_batch_size=micro, global_batch_size=global_batch, seq_length=SEQ,
                                             precision="fp32", lr=3e-3, min_lr=3e-4, warmup_steps=2, seed=SEED,
                                             train_steps=steps),
                     checkpoint=CheckpointConfig(load=load))
        cfg.validate()
        grid = ProcessGrid(tp, pp)
        engine = build_engine(cfg, grid, total_steps=steps)
        checkpointing.use_safe_loader(engine)
        return cfg, grid, engine

    cfg, grid, engine = engine_at(2, 2)
    full_losses, full_norms = run_steps(engine, grid, 0, steps, global_batch, micro)
    cfg, grid, engine = engine_at(2, 2)
    run_steps(engine, grid, 0, cut, global_batch, micro)
    checkpointing.save(engine, work / "ckpt", cut, checkpointing.client_state(
        cfg, grid, cut, cut * global_batch, checkpointing.universal_checkpoint_info(cfg, 2)), keep_last=0)
    failure = [None]
    if dist.get_rank() == 0:
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(work / "ckpt" / f"global_step{cut}"), "--output_folder",
                               str(work / "universal" / f"global_step{cut}"), "--num_extract_workers", "1",
                               "--num_merge_workers", "1"], capture_output=True, text=True)
        failure = [proc.stderr[-3000:] if proc.returncode else None]
    dist.broadcast_object_list(failure, src=0)
    assert failure[0] is None, failure[0]
    out = {"full_losses": full_losses}
    for tp, pp in ((2, 2), (2, 1), (1, 2), (1, 1)):
        cfg, grid, engine = engine_at(tp, pp, load=str(work / "universal"))
        said = []
        consumed = resume(engine, cfg, grid, None, said.append)
        align_schedule(engine.lr_scheduler, cfg.training, steps, engine.global_steps)
        losses, norms = run_steps(engine, grid, engine.global_steps, steps, global_batch, micro)
        out[f"tp{tp} pp{pp} dp{grid.dp_size}"] = {
            "said": said, "step": engine.global_steps - len(losses), "consumed": consumed, "losses": losses,
            "loss_diff": max_over_world(max(abs(a - b) for a, b in zip(losses, full_losses[cut:]))),
            "norm_diff": max_over_world(max(abs(a - b) for a, b in zip(norms, full_norms[cut:])))}
    return out


def generate_scenario(preset: str, tp: int) -> dict:
    """KV-cached greedy generation with the heads split over TP ranks, each caching its own, vs TP=1."""
    from megaqkv.checkpoint.loading import build_model
    from megaqkv.model.generation import Sampling, generate

    ck = random_consolidated(preset)
    grid = ProcessGrid(tp, 1)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26, 27]]
    sampling = Sampling(max_new_tokens=10, temperature=0.8, top_k=50, seed=3)
    sharded = generate(build_model(ck, grid.tp), prompts, sampling)
    single = generate(build_model(ck), prompts, sampling)
    return {"same_tokens": sharded.tokens == single.tokens, "tokens": sharded.tokens,
            "rank_cache_bytes": sharded.cache_bytes, "single_cache_bytes": single.cache_bytes}


def grid_error_scenario() -> dict:
    """A layout that does not fit the launched processes is a clear error, not a hang."""
    try:
        ProcessGrid(tp=4, pp=1)
    except ConfigError as exc:
        return {"error": str(exc)}
    return {"error": None}


SUITES = {
    # two processes: TP=2 for every preset (K/V replicated for MQA and Q-MQA), PP=2, DP=2 with ZeRO-1, bf16
    "world2": [(f"grad tp2 {p}", grad_scenario, dict(preset=p, tp=2))
               for p in ("qkv", "qk", "kv", "k", "gqa4", "gqa8", "mqa", "qgqa4", "qgqa8", "qmqa")]
    + [(f"grad sp2 {p}", grad_scenario, dict(preset=p, tp=1, sp=2)) for p in SP_PRESETS]
    + [(f"fused loss tp2 vocab {v} block {b}", fused_loss_scenario, dict(vocab=v, block=b))
       for v, b in ((1000, 5), (100, 23))]
    + [("train tp2 kv", train_scenario, dict(preset="kv", tp=2, pp=1)),
       ("train tp2 qmqa", train_scenario, dict(preset="qmqa", tp=2, pp=1)),
       ("train pp2 kv", train_scenario, dict(preset="kv", tp=1, pp=2)),
       ("train pp2 qkv checkpointed", train_scenario, dict(preset="qkv", tp=1, pp=2, checkpointing=True)),
       ("train tp2 kv compiled", train_scenario, dict(preset="kv", tp=2, pp=1, compile=True)),
       ("train pp2 qkv compiled checkpointed", train_scenario,
        dict(preset="qkv", tp=1, pp=2, checkpointing=True, compile=True)),
       ("train dp2 zero1 qmqa", train_scenario, dict(preset="qmqa", tp=1, pp=1)),
       ("train tp2 bf16 kv", train_scenario, dict(preset="kv", tp=2, pp=1, precision="bf16")),
       ("train dp2 bf16 qkv", train_scenario, dict(preset="qkv", tp=1, pp=1, precision="bf16")),
       ("train pp2 bf16 qkv", train_scenario, dict(preset="qkv", tp=1, pp=2, precision="bf16")),
       ("train sp2 kv", train_scenario, dict(preset="kv", tp=1, pp=1, sp=2)),
       ("train sp2 qmqa", train_scenario, dict(preset="qmqa", tp=1, pp=1, sp=2)),
       ("train sp2 qkv checkpointed", train_scenario, dict(preset="qkv", tp=1, pp=1, sp=2, checkpointing=True)),
       ("train pp2 bf16 qkv untied", train_scenario, dict(preset="qkv", tp=1, pp=2, precision="bf16", tied=False)),
       ("rng tp2 dropout", rng_scenario, dict(tp=2)),
       ("grid error", grid_error_scenario, {}),
       ("eval tp2 kv", eval_scenario, dict(preset="kv", tp=2, pp=1)),
       ("eval pp2 qmqa", eval_scenario, dict(preset="qmqa", tp=1, pp=2)),
       ("eval dp2 qkv", eval_scenario, dict(preset="qkv", tp=1, pp=1)),
       ("eval sp2 qmqa", eval_scenario, dict(preset="qmqa", tp=1, pp=1, sp=2)),
       ("skip large gradient norm", skip_scenario, {}),
       ("generate tp2 kv", generate_scenario, dict(preset="kv", tp=2)),
       ("generate tp2 qmqa", generate_scenario, dict(preset="qmqa", tp=2)),
       ("generate tp2 gqa4", generate_scenario, dict(preset="gqa4", tp=2))],
    # four processes: TP=4 (fused groups and replicated K/V), TP=2×PP=2, TP=2×DP=2, PP=2×DP=2
    "world4": [(f"grad tp4 {p}", grad_scenario, dict(preset=p, tp=4)) for p in ("qkv", "gqa4", "mqa", "qmqa", "kv")]
    + [("train tp2xpp2 qmqa", train_scenario, dict(preset="qmqa", tp=2, pp=2)),
       ("train tp2xpp2 qkv", train_scenario, dict(preset="qkv", tp=2, pp=2)),
       ("train tp2xdp2 zero1 gqa4", train_scenario, dict(preset="gqa4", tp=2, pp=1)),
       ("train pp2xdp2 zero1 kv", train_scenario, dict(preset="kv", tp=1, pp=2)),
       ("train tp4 mqa", train_scenario, dict(preset="mqa", tp=4, pp=1)),
       ("eval tp2xpp2 gqa4", eval_scenario, dict(preset="gqa4", tp=2, pp=2))]
    # sequence parallelism: SP=2×TP=2 and SP=4 (more ranks than Q-MQA's one KV head: each gets a copy of it),
    # SP=2×PP=2 through the DeepSpeed pipeline engine, and the bytes of the exchanges at SP=4
    + [(f"grad sp2xtp2 {p}", grad_scenario, dict(preset=p, tp=2, sp=2)) for p in SP_PRESETS]
    + [(f"grad sp4 {p}", grad_scenario, dict(preset=p, tp=1, sp=4)) for p in SP_PRESETS]
    + [(f"train sp2xpp2 {p}", train_scenario, dict(preset=p, tp=1, pp=2, sp=2)) for p in SP_PRESETS]
    + [("train sp2xtp2 qmqa", train_scenario, dict(preset="qmqa", tp=2, pp=1, sp=2)),
       ("train sp2xdp2 kv", train_scenario, dict(preset="kv", tp=1, pp=1, sp=2)),
       ("sp4 bytes", sp_bytes_scenario, dict(sp=4))],
    # four processes, for tests/test_convert.py: DeepSpeed checkpoints of every preset at TP=2×PP=2 and TP=4 (and
    # one at TP=2×DP=2); a universal checkpoint of a TP=2×PP=2 run resumed at four layouts
    "convert4": [(f"{p} tp{tp} pp{pp}", write_checkpoint_scenario, dict(preset=p, tp=tp, pp=pp))
                 for p in ("qkv", "qk", "kv", "k", "gqa4", "gqa8", "mqa", "qgqa4", "qgqa8", "qmqa")
                 for tp, pp in ((2, 2), (4, 1))]
    + [("gqa4 tp2 pp1", write_checkpoint_scenario, dict(preset="gqa4", tp=2, pp=1)),
       ("universal resume qmqa", universal_resume_scenario, dict(preset="qmqa"))],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", help="where scenarios that write files put them")
    args = parser.parse_args()
    init_distributed(timeout_s=300)
    torch.set_num_threads(1)
    results = {}
    for name, fn, kwargs in SUITES[args.suite]:
        start = time.perf_counter()
        if "workdir" in fn.__code__.co_varnames:
            kwargs = {**kwargs, "workdir": args.workdir}
        results[name] = {**fn(**kwargs), "seconds": round(time.perf_counter() - start, 2)}
        if dist.get_rank() == 0:
            print(f"[{args.suite}] {name}: {results[name]}", flush=True)
    if dist.get_rank() == 0:
        tmp = Path(args.out + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.rename(args.out)
    dist.barrier()


if __name__ == "__main__":
    main()
