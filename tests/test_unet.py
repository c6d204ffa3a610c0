"""UNet and its building blocks: shapes, conditioning, gradients, checkpointing, config errors."""

from __future__ import annotations

import math

import pytest
import torch

from diffunet.config import UNetConfig
from diffunet.errors import ConfigError
from diffunet.nn import (
    AttentionBlock,
    Downsample,
    ResidualBlock,
    Upsample,
    group_norm,
    timestep_embedding,
)
from diffunet.unet import UNet
from helpers import perturbed, tiny_net

def tiny(**overrides) -> UNetConfig:
    """The tests' tiny network (16x16, attention at 8x8), 16 base channels in 8 groups."""
    return UNetConfig(**tiny_net(**{"base_channels": 16, "num_groups": 8, **overrides}))


def inputs(cfg: UNetConfig, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


# ---------------------------------------------------------------------------------------------
# Shapes and channel bookkeeping


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(base_channels=24, num_groups=8, channel_mults=(1, 2, 3), attn_resolutions=(8, 4)),
        dict(in_channels=1),
        dict(in_channels=4, out_channels=8),
        dict(in_channels=3, out_channels=6),
        dict(channel_mults=(1,), attn_resolutions=(16,)),
        dict(channel_mults=(2, 1), attn_resolutions=()),
        dict(channel_mults=(1, 2, 3), num_res_blocks=3, attn_resolutions=(16, 4)),
        dict(num_res_blocks=3, image_size=8, attn_resolutions=(4,)),
        dict(downsample="avgpool", upsample="transposed"),
        dict(scale_shift_norm=True),
        dict(head_channels=8),
        dict(num_heads=4),
        dict(num_classes=10),
        dict(gradient_checkpointing=True),
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "tiny",
)
def test_output_shape(overrides):
    cfg = tiny(**overrides)
    model = UNet(cfg)
    x, t = inputs(cfg, batch=3)
    out = model(x, t)
    assert out.shape == (3, cfg.output_channels, cfg.image_size, cfg.image_size)
    assert out.dtype == x.dtype
    assert model.config is cfg


def test_fresh_model_outputs_zero():
    # Zero-initialised conv_out (and residual branches) make the untrained net output 0.
    cfg = tiny()
    x, t = inputs(cfg)
    assert torch.count_nonzero(UNet(cfg)(x, t)) == 0


@pytest.mark.parametrize(
    "t",
    [7, 7.0, torch.tensor(7), torch.tensor(7.5), torch.tensor([7, 300]),
     torch.tensor([7.0, 300.5]), torch.tensor([7, 300], dtype=torch.int32)],
    ids=["int", "float", "0d-int", "0d-float", "B-int64", "B-float", "B-int32"],
)
def test_timestep_forms(t):
    cfg = tiny()
    model = perturbed(UNet(cfg)).eval()
    x, _ = inputs(cfg)
    out = model(x, t)
    assert out.shape == x.shape
    if isinstance(t, (int, float)) or t.ndim == 0:
        # A scalar means that timestep for every sample.
        expected = model(x, torch.full((2,), float(t)))
        torch.testing.assert_close(out, expected)


def test_timestep_wrong_shape_raises():
    cfg = tiny()
    x, _ = inputs(cfg)
    with pytest.raises(ValueError, match="shape"):
        UNet(cfg)(x, torch.tensor([1, 2, 3]))


def test_state_dict_keys_are_stable():
    keys = set(UNet(tiny(num_classes=3)).state_dict())
    for k in ["time_embed.0.weight", "time_embed.2.weight", "class_embed.weight", "conv_in.weight",
              "down.0.res.0.norm1.weight", "down.0.res.0.conv2.weight",
              "down.0.downsample.conv.weight", "down.1.res.0.skip.weight",
              "down.1.attn.0.qkv.weight", "down.1.attn.0.proj.weight", "mid.res1.emb_proj.weight",
              "mid.attn.norm.weight", "mid.res2.conv1.weight", "up.0.res.1.conv1.weight",
              "up.1.upsample.conv.weight", "up.1.attn.1.qkv.weight", "norm_out.weight",
              "conv_out.weight"]:
        assert k in keys, k
    assert not any("upsample" in k for k in keys if k.startswith("up.0."))
    assert not any("downsample" in k for k in keys if k.startswith("down.1."))


