"""The model: one attention class for every variant, GPT-2 blocks, the plain GPT and its pipeline form."""
from .attention import Attention
from .gpt import GPT, Block, GPTOutput, MLP, PositionEmbedding

__all__ = ["Attention", "Block", "GPT", "GPTOutput", "MLP", "PositionEmbedding"]
