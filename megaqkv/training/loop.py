"""The pretraining loop: resume, train steps, validation, logging, checkpoints, graceful stop."""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..analysis import qkv_baseline, sequence_exchange
from ..checkpoint import consolidated, universal
from ..checkpoint import deepspeed_layout as layout
from ..checkpoint.consolidated import CheckpointError
from ..checkpoint.deepspeed_layout import client_state_of
from ..checkpoint.engine_state import load_into_engine
from ..config import Config, ConfigError
from ..data.gpt_dataset import INDEX_VERSION
from ..kernels.attention import kernels_text
from ..model.attention import Attention
from ..model.pipeline import PipelineLoss, stage_summary
from ..parallel.grid import ProcessGrid, comm_device
from . import checkpointing
from .data import build_datasets, eval_batches, step_batches
from .engine import build_engine
from .monitor import Monitor, reset_peak_memory
from .schedule import align_schedule

# What a resumed run must share with the run that wrote the checkpoint: these decide which samples come
# next (sample index, shuffle, packing) and what a step is, so changing them would repeat or skip data.
RESUME_MUST_MATCH = ("training.seed", "training.seq_length", "training.global_batch_size")
# What may differ from the checkpoint's model: how it is trained or run, not what it computes.
MODEL_MAY_DIFFER = ("embedding_dropout", "attention_dropout", "hidden_dropout", "init_std", "attention_backend")


class TrainingError(RuntimeError):
    """Training cannot go on (divergence); the message says what happened and what is left on disk."""


def total_steps(cfg: Config) -> int:
    t = cfg.training
    if t.train_steps:
        return t.train_steps
    return math.ceil(t.train_tokens / (t.global_batch_size * t.seq_length))


class StopRequest:
    """SIGTERM/SIGINT ask for a graceful stop: the current step finishes, a checkpoint is saved, exit 0.
    A second SIGINT stops at once. Every rank agrees on the decision (one all-reduce per step)."""

    def __init__(self):
        self.requested = False
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def evaluate(engine, cfg: Config, grid: ProcessGrid, batches: list) -> tuple[float, int]:
    """Token-weighted validation loss over the whole fixed set: sums of token losses and token counts are
    added over micro-batches and DP ranks, then divided once, so the value does not depend on the layout."""
    module = engine.module
    train_loss = module.loss_fn
    module.loss_fn = PipelineLoss(sums=True, sp=grid.sp)
    engine.total_loss = None  # eval_batch adds into the last training loss, a scalar; ours is [sum, count]
    try:
        out = engine.eval_batch(iter(batches), reduce_output="avg", bcast_loss=False,
                                num_micro_batches=len(batches))
    finally:
        module.loss_fn = train_loss
        engine.total_loss = None
    totals = torch.zeros(2, dtype=torch.float64, device=comm_device())
    if grid.is_last_stage:
        totals = out.detach().double().to(totals.device) * len(batches) * grid.data_size  # undo the engine's average
    src = grid.topology.get_rank(pipe=grid.pp_size - 1, data=grid.data_rank, model=grid.tp_rank)
    dist.broadcast(totals, src=src, group=grid.mpu.get_pipe_parallel_group())
    return (totals[0] / totals[1]).item(), int(round(totals[1].item()))


def sequence_parallel_text(cfg: Config) -> str:
    """What sequence parallelism sends per layer and micro-batch (analysis.sequence_exchange; the exchanges count
    what they really send in parallel.sequence.SENT)."""
    t, p = cfg.training, cfg.parallel
    size = 4 if t.precision == "fp32" else 2

    def mib(model, key: str) -> float:
        sent = sequence_exchange(model, p.sp, t.seq_length, p.tp, size, p.activation_checkpointing)[key]
        return sent * t.micro_batch_size / 2 ** 20

    return (f"sequence parallelism: SP {p.sp}, {t.seq_length // p.sp:,} positions per rank; per layer and micro-batch "
            f"a rank sends {mib(cfg.model, 'projection_bytes'):.2f} MiB of projection output (QKV would send "
            f"{mib(qkv_baseline(cfg.model), 'projection_bytes'):.2f}) and {mib(cfg.model, 'output_bytes'):.2f} MiB of "
            "attention output, forward" + (" (twice: activation checkpointing)" if p.activation_checkpointing else "")
            + " and backward")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def check_resumable(client: dict, cfg: Config, where: str, same_run: bool) -> None:
    """A checkpoint holds one model: another architecture is an error listing what differs. Resuming the run's
    own directory (`same_run`) must also keep the data order; a checkpoint written by tools/convert_ckpt.py
    carries no training settings of its own, so only its model is compared."""
    ours, theirs = _flat(cfg.to_dict()), _flat(client["config"])
    model = [k for k in ours if k.startswith("model.") and k.split(".", 1)[1] not in MODEL_MAY_DIFFER
             and k in theirs and theirs[k] != ours[k]]
    if model:
        raise ConfigError(f"{where} holds a different model: " + ", ".join(
            f"{k} is {theirs[k]!r} there, {ours[k]!r} here" for k in model)
            + "; use the checkpoint's model config, or another --save directory for another model")
    if not same_run or client.get("converted_from"):
        return
    data = [k for k in RESUME_MUST_MATCH if k in theirs and theirs[k] != ours[k]]
    if data:
        raise ConfigError(f"{where} was trained with " + ", ".join(f"{k}={theirs[k]!r}" for k in data)
                          + "; this run has " + ", ".join(f"{k}={ours[k]!r}" for k in data)
                          + ". Changing them on resume would repeat or skip training data and make the token count "
                          "jump; resume with the checkpoint's values (--set " + " --set ".join(
                              f"{k}={theirs[k]}" for k in data) + "), or start a new run in another --save directory "
                          f"with --set checkpoint.load={where}")