# ---------------------------------------------------------------------------------------------
# Parameter count: the DDPM CIFAR-10 network


def test_ddpm_cifar10_parameter_count():
    model = UNet(UNetConfig())  # the defaults are the DDPM CIFAR-10 configuration
    n = model.num_parameters()
    assert n == sum(p.numel() for p in model.parameters())
    assert abs(n - 35.7e6) / 35.7e6 < 0.03
    assert n == 35_746_307  # diffusers' google/ddpm-cifar10-32 UNet2DModel, exactly


@pytest.mark.parametrize("overrides", [
    {},
    {"channel_mults": (1, 2, 3, 4), "num_res_blocks": 3, "attn_resolutions": (16, 2),
     "scale_shift_norm": True, "num_classes": 5, "in_channels": 1, "out_channels": 2},
    {"channel_mults": (2, 1, 2), "downsample": "avgpool", "upsample": "transposed",
     "attn_resolutions": (), "head_channels": 8},
    {"time_conditioning": False, "out_channels": 3, "num_res_blocks": 2},
    {"channel_mults": (1,), "image_size": 4, "attn_resolutions": (4,), "num_res_blocks": 4},
])
def test_network_size_is_the_built_networks(overrides):
    # resources.network_size prices a config by arithmetic (a million blocks in microseconds);
    # it must count exactly what UNet.__init__ builds
    from diffunet.resources import network_size

    cfg = tiny(**overrides)
    with torch.device("meta"):
        state = UNet(cfg).state_dict()
    assert network_size(cfg) == (len(state), sum(v.numel() for v in state.values()))


def test_network_size_of_a_million_blocks_is_counted_not_built():
    from diffunet.resources import network_size

    cfg = tiny(num_res_blocks=10**6, channel_mults=(1, 2, 2, 2), attn_resolutions=(8,))
    size = network_size(cfg)  # building it would take minutes and gigabytes
    two = network_size(tiny(num_res_blocks=2, channel_mults=(1, 2, 2, 2), attn_resolutions=(8,)))
    three = network_size(tiny(num_res_blocks=3, channel_mults=(1, 2, 2, 2),
                              attn_resolutions=(8,)))
    per_block = three.parameters - two.parameters  # each block adds the same
    assert size.parameters == two.parameters + (10**6 - 2) * per_block
    assert size.tensors == two.tensors + (10**6 - 2) * (three.tensors - two.tensors)


# ---------------------------------------------------------------------------------------------
# Gradients, time embedding, conditioning


def test_gradients_reach_every_parameter():
    cfg = tiny(num_classes=3, scale_shift_norm=True, channel_mults=(1, 2, 2),
               attn_resolutions=(16, 4))
    model = perturbed(UNet(cfg))
    x, t = inputs(cfg)
    model(x, t, class_labels=torch.tensor([0, 3])).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad) > 0, name


def test_gradients_reach_zero_init_output_at_init():
    # A fresh net outputs 0; the zero-initialised output conv must still receive gradient.
    cfg = tiny()
    model = UNet(cfg)
    x, t = inputs(cfg)
    (model(x, t) - 1.0).square().mean().backward()
    assert torch.count_nonzero(model.conv_out.weight.grad) > 0


def test_timestep_embedding_shapes_and_types():
    for t in (5, 5.0, torch.tensor(5), torch.tensor(5, dtype=torch.int64)):
        emb = timestep_embedding(t, 32)
        assert emb.shape == (1, 32) and emb.dtype == torch.float32
    emb = timestep_embedding(torch.tensor([0, 1, 999]), 33)  # odd dim: one zero column
    assert emb.shape == (3, 33) and torch.all(emb[:, -1] == 0)
    # int and float t give the same embedding; half-precision t is computed in float32 too.
    torch.testing.assert_close(timestep_embedding(torch.tensor([3, 700]), 16),
                               timestep_embedding(torch.tensor([3.0, 700.0]), 16))
    # t = 0: cos part is 1, sin part is 0.
    torch.testing.assert_close(timestep_embedding(0, 8), torch.tensor([[1.0] * 4 + [0.0] * 4]))
    # the first frequency is 1: sin(t) for the first sin column.
    torch.testing.assert_close(timestep_embedding(torch.tensor([2.0]), 8)[0, 4],
                               torch.tensor(math.sin(2.0)))


