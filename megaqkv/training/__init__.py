"""Training: DeepSpeed engine wiring, LR schedule, the loop, evaluation, logging, checkpointing."""
