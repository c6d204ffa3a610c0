"""Evaluation: the bits/dim bound and its pieces, FID/KID pieces, the reference cache, the
FID Inception loader's errors, and the `eval` command (tiny models and feature networks)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from diffunet import NoiseSchedule, ScheduleConfig, UNet, UNetConfig, save_model
from diffunet.data import BuiltinShapes, FolderImages
from diffunet.images import save_image
from diffunet.likelihood import (bits_per_dim, discretized_gaussian_log_likelihood, model_variance,
                                 normal_kl, p_mean_variance, prior_bpd, q_posterior)
from diffunet.errors import DiffunetError, ModelFileError
from diffunet import evaluation as ev
from helpers import perturbed, tiny_net
from diffunet.evaluation import (FeatureNetwork, dataset_bits_per_dim, fid_kid, frechet_distance,
                                 kernel_inception_distance, reference_statistics)

F64 = torch.float64
LN2 = math.log(2.0)
GRID = torch.arange(256, dtype=F64) / 127.5 - 1  # the 256 data values in [-1, 1]


def _schedule(T: int = 20, **kw) -> NoiseSchedule:
    kw.setdefault("beta_start", 1e-3)
    kw.setdefault("beta_end", 0.3)
    return NoiseSchedule(ScheduleConfig(num_train_timesteps=T, **kw))


def _image(seed: int = 0, shape=(1, 3, 4, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=g).to(F64) / 127.5 - 1


def _oracle(schedule: NoiseSchedule, x0: torch.Tensor):
    """A model that knows x0: it outputs the exact target for (x_t, t) in any parametrisation."""

    def model(xt, t):
        x = x0.expand_as(xt)
        return schedule.target(x, schedule.eps_from_x0(xt, t, x), t)

    return model


# ---------------------------------------------------------------------------------------------
# Likelihood pieces


@pytest.mark.parametrize("mean,std", [(0.0, 0.1), (0.99, 1e-3), (-0.3, 3.0), (5.0, 0.01),
                                      (0.5, 1e-5), (-1.0, 0.02), (0.123, 0.004)])
def test_discretized_gaussian_is_a_distribution_over_the_256_bins(mean, std):
    logp = discretized_gaussian_log_likelihood(GRID, torch.tensor(mean, dtype=F64),
                                               torch.tensor(2 * math.log(std), dtype=F64))
    assert torch.isfinite(logp).all()
    assert float(logp.exp().sum()) == pytest.approx(1.0, abs=1e-9)
    assert float(logp.max()) <= 0.0


def test_discretized_gaussian_matches_the_normal_cdf():
    mean = torch.tensor([0.05], dtype=F64)
    std = 0.3
    normal = torch.distributions.Normal(mean, std)
    logvar = torch.tensor(2 * math.log(std), dtype=F64)
    logp = discretized_gaussian_log_likelihood(GRID, mean, logvar)
    inner = normal.cdf(GRID + 1 / 255) - normal.cdf(GRID - 1 / 255)
    expected = torch.cat([normal.cdf(GRID[:1] + 1 / 255), inner[1:-1],
                          1 - normal.cdf(GRID[-1:] - 1 / 255)])
    torch.testing.assert_close(logp.exp(), expected, rtol=1e-10, atol=1e-14)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(50, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    lv1, lv2 = torch.randn(50, generator=g, dtype=F64), torch.randn(50, generator=g, dtype=F64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()),
        torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)
    assert float(normal_kl(m1, lv1, m1, lv1).abs().max()) < 1e-12


def test_prior_kl_vanishes_when_alpha_bar_at_T_goes_to_zero():
    x0 = _image(shape=(2, 3, 4, 4))
    zero_snr = _schedule(20, rescale_zero_terminal_snr=True, prediction_type="v")
    assert float(zero_snr.alphas_cumprod[-1]) == 0.0
    assert torch.equal(prior_bpd(zero_snr, x0), torch.zeros(2, dtype=F64))
    long_cosine = NoiseSchedule(ScheduleConfig(num_train_timesteps=1000, beta_schedule="cosine"))
    assert float(prior_bpd(long_cosine, x0).max()) < 1e-4
    short = _schedule(10, beta_end=0.05)  # alpha_bar_T far from 0: a real cost
    assert float(prior_bpd(short, x0).min()) > 0.01


def test_model_variance_and_posterior_tables():
    s = _schedule(20)
    betas, ab = s.betas, s.alphas_cumprod
    post = betas[1:] * (1 - ab[:-1]) / (1 - ab[1:])  # beta~ for t = 1..T-1
    t = torch.arange(20)
    large, small = model_variance(s, t, "fixed_large"), model_variance(s, t, "fixed_small")
    torch.testing.assert_close(large[1:], betas[1:])
    torch.testing.assert_close(small[1:], post)
    assert float(large[0]) == float(small[0]) == pytest.approx(float(post[0]))  # improved-diffusion
    # q(x_{t-1} | x_t, x0) at t = 0 is x0 itself, with variance 0.
    x0, xt = _image(1), _image(2)
    mean, var = q_posterior(s, x0, xt, 0)
    torch.testing.assert_close(mean, x0)
    assert float(var) == 0.0
    with pytest.raises(ValueError, match="fixed_smal"):
        model_variance(s, 3, "fixed_smal")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v", "x0"])
def test_oracle_with_fixed_small_variance_leaves_only_prior_and_decoder(prediction_type):
    s = _schedule(20, prediction_type=prediction_type)
    x0 = _image(0)
    r = bits_per_dim(_oracle(s, x0), s, x0, variance="fixed_small", batch_size=7,
                     generator=torch.Generator().manual_seed(1))
    # The oracle's mean is the posterior mean, and fixed_small is the posterior variance: every
    # KL term L_1..L_{T-1} is zero.
    assert r.exact and r.terms.shape == (1, 20)
    assert torch.equal(r.timesteps[0], torch.arange(20))
    assert float(r.terms[0, 1:].abs().max()) < 1e-10
    # Decoder at t = 0: mean x0 exactly (posterior mean at t = 0), variance beta~_1. Each pixel's
    # probability is the mass of its bin: 2 Phi(1/255/sigma) - 1 inside, Phi(1/255/sigma) at the
    # edges -1 and 1.
    sigma = math.sqrt(float(s.betas[1] * (1 - s.alphas_cumprod[0]) / (1 - s.alphas_cumprod[1])))
    phi = 0.5 * (1 + math.erf(1 / 255 / sigma / math.sqrt(2)))
    p = torch.where(x0.abs() == 1, torch.tensor(phi, dtype=F64),
                    torch.tensor(2 * phi - 1, dtype=F64))
    decoder = float(-p.log().mean() / LN2)
    ab = float(s.alphas_cumprod[-1])  # KL(N(sqrt(ab) x, 1 - ab) || N(0, 1)) per pixel
    prior = float((0.5 * (-math.log(1 - ab) + (1 - ab) + ab * x0.square() - 1)).mean() / LN2)
    assert float(r.decoder[0]) == pytest.approx(decoder, rel=1e-10)
    assert float(r.prior[0]) == pytest.approx(prior, rel=1e-10)
    assert float(r.bpd[0]) == pytest.approx(prior + decoder, rel=1e-9)
    # A network that knows nothing does much worse.
    zero = bits_per_dim(lambda xt, t: torch.zeros_like(xt), s, x0, variance="fixed_small",
                        generator=torch.Generator().manual_seed(1))
    assert float(zero.bpd[0]) > float(r.bpd[0]) + 1.0


def test_oracle_with_fixed_large_variance_pays_exactly_the_variance_mismatch():
    s = _schedule(20)
    x0 = _image(3)
    r = bits_per_dim(_oracle(s, x0), s, x0, variance="fixed_large",
                     generator=torch.Generator().manual_seed(0))
    beta = s.betas[1:]
    post = beta * (1 - s.alphas_cumprod[:-1]) / (1 - s.alphas_cumprod[1:])
    expected = 0.5 * ((beta / post).log() + post / beta - 1) / LN2  # same means, other variance
    torch.testing.assert_close(r.terms[0, 1:], expected, rtol=1e-9, atol=1e-12)
    assert float(r.kl[0]) == pytest.approx(float(expected.sum()), rel=1e-9)


def test_subset_estimator_is_unbiased():
    s = _schedule(20)
    x0 = _image(4)
    model = _oracle(s, x0)
    full = bits_per_dim(model, s, x0, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    x0s = x0.expand(400, -1, -1, -1)  # 400 independent draws of 4 KL timesteps each
    est = bits_per_dim(model, s, x0s, num_timesteps=4, batch_size=500, generator=g)
    assert not est.exact and est.terms.shape == (400, 5)
    assert (est.timesteps[:, 0] == 0).all() and (est.timesteps[:, 1:] >= 1).all()
    assert all(len(set(row.tolist())) == 5 for row in est.timesteps)  # distinct timesteps
    torch.testing.assert_close(est.decoder, full.decoder.expand(400))
    # The oracle's terms do not depend on the noise, so each estimate is exactly (T-1)/K times
    # the sum of the full terms at its timesteps ...
    picked = full.terms[0][est.timesteps[:, 1:]]  # (400, 4)
    torch.testing.assert_close(est.kl, picked.sum(dim=1) * 19 / 4)
    # ... and every timestep 1..T-1 is picked with the same probability K/(T-1), which makes
    # the estimate unbiased: E = sum_t (K/(T-1)) (T-1)/K L_t = sum_t L_t.
    counts = torch.bincount(est.timesteps[:, 1:].reshape(-1), minlength=20)[1:]
    assert counts.sum() == 1600 and int(counts.min()) > 50 and int(counts.max()) < 120
    assert float(est.kl.mean()) == pytest.approx(float(full.kl[0]), rel=0.25)  # loosely
    # Asking for all T - 1 KL timesteps is the exact computation.
    assert bits_per_dim(model, s, x0, num_timesteps=19,
                        generator=torch.Generator().manual_seed(0)).exact


def test_p_mean_variance_clips_x0_hat():
    s = _schedule(20)
    xt = torch.full((1, 1, 2, 2), 3.0, dtype=F64)
    out = torch.full_like(xt, -5.0)  # eps-prediction giving x0_hat far outside [-1, 1]
    _, _, x0_hat = p_mean_variance(s, out, xt, 10, clip_x0=True)
    assert float(x0_hat.max()) == 1.0
    _, _, raw = p_mean_variance(s, out, xt, 10, clip_x0=False)
    assert float(raw.min()) > 1.0


TINY_UNET = UNetConfig(**tiny_net(8, base_channels=16, num_groups=8, attn_resolutions=()))


def _tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return perturbed(UNet(TINY_UNET), seed=seed).eval()


def test_bits_per_dim_of_a_tiny_unet_on_builtin_shapes():
    s = _schedule(20, prediction_type="v")
    net = _tiny_unet()
    data = BuiltinShapes(100, image_size=8, channels=3)
    full = dataset_bits_per_dim(net, s, data, max_images=3, batch_size=40,
                                generator=torch.Generator().manual_seed(0))
    assert full.bpd.shape == (3,) and full.num_timesteps is None
    assert torch.isfinite(full.bpd).all() and (full.bpd > 0).all()
    torch.testing.assert_close(full.bpd, full.prior + full.decoder + full.kl)
    summary = full.summary()
    assert summary["num_images"] == 3 and summary["timesteps"] == "all"
    assert summary["variance"] == "fixed_large" and summary["clip_x0"] is True
    # Unbiased subset estimate (8 of 19 KL terms): the mean of 16 draws per image is within 4
    # of its standard errors of the full sum (loosely: the noise x_t differs between runs too).
    reps = 16
    x0 = torch.stack([data[i][0] for i in range(3)])
    est = bits_per_dim(net, s, x0.repeat(reps, 1, 1, 1), num_timesteps=8, batch_size=256,
                       generator=torch.Generator().manual_seed(1))
    est_kl = est.kl.double().reshape(reps, 3)
    stderr = est_kl.std(dim=0) / math.sqrt(reps)
    assert ((est_kl.mean(dim=0) - full.kl).abs() <= 4 * stderr + 0.05 * full.kl).all()
    # The same pipeline with fixed_small is also finite and positive.
    small = dataset_bits_per_dim(net, s, data, max_images=1, variance="fixed_small",
                                 generator=torch.Generator().manual_seed(0))
    assert math.isfinite(small.summary()["bpd"]) and small.summary()["bpd"] > 0


def test_bits_per_dim_passes_labels_to_a_class_conditional_model():
    s = _schedule(20)
    torch.manual_seed(0)
    net = UNet(UNetConfig(**{**TINY_UNET.__dict__, "num_classes": 4})).eval()
    seen = []

    def model(x, t, class_labels=None):
        seen.append(class_labels)
        return net(x, t, class_labels=class_labels)

    model.config = net.config  # what dataset_bits_per_dim reads num_classes from
    r = dataset_bits_per_dim(model, s, BuiltinShapes(8, 8, 3), max_images=3, num_timesteps=2,
                             batch_size=9, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(r.bpd).all()
    labels = torch.cat(seen)
    assert sorted(set(labels.tolist())) == [0, 1, 2]  # shapes 0, 1, 2: each image's class


# ---------------------------------------------------------------------------------------------
# FID / KID pieces


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    s1, s2 = torch.rand(5, generator=g, dtype=F64) + 0.1, torch.rand(5, generator=g, dtype=F64)
    expected = float((mu1 - mu2).square().sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum())
    assert frechet_distance(mu1, s1.diag(), mu2, s2.diag()) == pytest.approx(expected, rel=1e-10)
    # Identical statistics: 0.
    a = torch.randn(6, 6, generator=g, dtype=F64)
    cov = a @ a.T
    assert abs(frechet_distance(mu1.new_zeros(6), cov, mu1.new_zeros(6), cov)) < 1e-10
    # Non-diagonal, by hand: I vs [[2, 1], [1, 2]] (eigenvalues 3, 1), means 1 apart on each
    # axis: 2 + tr(I) + tr(S) - 2 tr(S^(1/2)) = 2 + 2 + 4 - 2 (sqrt 3 + 1) = 6 - 2 sqrt 3.
    cov2 = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=F64)
    fd = frechet_distance(torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64),
                          torch.ones(2, dtype=F64), cov2)
    assert fd == pytest.approx(6 - 2 * math.sqrt(3), rel=1e-12)
    # Singular covariances (fewer samples than dimensions): diag(1, 0) vs diag(4, 0) -> 1.
    fd = frechet_distance(torch.zeros(2), torch.diag(torch.tensor([1.0, 0.0])),
                          torch.zeros(2), torch.diag(torch.tensor([4.0, 0.0])))
    assert fd == pytest.approx(1.0, abs=1e-12)


def test_frechet_distance_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 8, generator=g, dtype=F64), torch.randn(8, 8, generator=g, dtype=F64)
    s1, s2 = a @ a.T + 0.1 * torch.eye(8, dtype=F64), b @ b.T
    mu1, mu2 = torch.randn(8, generator=g, dtype=F64), torch.randn(8, generator=g, dtype=F64)
    covmean = linalg.sqrtm((s1 @ s2).numpy()).real
    expected = float((mu1 - mu2).square().sum() + s1.trace() + s2.trace()
                     - 2 * float(covmean.trace()))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_kid_unbiased_mmd_and_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(300, 16, generator=g)
    b = torch.rand(300, 16, generator=g)  # same distribution
    c = torch.rand(300, 16, generator=g) + 0.3  # shifted
    same, _ = kernel_inception_distance(a, b, subset_size=100, num_subsets=20)
    shifted, shifted_std = kernel_inception_distance(a, c, subset_size=100, num_subsets=20)
    assert abs(same) < 0.01
    assert shifted > 0.1 and shifted > 10 * abs(same) and shifted_std > 0
    # One subset of the whole (small) sets is exactly the unbiased MMD^2 with k = (x.y/d + 1)^3.
    x, y = a[:7].double(), c[:5].double()
    k = lambda u, v: (float(u @ v) / 16 + 1) ** 3  # noqa: E731
    m = 5  # the subset size is capped at the smaller set: 5 of x's 7 are drawn
    kid, std = kernel_inception_distance(x[:5], y, subset_size=1000, num_subsets=1)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    assert kid == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std == 0.0


# ---------------------------------------------------------------------------------------------
# The whole FID/KID computation with a tiny feature network


class _CountingNet:
    """A tiny, fixed random conv net (B, 3, H, W) -> (B, 8) that counts the images it sees."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten())
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.images = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        return self.net(x)


