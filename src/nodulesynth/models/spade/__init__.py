"""SPADE / GauGAN baseline (Park et al. 2019, NVlabs/SPADE): the comparison arm B of the study.

options (SPADEOptions), networks (SPADE generator, multi-scale PatchGAN discriminator), losses
(hinge, feature matching, optional VGG19 from a local file), train (SPADETrainer, train_spade) and
sample (load_spade, generate, sample_spade).
"""

from nodulesynth.models.spade.options import SPADEOptions
from nodulesynth.models.spade.sample import generate, load_spade, sample_spade
from nodulesynth.models.spade.train import train_spade

__all__ = ["SPADEOptions", "train_spade", "load_spade", "generate", "sample_spade"]
