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
from ..parallel.sharding import canonical_shapes
from .consolidated import CheckpointError, Consolidated, variant_text, writing

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


def _layout(cfg: ModelConfig) -> dict[str, list[str]]:
    """Every reference key of a model (causal masks aside) -> the canonical tensors stacked in it by rows."""
    layout = {name: [name] for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")}
    if not cfg.tie_embeddings:
        layout["lm_head.weight"] = ["lm_head.weight"]
    kinds = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.num_layers):
        for theirs, ours in _PER_LAYER.items():
            for kind in ("weight", "bias") if theirs.startswith("ln_") else kinds:
                layout[f"h.{i}.{theirs}.{kind}"] = [f"layers.{i}.{ours}.{kind}"]
        for proj, roles in _attention_keys(cfg.sharing, cfg.num_heads, cfg.kv_heads).items():
            for kind in kinds:
                layout[f"h.{i}.attn.{proj}.{kind}"] = [f"layers.{i}.attn.{r}.{kind}" for r in roles]
    return layout


def torch_load(path: Path):
    """`torch.load(weights_only=True)` with its failures as CheckpointErrors: a file that needs classes
    unpickled is refused rather than executed, and a cut or damaged one says so."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not (refused := re.search(r"Unsupported (global|class).*", str(exc))):
            raise CheckpointError(f"{path}: truncated or corrupt, not a readable torch file; copy it again") from None
        raise CheckpointError(
            f"{path}: holds pickled Python objects that a safe load refuses ({refused.group(0)[:200]}). "
            "megaqkv never unpickles checkpoint files. On a machine where you trust the file, re-save it with plain "
            "data, e.g. ck = torch.load(p, weights_only=False); ck['model_config'] = dict(vars(ck['model_config'])); "
            "ck.pop('optimizer_state_dict', None); torch.save(ck, p2)") from None
    except Exception as exc:  # torch.load names no error set: a cut zip, a bad pickle opcode, an odd index...
        raise CheckpointError(f"{path}: truncated or corrupt, not a readable torch file ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); copy it again") from None


def read(path: str | Path) -> Consolidated:
    path = Path(path)
    ck = torch_load(path)
    if not isinstance(ck, dict) or not isinstance(ck.get("model_state_dict"), dict):
        raise CheckpointError(f"{path}: not a reference checkpoint (no 'model_state_dict')")
    sd = {re.sub(r"^(module\.)?(transformer\.)?", "", k): v for k, v in ck["model_state_dict"].items()}
    if odd := [k for k, v in sd.items() if not isinstance(v, torch.Tensor)][:4]:
        raise CheckpointError(f"{path}: model_state_dict entries {odd} are not tensors")
    mc = ck.get("model_config") or {}
    if not isinstance(mc, dict):
        raise CheckpointError(f"{path}: model_config is {type(mc).__name__}, expected a dict")
    heads = _config_value(mc, "n_head", "num_heads")
    if not isinstance(heads, int) or heads < 1:
        raise CheckpointError(f"{path}: model_config has n_head {heads!r}; it needs the positive number of heads, "
                              "which cannot be read from the weights")
    try:
        vocab, hidden = sd["wte.weight"].shape
        layers = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"h\.(\d+)\.", k))), default=-1)
        if _config_value(mc, "n_layer", "num_layers", default=layers) != layers:
            raise CheckpointError(f"{path}: model_config has {_config_value(mc, 'n_layer', 'num_layers')} layers, "
                                  f"model_state_dict holds {layers} (h.0 to h.{layers - 1})")
        sharing, kv_heads = _recognise(sd, hidden // heads, heads, str(path))
        tied = "lm_head.weight" not in sd or torch.equal(sd["lm_head.weight"], sd["wte.weight"])
        cfg = model_config_from_dict({
            "num_layers": layers, "hidden_size": hidden, "num_heads": heads,
            "ffn_hidden_size": sd["h.0.mlp.c_fc.weight"].shape[0], "vocab_size": vocab,
            "max_position_embeddings": sd["wpe.weight"].shape[0], "sharing": sharing, "num_kv_heads": kv_heads,
            "bias": any(re.match(r"h\.\d+\.(attn|mlp)\.c_\w+\.bias$", k) for k in sd), "tie_embeddings": tied,
            "hidden_dropout": float(_config_value(mc, "dropout", "resid_pdrop", default=0.1)),
            "layernorm_eps": float(_config_value(mc, "layer_norm_epsilon", "eps", default=1e-5))},
            source=f"{path} (model_config and weights)")
    except KeyError as exc:
        raise CheckpointError(f"{path}: model_state_dict has no {exc}") from None
    except (CheckpointError, ConfigError) as exc:
        raise CheckpointError(str(exc)) from None
    except ValueError as exc:  # wte.weight not 2-D, a model_config value that is no number
        raise CheckpointError(f"{path}: unreadable model_state_dict or model_config ({exc})") from None
    layout = _layout(cfg)
    missing = [k for k in layout if k not in sd]
    unexpected = [k for k in sd if k not in layout
                  and not re.fullmatch(r"h\.\d+\.attn\.(masked_)?bias|lm_head\.weight", k)]  # masks, tied head
    if missing or unexpected:  # a key lost, or layers of different variants (layer 0 decides the variant)
        listed = lambda keys: f"{keys[:6]}{'...' if len(keys) > 6 else ''}"
        raise CheckpointError(f"{path}: model_state_dict does not match the model its layer 0 describes "
                              f"({variant_text(cfg)}): missing {listed(missing)}, unexpected {listed(unexpected)}")
    shapes = canonical_shapes(cfg)
    weights = {}
    try:
        for key, names in layout.items():
            parts = torch.split(sd[key], [shapes[n][0] for n in names])
            weights.update({n: t.clone() if len(names) > 1 else t for n, t in zip(names, parts)})
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: {key} has shape {tuple(sd[key].shape)}, which disagrees with the variant "
                              f"({exc})") from None
    out = Consolidated(cfg, weights, source=f"paper:{path}")
    out.trainer = {"step": int(ck.get("step", 0)), "tokens_seen": int(ck.get("tokens_seen", 0))}
    out.check(str(path))
    return out


def write(ck: Consolidated, path: str | Path, force: bool = False) -> Path:
    """Consolidated -> a reference checkpoint the paper's scripts load (causal masks stored as bool)."""
    path = Path(path)
    cfg: ModelConfig = ck.config
    w = ck.weights
    sd = {key: w[names[0]] if len(names) == 1 else torch.cat([w[n] for n in names])
          for key, names in _layout(cfg).items()}
    mask = torch.ones(cfg.max_position_embeddings, cfg.max_position_embeddings, dtype=torch.bool).tril()
    sd.update({f"h.{i}.attn.bias": mask.view(1, 1, *mask.shape) for i in range(cfg.num_layers)})
    trainer = ck.trainer or {}
    out = {"model_state_dict": {f"module.{k}": v for k, v in sd.items()},
           "model_config": {"n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_embd": cfg.hidden_size,
                            "n_kv_head": cfg.kv_heads, "sharing": cfg.sharing, "vocab_size": cfg.vocab_size,
                            "block_size": cfg.max_position_embeddings, "ffn_hidden_size": cfg.ffn_hidden_size,
                            "bias": cfg.bias, "dropout": cfg.hidden_dropout},
           "train_config": {}, "step": int(trainer.get("step", 0)),
           "tokens_seen": int(trainer.get("tokens_seen", 0))}
    with writing(path, force, directory=False) as tmp:
        torch.save(out, tmp)
    return path
