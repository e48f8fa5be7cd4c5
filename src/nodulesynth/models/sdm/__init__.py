"""Semantic diffusion model (SDM, Wang et al. 2022): lesion map -> CT slice.

options (SDMOptions), unet (the network), diffusion (schedules, posterior, hybrid loss), samplers
(guidance wrapper, DDPM / DDIM / DPM-Solver++ ODE and SDE), train (train_sdm) and sample (load_sdm,
sample_images, sample_sdm).
"""

from nodulesynth.models.sdm.options import SDMOptions
from nodulesynth.models.sdm.sample import load_sdm, sample_images, sample_sdm
from nodulesynth.models.sdm.train import train_sdm

__all__ = ["SDMOptions", "train_sdm", "load_sdm", "sample_images", "sample_sdm"]
