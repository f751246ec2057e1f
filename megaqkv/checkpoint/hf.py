"""Hugging Face model directories: the native megaqkv model (`--to hf`, the default) and the duplicated
GPT-2 (`--to hf-gpt2`, `hf_gpt2.py`), both shipped with tokenizer, generation config and model card.

The native export is megaqkv's consolidated tensors under transformers' names (`model.` + ours, tied
head left out), a `MegaQKVConfig` with `auto_map`, and the standalone modeling files of
`megaqkv/hf/`, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` needs no megaqkv.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import ConfigError, model_config_from_dict
from . import hf_assets, hf_gpt2
from .consolidated import CheckpointError, Consolidated, LazyTensors, writing
from .paper import torch_load

KINDS = ("native", "gpt2")
# megaqkv ModelConfig field <- MegaQKVConfig field
_FIELDS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "num_heads": "num_attention_heads",
           "num_kv_heads": "num_key_value_heads", "sharing": "sharing", "ffn_hidden_size": "intermediate_size",
           "vocab_size": "vocab_size", "max_position_embeddings": "max_position_embeddings",
           "embedding_dropout": "embedding_dropout", "attention_dropout": "attention_dropout",
           "hidden_dropout": "hidden_dropout", "layernorm_eps": "layer_norm_eps", "bias": "bias",
           "tie_embeddings": "tie_word_embeddings", "init_std": "initializer_range"}


def is_hf(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and (
        (path / "model.safetensors").is_file() or (path / "pytorch_model.bin").is_file())


def export(ck: Consolidated, path: str | Path, force: bool = False, kind: str = "native",
           tokenizer: str | None = None) -> Path:
    """Writes the HF model directory; `tokenizer` (a megaqkv spec) defaults to the one the checkpoint records.
    Everything is built and checked first, so that only writing happens inside `writing`."""
    path = Path(path)
    tok = hf_assets.tokenizer_for(ck, tokenizer, path)
    assets = hf_assets.prepare(ck, tok, kind)
    eod = tok.eod if tok else None
    if kind == "native":
        hc, state = _native(ck, eod, path)
    else:
        model = hf_gpt2.model(ck, eod, path)
    with writing(path, force) as tmp:
        if kind == "native":
            from ..hf import HERE, MODEL_FILES

            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            hc.save_pretrained(str(tmp))
            for name in MODEL_FILES:
                shutil.copyfile(HERE / name, tmp / name)
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
        assets.save(tmp)
    return path


def _native(ck: Consolidated, eod: int | None, out: Path):
    """The native config and tensors (transformers' names), checked against the model class's own."""
    from ..hf import AUTO_MAP
    from ..hf.configuration_megaqkv import MegaQKVConfig
    from ..hf.modeling_megaqkv import MegaQKVForCausalLM

    cfg = ck.config
    hc = MegaQKVConfig(**{theirs: getattr(cfg, ours) for ours, theirs in _FIELDS.items()},
                       bos_token_id=eod, eos_token_id=eod, pad_token_id=eod)
    hc.auto_map = AUTO_MAP
    hc.architectures = ["MegaQKVForCausalLM"]
    hc.dtype = str(next(iter(ck.weights.values())).dtype).removeprefix("torch.")
    state = {("model." + k if k != "lm_head.weight" else k): v.contiguous() for k, v in ck.weights.items()}
    with torch.device("meta"):
        expected = set(MegaQKVForCausalLM(hc).state_dict()) - ({"lm_head.weight"} if hc.tie_word_embeddings else set())
    if expected != set(state):
        raise CheckpointError(f"{out}: the weights do not fit the native model (missing "
                              f"{sorted(expected - set(state))[:4]}, unexpected {sorted(set(state) - expected)[:4]})")
    return hc, state


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").is_file():
        return dict(LazyTensors(path / "model.safetensors"))
    if (path / "pytorch_model.bin").is_file():
        sd = torch_load(path / "pytorch_model.bin")
        if isinstance(sd, dict):
            return sd
        raise CheckpointError(f"{path / 'pytorch_model.bin'}: holds a {type(sd).__name__}, not a state dict")
    raise CheckpointError(f"{path}: no model.safetensors or pytorch_model.bin (sharded HF checkpoints do not import; "
                          "re-save the model with save_pretrained(max_shard_size='100GB'))")


def _hf_config(path: Path) -> dict:
    try:
        hc = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not a Hugging Face model directory (no config.json)") from None
    except ValueError as exc:  # not JSON, or not text
        raise CheckpointError(f"{path}/config.json: not valid JSON ({exc})") from None
    if not isinstance(hc, dict):
        raise CheckpointError(f"{path}/config.json: expected a JSON object, got {type(hc).__name__}")
    return hc


def read(path: str | Path, log=print) -> Consolidated:
    """A native megaqkv export (any variant) or a GPT-2-shaped model (the `qkv` preset) -> consolidated."""
    path = Path(path)
    hc = _hf_config(path)
    if hc.get("model_type") == "gpt2":
        out = hf_gpt2.read(path, hc, _load_state(path), log)
    elif hc.get("model_type") == "megaqkv":
        out = _read_native(path, hc)
    else:
        raise CheckpointError(f"{path}/config.json: model_type {hc.get('model_type')!r}; megaqkv imports its own "
                              "exports (megaqkv) and GPT-2 models (gpt2)")
    out.check(str(path))
    out.trainer = {**(out.trainer or {}), "tokenizer": hf_assets.shipped_tokenizer(path)}
    return out


def _read_native(path: Path, hc: dict) -> Consolidated:
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size") if k not in hc]
    if missing:
        raise CheckpointError(f"{path}/config.json: missing key {missing[0]!r}")
    try:
        cfg = model_config_from_dict({ours: hc[theirs] for ours, theirs in _FIELDS.items() if theirs in hc},
                                     source=f"{path}/config.json")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    weights = {k.removeprefix("model."): v for k, v in _load_state(path).items()}
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)  # some savers write the tied head too
    return Consolidated(cfg, weights, source=f"hf:{path}")
