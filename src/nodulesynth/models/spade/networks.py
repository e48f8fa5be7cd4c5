"""SPADE generator and multi-scale PatchGAN discriminator (Park et al. 2019, the NVlabs layout).

The generator has no encoder and no noise: the one-hot lesion map, downsampled to the start
resolution and convolved, is its input, and every residual block is modulated by the map through
SPADE (parameter-free norm, then x * (1 + gamma) + beta with gamma and beta from a conv over the
map resized to the feature size).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from nodulesynth.errors import InputError
from nodulesynth.labels import NUM_CLASSES

from .options import SPADEOptions

# The paper's widest block has 16 x ngf channels (1024 for ngf 64).
MAX_WIDTH_MULT = 16
# NVlabs/SPADE initialises every conv with Xavier-normal, gain 0.02 (its --init_variance): the
# SPADE gamma/beta start near zero, so each block starts as a plain normalised residual block.
INIT_GAIN = 0.02


def conv(in_ch, out_ch, kernel, stride=1, padding=0, bias=True, sn=False):
    """A Conv2d initialised as in the paper, with spectral norm if asked.

    Initialised before spectral norm is applied, so its power-iteration vectors match the weight.
    """
    layer = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=bias)
    nn.init.xavier_normal_(layer.weight, gain=INIT_GAIN)
    if bias:
        nn.init.zeros_(layer.bias)
    return spectral_norm(layer) if sn else layer


class SPADE(nn.Module):
    """Spatially-adaptive denormalisation of `x` by the one-hot map `segmap` (the NVlabs block; the SDM's,
    sdm.unet.SPADEGroupNorm, differs in its norm, its init and its fused gamma/beta conv)."""

    def __init__(self, norm_nc: int, label_nc: int, hidden: int = 128, kernel: int = 3, norm: str = "instance"):
        super().__init__()
        if norm == "instance":
            self.param_free_norm = nn.InstanceNorm2d(norm_nc, affine=False)
        elif norm == "batch":
            self.param_free_norm = nn.BatchNorm2d(norm_nc, affine=False)
        else:
            raise InputError(f"unknown parameter-free norm {norm!r}")
        pad = kernel // 2
        self.mlp_shared = nn.Sequential(conv(label_nc, hidden, kernel, padding=pad), nn.ReLU())
        self.mlp_gamma = conv(hidden, norm_nc, kernel, padding=pad)
        self.mlp_beta = conv(hidden, norm_nc, kernel, padding=pad)

    def forward(self, x, segmap):
        normalized = self.param_free_norm(x)
        # Nearest keeps the map one-hot: no invented class mixtures at region borders.
        segmap = F.interpolate(segmap, size=x.shape[2:], mode="nearest")
        actv = self.mlp_shared(segmap)
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResnetBlock(nn.Module):
    """Two SPADE-ReLU-conv units plus a (learned where the width changes) shortcut."""

    def __init__(self, fin: int, fout: int, label_nc: int, hidden: int = 128, norm: str = "instance"):
        super().__init__()
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        # Spectral norm on the block convs (not on the SPADE convs), as in the paper's generator.
        self.conv_0 = conv(fin, fmiddle, 3, padding=1, sn=True)
        self.conv_1 = conv(fmiddle, fout, 3, padding=1, sn=True)
        self.norm_0 = SPADE(fin, label_nc, hidden, norm=norm)
        self.norm_1 = SPADE(fmiddle, label_nc, hidden, norm=norm)
        if self.learned_shortcut:
            self.conv_s = conv(fin, fout, 1, bias=False, sn=True)
            self.norm_s = SPADE(fin, label_nc, hidden, norm=norm)

    def forward(self, x, seg):
        x_s = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return x_s + dx


def generator_widths(ngf: int, upsampling: int) -> list:
    """Channels of the head and of each upsampled block.

    With 5 upsamplings this is the paper's 16, 8, 4, 2, 1 x ngf; fewer upsamplings (small images)
    drop the widest stages so that the last block is always ngf wide.
    """
    mults = [min(2 ** max(upsampling - 1 - i, 0), MAX_WIDTH_MULT) for i in range(upsampling)]
    return [ngf * m for m in mults]


class SPADEGenerator(nn.Module):
    """One-hot map [B, C, S, S] -> image [B, 1, S, S] in [-1, 1].

    head (start size) - up - middle_0, middle_1 - then (up, block) for each further upsampling,
    which halves the width until ngf; LeakyReLU, 3x3 conv to one channel, tanh.
    """

    def __init__(self, options: SPADEOptions, label_nc: int = NUM_CLASSES, out_nc: int = 1):
        super().__init__()
        self.label_nc = label_nc
        self.image_size = options.image_size
        self.start_size = options.start_size
        up = options.upsampling
        widths = generator_widths(options.ngf, up)
        block = dict(label_nc=label_nc, hidden=options.spade_hidden, norm=options.norm_g)
        # The downsampled map convolved as the input (the paper's non-VAE generator, no noise).
        self.fc = conv(label_nc, widths[0], 3, padding=1)
        self.head_0 = SPADEResnetBlock(widths[0], widths[0], **block)
        self.middle_0 = SPADEResnetBlock(widths[0], widths[0], **block)
        self.middle_1 = SPADEResnetBlock(widths[0], widths[0], **block)
        self.up_blocks = nn.ModuleList(
            SPADEResnetBlock(widths[i - 1], widths[i], **block) for i in range(1, up))
        self.conv_img = conv(widths[-1], out_nc, 3, padding=1)

    def forward(self, seg):
        if seg.shape[1] != self.label_nc or seg.shape[-1] != self.image_size or seg.shape[-2] != self.image_size:
            raise InputError(f"expected a one-hot map [B,{self.label_nc},{self.image_size},{self.image_size}], "
                             f"got {list(seg.shape)}")
        x = self.fc(F.interpolate(seg, size=(self.start_size, self.start_size), mode="nearest"))
        x = self.head_0(x, seg)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = self.middle_1(self.middle_0(x, seg), seg)
        for block in self.up_blocks:
            x = block(F.interpolate(x, scale_factor=2, mode="nearest"), seg)
        return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))


class NLayerDiscriminator(nn.Module):
    """PatchGAN returning every layer's output (the last one is the real/fake score map).

    4x4 convs, stride 2 except the last two, widths doubling up to 512. As in NVlabs/SPADE, the
    first conv has neither norm nor spectral norm; the middle ones have spectral norm followed by
    instance norm; the 1-channel output conv is plain.
    """

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 4):
        super().__init__()
        kw, pad = 4, 2
        nf = ndf
        layers = [nn.Sequential(conv(input_nc, nf, kw, stride=2, padding=pad), nn.LeakyReLU(0.2))]
        for n in range(1, n_layers):
            nf_prev, nf = nf, min(nf * 2, 512)
            stride = 1 if n == n_layers - 1 else 2
            layers.append(nn.Sequential(
                conv(nf_prev, nf, kw, stride=stride, padding=pad, sn=True),
                nn.InstanceNorm2d(nf, affine=False), nn.LeakyReLU(0.2)))
        layers.append(nn.Sequential(conv(nf, 1, kw, stride=1, padding=pad)))
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features


class MultiscaleDiscriminator(nn.Module):
    """PatchGANs on the (map, image) pair at full, 1/2, ... resolution.

    Returns a list over scales of lists of features; [s][-1] is the score map of scale s.
    """

    def __init__(self, options: SPADEOptions, label_nc: int = NUM_CLASSES, image_nc: int = 1):
        super().__init__()
        self.discriminators = nn.ModuleList(
            NLayerDiscriminator(label_nc + image_nc, options.ndf, options.n_layers_d)
            for _ in range(options.n_scales))

    def forward(self, seg, image):
        x = torch.cat([seg, image], dim=1)
        outputs = []
        for i, discriminator in enumerate(self.discriminators):
            if i:
                x = F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)
            outputs.append(discriminator(x))
        return outputs


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
