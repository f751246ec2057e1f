"""The model: one attention class for every variant, GPT-2 blocks, and the plain GPT module."""
from .attention import Attention
from .gpt import GPT, Block, Embedding, GPTOutput

__all__ = ["Attention", "Block", "Embedding", "GPT", "GPTOutput"]
