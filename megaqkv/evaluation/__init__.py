"""Evaluation: validation perplexity, the lm-evaluation-harness adapter, and the evaluate/generate commands."""
