"""megaqkv's shared-projection GPT as a Hugging Face transformers causal LM.

Standalone (torch and transformers >= 5.24 only): this file is copied next to every exported model.
The weights are megaqkv's per-role tensors, nothing duplicated: a layer has one Linear per distinct
projection (`q`, `k`, `v`, `qk`, `kv` or `qkv`) and computes each once; roles that share a projection
are the same tensor downstream. The cache follows: GQA/MQA layers cache `num_key_value_heads` heads,
and a K=V layer caches one tensor where transformers' layers keep two: the model turns the empty
layers of any DynamicCache/StaticCache it is given (by `generate`, beam search, or the caller) into
`SharedKVLayer`/`SharedKVStaticLayer` before their first write. GPT-2 architecture otherwise: learned
positions, pre-LayerNorm, exact-erf GELU, tied head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticLayer
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_megaqkv import ROLES, MegaQKVConfig

if "cache" not in CausalLMOutputWithPast.__dataclass_fields__:
    raise ImportError(f"this megaqkv model needs transformers >= 5.24 (its cache API), found {transformers.__version__}: "
                      "pip install -U transformers")


class _OneTensor:
    """A K=V cache layer: `values` is `keys`, one tensor. Every operation transformers applies to a layer
    transforms keys and values alike, so a write to `values` carries nothing new and is dropped; the
    methods that would do the work twice are overridden to do it once."""

    @property
    def values(self):
        return self.keys

    @values.setter
    def values(self, tensor):
        """Dropped: the keys are the values (see the class docstring)."""

    @staticmethod
    def _check(key_states, value_states):
        if value_states is not key_states:
            raise ValueError("a K=V cache layer stores one tensor: update it with the same tensor as key and value")

    def reorder_cache(self, beam_idx):
        if self.get_seq_length() > 0:
            self.keys = self.keys.index_select(0, beam_idx.to(self.keys.device))

    def batch_repeat_interleave(self, repeats: int):
        if self.get_seq_length() > 0:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices):
        if self.get_seq_length() > 0:
            self.keys = self.keys[indices, ...]

    def offload(self):
        if self.is_initialized:
            self.keys = self.keys.to("cpu", non_blocking=True)

    def prefetch(self):
        if self.is_initialized and self.keys.device != self.device:
            self.keys = self.keys.to(self.device, non_blocking=True)


class SharedKVLayer(_OneTensor, DynamicLayer):
    """DynamicLayer holding one tensor for key and value."""

    def update(self, key_states, value_states, *args, **kwargs):
        self._check(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        return self.keys, self.keys


class SharedKVStaticLayer(_OneTensor, StaticLayer):
    """StaticLayer (`cache_implementation="static"`, torch.compile) holding one preallocated tensor."""

    def lazy_initialization(self, key_states, value_states):
        self.device = key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim = self.v_head_dim = key_states.shape[-1]
        self.keys = torch.zeros((self.batch_size, self.num_heads, self.max_cache_len, self.k_head_dim),
                                dtype=key_states.dtype, device=self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(self.keys)
            torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self._check(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
        self.cumulative_length.add_(key_states.shape[-2])
        self.keys.index_copy_(2, positions, key_states)
        return self.keys, self.keys


def one_tensor_layers(cache) -> None:
    """Empty transformers layers of `cache` -> their one-tensor K=V versions. A static layer allocated ahead of
    time (chunked prefill, export) keeps its key buffer and drops the value buffer; filled layers are left alone."""
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, _OneTensor):
            continue
        if type(layer) is DynamicLayer and not layer.is_initialized:
            cache.layers[i] = SharedKVLayer()
        elif type(layer) is StaticLayer and (not layer.is_initialized or int(layer.cumulative_length) == 0):
            one = cache.layers[i] = SharedKVStaticLayer(layer.max_cache_len)
            if layer.is_initialized:
                for name in ("device", "batch_size", "num_heads", "k_head_dim", "cumulative_length", "keys"):
                    setattr(one, name, getattr(layer, name))
                one.v_head_dim, one.is_initialized = one.k_head_dim, True
    if cache.layer_class_to_replicate is DynamicLayer:
        cache.layer_class_to_replicate = SharedKVLayer


def eager_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """Plain attention (`attn_implementation="eager"`, and the only one that returns the weights)."""
    r = module.num_key_value_groups
    shared = value is key
    key = key.repeat_interleave(r, dim=1)
    value = key if shared else value.repeat_interleave(r, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = F.dropout(torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), dropout,
                        module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class MegaQKVAttention(nn.Module):
    def __init__(self, config: MegaQKVConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        n, g, d, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.hidden_size
        self.head_dim, self.num_key_value_groups, self.scaling, self.is_causal = d, n // g, d ** -0.5, True
        self.roles = ROLES[config.sharing]
        rows = {"q": n * d, "qk": n * d, "qkv": n * d, "k": g * d, "v": g * d, "kv": g * d}
        for role in dict.fromkeys(self.roles):
            self.add_module(role, nn.Linear(h, rows[role], bias=config.bias))
        self.out_proj = nn.Linear(h, h, bias=config.bias)

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        b, t, _ = hidden_states.shape
        heads = {role: getattr(self, role)(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
                 for role in dict.fromkeys(self.roles)}
        query, key, value = (heads[role] for role in self.roles)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        out, weights = attend(self, query, key, value, attention_mask, scaling=self.scaling,
                              dropout=self.config.attention_dropout if self.training else 0.0, **kwargs)
        return self.out_proj(out.reshape(b, t, -1)), weights


class MegaQKVMLP(nn.Module):
    def __init__(self, config: MegaQKVConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)

    def forward(self, x):
        return self.fc_out(F.gelu(self.fc_in(x)))  # exact (erf) GELU, as megaqkv trains with


class MegaQKVBlock(GradientCheckpointingLayer):
    """Pre-LayerNorm block, residual dropout after attention and after the MLP."""

    def __init__(self, config: MegaQKVConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = MegaQKVAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MegaQKVMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        attended, _ = self.attn(self.ln_1(hidden_states), attention_mask=attention_mask, cache=cache, **kwargs)
        hidden_states = hidden_states + self.dropout(attended)
        return hidden_states + self.dropout(self.mlp(self.ln_2(hidden_states)))


class MegaQKVPreTrainedModel(PreTrainedModel):
    config_class = MegaQKVConfig
    config: MegaQKVConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MegaQKVBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True


class MegaQKVModel(MegaQKVPreTrainedModel):
    def __init__(self, config: MegaQKVConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList(MegaQKVBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache is not None and self.config.kv_shared:
            one_tensor_layers(cache)
        past = cache.get_seq_length() if cache is not None else 0
        if isinstance(past, int) and past + inputs_embeds.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"{past + inputs_embeds.shape[1]} positions exceed max_position_embeddings="
                             f"{self.config.max_position_embeddings}: shorten the prompt or max_new_tokens")
        if position_ids is None:
            position_ids = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        hidden_states = self.dropout(inputs_embeds + self.wpe(position_ids))
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=mask, cache=cache, position_ids=position_ids,
                                  **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(hidden_states), cache=cache if use_cache else None)


class MegaQKVForCausalLM(MegaQKVPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.wte.weight"}

    def __init__(self, config: MegaQKVConfig):
        super().__init__(config)
        self.model = MegaQKVModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


__all__ = ["MegaQKVForCausalLM", "MegaQKVModel", "MegaQKVPreTrainedModel", "SharedKVLayer", "SharedKVStaticLayer"]
