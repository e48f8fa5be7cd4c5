"""SPADE / GauGAN baseline (Park et al. 2019): the comparison arm B of the study.

options (SPADEOptions) - networks (generator, multi-scale PatchGAN) - losses (hinge, feature
matching, optional VGG19) - train (trainer, `train_spade`) - sample (`load_spade`, `sample_spade`).
"""

from .options import SPADEOptions

__all__ = ["SPADEOptions"]
