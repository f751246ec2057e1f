"""Hugging Face `GPT2LMHeadModel` export (`--to hf-gpt2`) and import, for tools that know only GPT-2.

Every variant is a GPT-2 with some weights duplicated: shared roles are copied into GPT-2's fused
`c_attn` (Q=K copies the query into the key block, K=V the key into the value block) and grouped
K/V heads are repeated for the query heads that read them. With `activation_function: gelu` (exact
erf, as ours) the exported model gives our logits and works offline with `from_pretrained`.
GPT-2's Conv1D stores weights as [in, out], the transpose of ours. Importing takes a GPT-2-shaped
model into the `qkv` preset. The price of the duplication is the variant's cache savings: the native
export (`hf.py`) keeps them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig, model_config_from_dict
from .consolidated import CheckpointError, Consolidated


def _expand(t: torch.Tensor, groups: int, heads: int, head_dim: int) -> torch.Tensor:
    """K/V rows of `groups` heads -> one copy per query head (head i reads group i // (heads/groups))."""
    return t.reshape(groups, head_dim, *t.shape[1:]).repeat_interleave(heads // groups, dim=0).reshape(
        heads * head_dim, *t.shape[1:])


def _qkv(w: dict, i: int, cfg: ModelConfig, kind: str) -> torch.Tensor:
    """GPT-2's fused [Q; K; V] (all heads) of layer i, from our per-role tensors."""
    from ..hf.configuration_megaqkv import ROLES

    a = lambda role: w[f"layers.{i}.attn.{role}.{kind}"]
    n, g, d = cfg.num_heads, cfg.kv_heads, cfg.head_dim
    q, k, v = ROLES[cfg.sharing]
    return torch.cat([a(q), _expand(a(k), g, n, d), _expand(a(v), g, n, d)])


def model(ck: Consolidated, eod: int | None, out: Path):
    """The duplicated GPT2LMHeadModel holding the checkpoint's weights (`out` names the export in errors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg, w = ck.config, ck.weights
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
                        n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.ffn_hidden_size,
                        activation_function="gelu", resid_pdrop=cfg.hidden_dropout, embd_pdrop=cfg.embedding_dropout,
                        attn_pdrop=cfg.attention_dropout, layer_norm_epsilon=cfg.layernorm_eps,
                        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=eod, eos_token_id=eod)
    zeros = lambda n: torch.zeros(n, dtype=w["wte.weight"].dtype)
    bias = lambda name, n: w[name] if cfg.bias else zeros(n)
    sd = {"transformer.wte.weight": w["wte.weight"], "transformer.wpe.weight": w["wpe.weight"],
          "transformer.ln_f.weight": w["ln_f.weight"], "transformer.ln_f.bias": w["ln_f.bias"],
          "lm_head.weight": w["wte.weight"] if cfg.tie_embeddings else w["lm_head.weight"]}
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    for i in range(cfg.num_layers):
        p, t = f"layers.{i}.", f"transformer.h.{i}."
        sd.update({t + "ln_1.weight": w[p + "ln_1.weight"], t + "ln_1.bias": w[p + "ln_1.bias"],
                   t + "ln_2.weight": w[p + "ln_2.weight"], t + "ln_2.bias": w[p + "ln_2.bias"],
                   t + "attn.c_attn.weight": _qkv(w, i, cfg, "weight").t(),
                   t + "attn.c_attn.bias": _qkv(w, i, cfg, "bias") if cfg.bias else zeros(3 * h),
                   t + "attn.c_proj.weight": w[p + "attn.out_proj.weight"].t(),
                   t + "attn.c_proj.bias": bias(p + "attn.out_proj.bias", h),
                   t + "mlp.c_fc.weight": w[p + "mlp.fc_in.weight"].t(), t + "mlp.c_fc.bias": bias(p + "mlp.fc_in.bias", f),
                   t + "mlp.c_proj.weight": w[p + "mlp.fc_out.weight"].t(),
                   t + "mlp.c_proj.bias": bias(p + "mlp.fc_out.bias", h)})
    hf_model = GPT2LMHeadModel(hf_cfg).to(w["wte.weight"].dtype)
    missing, unexpected = hf_model.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if not m.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise CheckpointError(f"{out}: export does not match GPT2LMHeadModel (missing {missing}, unexpected "
                              f"{unexpected})")
    return hf_model


def read(path: Path, hc: dict, state: dict[str, torch.Tensor], log=print) -> Consolidated:
    """A GPT-2-shaped HF model (its config.json `hc` and tensors) -> the `qkv` preset (separate Q, K, V)."""
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hc.get(flag):
            raise CheckpointError(f"{path}/config.json: {flag} is set; our attention has no such variation")
    if hc.get("activation_function", "gelu_new") != "gelu":
        log(f"warning: {path} uses activation {hc.get('activation_function', 'gelu_new')!r}; megaqkv uses exact "
            "GELU, so its logits will differ slightly from the original's")
    try:
        h = hc["n_embd"]
        cfg = model_config_from_dict({
            "num_layers": hc["n_layer"], "hidden_size": h, "num_heads": hc["n_head"],
            "ffn_hidden_size": hc.get("n_inner") or 4 * h, "vocab_size": hc["vocab_size"],
            "max_position_embeddings": hc["n_positions"], "sharing": "none",
            "hidden_dropout": hc.get("resid_pdrop", 0.1), "attention_dropout": hc.get("attn_pdrop", 0.0),
            "embedding_dropout": hc.get("embd_pdrop", 0.0), "layernorm_eps": hc.get("layer_norm_epsilon", 1e-5),
            "tie_embeddings": hc.get("tie_word_embeddings", True)}, source=f"{path}/config.json")
    except KeyError as exc:
        raise CheckpointError(f"{path}/config.json: missing key {exc}") from None
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    sd = {k.removeprefix("transformer."): v for k, v in state.items()}
    try:
        w = _weights(sd, cfg)
    except KeyError as exc:
        raise CheckpointError(f"{path}: the weights have no {exc}, which a {cfg.num_layers}-layer GPT-2 "
                              "needs") from None
    out = Consolidated(cfg, w, source=f"hf:{path}")
    out.check(str(path))
    return out


def _weights(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2's tensors (without `transformer.`) -> canonical `qkv` tensors."""
    h = cfg.hidden_size
    w = {"wte.weight": sd["wte.weight"], "wpe.weight": sd["wpe.weight"], "ln_f.weight": sd["ln_f.weight"],
         "ln_f.bias": sd["ln_f.bias"]}
    if not cfg.tie_embeddings:
        w["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_layers):
        p, t = f"layers.{i}.", f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            w.update({p + f"{ln}.weight": sd[t + f"{ln}.weight"], p + f"{ln}.bias": sd[t + f"{ln}.bias"]})
        for role, wt, b in zip("qkv", sd[t + "attn.c_attn.weight"].t().split(h), sd[t + "attn.c_attn.bias"].split(h)):
            w.update({p + f"attn.{role}.weight": wt.contiguous(), p + f"attn.{role}.bias": b.clone()})
        for ours, theirs in (("attn.out_proj", "attn.c_proj"), ("mlp.fc_in", "mlp.c_fc"), ("mlp.fc_out", "mlp.c_proj")):
            w.update({p + f"{ours}.weight": sd[t + f"{theirs}.weight"].t().contiguous(),
                      p + f"{ours}.bias": sd[t + f"{theirs}.bias"]})
    return w
