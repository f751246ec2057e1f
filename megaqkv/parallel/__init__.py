"""Tensor/pipeline/data parallelism: process grid and mpu, TP layers, vocab-parallel loss, RNG tracking."""