def load_universal(engine, cfg: Config, grid: ProcessGrid, source: Path, say) -> int:
    """A DeepSpeed universal checkpoint at any layout; returns samples consumed. Every file is first checked to
    hold plain data only (DeepSpeed's loader unpickles with weights_only=False). DeepSpeed's own universal loader
    is used where it finds every parameter of this layout by name. Where it cannot (fewer KV heads than TP ranks
    on one side only: MQA/Q-MQA keep their K/V rows in a replicated `kv_proj` there, in the fused `in_proj`
    otherwise), the folder is read as canonical tensors and scattered like a consolidated checkpoint."""
    tag_dir = universal.locate(source)
    problems = checkpointing.problems_collectively(tag_dir, universal.problems)
    if problems:
        kind = "unsafe" if any(k == "unsafe" for k, _ in problems) else "damaged"
        raise CheckpointError(f"{tag_dir}: {kind} universal checkpoint: {layout.describe(problems)}")
    client = client_state_of(tag_dir)
    where = str(tag_dir)
    check_resumable(client, cfg, where, same_run=False)
    held = universal.parameter_names(tag_dir)
    absent = [n for n, _ in engine.module.named_parameters() if n not in held]
    absent = [n for share in checkpointing.gather(absent[:1]) for n in share]
    if absent:
        consumed = load_into_engine(engine, grid, cfg, universal.read(tag_dir), where)
        how = (f"through its canonical tensors: DeepSpeed's universal loader finds parameters by name, and this "
               f"layout's {absent[0]} is not among them")
    else:
        client = checkpointing.load_universal(engine, tag_dir)
        if checkpointing.same_layout(client["layout"], grid):  # this rank's own random state
            checkpointing.set_rng_state(checkpointing.resumed_rng(client, grid), grid.tp.rng)
        consumed = client["consumed_samples"]
        how = "with DeepSpeed's universal loader"
    say(f"loaded universal checkpoint {tag_dir} (written at {client['layout']}) at {checkpointing.layout_of(grid)} "
        f"{how}: step {engine.global_steps}, {consumed:,} samples consumed")
    return consumed


