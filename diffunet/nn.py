"""Building blocks of the UNet: timestep embedding, residual, attention and resampling blocks.

The design follows DDPM (Ho et al. 2020, Appendix B: Wide-ResNet-style residual blocks with
GroupNorm, a sinusoidal timestep embedding added inside every block, self-attention at chosen
resolutions) and improved DDPM (Nichol & Dhariwal 2021, Sec. 3/Appendix A: multi-head attention
and the "AdaGN" scale/shift conditioning of the second GroupNorm).

Every module follows the device and dtype of its input; nothing here picks a device.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "timestep_embedding",
    "zero_",
    "group_norm",
    "attention",
    "ResidualBlock",
    "AttentionBlock",
    "Downsample",
    "Upsample",
]


def timestep_embedding(
    t: torch.Tensor | int | float, dim: int, max_period: float = 10000.0, *,
    order: Literal["cos_sin", "sin_cos"] = "cos_sin", freq_shift: int = 0,
) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (the Transformer position encoding; DDPM Sec. 3.3/App. B).

    Args:
        t: (B,) integer or float timesteps, or a scalar (python number or 0-d tensor).
        dim: embedding width. An odd ``dim`` gets one zero column at the end.
        max_period: the longest wavelength; frequencies are
            ``max_period ** (-i / (dim // 2 - freq_shift))``, i = 0 .. dim // 2 - 1.
        order: ``"cos_sin"`` (improved-diffusion) or ``"sin_cos"`` (DDPM's TensorFlow code).
        freq_shift: 0 (improved-diffusion) or 1 (DDPM's TensorFlow code, whose last frequency
            is exactly ``1 / max_period``); diffusers' ``freq_shift``.

    Returns:
        (B, dim) float32 on ``t``'s device (a scalar gives (1, dim), which broadcasts).
        Layout is ``[cos(t * f_0..f_{h-1}), sin(t * f_0..f_{h-1})]`` (``order="cos_sin"``) or
        the two halves swapped.
    """
    # float32 even for int64 or half inputs: t * freq must not lose precision for t ~ 1000.
    t = torch.as_tensor(t).to(torch.float32)
    if t.ndim == 0:
        t = t.reshape(1)
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding: t must be a scalar or shape (B,), "
                         f"got shape {tuple(t.shape)}")
    half = dim // 2
    if order not in ("cos_sin", "sin_cos"):
        raise ValueError(f"timestep_embedding: order must be 'cos_sin' or 'sin_cos', got {order!r}")
    if not 0 <= freq_shift < half:
        raise ValueError(f"timestep_embedding: freq_shift must be in [0, {half}), got {freq_shift}")
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
        / (half - freq_shift)
    )  # (half,)
    args = t[:, None] * freqs[None, :]  # (B, half)
    parts = [torch.cos(args), torch.sin(args)]
    emb = torch.cat(parts if order == "cos_sin" else parts[::-1], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


def zero_(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero in place and return it.

    Used on the last layer of each residual branch and on the output conv, so that at init every
    block is the identity and the network outputs zero (improved-diffusion, App. A).
    """
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def group_norm(channels: int, num_groups: int = 32, group_channels: int | None = None,
               eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm (Wu & He 2018) over ``channels``: ``num_groups`` groups, or, when
    ``group_channels`` is set, groups of that many channels (``channels // group_channels`` of
    them; ``num_groups`` is then unused). Its parameters are the same either way (a scale and a
    shift per channel); only how the statistics are pooled differs."""
    groups = num_groups if group_channels is None else channels // group_channels
    if groups < 1 or channels % groups or (group_channels and channels % group_channels):
        raise ValueError(f"group_norm: {channels} channels cannot be split into "
                         + (f"groups of {group_channels}" if group_channels
                            else f"{num_groups} groups"))
    return nn.GroupNorm(groups, channels, eps=eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``softmax(q k^T / sqrt(d)) v`` (Vaswani et al. 2017, eq. 1).

    Args:
        q, k, v: (B, heads, N, d), any strides with a contiguous last dim.

    Returns:
        (B, heads, N, d) in ``q``'s dtype.

    Runs ``F.scaled_dot_product_attention``, so PyTorch picks a flash / memory-efficient kernel
    where one fits (half precision on a GPU, the CPU flash kernel) and its math kernel otherwise
    (fp32 on a GPU, head sizes a fused kernel does not take). If no kernel is allowed (inside a
    caller's ``torch.nn.attention.sdpa_kernel`` restriction), this falls back to the same
    formula written out rather than failing.
    """
    try:
        return F.scaled_dot_product_attention(q, k, v)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:  # "No available kernel": every allowed backend refused these inputs
        return _math_attention(q, k, v)


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The formula of :func:`attention`, with the softmax in float32; (B, heads, N, d) each."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, heads, N, N)
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
    return weights @ v  # (B, heads, N, d)


def _add_into(h: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``h + other``, written into ``h`` when that gives the same tensor (same dtype and shape).

    For fresh activations no backward reads (a convolution's output): one buffer fewer.
    """
    # Dtype and shape checks that torch.compile folds at trace time (torch.result_type and
    # torch.broadcast_shapes would each break the graph).
    fits = other.dim() <= h.dim() and all(
        o in (1, s) for o, s in zip(reversed(other.shape), reversed(h.shape)))
    if fits and torch.promote_types(h.dtype, other.dtype) == h.dtype:
        return h.add_(other)
    return h + other


class ResidualBlock(nn.Module):
    """Residual block conditioned on the time(+class) embedding (DDPM App. B; AdaGN from
    Nichol & Dhariwal 2021).

    ``x (B, in_ch, H, W), emb (B, emb_dim) -> (B, out_ch, H, W)``::

        h = conv1(SiLU(norm1(x)))
        h = h + proj(emb)                                   # default: add per channel
                                                            # (skipped when emb_dim is None)
        h = norm2(h)             or  norm2(h) * (1 + scale) + shift   # scale_shift_norm (AdaGN)
        h = conv2(dropout(SiLU(h)))                         # conv2 zero-initialised
        return skip(x) + h                                  # skip: 1x1 conv iff in_ch != out_ch
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int | None,
        dropout: float = 0.0,
        num_groups: int = 32,
        scale_shift_norm: bool = False,
        eps: float = 1e-5,
        group_channels: int | None = None,
    ) -> None:
        super().__init__()
        if emb_dim is None and scale_shift_norm:
            raise ValueError("ResidualBlock: scale_shift_norm needs an embedding (emb_dim)")
        self.in_ch = in_ch
        self.out_ch = out_ch
        self.scale_shift_norm = scale_shift_norm
        self.norm1 = group_norm(in_ch, num_groups, group_channels, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        # SiLU is applied functionally before this Linear (the embedding MLP ends in a Linear).
        # No embedding (a time-less UNet): no projection, so no unused parameters.
        self.emb_proj = (None if emb_dim is None
                         else nn.Linear(emb_dim, 2 * out_ch if scale_shift_norm else out_ch))
        self.norm2 = group_norm(out_ch, num_groups, group_channels, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        # A 1x1 conv only where the channel count changes; otherwise the skip is free.
        self.skip: nn.Module = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_ch, H, W), emb (B, emb_dim) or None (time-less block) -> (B, out_ch, H, W)."""
        # In-place work only touches tensors this block just made and no backward needs (a
        # convolution's output; a GroupNorm output when autograd is off), so the numbers are the
        # same and fewer activation-sized buffers are allocated.
        no_grad = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=no_grad))  # (B, out_ch, H, W)
        if self.emb_proj is None:
            if emb is not None:
                raise ValueError("ResidualBlock: this block has no embedding input (emb_dim=None)")
            h = self.norm2(h)
        elif emb is None:
            raise ValueError("ResidualBlock: emb is required (the block was built with emb_dim)")
        elif self.scale_shift_norm:
            # AdaGN (Nichol & Dhariwal 2021): the embedding modulates the normalised activations.
            e = self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, 2*out_ch, 1, 1)
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        else:
            e = self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, out_ch, 1, 1)
            h = self.norm2(_add_into(h, e))
        h = self.conv2(self.dropout(F.silu(h, inplace=no_grad)))
        return _add_into(h, self.skip(x))  # = skip(x) + h, bit for bit


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection.

    ``x (B, C, H, W) -> (B, C, H, W)``. The C channels are split across ``num_heads`` heads of
    ``C // num_heads`` channels each (improved DDPM, Sec. 3/App. A; DDPM uses one head).
    The output projection is zero-initialised, so the block starts as the identity.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_groups: int = 32,
                 eps: float = 1e-5, group_channels: int | None = None) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"AttentionBlock: {channels} channels are not divisible by "
                             f"{num_heads} heads")
        self.channels = channels
        self.num_heads = num_heads
        self.norm = group_norm(channels, num_groups, group_channels, eps)
        # Linear layers on (B, HW, C) tokens (same parameters as 1x1 convs). Token-major layout
        # makes each head's q/k/v have a contiguous last dim, which SDPA's fused kernels want.
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H, W)."""
        b, c, height, width = x.shape
        n, heads = height * width, self.num_heads
        # Channels-last activations make this a view; NCHW ones are copied once here.
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, n, c)  # (B, HW, C)
        qkv = self.qkv(tokens)  # (B, HW, 3C)
        # Views into qkv, not copies: the fused kernels take strided q/k/v.
        q, k, v = qkv.view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v)  # (B, heads, HW, C/heads)
        out = self.proj(out.transpose(1, 2).reshape(b, n, c))  # (B, HW, C)
        return x + out.view(b, height, width, c).permute(0, 3, 1, 2)  # (B, C, H, W)


class Downsample(nn.Module):
    """Halve the resolution: ``(B, C, H, W) -> (B, C, H/2, W/2)``.

    ``kind="conv"``: 3x3 stride-2 conv, padding 1 (``padding="symmetric"``) or one zero row and
    column at the bottom and right only (``"bottom_right"``: TensorFlow's "SAME" padding, which
    DDPM's original code had); ``kind="avgpool"``: 2x2 average pooling.
    """

    def __init__(self, channels: int, kind: Literal["conv", "avgpool"] = "conv",
                 padding: Literal["symmetric", "bottom_right"] = "symmetric") -> None:
        super().__init__()
        if kind not in ("conv", "avgpool"):
            raise ValueError(f"Downsample: kind must be 'conv' or 'avgpool', got {kind!r}")
        if padding not in ("symmetric", "bottom_right"):
            raise ValueError(f"Downsample: padding must be 'symmetric' or 'bottom_right', "
                             f"got {padding!r}")
        self.kind = kind
        self.padding = padding
        self.conv: nn.Conv2d | None = None  # avgpool has no parameters
        if kind == "conv":
            self.conv = nn.Conv2d(channels, channels, 3, stride=2,
                                  padding=1 if padding == "symmetric" else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, H/2, W/2)."""
        if self.conv is not None:
            if self.padding == "bottom_right":
                x = F.pad(x, (0, 1, 0, 1))
            return self.conv(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


def _fold_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Three 3x3-conv taps along ``dim`` -> the four taps of the equivalent stride-2 transposed
    conv (see :meth:`Upsample.forward`): ``[w2, w1 + w2, w0 + w1, w0]``."""
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim=dim)


class Upsample(nn.Module):
    """Double the resolution: ``(B, C, H, W) -> (B, C, 2H, 2W)``.

    ``kind="nearest"``: nearest-neighbour x2 then a 3x3 conv (DDPM);
    ``kind="transposed"``: a 4x4 stride-2 transposed conv, padding 1.
    """

    def __init__(self, channels: int, kind: Literal["nearest", "transposed"] = "nearest") -> None:
        super().__init__()
        if kind not in ("nearest", "transposed"):
            raise ValueError(f"Upsample: kind must be 'nearest' or 'transposed', got {kind!r}")
        self.kind = kind
        self.conv: nn.Module
        if kind == "nearest":
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        else:
            self.conv = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> (B, C, 2H, 2W)."""
        if self.kind == "nearest":
            # conv3x3(nearest_x2(x)) computed without the 4x larger upsampled image: each output
            # pixel sees a 2x2 input window, so the pair is one 4x4 stride-2 transposed conv whose
            # taps are sums of the 3x3 taps (output row 2i reads rows i-1, i with weights w0,
            # w1 + w2; row 2i+1 reads rows i, i+1 with w0 + w1, w2). Same function, 16 instead of
            # 36 multiply-adds per output pixel and channel pair; only the rounding differs.
            w = self.conv.weight.contiguous()  # (C_out, C_in, 3, 3)
            w = _fold_taps(_fold_taps(w, 2), 3)  # (C_out, C_in, 4, 4)
            return F.conv_transpose2d(x, w.transpose(0, 1), self.conv.bias, stride=2, padding=1)
        return self.conv(x)
