"""The time-conditioned residual/attention UNet (Ho et al. 2020; Nichol & Dhariwal 2021).

The network only maps ``(x_t, t[, class_labels][, cond_image]) -> output``; it knows nothing about the noise
schedule or what the output means (eps, v or x0: see ``NoiseSchedule.split_output``). With
``UNetConfig(time_conditioning=False)`` it is the same network with no timestep input,
``net(x)``: no ``time_embed`` and no per-block embedding projections (a segmentation backbone).

State-dict layout (the keys of saved model files; keep stable)::

    time_embed.{0,2}        Linear(base, 4 base) -> SiLU -> Linear(4 base, 4 base)  (time-conditioned)
    class_embed             Embedding(num_classes + 1, 4 base)      (class-conditional only)
    conv_in                 (in_channels + cond_channels inputs; a condition image's start at 0)
    down.{level}.res.{i}    ResidualBlock      down.{level}.attn.{i}  AttentionBlock (if any)
    down.{level}.downsample                    (all levels but the last)
    mid.res1, mid.attn, mid.res2
    up.{level}.res.{i}      (num_res_blocks + 1 per level)            up.{level}.attn.{i}
    up.{level}.upsample                        (all levels but level 0)
    norm_out, conv_out

``level`` is the resolution level (0 = full resolution) in both ``down`` and ``up``; the up path
runs its levels in reverse order.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import UNetConfig
from .errors import ConfigError, require
from .nn import (AttentionBlock, Downsample, ResidualBlock, Upsample, group_norm,
                 timestep_embedding, zero_)

__all__ = ["UNet"]


class _DownLevel(nn.Module):
    """One resolution level of the encoder: residual blocks (+ attention), then a Downsample."""

    def __init__(self, res: list[ResidualBlock], attn: list[AttentionBlock],
                 downsample: Downsample | None) -> None:
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)  # empty, or one per residual block
        self.downsample = downsample


class _UpLevel(nn.Module):
    """One resolution level of the decoder: residual blocks (+ attention), then an Upsample."""

    def __init__(self, res: list[ResidualBlock], attn: list[AttentionBlock],
                 upsample: Upsample | None) -> None:
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.upsample = upsample


class _MidBlock(nn.Module):
    """The bottleneck: residual -> attention -> residual, at the lowest resolution (DDPM)."""

    def __init__(self, res1: ResidualBlock, attn: AttentionBlock, res2: ResidualBlock) -> None:
        super().__init__()
        self.res1 = res1
        self.attn = attn
        self.res2 = res2


class UNet(nn.Module):
    """Noise-prediction UNet: ``forward(x (B,C,H,W), t, class_labels=None, cond_image=None)
    -> (B,C_out,H,W)``.

    At the :class:`UNetConfig` defaults this is the DDPM CIFAR-10 network (35,746,307 parameters,
    the same as diffusers' ``google/ddpm-cifar10-32``).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        # Read once: torch.compile cannot trace torch.backends.mkldnn.is_available().
        self._onednn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
        cfg = config
        base = cfg.base_channels
        emb_dim = cfg.time_embed_dim
        last = len(cfg.channel_mults) - 1

        def res(cin: int, cout: int) -> ResidualBlock:
            return ResidualBlock(cin, cout, emb_dim, dropout=cfg.dropout, num_groups=cfg.num_groups,
                                 scale_shift_norm=cfg.scale_shift_norm, eps=cfg.norm_eps,
                                 group_channels=cfg.group_channels)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads=cfg.heads_at(ch), num_groups=cfg.num_groups,
                                  eps=cfg.norm_eps, group_channels=cfg.group_channels)

        # Raw t never enters a Linear: sinusoids first, then this MLP (DDPM App. B).
        self.time_embed = None if emb_dim is None else nn.Sequential(
            nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        # The extra row (index num_classes) is the learned "no label" embedding for
        # classifier-free guidance (Ho & Salimans 2022).
        self.class_embed = (
            nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes is not None else None
        )

        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.cond_channels, base, 3, padding=1)
        if cfg.cond_channels:
            # the condition image's input weights start at zero: a new conditional model is the
            # unconditional one, and training grows the condition's influence from nothing
            with torch.no_grad():
                self.conv_in.weight[:, cfg.in_channels:].zero_()

        # Encoder. skip_chs records the channels of every activation the decoder will
        # concatenate: after conv_in, after each residual(+attention) block, after each Downsample.
        skip_chs = [base]
        ch = base
        down = []
        for level, mult in enumerate(cfg.channel_mults):
            out_ch = base * mult
            use_attn = cfg.resolutions[level] in cfg.attn_resolutions
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(res(ch, out_ch))
                ch = out_ch
                if use_attn:
                    attns.append(attn(ch))
                skip_chs.append(ch)
            downsample = None
            if level != last:
                downsample = Downsample(ch, cfg.downsample, cfg.downsample_padding)
                skip_chs.append(ch)
            down.append(_DownLevel(blocks, attns, downsample))
        self.down = nn.ModuleList(down)

        self.mid = _MidBlock(res(ch, ch), attn(ch), res(ch, ch))

        # Decoder: built from the lowest resolution up (the order skips are consumed), stored by
        # level so that up[level] and down[level] work at the same resolution.
        up: list[_UpLevel] = []
        for level in reversed(range(len(cfg.channel_mults))):
            out_ch = base * cfg.channel_mults[level]
            use_attn = cfg.resolutions[level] in cfg.attn_resolutions
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(res(ch + skip_chs.pop(), out_ch))
                ch = out_ch
                if use_attn:
                    attns.append(attn(ch))
            upsample = Upsample(ch, cfg.upsample) if level != 0 else None
            up.append(_UpLevel(blocks, attns, upsample))
        assert not skip_chs, "every skip connection must be consumed"
        self.up = nn.ModuleList(reversed(up))

        self.norm_out = group_norm(ch, cfg.num_groups, cfg.group_channels, cfg.norm_eps)
        self.conv_out = zero_(nn.Conv2d(ch, cfg.output_channels, 3, padding=1))

    # -----------------------------------------------------------------------------------------

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Total number of parameters (``sum(p.numel() for p in self.parameters())``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _run(self, block: nn.Module, *args: Any) -> torch.Tensor:
        """Call ``block``, recomputing it in the backward pass when gradient checkpointing is on."""
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing restores the RNG state, so dropout masks match.
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory format the network runs in (the values are the same).

        Channels-last activations spare oneDNN (CPU) and cuDNN a layout reorder around every
        convolution, and make the attention tokens a view. On the CPU (oneDNN builds) they are
        always used; elsewhere they follow the weights, i.e. ``model.to(memory_format=
        torch.channels_last)`` turns them on. Every later activation inherits the format.
        """
        try:
            weights_nhwc = self.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
        except RuntimeError:  # batched weights under torch.func.vmap cannot say their layout
            weights_nhwc = False
        if (x.device.type == "cpu" and self._onednn) or weights_nhwc:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _timesteps(self, t: torch.Tensor | int | float, batch: int, device: torch.device
                   ) -> torch.Tensor:
        """t as a (B,) tensor on ``device``: a scalar is broadcast to every sample."""
        t = torch.as_tensor(t, device=device)
        if t.ndim == 0:
            return t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or have shape ({batch},) to match x, "
                             f"got shape {tuple(t.shape)}")
        return t

    def _class_labels(self, class_labels: torch.Tensor | int | None, batch: int,
                      device: torch.device) -> torch.Tensor:
        """Labels as a (B,) int64 tensor; ``None`` means the "no label" index for every sample."""
        num_classes = self.config.num_classes
        assert num_classes is not None
        if class_labels is None:
            return torch.full((batch,), num_classes, dtype=torch.long, device=device)
        labels = torch.as_tensor(class_labels, device=device)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be integers, got dtype {labels.dtype}")
        if labels.ndim == 0:
            labels = labels.expand(batch)
        if labels.shape != (batch,):
            raise ValueError(f"class_labels must have shape ({batch},) to match x, "
                             f"got shape {tuple(labels.shape)}")
        # No host sync (on a GPU a device-side assert rather than a silently wrong embedding
        # row; under torch.compile, part of the graph).
        require(((labels >= 0) & (labels <= num_classes)).all(), ValueError, lambda: (
            f"class_labels must be in [0, {num_classes}] ({num_classes} is 'no label'), got "
            f"values from {int(labels.min())} to {int(labels.max())}"))
        return labels.long()

    def _cond_image(self, cond_image: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """The condition image (B, cond_channels, H, W) in ``x``'s dtype and device; ``None`` is
        zeros, the null condition."""
        c = self.config.cond_channels
        if not c:
            raise ConfigError("unet.cond_channels: a cond_image was given but this UNet takes "
                              "none; set cond_channels or pass cond_image=None")
        b, _, h, w = x.shape
        if cond_image is None:
            return x.new_zeros((b, c, h, w))
        if cond_image.shape != (b, c, h, w):
            raise ValueError(f"cond_image must have shape ({b}, {c}, {h}, {w}) to match x "
                             f"(cond_channels {c}), got {tuple(cond_image.shape)}")
        return cond_image.to(device=x.device, dtype=x.dtype)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int | float | None = None,
        class_labels: torch.Tensor | int | None = None,
        cond_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the network target for noised images (or, time-less, e.g. mask logits).

        Args:
            x: (B, in_channels, H, W) with H = W = ``config.image_size`` (any multiple of
                2^(levels-1) works).
            t: (B,) integer or float timesteps, or a scalar (python number or 0-d tensor)
                used for every sample. Original-scale timesteps, e.g. in [0, 1000).
                Required when ``config.time_conditioning``; must be omitted otherwise.
            class_labels: (B,) integer labels (or one scalar for all) in [0, num_classes],
                ``num_classes`` meaning "no label"; ``None`` is "no label" for all samples.
                Only for conditional models (``ConfigError`` otherwise).
            cond_image: (B, cond_channels, H, W), a condition image at ``x``'s size,
                concatenated to ``x``; ``None`` is the null condition (zeros), as classifier-
                free guidance drops it. Only for ``config.cond_channels`` > 0.

        Returns:
            (B, out_channels, H, W) in ``x``'s dtype.
        """
        batch = x.shape[0]
        if class_labels is not None and self.class_embed is None:
            raise ConfigError("unet.num_classes: class_labels were given but this UNet is "
                              "unconditional; set num_classes or pass class_labels=None")

        emb = None
        if self.time_embed is None:
            if t is not None:
                raise ValueError("this UNet has no timestep input (unet.time_conditioning = "
                                 "false); call net(x)")
        else:
            if t is None:
                raise ValueError("this UNet is time-conditioned: call net(x, t) with the "
                                 "timesteps (a scalar or shape (B,))")
            t = self._timesteps(t, batch, x.device)
            # Sinusoids in float32 (exact for int t), then the MLP's own dtype (e.g. .half()).
            emb = timestep_embedding(t, self.config.base_channels,
                                     order=self.config.time_embed_order,
                                     freq_shift=self.config.time_embed_freq_shift)
            emb = self.time_embed(emb.to(self.time_embed[0].weight.dtype))  # (B, 4 base)
            if self.class_embed is not None:
                emb = emb + self.class_embed(self._class_labels(class_labels, batch, x.device))

        if self.config.cond_channels or cond_image is not None:
            x = torch.cat([x, self._cond_image(cond_image, x)], dim=1)  # (B, C + C_cond, H, W)
        h = self.conv_in(self._memory_format(x))  # (B, base, H, W)
        skips = [h]
        for level in self.down:
            for i, block in enumerate(level.res):
                h = self._run(block, h, emb)
                if len(level.attn):
                    h = self._run(level.attn[i], h)
                skips.append(h)
            if level.downsample is not None:
                h = level.downsample(h)  # (B, C, H/2, W/2)
                skips.append(h)

        h = self._run(self.mid.res1, h, emb)
        h = self._run(self.mid.attn, h)
        h = self._run(self.mid.res2, h, emb)

        for level in reversed(self.up):
            for i, block in enumerate(level.res):
                h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb)
                if len(level.attn):
                    h = self._run(level.attn[i], h)
            if level.upsample is not None:
                h = level.upsample(h)  # (B, C, 2H, 2W)

        h = nn.functional.silu(self.norm_out(h), inplace=not torch.is_grad_enabled())
        out = self.conv_out(h)  # (B, out_channels, H, W)
        return out.contiguous() if x.is_contiguous() else out  # NCHW in, NCHW out