def resume(engine, cfg: Config, grid: ProcessGrid, ckpt_dir: Path | None, say) -> int:
    """Continue from the newest complete checkpoint in `checkpoint.dir` that verifies; else start from
    `checkpoint.load` (a DeepSpeed checkpoint of this layout; a consolidated or a DeepSpeed universal one at
    any layout). Returns samples consumed."""
    own = bool(ckpt_dir and layout.complete_tags(ckpt_dir))
    if ckpt_dir and not own and layout.leftovers(ckpt_dir):
        raise ConfigError(f"checkpoint.dir: {ckpt_dir} has no checkpoint that verifies, but holds "
                          f"{', '.join(layout.leftovers(ckpt_dir))} from an earlier run; starting over there would "
                          "hide that. Use another --save directory, or remove them to start from scratch")
    if own:
        if not cfg.checkpoint.resume:
            raise ConfigError(f"checkpoint.dir: {ckpt_dir} holds checkpoints of an earlier run and checkpoint.resume "
                              "is false; use an empty directory (its checkpoints would be pruned by step number)")
        source = ckpt_dir
    elif cfg.checkpoint.load:
        source = Path(cfg.checkpoint.load)
    else:
        return 0
    if consolidated.is_consolidated(source):
        consumed = load_into_engine(engine, grid, cfg, consolidated.load(source, lazy=True), str(source))
        say(f"loaded consolidated checkpoint {source} at {checkpointing.layout_of(grid)}: step {engine.global_steps}, "
            f"{consumed:,} samples consumed")
        return consumed
    if not own and universal.is_universal(source):
        return load_universal(engine, cfg, grid, source, say)
    # only this run's own directory is tidied: a damaged checkpoint there is moved aside once
    tag = layout.choose(source, checkpointing.problems_collectively, say, move_aside=own and grid.rank == 0)
    if tag is None:
        raise ConfigError(f"{source}: no complete checkpoint that verifies to start from")
    client = client_state_of(source / tag)  # checked before DeepSpeed, whose own failures are obscure
    if not checkpointing.same_layout(client["layout"], grid):
        raise ConfigError(f"{source}/{tag} was written at {client['layout']}, this run is "
                          f"{checkpointing.layout_of(grid)}; convert it (tools/convert_ckpt.py --to consolidated, "
                          "then checkpoint.load=<that directory>, or --to deepspeed at this layout) or run at the "
                          "checkpoint's layout")
    check_resumable(client, cfg, f"{source}/{tag}", same_run=own)
    split = checkpointing.stage_split_mismatch(source / tag, engine, grid)
    if split:
        raise ConfigError(f"{source}/{tag} was written with other pipeline stages ({split}; stages are balanced by "
                          "compute, and each now holds at least one block): convert it (tools/convert_ckpt.py --to "
                          "consolidated, then checkpoint.load=<that directory>), which does not depend on the split")
    order = client.get("sample_order", 1)
    if own and order != INDEX_VERSION:
        say(f"warning: {source}/{tag} was trained on megaqkv's sample order {order}; this version reads Megatron's "
            f"(order {INDEX_VERSION}, docs/data.md), so from here the run reads another sequence of samples and some "
            "are repeated or skipped; to avoid that, start a new run in another --save directory with --set "
            f"checkpoint.load={source}")
    _, client = engine.load_checkpoint(str(source), tag=tag)
    checkpointing.set_rng_state(checkpointing.resumed_rng(client, grid), grid.tp.rng)
    say(f"resumed from {source}/{tag}: step {engine.global_steps}, {client['consumed_samples']:,} samples consumed")
    return client["consumed_samples"]


