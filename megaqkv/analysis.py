"""Parameters, compute and KV-cache size per variant: the numbers behind the paper's tables.

Two compute conventions are printed side by side:

* paper: per layer p·T·H² + 2·T²·H + T·H² + 2·T·H·FFN, plus the LM head T·H·V, with p the
  number of distinct projections (QKV 3; Q=K–V, Q–K=V, Q-GQA, Q-MQA 2; Q=K=V 1; GQA/MQA
  count as 3, as in the paper) and the full T×T score matrix;
* exact: the fused projection by its real rows (GQA/MQA-aware), scores and attention-times-V
  over the causal triangle T(T+1)/2 only, output projection, MLP and LM head; biases,
  LayerNorm and softmax excluded.

1 MAC = 2 FLOPs; a training step costs 3x the forward FLOPs (backward = 2x forward).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from .flops import CONVENTIONS, block_macs, head_macs
from .config import ConfigError, FieldError, ModelConfig, check_parallel_fits_model, load_model_config
from .model import GPT
from .parallel.grid import TPGroup
from .parallel.sharding import param_spec
from .variants import PRESETS, AttentionLayout, attention_parameters, kv_cache_bytes_per_token, \
    paper_name, total_parameters

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_CONFIGS = REPO_ROOT / "model_configs"
DEFAULT_SEQ_LENS = (128, 512, 1024, 2048)


def forward_macs(cfg: ModelConfig, seq_len: int, convention: str = "exact") -> int:
    """Multiply-accumulates of one forward pass over one sequence of `seq_len` tokens."""
    return cfg.num_layers * block_macs(cfg, seq_len, convention) + head_macs(cfg, seq_len)


def training_flops_per_token(cfg: ModelConfig, seq_len: int, convention: str = "exact") -> float:
    """Model FLOPs per trained token (forward + backward), for throughput and MFU."""
    return 3 * 2 * forward_macs(cfg, seq_len, convention) / seq_len


def megatron_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = False) -> float:
    """Training FLOPs per token as Megatron-LM counts them: `num_floating_point_operations(args, batch)` of
    megatron/training/training.py for a dense GPT (no MoE, no SwiGLU), divided by batch × seq_length:

        12·L·h²·((1 + g/n + T/h)·(n·d/h) + F/h) + 6·h·V

    with L layers, hidden h, n query heads of d = kv_channels, g = num_query_groups (KV heads), FFN width F,
    vocabulary V (Megatron's padded_vocab_size; the presets' vocab_size is already a multiple of 128) and
    T = seq_len: 12 = 3 (forward, backward wgrad and dgrad) × 2 (FLOPs per MAC) × 2 (GEMMs in pairs).

    Attention scores and attention-times-V are counted over the full T×T matrix, as Megatron-LM did through
    2024 (NVIDIA/Megatron-LM#831) and as most published Megatron MFU numbers are; `causal=True` is its 2025
    formula, which halves that term for the causal mask (T/h -> T/(2h)). Megatron has no shared projections:
    a variant is counted as Megatron would count the GQA model with the same KV heads, i.e. query, key and
    value projected separately (Q=K–V and Q=K=V as MHA; Q–K=V, Q-GQA and Q-MQA as MHA/GQA/MQA with g KV heads),
    so sharing saves nothing in this convention; `training_flops_per_token` credits only the real rows.
    """
    h, n, g = cfg.hidden_size, cfg.num_heads, cfg.kv_heads
    scores = seq_len / 2 if causal else seq_len
    attention = (1 + g / n + scores / h) * n * cfg.head_dim / h
    return 12 * cfg.num_layers * h * h * (attention + cfg.ffn_hidden_size / h) + 6 * h * cfg.vocab_size


def qkv_baseline(cfg: ModelConfig) -> ModelConfig:
    """The same shape with standard multi-head QKV attention."""
    return dataclasses.replace(cfg, sharing="none", num_kv_heads=None)


def analyze(cfg: ModelConfig, name: str, seq_lens: Sequence[int], context: int) -> dict:
    base = qkv_baseline(cfg)
    kv_token = kv_cache_bytes_per_token(cfg)
    kv_base = kv_cache_bytes_per_token(base)
    return {
        "config": name,
        "variant": paper_name(cfg.sharing, cfg.num_heads, cfg.kv_heads),
        "sharing": cfg.sharing,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.kv_heads,
        "shape": {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "heads": cfg.num_heads,
                  "ffn": cfg.ffn_hidden_size, "vocab": cfg.vocab_size},
        "parameters": total_parameters(cfg),
        "attention_parameters": attention_parameters(cfg),
        "parameter_reduction_vs_qkv": 1 - total_parameters(cfg) / total_parameters(base),
        "kv_cache_bytes_per_token": kv_token,
        "kv_cache_bytes_at_context": kv_token * context,
        "context": context,
        "kv_cache_reduction_vs_qkv": 1 - kv_token / kv_base,
        "gmacs": {conv: {t: forward_macs(cfg, t, conv) / 1e9 for t in seq_lens} for conv in CONVENTIONS},
    }


def per_rank_parameters(cfg: ModelConfig, tp: int) -> dict:
    """What one tensor-parallel rank holds (the model built on `meta`, no memory): parameters by layout
    and the attention input rows per role. Every rank holds the same shapes."""
    try:
        check_parallel_fits_model(cfg, tp, 1)
    except FieldError as exc:
        raise ConfigError(f"--tp {tp}: {exc.message}") from None
    with torch.device("meta"):
        model = GPT(cfg, tp=TPGroup(size=tp, rank=0))
    counts = {"sharded": 0, "replicated_kv": 0, "replicated_other": 0}
    for name, p in model.named_parameters():
        kind = ("sharded" if param_spec(name, cfg, tp).dim is not None
                else "replicated_kv" if ".attn.kv_proj." in name else "replicated_other")
        counts[kind] += p.numel()
    attn = model.layers[0].attn
    layout, local, d = AttentionLayout.of(cfg), attn.local, cfg.head_dim
    if hasattr(attn, "in_proj"):
        rows = {role: local.num_kv_heads * len(slots) * d for role, slots in layout.roles().items()}
    else:
        rows = {"q": local.num_heads * d, **{f"{role} (replicated)": layout.num_kv_heads * d
                                            for role in layout.kv_roles()}}
    per_rank = sum(counts.values())
    padding = (model.wte.part * tp - cfg.vocab_size) * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)
    return {"config": cfg, "tp": tp, "per_rank": per_rank, **counts, "attention_rows_per_rank": rows,
            "vocab_padding": padding, "duplicated": tp * per_rank - total_parameters(cfg) - padding}


def sequence_exchange(cfg: ModelConfig, sp: int, seq_len: int, tp: int = 1, bytes_per_element: int = 2,
                      checkpointed: bool = False) -> dict:
    """Bytes one rank sends to the other sequence-parallel ranks per layer for one sequence of `seq_len` tokens,
    forward and backward: the all-to-all of the projection output (only the rows the variant has) and of the
    attention output (`parallel.sequence`). Activation checkpointing runs the forward's exchanges again."""
    try:
        check_parallel_fits_model(cfg, tp, 1, sp=sp)
    except FieldError as exc:
        raise ConfigError(f"--sp {sp}: {exc.message}") from None
    if seq_len % sp:
        raise ConfigError(f"--sp {sp}: the sequence length {seq_len} is not divisible by it")
    local = AttentionLayout.of(cfg).tensor_split(tp)
    passes = 3 if checkpointed else 2
    projection, output = (passes * bytes_per_element * n for n in local.sequence_exchange_elements(sp, seq_len // sp))
    return {"sp": sp, "tp": tp, "seq_len": seq_len, "projection_bytes": projection, "output_bytes": output}


def _change(reduction: float, digits: int) -> str:
    value = -100 * reduction
    return f"{0.0 if abs(value) < 0.5 * 10 ** -digits else value:.{digits}f}%"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def tables(rows: list[dict], seq_lens: Sequence[int], context: int) -> list[tuple[str, list[str], list[list[str]]]]:
    params = ("Parameters and KV cache (bf16)",
              ["config", "variant", "sharing", "kv heads", "parameters", "attention params", "params vs QKV",
               "KV / token", f"KV @ {f'{context // 1024}K' if context % 1024 == 0 else context} ctx", "KV vs QKV"],
              [[r["config"], r["variant"], r["sharing"], str(r["num_kv_heads"]), f"{r['parameters']:,}",
                f"{r['attention_parameters']:,}", _change(r["parameter_reduction_vs_qkv"], 2),
                _bytes(r["kv_cache_bytes_per_token"]), _bytes(r["kv_cache_bytes_at_context"]),
                _change(r["kv_cache_reduction_vs_qkv"], 3)] for r in rows])
    compute = ("Forward GMACs per sequence, batch 1 (paper convention / exact)",
               ["config", "variant"] + [f"T={t}" for t in seq_lens],
               [[r["config"], r["variant"]]
                + [f"{r['gmacs']['paper'][t]:.2f} / {r['gmacs']['exact'][t]:.2f}" for t in seq_lens]
                for r in rows])
    return [params, compute]


def per_rank_table(ranks: list[dict]) -> tuple[str, list[str], list[list[str]]]:
    return ("Per tensor-parallel rank (duplicated = held by several ranks beyond the model's own count)",
            ["config", "TP", "params / rank", "sharded", "replicated K/V", "other replicated", "vocab padding",
             "duplicated (all ranks)", "attention input rows / rank"],
            [[r["config"], str(r["tp"]), f"{r['per_rank']:,}", f"{r['sharded']:,}", f"{r['replicated_kv']:,}",
              f"{r['replicated_other']:,}", f"{r['vocab_padding']:,}", f"{r['duplicated']:,}",
              " ".join(f"{k}:{v}" for k, v in r["attention_rows_per_rank"].items())] for r in ranks])


def sequence_table(rows: list[dict]) -> tuple[str, list[str], list[list[str]]]:
    base = {(r["sp"], r["tp"], r["seq_len"]): r["projection_bytes"] for r in rows if r["variant"] == "QKV"}
    return ("Sequence parallelism: bytes one rank sends per layer per sequence, forward + backward (bf16)",
            ["config", "variant", "SP", "TP", "seq", "q/k/v exchange", "vs QKV", "output exchange"],
            [[r["config"], r["variant"], str(r["sp"]), str(r["tp"]), str(r["seq_len"]), _bytes(r["projection_bytes"]),
              f"{r['projection_bytes'] / base[r['sp'], r['tp'], r['seq_len']]:.3f}×"
              if (r["sp"], r["tp"], r["seq_len"]) in base else "–", _bytes(r["output_bytes"])] for r in rows])


def render(title: str, header: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    fmt = lambda row: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([title, fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


CONVENTION_NOTE = (
    "Compute conventions. paper: per layer p*T*H^2 + 2*T^2*H + T*H^2 + 2*T*H*FFN plus LM head T*H*V, "
    "p = distinct projections (QKV 3, Q=K–V/Q–K=V/Q-GQA/Q-MQA 2, Q=K=V 1, GQA/MQA 3), full TxT scores. "
    "exact: fused projection by its real rows (GQA/MQA-aware), scores and AV over the causal triangle "
    "T(T+1)/2, out proj, MLP, LM head; biases/norms/softmax excluded. 1 MAC = 2 FLOPs; "
    "KV cache in bf16 (2 bytes), 1 KiB = 1024 B; reductions are against QKV of the same shape.")


def preset_paths(scale: str) -> list[Path]:
    paths = [MODEL_CONFIGS / f"{scale}_{preset}.yaml" for preset in PRESETS]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"no preset configs for scale '{scale}' under {MODEL_CONFIGS} "
                          f"(missing {missing[0].name}); pass config files explicitly")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="analyze.py", description="Parameters, FLOPs and KV-cache bytes per attention variant.",
        epilog=CONVENTION_NOTE)
    parser.add_argument("configs", nargs="*", help="model config YAML files (default: every preset of --scale)")
    parser.add_argument("--scale", default="300M", help="preset scale when no configs are given (300M, 1.2B, cpu, tiny)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=list(DEFAULT_SEQ_LENS))
    parser.add_argument("--context", type=int, default=32768, help="context length for the KV-cache column")
    parser.add_argument("--tp", type=int, nargs="+", default=[],
                        help="also show what one tensor-parallel rank holds at these TP sizes")
    parser.add_argument("--sp", type=int, nargs="+", default=[],
                        help="also show the bytes sequence parallelism exchanges at these SP sizes (at the longest "
                             "--seq-lens, TP 1 or each --tp)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="also draw KV cache against context length (up to --context) and parameters per variant "
                             "(needs matplotlib: pip install 'megaqkv[plot]')")
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="machine-readable output")
    fmt.add_argument("--markdown", action="store_true", help="markdown tables")
    args = parser.parse_args(argv)
    try:
        paths = [Path(p) for p in args.configs] or preset_paths(args.scale)
        configs = [(p.stem, load_model_config(p)) for p in paths]
        rows = [analyze(cfg, name, args.seq_lens, args.context) for name, cfg in configs]
        ranks = [{**per_rank_parameters(cfg, tp), "config": name} for tp in args.tp for name, cfg in configs]
        exchange = [{**sequence_exchange(cfg, sp, max(args.seq_lens), tp), "config": name,
                     "variant": paper_name(cfg.sharing, cfg.num_heads, cfg.kv_heads)}
                    for sp in args.sp for tp in args.tp or [1] for name, cfg in configs]
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"conventions": CONVENTION_NOTE, "rows": rows, "per_rank": ranks,
                          "sequence_parallel": exchange}, indent=2))
    else:
        sep = "\n\n"
        blocks = (tables(rows, args.seq_lens, args.context) + ([per_rank_table(ranks)] if ranks else [])
                  + ([sequence_table(exchange)] if exchange else []))
        print(sep.join(render(*t, markdown=args.markdown) for t in blocks))
        print(sep + CONVENTION_NOTE)
    return plot(rows, args.context, args.plot) if args.plot else 0


def plot(rows: list[dict], context: int, path: Path) -> int:
    """analyze.py --plot: the figure of figures.analysis over contexts from 128 tokens up to `context`."""
    from . import figures

    contexts = sorted({2 ** k for k in range(7, context.bit_length()) if 2 ** k <= context} | {context})
    try:
        print(f"wrote {figures.analysis(rows, contexts, path)}", file=sys.stderr)
    except figures.Unavailable as exc:
        print(f"error: --plot: {exc}", file=sys.stderr)
        return 2
    return 0
