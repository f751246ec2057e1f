"""The paper's reference checkpoints (`checkpoint_step_N.pt`, `final_model.pt`, DESIGN §6) <-> consolidated.

A dict with `model_state_dict` (keys `module.`-prefixed, GPT-2 names `h.{i}.…`, `wte`, `wpe`, `ln_f`,
attention per variant as below, and a causal-mask buffer `h.{i}.attn.bias`), `model_config`,
`train_config`, `step`, `tokens_seen`. Attention weights are [out, in] with biases:

    QKV      c_attn [3H, H] = [Q; K; V]        GQA / MQA  c_q [H, H], c_kv [2gd, H] = [K; V]
    Q=K–V    c_kv   [2H, H] = [QK; V]          Q-GQA      c_q [H, H], c_k  [gd, H] (shared K=V)
    Q–K=V    c_q, c_k [H, H] (c_k: K=V)        Q-MQA      c_q [H, H], c_kv [d, H]  (shared K=V)
    Q=K=V    c_k [H, H]

Files are read with `torch.load(weights_only=True)`: a file that needs arbitrary classes unpickled
is refused rather than executed.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig, model_config_from_dict
from .consolidated import CheckpointError, Consolidated, commit_output, prepare_output

_PER_LAYER = {"ln_1": "ln_1", "ln_2": "ln_2", "mlp.c_fc": "mlp.fc_in", "mlp.c_proj": "mlp.fc_out",
              "attn.c_proj": "attn.out_proj"}


def _attention_keys(sharing: str, n: int, g: int) -> dict[str, list[str]]:
    """Paper projection name -> the canonical roles stacked in it, in row order."""
    if sharing == "none":
        return {"c_attn": ["q", "k", "v"]} if g == n else {"c_q": ["q"], "c_kv": ["k", "v"]}
    if sharing == "qk":
        return {"c_kv": ["qk", "v"]}
    if sharing == "qkv":
        return {"c_k": ["qkv"]}
    return {"c_q": ["q"], ("c_kv" if g == 1 else "c_k"): ["kv"]}


def _recognise(sd: dict[str, torch.Tensor], head_dim: int, num_heads: int, where: str) -> tuple[str, int]:
    """(sharing, num_kv_heads) from the attention keys and shapes of layer 0."""
    keys = {k.split(".")[-2] for k in sd if re.match(r"h\.0\.attn\.c_(attn|q|k|kv)\.weight$", k)}
    rows = lambda name: sd[f"h.0.attn.{name}.weight"].shape[0]
    h = num_heads * head_dim
    if keys == {"c_attn"}:
        return "none", num_heads
    if keys == {"c_kv"} and rows("c_kv") == 2 * h:
        return "qk", num_heads
    if keys == {"c_k"} and rows("c_k") == h:
        return "qkv", num_heads
    if keys == {"c_q", "c_k"}:
        return "kv", rows("c_k") // head_dim
    if keys == {"c_q", "c_kv"}:
        if rows("c_kv") == head_dim:
            return "kv", 1  # Q-MQA: one shared K=V head
        return "none", rows("c_kv") // (2 * head_dim)
    raise CheckpointError(f"{where}: attention keys {sorted(keys)} of layer 0 match no variant of DESIGN §6")


def _config_value(mc: dict, *names, default=None):
    for n in names:
        if n in mc and mc[n] is not None:
            return mc[n]
    return default


def read(path: str | Path) -> Consolidated:
    path = Path(path)
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: holds pickled Python objects that a safe load refuses ({str(exc).splitlines()[-1][:200]}). "
            "megaqkv never unpickles checkpoint files. On a machine where you trust the file, re-save it with plain "
            "data, e.g. ck = torch.load(p, weights_only=False); ck['model_config'] = dict(vars(ck['model_config'])); "
            "ck.pop('optimizer_state_dict', None); torch.save(ck, p2)") from None
    if not isinstance(ck, dict) or "model_state_dict" not in ck:
        raise CheckpointError(f"{path}: not a reference checkpoint (no 'model_state_dict')")
    sd = {re.sub(r"^(module\.)?(transformer\.)?", "", k): v for k, v in ck["model_state_dict"].items()}
    mc = ck.get("model_config") or {}
    if not isinstance(mc, dict):
        raise CheckpointError(f"{path}: model_config is {type(mc).__name__}, expected a dict")
    try:
        vocab, hidden = sd["wte.weight"].shape
        layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"h\.(\d+)\.", k)))
        heads = _config_value(mc, "n_head", "num_heads")
        if heads is None:
            raise CheckpointError(f"{path}: model_config has no n_head; it cannot be read from the weights")
        sharing, kv_heads = _recognise(sd, hidden // heads, heads, str(path))
        tied = "lm_head.weight" not in sd or torch.equal(sd["lm_head.weight"], sd["wte.weight"])
        cfg = model_config_from_dict({
            "num_layers": layers, "hidden_size": hidden, "num_heads": heads,
            "ffn_hidden_size": sd["h.0.mlp.c_fc.weight"].shape[0], "vocab_size": vocab,
            "max_position_embeddings": sd["wpe.weight"].shape[0], "sharing": sharing, "num_kv_heads": kv_heads,
            "bias": "h.0.mlp.c_fc.bias" in sd, "tie_embeddings": tied,
            "hidden_dropout": float(_config_value(mc, "dropout", "resid_pdrop", default=0.1)),
            "layernorm_eps": float(_config_value(mc, "layer_norm_epsilon", "eps", default=1e-5))},
            source=f"{path} (model_config and weights)")
    except KeyError as exc:
        raise CheckpointError(f"{path}: missing key {exc} in model_state_dict") from None
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    weights = {"wte.weight": sd["wte.weight"], "wpe.weight": sd["wpe.weight"],
               "ln_f.weight": sd["ln_f.weight"], "ln_f.bias": sd["ln_f.bias"]}
    if not tied:
        weights["lm_head.weight"] = sd["lm_head.weight"]
    d = cfg.head_dim
    sizes = {"q": heads * d, "qk": heads * d, "qkv": heads * d, "k": kv_heads * d, "v": kv_heads * d,
             "kv": kv_heads * d}
    try:
        for i in range(layers):
            for theirs, ours in _PER_LAYER.items():
                for kind in ("weight", "bias"):
                    if f"h.{i}.{theirs}.{kind}" in sd:
                        weights[f"layers.{i}.{ours}.{kind}"] = sd[f"h.{i}.{theirs}.{kind}"]
            for proj, roles in _attention_keys(sharing, heads, kv_heads).items():
                for kind in ("weight", "bias") if cfg.bias else ("weight",):
                    parts = torch.split(sd[f"h.{i}.attn.{proj}.{kind}"], [sizes[r] for r in roles])
                    weights.update({f"layers.{i}.attn.{r}.{kind}": t.clone() for r, t in zip(roles, parts)})
    except KeyError as exc:
        raise CheckpointError(f"{path}: missing key {exc} for a {sharing}/{kv_heads}-KV-head model") from None
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: attention shapes disagree with the variant ({exc})") from None
    out = Consolidated(cfg, weights, source=f"paper:{path}")
    out.trainer = {"step": int(ck.get("step", 0)), "tokens_seen": int(ck.get("tokens_seen", 0))}
    out.check(str(path))
    return out


def write(ck: Consolidated, path: str | Path, force: bool = False) -> Path:
    """Consolidated -> a reference checkpoint the paper's scripts load (causal masks stored as bool)."""
    path = Path(path)
    tmp = prepare_output(path, force, directory=False)
    cfg: ModelConfig = ck.config
    w = ck.weights
    sd = {"wte.weight": w["wte.weight"], "wpe.weight": w["wpe.weight"], "ln_f.weight": w["ln_f.weight"],
          "ln_f.bias": w["ln_f.bias"]}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = w["lm_head.weight"]
    mask = torch.ones(cfg.max_position_embeddings, cfg.max_position_embeddings, dtype=torch.bool).tril()
    mask = mask.view(1, 1, *mask.shape)
    for i in range(cfg.num_layers):
        for theirs, ours in _PER_LAYER.items():
            for kind in ("weight", "bias"):
                if f"layers.{i}.{ours}.{kind}" in w:
                    sd[f"h.{i}.{theirs}.{kind}"] = w[f"layers.{i}.{ours}.{kind}"]
        for proj, roles in _attention_keys(cfg.sharing, cfg.num_heads, cfg.kv_heads).items():
            for kind in ("weight", "bias") if cfg.bias else ("weight",):
                sd[f"h.{i}.attn.{proj}.{kind}"] = torch.cat([w[f"layers.{i}.attn.{r}.{kind}"] for r in roles])
        sd[f"h.{i}.attn.bias"] = mask
    trainer = ck.trainer or {}
    out = {"model_state_dict": {f"module.{k}": v for k, v in sd.items()},
           "model_config": {"n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_embd": cfg.hidden_size,
                            "n_kv_head": cfg.kv_heads, "sharing": cfg.sharing, "vocab_size": cfg.vocab_size,
                            "block_size": cfg.max_position_embeddings, "ffn_hidden_size": cfg.ffn_hidden_size,
                            "bias": cfg.bias, "dropout": cfg.hidden_dropout},
           "train_config": {}, "step": int(trainer.get("step", 0)),
           "tokens_seen": int(trainer.get("tokens_seen", 0))}
    torch.save(out, tmp)
    return commit_output(tmp, path)