def test_nearby_timesteps_differ():
    emb = timestep_embedding(torch.arange(995, 1000), 128)
    gaps = (emb[1:] - emb[:-1]).norm(dim=1)
    assert torch.all(gaps > 0.5)  # t and t+1 are well separated even at large t
    cfg = tiny()
    model = perturbed(UNet(cfg)).eval()
    x, _ = inputs(cfg, batch=1)
    a, b = model(x, 998), model(x, 999)
    assert (a - b).abs().max() > 1e-4


def test_class_conditioning():
    cfg = tiny(num_classes=5)
    model = perturbed(UNet(cfg)).eval()
    x, t = inputs(cfg)
    out0 = model(x, t, class_labels=torch.tensor([0, 0]))
    out1 = model(x, t, class_labels=torch.tensor([1, 1]))
    assert (out0 - out1).abs().max() > 1e-4
    # None means "no label" (index num_classes) for every sample.
    torch.testing.assert_close(model(x, t), model(x, t, class_labels=torch.tensor([5, 5])))
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        model(x, t, class_labels=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        model(x, t, class_labels=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="integers"):
        model(x, t, class_labels=torch.tensor([0.0, 1.0]))


def test_class_labels_on_unconditional_model_raise_config_error():
    cfg = tiny()
    x, t = inputs(cfg)
    with pytest.raises(ConfigError, match="num_classes") as info:
        UNet(cfg)(x, t, class_labels=torch.tensor([0, 1]))
    assert "\n" not in str(info.value)


def test_gradient_checkpointing_matches_plain_path():
    # Dropout on: checkpointing must replay the same dropout masks in the recomputation.
    cfg = tiny(dropout=0.3, scale_shift_norm=True, num_classes=3)
    plain = perturbed(UNet(cfg)).train()
    ckpt = UNet(tiny(dropout=0.3, scale_shift_norm=True, num_classes=3,
                     gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    x, t = inputs(cfg)
    labels = torch.tensor([0, 2])
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(123)
        out = model(x, t, labels)
        out.square().mean().backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-6, atol=1e-7, msg=name)


def test_gradient_checkpointing_inactive_in_eval_and_no_grad(monkeypatch):
    import diffunet.unet as unet_module

    calls = []
    real = unet_module.checkpoint
    monkeypatch.setattr(unet_module, "checkpoint",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = tiny(gradient_checkpointing=True)
    model = perturbed(UNet(cfg))
    x, t = inputs(cfg)
    with torch.no_grad():
        model.train()(x, t)  # training mode, but nothing to recompute for
    model.eval()(x, t)  # gradients on, but evaluating
    assert calls == []
    model.train()(x, t).sum().backward()  # the one case that checkpoints: every block
    assert len(calls) >= cfg.num_res_blocks * len(cfg.channel_mults)


# ---------------------------------------------------------------------------------------------
# Blocks


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_attention_matches_reference(heads):
    torch.manual_seed(0)
    block = perturbed(AttentionBlock(16, num_heads=heads, num_groups=4))
    x = torch.randn(2, 16, 5, 3)  # non-square on purpose: rows/cols must not be mixed up
    out = block(x)

    # Hand-written softmax(Q K^T / sqrt(d)) V, heads splitting the channels.
    b, c, h, w = x.shape
    d = c // heads
    tokens = block.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
    q, k, v = (tokens @ block.qkv.weight.T + block.qkv.bias).split(c, dim=-1)

    def split(z: torch.Tensor) -> torch.Tensor:  # (B, HW, C) -> (B, heads, HW, d)
        return z.reshape(b, h * w, heads, d).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    attn = (weights @ v).transpose(1, 2).reshape(b, h * w, c)  # (B, HW, C)
    proj = attn @ block.proj.weight.T + block.proj.bias
    expected = x + proj.transpose(1, 2).reshape(b, c, h, w)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_attention_starts_as_identity():
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(AttentionBlock(8, 2, 4)(x), x)


def test_residual_block_structure():
    same = ResidualBlock(16, 16, emb_dim=32, num_groups=4)
    assert isinstance(same.skip, torch.nn.Identity)
    wider = ResidualBlock(16, 24, emb_dim=32, num_groups=4)
    assert isinstance(wider.skip, torch.nn.Conv2d) and wider.skip.kernel_size == (1, 1)
    ada = ResidualBlock(16, 24, emb_dim=32, num_groups=4, scale_shift_norm=True)
    assert ada.emb_proj.out_features == 48
    assert torch.count_nonzero(ada.conv2.weight) == 0 and torch.count_nonzero(ada.conv2.bias) == 0
    x, emb = torch.randn(2, 16, 6, 6), torch.randn(2, 32)
    assert ada(x, emb).shape == (2, 24, 6, 6)
    # zero-init conv2: the block starts as its skip path.
    torch.testing.assert_close(same(x, emb), x)


def test_scale_shift_norm_formula():
    torch.manual_seed(0)
    block = perturbed(ResidualBlock(8, 8, emb_dim=12, num_groups=2, scale_shift_norm=True)).eval()
    x, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 12)
    h = block.conv1(torch.nn.functional.silu(block.norm1(x)))
    scale, shift = block.emb_proj(torch.nn.functional.silu(emb)).chunk(2, dim=1)
    h = block.norm2(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    expected = x + block.conv2(torch.nn.functional.silu(h))
    torch.testing.assert_close(block(x, emb), expected)


@pytest.mark.parametrize("kind", ["conv", "avgpool"])
def test_downsample(kind):
    assert Downsample(6, kind)(torch.randn(2, 6, 8, 8)).shape == (2, 6, 4, 4)


@pytest.mark.parametrize("kind", ["nearest", "transposed"])
def test_upsample(kind):
    assert Upsample(6, kind)(torch.randn(2, 6, 4, 4)).shape == (2, 6, 8, 8)


# ---------------------------------------------------------------------------------------------
# dtype / device following


def test_double_precision():
    cfg = tiny(num_classes=2)
    model = perturbed(UNet(cfg)).double()
    x, t = inputs(cfg)
    out = model(x.double(), t, class_labels=torch.tensor([0, 1]))
    assert out.dtype == torch.float64
    out.sum().backward()
    assert model.conv_in.weight.grad.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# GroupNorm groups: a fixed number (num_groups) or a fixed width (group_channels)


def _norms(net: torch.nn.Module) -> list[torch.nn.GroupNorm]:
    return [m for m in net.modules() if isinstance(m, torch.nn.GroupNorm)]


def test_group_channels_gives_groups_of_that_width_at_every_norm():
    # the default network's first level: 32 channels in 32 groups of one channel each ...
    default = UNet(UNetConfig(base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                              attn_resolutions=(16,)))
    assert {(n.num_channels, n.num_groups) for n in _norms(default)} >= {(32, 32), (64, 32)}
    # ... with group_channels = 32, one group at 32 channels, two at 64, three at 96 (a skip
    # concatenation): every group is 32 channels wide
    wide = UNet(UNetConfig(base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                           attn_resolutions=(16,), group_channels=32))
    norms = _norms(wide)
    assert len(norms) == len(_norms(default))
    assert all(n.num_channels // n.num_groups == 32 for n in norms)
    assert {n.num_channels for n in norms} >= {32, 64, 96}
    # the same parameters (a scale and shift per channel): the state dicts have one shape
    assert {k: v.shape for k, v in wide.state_dict().items()} == {
        k: v.shape for k, v in default.state_dict().items()}


def test_group_norm_of_width_c_is_groupnorm_of_channels_over_c_groups():
    x = torch.randn(2, 24, 5, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(group_norm(24, group_channels=8)(x),
                               torch.nn.GroupNorm(3, 24)(x), rtol=0, atol=0)
    assert group_norm(24, num_groups=6).num_groups == 6  # group_channels unset: num_groups
    with pytest.raises(ValueError, match="groups of 5"):
        group_norm(24, group_channels=5)


def test_group_channels_unset_keeps_num_groups_at_every_norm():
    # the network of every config before group_channels existed: num_groups groups everywhere,
    # and the same initial weights from the same seed (a GroupNorm draws no random numbers)
    cfg = tiny()
    assert cfg.group_channels is None
    torch.manual_seed(0)
    net = UNet(cfg)
    assert all(n.num_groups == 8 and n.eps == cfg.norm_eps for n in _norms(net))
    torch.manual_seed(0)
    wide = UNet(tiny(num_groups=32, group_channels=2))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                 wide.state_dict().values()))


def test_group_channels_round_trips_through_a_model_file(tmp_path):
    import diffunet
    from diffunet import NoiseSchedule, ScheduleConfig

    cfg = tiny(num_groups=32, group_channels=4)
    net = perturbed(UNet(cfg)).eval()
    diffunet.save_model(tmp_path / "m.safetensors", net, NoiseSchedule(ScheduleConfig()))
    loaded, _, meta = diffunet.load_model(tmp_path / "m.safetensors")
    assert loaded.config == cfg and meta["unet_config"]["group_channels"] == 4
    assert [n.num_groups for n in _norms(loaded)] == [n.num_groups for n in _norms(net)]
    x, t = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(x, t), net(x, t))


# ---------------------------------------------------------------------------------------------
# Config validation


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(image_size=20, channel_mults=(1, 2, 2, 2)), "unet.image_size"),
        (dict(base_channels=20, num_groups=8), "unet.num_groups"),
        (dict(base_channels=16, channel_mults=(1, 3), num_groups=32), "unet.num_groups"),
        (dict(num_heads=3), "unet.num_heads"),
        (dict(head_channels=12), "unet.head_channels"),
        (dict(attn_resolutions=(5,)), "unet.attn_resolutions"),
        (dict(image_size=0), "unet.image_size"),
        (dict(base_channels=-8), "unet.base_channels"),
        (dict(num_res_blocks=0), "unet.num_res_blocks"),
        (dict(num_groups=0), "unet.num_groups"),
        (dict(in_channels=0), "unet.in_channels"),
        (dict(out_channels=0), "unet.out_channels"),
        (dict(num_classes=0), "unet.num_classes"),
        (dict(channel_mults=()), "unet.channel_mults"),
        (dict(channel_mults=(1, 0)), "unet.channel_mults"),
        (dict(dropout=1.0), "unet.dropout"),
        (dict(num_groups=32, group_channels=0), "unet.group_channels"),
        (dict(num_groups=32, group_channels=5), "unet.group_channels"),  # 16 channels
        (dict(num_groups=8, group_channels=4), "unet.group_channels"),  # both set
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as info:
        tiny(**overrides)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Same function as diffusers' UNet2DModel (the google/ddpm-cifar10-32 architecture)


def test_matches_diffusers_unet2dmodel():
    diffusers = pytest.importorskip("diffusers")
    cfg = tiny(channel_mults=(1, 2, 2), attn_resolutions=(8,), num_res_blocks=2)
    ours = perturbed(UNet(cfg)).eval()
    # The mapping lives in diffunet.interop (tests/test_interop.py: sampling, both directions).
    from diffunet.interop import state_to_diffusers, unet_to_diffusers

    config = unet_to_diffusers(cfg)
    assert config["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"]
    theirs = diffusers.UNet2DModel(**config).eval()
    assert sum(p.numel() for p in theirs.parameters()) == ours.num_parameters()
    theirs.load_state_dict(state_to_diffusers(ours.state_dict(), cfg), strict=True)
    x, t = inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), theirs(x, t).sample, rtol=1e-4, atol=1e-5)
