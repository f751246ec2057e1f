"""Training and validation datasets from the config, and the micro-batches each rank feeds the engine."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..config import Config, ConfigError, blend_of
from ..data.blending import BlendedDataset
from ..data.builder import build_split
from ..data.gpt_dataset import micro_batch_indices, split_ranges
from ..data.indexed import DataError, IndexedDataset, paths
from ..parallel.grid import NO_SP, SPGroup


def missing_data_hint(prefix: str, source: str | None, tokenizer: str | None = None, vocab_size: int = 0) -> str:
    """The commands that make `prefix` (named {out}[_{split}][_{set}]_{key}_document): preprocessing with the
    config's tokenizer, after training that tokenizer (at the model's vocabulary) when it is a sentencepiece model
    not made yet."""
    split = re.match(r"(.+?)_(train|validation|test)_(.+)_document$", prefix)
    m = split or re.match(r"(.+?)_([^_]+)_document$", prefix)
    out, key = (m.group(1), m.group(m.lastindex)) if m else (prefix, "text")
    key = key.split("_")[-1]
    corpus = source or "/path/to/SlimPajama-627B"
    steps = []
    if tokenizer and tokenizer.endswith(".model") and not Path(tokenizer).is_file():
        steps.append(f"python tools/train_tokenizer.py --input {corpus} --model-prefix {tokenizer[:-len('.model')]}"
                     + (f" --vocab-size {vocab_size}" if vocab_size else ""))
    steps.append(f"python tools/preprocess_data.py --input {corpus} --output-prefix {out} --json-keys {key}"
                 + ("" if tokenizer in (None, "gpt2") else f" --tokenizer {tokenizer}"))
    writes = (f"{out}_train_{key}_document, {out}_validation_{key}_document and {out}_test_{key}_document from a "
              "SlimPajama folder" if split else f"{out}_{key}_document from a file or folder of documents")
    return (f"{prefix}.bin/.idx: not found. Make it with:\n" + "".join(f"  {c}\n" for c in steps)
            + f"(it writes {writes}" + ("" if source else "; point --input at your corpus") + ")")


def check_data(cfg: Config) -> None:
    """Fail before any process group is started if a dataset file is missing, damaged, or holds token ids
    the model's vocabulary does not have."""
    if not cfg.data.path:
        raise ConfigError("data.path: no training data given; pass --data-path PREFIX (a .bin/.idx pair made by "
                          "tools/preprocess_data.py) or set data.path in the training config")
    for prefix in blend_of(cfg.data.path)[0] + blend_of(cfg.data.valid_path, "data.valid_path")[0]:
        if not all(p.is_file() for p in paths(prefix)):
            raise ConfigError(missing_data_hint(prefix, cfg.data.source, cfg.data.tokenizer, cfg.model.vocab_size))
        IndexedDataset(prefix).check_vocab(cfg.model.vocab_size, "the model (model.vocab_size)", cfg.data.cache_dir)


def _held(prefix: str, split: int | None, ratios: list[float]) -> tuple[str, int]:
    """("N tokens in M documents[ (after the split)]", N) of the documents `prefix` gives this split."""
    indexed = IndexedDataset(prefix)
    start, stop = (0, len(indexed)) if split is None else split_ranges(len(indexed), ratios)[split]
    tokens = int(indexed.sizes[start:stop].sum(dtype=np.int64))
    return f"{tokens:,} tokens in {stop - start:,} documents" + ("" if split is None else " (after the split)"), tokens