def cut_metrics(path: Path, step: int) -> None:
    """Drop the rows a killed run logged after the step it is resumed from, so every step appears once; a run
    from step 0 keeps none (an earlier run's rows in the same directory would read as this run's)."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            if step and json.loads(line)["step"] <= step:
                rows.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short when the run was killed
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(rows))
    os.replace(tmp, path)


def run(cfg: Config, ds_config: str | None = None, log=print) -> dict:
    reset_peak_memory()
    grid = ProcessGrid(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.sp)
    is_writer = dist.get_rank() == 0
    say = log if is_writer else (lambda *a, **k: None)
    ckpt_dir = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
    lock = None
    if ckpt_dir:
        failure = [None]
        if is_writer:
            try:
                lock = checkpointing.RunLock(ckpt_dir, say)
            except Exception as exc:  # noqa: BLE001 - every rank must learn of it, or the others would wait
                failure = [str(exc) if isinstance(exc, CheckpointError) else f"{ckpt_dir}: {exc!r}"]
        dist.broadcast_object_list(failure, src=0)
        if failure[0]:
            raise ConfigError(failure[0])
    try:
        return _train(cfg, grid, ds_config, ckpt_dir, is_writer, say, log)
    finally:
        if lock:
            lock.release()


def _train(cfg: Config, grid: ProcessGrid, ds_config, ckpt_dir: Path | None, is_writer: bool, say, log) -> dict:
    steps = total_steps(cfg)
    t = cfg.training
    say(f"parallel layout: {grid.describe()}\nbatch: global {t.global_batch_size} = micro {t.micro_batch_size} × "
        f"accumulation {t.gradient_accumulation_steps} × DP {grid.dp_size}; {t.global_batch_size * t.seq_length:,} "
        f"tokens per step, {steps:,} steps")

    valid_samples = math.ceil(cfg.eval.tokens / t.seq_length)
    train_ds, valid_ds = build_datasets(cfg, steps * t.global_batch_size, valid_samples, say=say)
    valid = None if valid_ds is None else eval_batches(valid_ds, valid_samples, t.micro_batch_size, grid.dp_size,
                                                       grid.dp_rank, t.seq_length, grid.sp)
    engine = build_engine(cfg, grid, ds_config, total_steps=steps)
    checkpointing.use_safe_loader(engine)
    if grid.pp_size > 1:
        say(stage_summary(engine.module, cfg.model))
    m = cfg.model
    attention = next((mod for mod in engine.module.modules() if isinstance(mod, Attention)), None)
    if attention is not None:  # a pipeline stage may hold no block
        say(kernels_text(m.attention_backend, next(engine.module.parameters()), attention.kernel_cols,
                         m.attention_dropout))
    if grid.sp_size > 1:
        say(sequence_parallel_text(cfg))

    consumed = resume(engine, cfg, grid, ckpt_dir, say)
    if engine.global_steps:
        align_schedule(engine.lr_scheduler, t, steps, engine.global_steps)

    if engine.global_steps >= steps:
        say(f"nothing to do: the checkpoint is at step {engine.global_steps} of {steps}")
        return {"step": engine.global_steps, "reason": "already finished", "train": [], "valid": []}
    metrics_file = Path(cfg.logging.tensorboard_dir) / "metrics.jsonl" if cfg.logging.tensorboard_dir else None
    if is_writer and metrics_file:
        cut_metrics(metrics_file, engine.global_steps)
    universal_info = checkpointing.universal_checkpoint_info(cfg, grid.tp_size)
    monitor = Monitor(cfg, dist.get_world_size(), is_writer, steps, log, first_step=engine.global_steps + 1)
    stop = StopRequest()
    history = {"train": [], "valid": []}
    last_loss = None

    def record(kind: str, row: dict) -> None:
        history[kind].append(row)
        if is_writer and metrics_file:
            metrics_file.parent.mkdir(parents=True, exist_ok=True)
            with open(metrics_file, "a") as f:
                f.write(json.dumps({"kind": kind, **row}) + "\n")

    def validate(step: int) -> None:
        if valid is None:  # no validation set (data.split gives it no share): evaluation is off, as in Megatron
            return
        loss, tokens = evaluate(engine, cfg, grid, valid)
        monitor.validation(step, loss, tokens)
        record("valid", {"step": step, "loss": loss, "tokens": tokens})

    def save(step: int) -> None:
        if ckpt_dir is None:
            return
        client = checkpointing.client_state(cfg, grid, step, consumed, universal_info,
                                            history["valid"][-1] if history["valid"] else None)
        path = checkpointing.save(engine, ckpt_dir, step, client, cfg.checkpoint.keep_last, last_loss)
        say(f"saved checkpoint {path}")

    step = engine.global_steps
    if cfg.eval.at_start and step == 0:
        validate(0)
    this_run = nonfinite = 0
    reason = "finished"
    try:
        while step < steps:
            lr = engine.get_lr()[0]
            started = time.perf_counter()
            loss = engine.train_batch(step_batches(train_ds, consumed, t.micro_batch_size, grid.dp_size,
                                                   grid.dp_rank, t.gradient_accumulation_steps, grid.sp)).item()
            seconds = time.perf_counter() - started
            consumed += t.global_batch_size
            step, this_run, last_loss = engine.global_steps, this_run + 1, loss
            norm = engine.get_global_grad_norm()
            row = monitor.step(step, consumed * t.seq_length, loss, lr, float(norm) if norm is not None else math.nan,
                               engine.skipped_steps, seconds)
            record("train", {"step": step, **row})
            nonfinite = 0 if math.isfinite(loss) else nonfinite + 1
            if nonfinite >= t.max_nonfinite_steps:
                good = layout.finite_tags(ckpt_dir) if ckpt_dir else []
                newer = [t for t in layout.complete_tags(ckpt_dir) if good and layout.step_of(t) > layout.step_of(
                    good[-1])] if ckpt_dir else []
                raise TrainingError(
                    f"the training loss was not finite for {nonfinite} consecutive steps (steps "
                    f"{step - nonfinite + 1}-{step}, training.max_nonfinite_steps={t.max_nonfinite_steps}); "
                    "stopped without saving. "
                    + (f"The newest checkpoint with a finite loss is {ckpt_dir / good[-1]}"
                       + (f" (to resume from it, move the newer {', '.join(newer)} out of {ckpt_dir})" if newer
                          else "") + ". " if good else "")
                    + "Lower training.lr or warm up longer, and check the data")
            if cfg.eval.interval and step % cfg.eval.interval == 0 and step < steps:
                validate(step)
            stopping = stop.agreed()
            exiting = bool(t.exit_after_steps) and this_run >= t.exit_after_steps and step < steps
            if stopping or exiting:
                reason = "stopped by signal" if stopping else f"exit_after_steps={t.exit_after_steps}"
                save(step)
                break
            if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and step < steps:
                save(step)
        else:
            validate(step)
            save(step)
    finally:
        stop.restore()
        monitor.close()
    say(f"{reason} at step {step}/{steps}"
        + (f"; checkpoints in {ckpt_dir.resolve()}" if ckpt_dir else "")
        + (f"; TensorBoard logs in {monitor.log_dir} (tensorboard --logdir {monitor.log_dir})" if monitor.log_dir
           else ""))
    return {"step": step, "reason": reason, **history}
