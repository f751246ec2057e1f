"""Checkpoint formats (DeepSpeed, consolidated, the paper's, Hugging Face) and conversions between them."""
