"""A second RNG stream for activations that are sharded across tensor-parallel ranks.

Dropout on replicated activations must draw the same mask on every TP rank (the default
stream, seeded identically); dropout on a rank's own heads must not (this stream, seeded
per rank). `fork()` swaps the stream in for the duration of a block, on CPU and CUDA alike.
"""
from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint


def _get_states() -> dict[str, torch.Tensor]:
    """The CPU stream, and the CUDA one only in a process that runs on the GPU (grid.uses_cuda): reading it
    would open a CUDA context on GPU 0 in a gloo process, e.g. each of the checkpoint writer's workers."""
    from .grid import uses_cuda  # grid imports this module

    states = {"cpu": torch.get_rng_state()}
    if uses_cuda():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_states(states: dict[str, torch.Tensor]) -> None:
    """A CUDA stream saved by a GPU run is kept in the state but not applied in a CPU process."""
    from .grid import uses_cuda

    torch.set_rng_state(states["cpu"])
    if "cuda" in states and uses_cuda():
        torch.cuda.set_rng_state(states["cuda"])


class RNGTracker:
    def __init__(self):
        self.states: dict[str, torch.Tensor] | None = None

    def seed(self, seed: int) -> None:
        outer = _get_states()
        torch.manual_seed(seed)
        self.states = _get_states()
        _set_states(outer)

    @contextlib.contextmanager
    def fork(self):
        """Run the block on this stream; the default stream is left exactly where it was."""
        if self.states is None:
            raise RuntimeError("the tensor-parallel RNG stream was never seeded; call ProcessGrid.seed()")
        outer = _get_states()
        _set_states(self.states)
        try:
            yield
        finally:
            self.states = _get_states()
            _set_states(outer)

    def get_state(self) -> dict[str, torch.Tensor] | None:
        return None if self.states is None else {k: v.clone() for k, v in self.states.items()}

    def set_state(self, states: dict[str, torch.Tensor] | None) -> None:
        self.states = None if states is None else {k: v.clone() for k, v in states.items()}


def checkpoint(fn, x: torch.Tensor, tracker: RNGTracker) -> torch.Tensor:
    """Activation checkpointing of `fn(x)` that also replays the tensor-parallel stream.

    torch's checkpoint restores the default RNG for the recomputation; the recomputation here also
    starts from the TP stream's state of the first pass and then puts the stream back where it was,
    so dropout masks are identical in both passes and later draws are unaffected.
    """
    start = tracker.get_state()
    first = [True]

    def run(inp):
        if first[0]:
            first[0] = False
            return fn(inp)
        resume = tracker.get_state()
        tracker.set_state(start)
        try:
            return fn(inp)
        finally:
            tracker.set_state(resume)

    return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False, preserve_rng_state=True)
