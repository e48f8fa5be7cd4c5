"""Which torch device a generator job runs on."""

import torch


def pick_device(requested: str = "auto") -> torch.device:
    """"auto" = the GPU when one is present, else the CPU; anything else is taken literally."""
    requested = str(requested or "auto")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        # An explicit request must not silently fall back: a GPU job on the CPU would run for days.
        raise RuntimeError(f"device {requested!r} requested but CUDA is not available (use 'auto')")
    return device
