"""The SDM denoising U-Net (Wang et al. 2022, arXiv 2207.00050).

The encoder sees only the noisy image (plain residual blocks with timestep scale/shift). The middle
block and every decoder block take the lesion map through spatially-adaptive normalisation
(GroupNorm without affine, then x * (1 + gamma) + beta, gamma and beta predicted by convs over the
one-hot map resized by nearest neighbour to the feature size). The timestep embedding enters as a
scale/shift after the second norm of each residual block. Output: eps and, with a learned sigma,
the variance interpolation v, per input channel.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nodulesynth.errors import InputError
from nodulesynth.models.sdm.options import SDMOptions


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps, cos then sin halves."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def group_norm(channels: int, groups: int, affine: bool = True) -> nn.GroupNorm:
    # Narrow demo layers cannot hold 32 groups: use the largest common divisor instead.
    return nn.GroupNorm(math.gcd(groups, channels), channels, affine=affine)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero-initialised output layers make every residual block start as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Block(nn.Module):
    """Common call signature of every U-Net layer: (h, emb, seg) with seg(size) -> resized map."""

    def forward(self, h, emb, seg):  # pragma: no cover - interface
        raise NotImplementedError


class SPADEGroupNorm(nn.Module):
    """GroupNorm(affine=False), then x * (1 + gamma) + beta from the (resized) one-hot map.

    gamma and beta come out of one conv with 2C outputs: the same maths as two separate convs over
    the shared hidden activation, one kernel launch fewer. Not shared with the SPADE baseline's block
    (spade.networks.SPADE): that one normalises per instance or batch, initialises its convs Xavier 0.02
    and resizes the map itself; one block would change either network's parameters or outputs.
    """

    def __init__(self, channels: int, num_classes: int, hidden: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(num_classes, hidden, 3, padding=1), nn.ReLU())
        self.gamma_beta = nn.Conv2d(hidden, 2 * channels, 3, padding=1)

    def forward(self, x, segmap):
        gamma, beta = self.gamma_beta(self.shared(segmap)).chunk(2, dim=1)
        return self.norm(x) * (1 + gamma) + beta


class Downsample(Block):
    def __init__(self, channels, use_conv):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else None

    def forward(self, h, emb=None, seg=None):
        return self.conv(h) if self.conv is not None else F.avg_pool2d(h, 2)


class Upsample(Block):
    def __init__(self, channels, use_conv):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, h, emb=None, seg=None):
        h = F.interpolate(h, scale_factor=2.0, mode="nearest")
        return self.conv(h) if self.conv is not None else h


class ResBlock(Block):
    """Residual block; `spade` selects the semantic (decoder/middle) variant.

    norm1 -> SiLU -> [resample] -> conv3x3 -> norm2 -> *(1+scale)+shift (timestep) -> SiLU
    -> dropout -> zero-initialised conv3x3, plus a (1x1-projected) skip.
    """

    def __init__(self, channels, emb_channels, out_channels=None, *, dropout=0.0, spade=False,
                 num_classes=6, spade_hidden=128, groups=32, up=False, down=False, grad_checkpoint=False):
        super().__init__()
        out_channels = out_channels or channels
        self.spade = spade
        self.grad_checkpoint = grad_checkpoint
        if spade:
            self.norm1 = SPADEGroupNorm(channels, num_classes, spade_hidden, groups)
            self.norm2 = SPADEGroupNorm(out_channels, num_classes, spade_hidden, groups)
        else:
            self.norm1 = group_norm(channels, groups)
            self.norm2 = group_norm(out_channels, groups)
        self.conv1 = nn.Conv2d(channels, out_channels, 3, padding=1)
        self.resample = Upsample(channels, False) if up else Downsample(channels, False) if down else None
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def _norm(self, norm, h, seg):
        return norm(h, seg(h.shape[-2:])) if self.spade else norm(h)

    def _forward(self, x, emb, seg):
        h = F.silu(self._norm(self.norm1, x, seg))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.conv1(h)
        scale, shift = self.emb(emb).to(h.dtype)[..., None, None].chunk(2, dim=1)
        h = self._norm(self.norm2, h, seg) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h

    def forward(self, h, emb, seg):
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, h, emb, seg, use_reentrant=False)
        return self._forward(h, emb, seg)


class AttentionBlock(Block):
    """Global self-attention over the feature map (GroupNorm, qkv projection, heads, zero-init output).

    `impl="sdpa"` uses F.scaled_dot_product_attention (flash / memory-efficient kernels on GPU);
    "plain" is the explicit softmax(QK^T / sqrt(d)) V, kept for the benchmark and as a reference.
    Tokens are laid out [B, L, C] so q, k, v have a contiguous head dimension (the fused kernels
    need it); with channels-last features that layout is free.
    """

    def __init__(self, channels, head_channels=64, groups=32, impl="sdpa"):
        super().__init__()
        self.heads = max(1, channels // head_channels) if head_channels > 0 else 1
        if channels % self.heads:
            raise InputError(f"attention: {channels} channels not divisible into {self.heads} heads")
        self.impl = impl
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, h, emb=None, seg=None):
        b, c, height, width = h.shape
        tokens = self.norm(h).flatten(2).transpose(1, 2)  # [B, L, C]
        qkv = self.qkv(tokens).view(b, -1, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, L, d]
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            weights = torch.softmax((q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1]), dim=-1)
            out = weights.to(v.dtype) @ v
        out = self.proj(out.transpose(1, 2).reshape(b, -1, c))  # [B, L, C]
        return h + out.transpose(1, 2).reshape(b, c, height, width)


class Stage(nn.ModuleList):
    """A sequence of blocks sharing the (h, emb, seg) call."""

    def forward(self, h, emb, seg):
        for block in self:
            h = block(h, emb, seg)
        return h


class InputConv(Block):
    def __init__(self, in_channels, channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)

    def forward(self, h, emb=None, seg=None):
        return self.conv(h)


class SDMUNet(nn.Module):
    """forward(x [B,in,H,W], t long/float [B], cond one-hot [B,num_classes,H,W]) -> [B,out,H,W]."""

    def __init__(self, options: SDMOptions):
        super().__init__()
        o = options
        self.options = o
        self.in_channels = o.in_channels
        self.out_channels = o.in_channels * (2 if o.learn_sigma else 1)
        self.model_channels = o.model_channels
        emb_dim = 4 * o.model_channels
        groups = o.norm_groups
        attention_ds = {o.image_size // r for r in o.attention_resolutions}

        self.time_embed = nn.Sequential(nn.Linear(o.model_channels, emb_dim), nn.SiLU(),
                                        nn.Linear(emb_dim, emb_dim))

        def res(ch_in, ch_out, spade, **kw):
            return ResBlock(ch_in, emb_dim, ch_out, dropout=o.dropout, spade=spade, num_classes=o.num_classes,
                            spade_hidden=o.spade_hidden, groups=groups, grad_checkpoint=o.grad_checkpoint, **kw)

        def attn(ch):
            return AttentionBlock(ch, o.num_head_channels, groups, o.attention)

        # Encoder: the noisy image alone.
        ch = int(o.channel_mult[0] * o.model_channels)
        self.input_blocks = nn.ModuleList([Stage([InputConv(o.in_channels, ch)])])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(o.channel_mult):
            for _ in range(o.num_res_blocks):
                out = int(mult * o.model_channels)
                layers = [res(ch, out, spade=False)]
                ch = out
                if ds in attention_ds:
                    layers.append(attn(ch))
                self.input_blocks.append(Stage(layers))
                skip_channels.append(ch)
            if level != len(o.channel_mult) - 1:
                down = res(ch, ch, spade=False, down=True) if o.resblock_updown else Downsample(ch, True)
                self.input_blocks.append(Stage([down]))
                skip_channels.append(ch)
                ds *= 2

        # Middle and decoder: every residual block is semantic (SPADE-normalised).
        self.middle_block = Stage([res(ch, ch, spade=True), attn(ch), res(ch, ch, spade=True)])

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(o.channel_mult))[::-1]:
            for i in range(o.num_res_blocks + 1):
                out = int(mult * o.model_channels)
                layers = [res(ch + skip_channels.pop(), out, spade=True)]
                ch = out
                if ds in attention_ds:
                    layers.append(attn(ch))
                if level and i == o.num_res_blocks:
                    layers.append(res(ch, ch, spade=True, up=True) if o.resblock_updown else Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(Stage(layers))

        self.out = nn.Sequential(group_norm(ch, groups), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, self.out_channels, 3, padding=1)))

    def forward(self, x, t, cond):
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        resized = {}

        def seg(size):
            # The map at each feature size is computed once per forward and shared by its blocks.
            size = tuple(size)
            if size not in resized:
                resized[size] = cond if tuple(cond.shape[-2:]) == size else F.interpolate(cond, size=size, mode="nearest")
            return resized[size]

        h = x
        skips = []
        for stage in self.input_blocks:
            h = stage(h, emb, seg)
            skips.append(h)
        h = self.middle_block(h, emb, seg)
        for stage in self.output_blocks:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, seg)
        return self.out(h)


def set_attention(model: nn.Module, impl: str):
    """Switch every attention block between "sdpa" and "plain" (same weights)."""
    for module in model.modules():
        if isinstance(module, AttentionBlock):
            module.impl = impl
