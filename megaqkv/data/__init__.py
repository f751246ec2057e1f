"""Data: indexed .bin/.idx datasets, tokenizers, preprocessing, packed GPT samples and blending."""
