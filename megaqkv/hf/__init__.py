"""megaqkv's native Hugging Face model: the remote-code files exported with every model, and their
registration with transformers' Auto classes.

`configuration_megaqkv.py` and `modeling_megaqkv.py` import nothing from megaqkv, so an export runs
with transformers alone (`trust_remote_code=True`); with megaqkv imported, `AutoModelForCausalLM`
knows the model type without remote code (see `megaqkv.__init__`).
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL_FILES = ("configuration_megaqkv.py", "modeling_megaqkv.py")
AUTO_MAP = {"AutoConfig": "configuration_megaqkv.MegaQKVConfig",
            "AutoModel": "modeling_megaqkv.MegaQKVModel",
            "AutoModelForCausalLM": "modeling_megaqkv.MegaQKVForCausalLM"}


def register() -> bool:
    """Registers the model type with AutoConfig/AutoModel/AutoModelForCausalLM; False when the installed
    transformers is too old for the model (its import says which version it needs)."""
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        from .configuration_megaqkv import MegaQKVConfig
        from .modeling_megaqkv import MegaQKVForCausalLM, MegaQKVModel
    except ImportError as exc:
        import warnings

        warnings.warn(f"megaqkv's native model is not registered with transformers: {exc}")
        return False
    AutoConfig.register(MegaQKVConfig.model_type, MegaQKVConfig, exist_ok=True)
    AutoModel.register(MegaQKVConfig, MegaQKVModel, exist_ok=True)
    AutoModelForCausalLM.register(MegaQKVConfig, MegaQKVForCausalLM, exist_ok=True)
    return True
