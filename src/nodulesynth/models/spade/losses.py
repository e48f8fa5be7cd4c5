"""SPADE losses: hinge GAN loss, discriminator feature matching, optional VGG19 perceptual loss.

Discriminator outputs are lists over scales of lists of features (the last is the score map),
as returned by `MultiscaleDiscriminator`. GAN terms are averaged over scales as in NVlabs/SPADE.
"""

import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nodulesynth.errors import InputError


def d_hinge_loss(pred_real, pred_fake):
    """Discriminator hinge loss: mean over scales of E[relu(1 - D(real))] + E[relu(1 + D(fake))]."""
    real = sum(F.relu(1.0 - scale[-1]).mean() for scale in pred_real) / len(pred_real)
    fake = sum(F.relu(1.0 + scale[-1]).mean() for scale in pred_fake) / len(pred_fake)
    return real, fake


def g_hinge_loss(pred_fake):
    """Generator hinge loss: -E[D(fake)], mean over scales."""
    return -sum(scale[-1].mean() for scale in pred_fake) / len(pred_fake)


def feature_matching_loss(pred_fake, pred_real, lambda_feat: float = 10.0):
    """L1 between the discriminator's intermediate features on fake and real.

    Summed over the intermediate layers (the score map excluded), averaged over scales, times
    lambda_feat. Real features are detached: this term trains the generator only.
    """
    total = 0.0
    for fake_scale, real_scale in zip(pred_fake, pred_real, strict=True):
        for fake, real in zip(fake_scale[:-1], real_scale[:-1], strict=True):
            total = total + F.l1_loss(fake, real.detach())
    return total * (lambda_feat / len(pred_fake))


# relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 of torchvision's vgg19.features, with the paper's
# weights (deeper layers count more).
VGG_SLICES = ((0, 2), (2, 7), (7, 12), (12, 21), (21, 30))
VGG_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGLoss(nn.Module):
    """Perceptual loss on a frozen VGG19 loaded from a LOCAL torchvision state-dict file.

    There is no fallback: a perceptual loss on random weights is not the paper's loss, and nothing
    can be downloaded here, so without a file this refuses to be built.
    """

    def __init__(self, weights_path):
        super().__init__()
        if not weights_path:
            raise InputError("the VGG perceptual loss needs a local VGG19 weights file (spade.vgg_weights); "
                             "none can be downloaded here and random weights are refused")
        weights_path = Path(weights_path)
        if not weights_path.is_file():
            raise FileNotFoundError(f"spade.vgg_weights: {weights_path} does not exist")
        # torchvision's vgg19 feature extractor (configuration "E"), architecture only: its
        # classifier is never used, so it is not built.
        from torchvision.models.vgg import cfgs, make_layers

        features = make_layers(cfgs["E"], batch_norm=False)
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        # torchvision's vgg19 file or the state dict of `.features` alone; strict over the convs.
        if any(key.startswith("features.") for key in state):
            state = {key[len("features."):]: value for key, value in state.items() if key.startswith("features.")}
        features.load_state_dict(state)
        self.slices = nn.ModuleList(features[a:b] for a, b in VGG_SLICES)
        self.requires_grad_(False)
        self.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.weights_path = str(weights_path)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen feature extractor, always in eval mode

    def _normalize(self, image):
        # CT in [-1, 1], one channel -> the [0, 1] RGB statistics the ImageNet weights expect.
        rgb = ((image + 1.0) * 0.5).expand(-1, 3, -1, -1)
        return (rgb - self.mean) / self.std

    def forward(self, fake, real):
        x, y = self._normalize(fake), self._normalize(real)
        loss = 0.0
        for weight, block in zip(VGG_WEIGHTS, self.slices):
            x, y = block(x), block(y)
            loss = loss + weight * F.l1_loss(x, y.detach())
        return loss


def perceptual_loss_status(options) -> str:
    """Whether this run trains with the VGG perceptual loss, in words, for the model's outputs (and so
    the report): "on (...)", "off (no vgg_weights)" or "off (lambda_vgg 0)"."""
    if options.lambda_vgg == 0:
        return "off (lambda_vgg 0)"
    if not options.vgg_weights:
        return "off (no vgg_weights)"
    return f"on (lambda_vgg {options.lambda_vgg:g}, vgg_weights {options.vgg_weights})"


def build_vgg_loss(options):
    """The VGG loss when a local weights file is configured, else None.

    Without weights while lambda_vgg > 0 this is not the paper's SPADE: a warning says so (Python
    shows it once per process however many trainers are built), and `perceptual_loss_status` records it.
    """
    status = perceptual_loss_status(options)
    if status == "off (no vgg_weights)":
        warnings.warn(f"spade: VGG perceptual loss OFF although spade.lambda_vgg is {options.lambda_vgg:g}: no local "
                      "VGG19 weights file in spade.vgg_weights, and none can be downloaded here; training with "
                      "hinge GAN + feature matching only", UserWarning, stacklevel=2)
    else:
        print(f"spade: VGG perceptual loss {status}", file=sys.stderr)
    return VGGLoss(options.vgg_weights) if status.startswith("on") else None
