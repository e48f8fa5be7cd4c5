"""Semantic diffusion model (SDM, Wang et al. 2022): lesion map -> CT slice.

options (SDMOptions), unet (the network), diffusion (schedules, posterior, hybrid loss), samplers
(guidance wrapper, DDPM / DDIM / DPM-Solver++ ODE and SDE), train (train_sdm) and sample (load_sdm,
sample_images, sample_sdm).
"""


from nodulesynth.models.sdm.options import SDMOptions

__all__ = ["SDMOptions", "train_sdm", "load_sdm", "sample_images", "sample_sdm"]
_LAZY = {"train_sdm": "train", "load_sdm": "sample", "sample_images": "sample", "sample_sdm": "sample"}


def __getattr__(name):
    # The networks, training and sampling import torch; loaded on first use so that the options (and with them the
    # rules' split of the `sdm:` section) import without it.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"nodulesynth.models.sdm.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