def _write_images(folder: Path, images: torch.Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        save_image(img, folder / f"{i:06d}.png")
    return folder


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    shapes = BuiltinShapes(40, image_size=16, channels=3)
    ref = _write_images(tmp_path / "ref", shapes.render(range(20))[0])
    g = torch.Generator().manual_seed(0)
    gen = _write_images(tmp_path / "gen", torch.rand(12, 3, 16, 16, generator=g) * 2 - 1)
    return gen, ref


def test_fid_kid_end_to_end_with_reference_cache(tmp_path):
    gen_dir, ref_dir = _folders(tmp_path)
    counter = _CountingNet()
    network = FeatureNetwork(net=counter, identity="tiny-test-net-v1")
    gen, ref = FolderImages(gen_dir, 16, 3), FolderImages(ref_dir, 16, 3)
    cache = tmp_path / "cache"

    first = fid_kid(gen, ref, network, cache_dir=cache, batch_size=8, kid_subset_size=1000)
    assert counter.images == 12 + 20 and not first.reference_from_cache
    assert Path(first.reference_cache).is_file() and first.reference_cache.startswith(str(cache))
    assert first.fid > 0 and first.kid > 0 and first.kid_subset_size == 12  # capped
    assert first.num_generated == 12 and first.num_reference == 20

    counter.images = 0
    second = fid_kid(gen, ref, network, cache_dir=cache, batch_size=8, kid_subset_size=1000)
    assert counter.images == 12  # the reference features came from the cache
    assert second.reference_from_cache and second.reference_cache == first.reference_cache
    assert second.fid == pytest.approx(first.fid, rel=1e-6)
    assert second.kid == pytest.approx(first.kid, rel=1e-6)

    # The reference against itself: FID ~ 0.
    same = fid_kid(ref, ref, network, cache_dir=cache, batch_size=8)
    assert abs(same.fid) < 1e-6 and same.reference_from_cache

    # Another feature network identity is another cache entry.
    counter.images = 0
    other = FeatureNetwork(net=counter, identity="tiny-test-net-v2")
    assert not fid_kid(gen, ref, other, cache_dir=cache, batch_size=8).reference_from_cache
    assert counter.images == 32

    # A changed reference file invalidates the cache.
    path = ref_dir / "000003.png"
    save_image(torch.zeros(3, 16, 16), path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    counter.images = 0
    changed = fid_kid(gen, FolderImages(ref_dir, 16, 3), network, cache_dir=cache, batch_size=8)
    assert counter.images == 32 and not changed.reference_from_cache
    assert changed.reference_cache != first.reference_cache
    assert changed.fid != pytest.approx(first.fid, rel=1e-9)


def test_reference_cache_is_safetensors_and_a_damaged_entry_is_recomputed(tmp_path):
    _, ref_dir = _folders(tmp_path)
    counter = _CountingNet()
    network = FeatureNetwork(net=counter, identity="tiny")
    ref = FolderImages(ref_dir, 16, 3)
    stats, path, hit = reference_statistics(ref, network, cache_dir=tmp_path / "c")
    assert not hit and path.suffix == ".safetensors"
    assert path.read_bytes()[:4] != b"PK\x03\x04"  # not a torch.save zip pickle
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "diffunet.fid_reference"
        assert set(f.keys()) == {"features", "mu", "sigma"}
    assert stats.features.shape == (20, 8) and stats.sigma.dtype == F64
    path.write_bytes(b"garbage")
    counter.images = 0
    again, _, hit = reference_statistics(ref, network, cache_dir=tmp_path / "c")
    assert not hit and counter.images == 20
    torch.testing.assert_close(again.mu, stats.mu)
    assert reference_statistics(ref, network, cache_dir=tmp_path / "c")[2]  # rewritten


# ---------------------------------------------------------------------------------------------
# The FID Inception: missing extra, missing weights, and equality with pytorch-fid


def test_missing_eval_extra_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", None)
    with pytest.raises(DiffunetError, match=r'pip install "diffunet\[eval\]"') as info:
        ev.load_inception()
    assert "\n" not in str(info.value)


def test_missing_weights_file_message(tmp_path, monkeypatch):
    pytest.importorskip("pytorch_fid")
    with pytest.raises(ModelFileError, match="not found") as info:
        ev.load_inception(tmp_path / "nope.pth")
    assert ev.INCEPTION_WEIGHTS_URL in str(info.value)

    def offline(url, path):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(ev, "_download", offline)
    monkeypatch.setenv("DIFFUNET_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelFileError) as info:
        ev.load_inception()
    msg = str(info.value)
    assert "\n" not in msg and "could not be downloaded" in msg and "name resolution" in msg
    assert ev.INCEPTION_WEIGHTS_URL in msg and "--feature-weights" in msg
    assert "DIFFUNET_CACHE" in msg
    assert str(tmp_path / "cache" / ev.INCEPTION_WEIGHTS_FILE) in msg
    assert not (tmp_path / "cache" / ev.INCEPTION_WEIGHTS_FILE).exists()
    with pytest.raises(ModelFileError, match="not in"):
        ev.load_inception(download=False)


def test_weights_are_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    source = tmp_path / "server" / "weights.pth"
    source.parent.mkdir()
    source.write_bytes(b"0123456789" * 1000)
    monkeypatch.setattr(ev, "INCEPTION_WEIGHTS_URL", source.as_uri())
    cache = tmp_path / "cache"
    path = ev.inception_weights_path(cache_dir=cache)
    assert path == cache / ev.INCEPTION_WEIGHTS_FILE and path.read_bytes() == source.read_bytes()

    def offline(url, path):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(ev, "_download", offline)
    assert ev.inception_weights_path(cache_dir=cache) == path
    # A download that fails half-way leaves no partial file behind.
    monkeypatch.undo()
    monkeypatch.setattr(ev, "INCEPTION_WEIGHTS_URL", (tmp_path / "server" / "gone.pth").as_uri())
    with pytest.raises(ModelFileError, match="could not be downloaded"):
        ev.inception_weights_path(cache_dir=tmp_path / "cache2")
    assert list((tmp_path / "cache2").iterdir()) == []


def test_weights_that_are_not_the_inception_are_refused(tmp_path):
    pytest.importorskip("pytorch_fid")
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    with pytest.raises(ModelFileError, match="not the FID Inception weights"):
        ev.load_inception(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match="cannot read"):
        ev.load_inception(path)


@pytest.mark.slow
def test_inception_matches_pytorch_fid(tmp_path, monkeypatch):
    fid_inception = pytest.importorskip("pytorch_fid.inception")
    state = ev.build_fid_inception().state_dict()  # randomly initialised weights
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    ours = ev.load_inception(path)
    assert ours.identity.endswith(ev._sha256(path))
    # pytorch-fid's own network with the same weights (its loader fetches from a URL).
    monkeypatch.setattr(fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
    theirs = fid_inception.InceptionV3([3]).eval()
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # in [0, 1]
    with torch.no_grad():
        a = ours.net(x * 2 - 1)
        b = theirs(x)[0].flatten(1)
    assert a.shape == (1, 2048)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# The command


def _parse(argv: list[str]) -> argparse.Namespace:
    from diffunet.cli import build_parser

    return build_parser(["eval"]).parse_args(argv)


def test_eval_bpd_command(tmp_path, capsys):
    model = tmp_path / "model.safetensors"
    save_model(model, _tiny_unet(), _schedule(20, prediction_type="v"))
    out = tmp_path / "bpd.json"
    args = _parse(["eval", "bpd", str(model), "data.builtin_size=10", "--max-images", "2",
                   "--batch-size", "40", "--timesteps", "5", "--device", "cpu",
                   "--json", str(out), "--no-progress"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "bits/dim" in text and "fixed_large" in text and "clipped to [-1, 1]" in text
    result = json.loads(out.read_text())
    assert result["num_images"] == 2 and result["timesteps"] == 5 and result["bpd"] > 0
    with pytest.raises(DiffunetError, match="data.image_size"):
        args = _parse(["eval", "bpd", str(model), "data.image_size=16", "--no-progress"])
        args.func(args)
    with pytest.raises(DiffunetError, match="only data.key=value"):
        args = _parse(["eval", "bpd", str(model), "train.lr=0.1"])
        args.func(args)


def test_eval_fid_command(tmp_path, capsys, monkeypatch):
    gen_dir, ref_dir = _folders(tmp_path)
    counter = _CountingNet()
    monkeypatch.setattr(ev, "load_inception",
                        lambda weights=None, **kw: FeatureNetwork(counter, "tiny-cli"))
    monkeypatch.setenv("DIFFUNET_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "fid.json"
    args = _parse(["eval", "fid", str(gen_dir), "--reference", str(ref_dir), "--device", "cpu",
                   "--kid-subsets", "5", "--json", str(out), "--no-progress"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "FID" in text and "KID" in text and "computed, cached" in text
    result = json.loads(out.read_text())
    assert result["num_generated"] == 12 and result["image_size"] == 16
    assert result["fid"] > 0 and result["kid_num_subsets"] == 5
    assert args.func(args) == 0
    assert "from cache" in capsys.readouterr().out
    # A configured data set as the reference (built-in shapes, loaded at the generated size).
    args = _parse(["eval", "fid", str(gen_dir), "data.source=builtin", "data.builtin_size=16",
                   "--kid-subsets", "2", "--no-progress"])
    assert args.func(args) == 0
    assert "16 reference" in capsys.readouterr().out
    with pytest.raises(DiffunetError, match="no reference set"):
        args = _parse(["eval", "fid", str(gen_dir)])
        args.func(args)


def test_eval_bpd_finds_the_stored_data_from_anywhere_and_names_it(tmp_path, capsys,
                                                                    monkeypatch):
    from diffunet.config import load_config, to_dict

    # trained in tmp/project as `diffunet train data.path=images --out-dir runs/r`
    project = tmp_path / "project"
    images = _write_images(project / "images", BuiltinShapes(3, image_size=8, channels=3)
                           .render(range(3))[0])
    (project / "runs" / "r" / "weights").mkdir(parents=True)
    (project / "runs" / "r" / "config.json").write_text("{}")
    cfg = load_config(None, ["data.source=folder", "data.path=images", "unet.image_size=8"])
    model = project / "runs" / "r" / "weights" / "model_step0000002.safetensors"
    save_model(model, _tiny_unet(), _schedule(20), extra={"run_config": to_dict(cfg)})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "bpd.json"
    args = _parse(["eval", "bpd", str(model), "--timesteps", "2", "--device", "cpu",
                   "--json", str(out), "--no-progress"])
    assert args.func(args) == 0
    assert f"data: folder {images}, 3 images at 8x8" in capsys.readouterr().out
    assert json.loads(out.read_text())["data"] == {"source": "folder", "path": str(images),
                                                   "images": 3, "name": None}
    # not found: one line naming where it looked and how to point at it
    images.rename(project / "moved")
    with pytest.raises(DiffunetError, match=r"data.path: the model was trained on 'images' .*"
                                            rf"{elsewhere / 'images'}; give data.path="):
        args.func(args)
    args = _parse(["eval", "bpd", str(model), f"data.path={project / 'moved'}", "--timesteps",
                   "2", "--no-progress"])
    assert args.func(args) == 0
    assert f"data: folder {project / 'moved'}, 3" in capsys.readouterr().out
    # a CONFIG gives only its [data]: the 64x64 UNet of configs/folder.toml is not used
    folder_toml = Path(__file__).parents[1] / "configs" / "folder.toml"
    args = _parse(["eval", "bpd", str(model), str(folder_toml), f"data.path={project / 'moved'}",
                   "data.num_workers=0", "--timesteps", "2", "--no-progress"])
    assert args.func(args) == 0
    assert "3 images at 8x8" in capsys.readouterr().out
    # the model fixes the shape: a different one is refused in one line, unet.* before anything
    with pytest.raises(DiffunetError, match="data.image_size: 16 does not match the model's "
                                            "image_size 8; leave it unset"):
        args = _parse(["eval", "bpd", str(model), "data.image_size=16"])
        args.func(args)
    with pytest.raises(DiffunetError, match="the model file fixes unet"):
        args = _parse(["eval", "bpd", str(model), "unet.image_size=16"])
        args.func(args)


def test_json_never_replaces_a_users_file_but_updates_its_own(tmp_path: Path, capsys) -> None:
    from diffunet import cli

    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}\n')
    folder = tmp_path / "gen"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 20, 200)).save(folder / f"{i}.png")
    args = ["eval", "fid", str(folder), "--features", "builtin", "--max-reference", "20",
            "--kid-subset-size", "4", "--kid-subsets", "2", "--no-progress", "--json"]
    assert cli.main([*args, str(mine)]) == 2
    assert "is not a diffunet eval result" in capsys.readouterr().err
    assert mine.read_text() == '{"my": "notes"}\n'
    ours = tmp_path / "fid.json"
    assert cli.main([*args, str(ours)]) == 0
    assert json.loads(ours.read_text())["written_by"] == "diffunet eval"
    assert cli.main([*args, str(ours)]) == 0  # its own earlier result may be replaced