def _split(items: list, key: str, name: str, cfg: Config, samples: int, split: int | None,
           say: Callable[[str], None]):
    """The `samples` samples of the `name` set from the blend `items`: split `split` (0 train, 1 valid) of its
    documents, or all of them (None), as megatron-core's builder picks them; None when data.split gives that split no
    share."""
    if split is not None and cfg.data.split[split] == 0:
        return None
    prefixes, weights = blend_of(items, key)
    seq = cfg.training.seq_length
    if name == "train" and cfg.data.mode == "packed":
        for prefix in prefixes:
            held, tokens = _held(prefix, split, cfg.data.split)
            if tokens < seq + 1:
                raise DataError(f"{prefix}: the training data has {held}, fewer than one sample of "
                                f"training.seq_length + 1 = {seq + 1:,} tokens, so packing cannot make even one "
                                "sample; give it more data" + ("" if split is None else " (or a larger train share "
                                                               "in data.split)") + " or lower training.seq_length")
    seed = cfg.eval.seed if name == "valid" and cfg.eval.seed is not None else cfg.training.seed
    ds = build_split(prefixes, weights, samples, seq, seed, ratios=None if split is None else
                     cfg.data.split, split=split or 0, mode=cfg.data.mode, cache_dir=cfg.data.cache_dir)
    if len(ds) < samples:
        raise DataError(f"{key} lists {len(prefixes)} prefixes without weights: as in Megatron they are blended in "
                        f"proportion to their sizes over one pass each, {len(ds):,} samples of {seq + 1:,} tokens, but "
                        f"the {name} set needs {samples:,}; give weights ({key}=[0.5, a, 0.5, b] repeats data as "
                        "needed), more data, or fewer " + ("training.train_tokens" if name == "train" else
                                                           "eval.tokens"))
    for prefix, part in zip(prefixes, ds.datasets if isinstance(ds, BlendedDataset) else [ds]):
        if name == "valid" and part.epochs > 1:
            say(f"warning: validation data {prefix} has {_held(prefix, split, cfg.data.split)[0]}, less than the "
                f"{part.cfg.num_samples:,} samples of {seq + 1:,} tokens that eval.tokens={cfg.eval.tokens:,} takes "
                f"from it: the validation samples pass over its tokens {part.epochs:,} times, so the same text is "
                "scored repeatedly; give more validation data or lower eval.tokens")
    return ds


def build_datasets(cfg: Config, train_samples: int, valid_samples: int, say: Callable[[str], None]):
    """(train, valid) datasets; valid is None (evaluation off) when data.split gives it no share and data.valid_path
    is empty, as in Megatron. Warnings about too little validation data go to `say`."""
    separate_valid = bool(cfg.data.valid_path)
    train = _split(cfg.data.path, "data.path", "train", cfg, train_samples, None if separate_valid else 0, say)
    if separate_valid:
        valid = _split(cfg.data.valid_path, "data.valid_path", "valid", cfg, valid_samples, None, say)
    else:
        valid = _split(cfg.data.path, "data.path", "valid", cfg, valid_samples, 1, say)
    if valid is None:
        say(f"no validation set: data.split={cfg.data.split} gives validation no share and data.valid_path is empty, "
            "so evaluation is off (as in Megatron)")
    return train, valid


def collate(samples: list[dict], sp: SPGroup = NO_SP) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Pipeline-engine micro-batch: (input tokens, (labels, loss mask)); under sequence parallelism this rank's
    contiguous slice of the positions."""
    tokens = torch.from_numpy(np.stack([s["tokens"] for s in samples]))
    mask = torch.from_numpy(np.stack([s["loss_mask"] for s in samples]))
    positions = slice(sp.rank * mask.shape[1] // sp.size, (sp.rank + 1) * mask.shape[1] // sp.size)
    return (tokens[:, :-1][:, positions].contiguous(),
            (tokens[:, 1:][:, positions].contiguous(), mask[:, positions].contiguous()))


def step_batches(dataset, consumed: int, micro: int, dp_size: int, dp_rank: int, steps_of: int,
                 sp: SPGroup = NO_SP) -> Iterator:
    """The `steps_of` micro-batches this DP rank (of SP rank `sp`) reads for the step starting at `consumed`
    samples."""
    it = micro_batch_indices(consumed, micro, dp_size, dp_rank, consumed + steps_of * micro * dp_size)
    for indices in it:
        yield collate([dataset[i] for i in indices], sp)


def eval_batches(dataset, total: int, micro: int, dp_size: int, dp_rank: int, seq_length: int,
                 sp: SPGroup = NO_SP) -> list:
    """All `total` validation samples as micro-batches for this DP rank (of SP rank `sp`), the last ones padded
    with fully masked samples so that every layout sees exactly the same set."""
    step = micro * dp_size
    padded = -(-total // step) * step
    empty = {"tokens": np.zeros(seq_length + 1, np.int64), "loss_mask": np.zeros(seq_length, np.float32)}
    out = []
    for indices in micro_batch_indices(0, micro, dp_size, dp_rank, padded):
        out.append(collate([dataset[i] if i < total else empty for i in indices], sp))
    return out
