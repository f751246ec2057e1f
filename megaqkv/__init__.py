"""megaqkv: 3D-parallel GPT pretraining with shared-projection attention variants."""

__version__ = "0.1.0"
