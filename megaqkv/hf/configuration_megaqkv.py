"""Configuration of megaqkv's shared-projection GPT for Hugging Face transformers.

Standalone (torch and transformers only): this file is copied next to every exported model so that
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works without megaqkv installed.
A variant is the pair (`sharing`, `num_key_value_heads`):

    sharing  projections       cached per layer and token
    none     q, k, v           k and v, num_key_value_heads heads each (QKV, GQA, MQA)
    qk       qk (q = k), v     k and v, num_attention_heads heads each (Q=K-V)
    kv       q, kv (k = v)     one tensor of num_key_value_heads heads (Q-K=V, Q-GQA, Q-MQA)
    qkv      qkv (q = k = v)   one tensor of num_attention_heads heads (Q=K=V)
"""
from transformers import PretrainedConfig

# sharing -> the projection that gives the query, the key and the value
ROLES = {"none": ("q", "k", "v"), "qk": ("qk", "qk", "v"), "kv": ("q", "kv", "kv"), "qkv": ("qkv", "qkv", "qkv")}
SHARINGS = tuple(ROLES)


class MegaQKVConfig(PretrainedConfig):
    model_type = "megaqkv"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(self, vocab_size: int = 50304, max_position_embeddings: int = 2048, hidden_size: int = 1024,
                 num_hidden_layers: int = 20, num_attention_heads: int = 16, num_key_value_heads: int | None = None,
                 sharing: str = "none", intermediate_size: int | None = None, layer_norm_eps: float = 1e-5,
                 hidden_dropout: float = 0.1, attention_dropout: float = 0.0, embedding_dropout: float = 0.0,
                 bias: bool = True, initializer_range: float = 0.02, tie_word_embeddings: bool = True,
                 use_cache: bool = True, bos_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, **kwargs):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.sharing = sharing
        self.intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        self.layer_norm_eps = layer_norm_eps
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.embedding_dropout = embedding_dropout
        self.bias = bias
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self._check()
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_shared(self) -> bool:
        """Key and value are one projection, so the cache holds one tensor per layer."""
        return self.sharing in ("kv", "qkv")

    def _check(self) -> None:
        n, g = self.num_attention_heads, self.num_key_value_heads
        if self.sharing not in SHARINGS:
            raise ValueError(f"sharing: {self.sharing!r} is not one of {', '.join(SHARINGS)}")
        if self.hidden_size % n:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {n}")
        if g < 1 or n % g:
            raise ValueError(f"num_key_value_heads {g} must be a divisor of num_attention_heads {n}")
        if self.sharing in ("qk", "qkv") and g != n:
            raise ValueError(f"sharing {self.sharing!r} ties the query to the key, so num_key_value_heads must equal "
                             f"num_attention_heads ({n}), got {g}")
