"""Per-step random generators: a resumed run replays exactly the draws an unbroken run makes (bitwise on CPU)."""

import numpy as np
import torch


def step_generator(seed: int, step: int, device="cpu") -> torch.Generator:
    """A generator seeded from (seed, step) alone.

    Every random draw of training step `step` comes from it, so resuming at step k needs no
    saved RNG state and replays exactly the draws an unbroken run would make.
    """
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step)]).generate_state(2, np.uint32)
    generator = torch.Generator(device=device)
    generator.manual_seed((int(state[0]) << 31 | int(state[1]) >> 1) & 0x7FFFFFFFFFFFFFFF)
    return generator


def seed_everything_for_step(seed: int, step: int, rank: int = 0):
    """Seed the global RNGs from (seed, step) too, for dropout and any op drawing globally; each process of a run
    on several GPUs (`rank`) draws its own masks for its own samples (rank 0 those of a one-process run)."""
    torch.manual_seed((int(step_generator(seed, step).initial_seed()) ^ 0x5DEECE66D) + int(rank))
