"""Make the previous-release fixtures in this folder: three tiny model files, the sampling cases
(cases.json) and what diffunet.sample returned for each (expected.safetensors).

They pin, bit for bit, what the release at commit 2765a3e computes, so a later test can show
that old model files still load and sample identically. They were made with diffunet at that
commit, checked out in a separate git worktree:

    cd <worktree> && PYTHONPATH=<worktree> python <this folder>/make_fixtures.py [out_dir]

(out_dir defaults to this script's folder). Everything runs on the CPU in float32 under
torch.no_grad(), with torch.set_num_threads(1) so the results do not depend on the thread count.

expected.safetensors holds, per case name, the sample (3, 3, 8, 8), and the shared inputs
"input/x_T", "input/init" (init_image) and "input/mask". A case is sampled with
    diffunet.sample(net, schedule, x_T, generator=[Generator().manual_seed(100 + b) for b < 3],
                    class_labels=labels, init_image=init|None, mask=mask|None, **kwargs)
where net, schedule = diffunet.load_model(<model>), labels = tensor(case["labels"]) or None,
init is passed for edit "sdedit"/"inpaint", mask for "inpaint". "guided" says whether the case
uses classifier-free guidance (its kwargs then hold guidance_scale).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import diffunet
from diffunet import NoiseSchedule, ScheduleConfig, UNet, UNetConfig, edm

torch.set_num_threads(1)  # results must not depend on the number of threads

B = 3
NET = dict(image_size=8, in_channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
           attn_resolutions=(4,), dropout=0.0, num_groups=4)


def build_net(seed: int, num_classes: int | None) -> UNet:
    """A tiny UNet whose every parameter is its seeded init plus Gaussian noise of std 0.05, so
    no layer is zero (the output convolution starts at zero) and outputs depend on the input."""
    torch.manual_seed(seed)
    net = UNet(UNetConfig(**NET, num_classes=num_classes))
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


MODELS = {  # file name -> (net, schedule)
    "vp_v_cosine_cond.safetensors": (build_net(0, num_classes=3), NoiseSchedule(ScheduleConfig(
        beta_schedule="cosine", prediction_type="v", num_train_timesteps=1000))),
    "vp_eps_linear.safetensors": (build_net(1, num_classes=None), NoiseSchedule(ScheduleConfig())),
    "edm.safetensors": (build_net(2, num_classes=None),
                        edm.make_schedule(ScheduleConfig(formulation="edm"))),
}
VP_MODELS = {"vp_v_cosine_cond": "vp_v_cosine_cond.safetensors",
             "vp_eps_linear": "vp_eps_linear.safetensors"}
EDM = "edm.safetensors"
KARRAS = {"sigmas": "karras"}


def case(name, model, labels=None, edit=None, **kwargs):
    return {"name": name, "model": model, "kwargs": kwargs, "labels": labels,
            "guided": kwargs.get("guidance_scale", 1.0) != 1.0, "edit": edit}


def make_cases() -> list[dict]:
    cases = []
    # the samplers and grids, on both VP models (the conditional one unlabelled here) and EDM
    for tag, model in [*VP_MODELS.items(), ("edm", EDM)]:
        vp = tag != "edm"
        cases += [
            case(f"{tag}/ddpm", model, sampler="ddpm", num_steps=6),
            case(f"{tag}/ddim_eta0", model, sampler="ddim", num_steps=6, eta=0.0),
            case(f"{tag}/ddim_eta0.5", model, sampler="ddim", num_steps=6, eta=0.5),
            case(f"{tag}/dpmpp-2m", model, sampler="dpmpp-2m", num_steps=6),
            case(f"{tag}/dpmpp-2m_karras", model, sampler="dpmpp-2m", num_steps=6, **KARRAS),
            case(f"{tag}/euler_karras", model, sampler="euler", num_steps=6, **KARRAS),
            case(f"{tag}/heun_karras_churn", model, sampler="heun", num_steps=5, s_churn=1.0,
                 **KARRAS),
            case(f"{tag}/euler-ancestral_karras", model, sampler="euler-ancestral", num_steps=6,
                 **KARRAS),
            case(f"{tag}/dpmpp-2m-sde_karras", model, sampler="dpmpp-2m-sde", num_steps=6,
                 **KARRAS),
            case(f"{tag}/euler_exponential", model, sampler="euler", num_steps=6,
                 sigmas="exponential"),
            case(f"{tag}/ddim_karras_sigma_max", model, sampler="ddim", num_steps=6,
                 sigma_max=80.0 if vp else 40.0, **KARRAS),
            case(f"{tag}/euler_karras_clip", model, sampler="euler", num_steps=6, clip_x0=True,
                 **KARRAS),
            case(f"{tag}/euler_karras_noclip", model, sampler="euler", num_steps=6,
                 clip_x0=False, **KARRAS),
        ]
        if vp:
            cases.append(case(f"{tag}/ddim_uniform", model, sampler="ddim", num_steps=6,
                              sigmas="uniform"))
    # class labels and classifier-free guidance on the conditional VP model
    cond, labels = VP_MODELS["vp_v_cosine_cond"], [0, 2, 1]
    cases += [
        case("cond/ddim_labels", cond, labels, sampler="ddim", num_steps=6),
        case("cond/ddim_guided", cond, labels, sampler="ddim", num_steps=6, guidance_scale=2.0),
        case("cond/euler_karras_guided", cond, labels, sampler="euler", num_steps=6,
             guidance_scale=2.0, **KARRAS),
    ]
    # editing: SDEdit (init_image + strength) and RePaint inpainting (mask + resample)
    for tag, model in [*VP_MODELS.items(), ("edm", EDM)]:
        cases += [
            case(f"{tag}/sdedit_ddim", model, edit="sdedit", sampler="ddim", num_steps=10,
                 strength=0.6),
            case(f"{tag}/sdedit_euler_karras", model, edit="sdedit", sampler="euler",
                 num_steps=10, strength=0.6, **KARRAS),
            case(f"{tag}/inpaint_ddpm_resample2", model, edit="inpaint", sampler="ddpm",
                 num_steps=5, resample=2),
            case(f"{tag}/inpaint_euler-ancestral_karras_resample2", model, edit="inpaint",
                 sampler="euler-ancestral", num_steps=5, resample=2, **KARRAS),
        ]
    return cases


def run_case(c: dict, loaded: dict, inputs: dict) -> torch.Tensor:
    net, schedule = loaded[c["model"]]
    labels = None if c["labels"] is None else torch.tensor(c["labels"], dtype=torch.long)
    return diffunet.sample(
        net, schedule, inputs["input/x_T"].clone(),
        generator=[torch.Generator().manual_seed(100 + b) for b in range(B)],
        class_labels=labels,
        init_image=inputs["input/init"].clone() if c["edit"] else None,
        mask=inputs["input/mask"].clone() if c["edit"] == "inpaint" else None,
        **c["kwargs"])


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    src = Path(diffunet.__file__).resolve().parent
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    print(f"diffunet {diffunet.__version__} from {src} (commit {commit}), torch {torch.__version__}")

    for name, (net, schedule) in MODELS.items():
        diffunet.save_model(out / name, net, schedule, extra={"step": 1})
    # sample with the nets as loaded back from the files, as the later test will
    loaded = {name: diffunet.load_model(out / name)[:2] for name in MODELS}

    inputs = {
        "input/x_T": torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(7)),
        "input/init": torch.rand(B, 3, 8, 8, generator=torch.Generator().manual_seed(8)) * 2 - 1,
        "input/mask": (torch.rand(B, 1, 8, 8, generator=torch.Generator().manual_seed(9))
                       > 0.5).float(),
    }
    cases, tensors, refused = [], dict(inputs), []
    with torch.no_grad():
        for c in make_cases():
            try:
                y = run_case(c, loaded, inputs)
            except diffunet.DiffunetError as e:  # the old code refused it: leave it out
                refused.append(c["name"])
                print(f"REFUSED {c['name']}: {type(e).__name__}: {e}")
                continue
            assert y.shape == (B, 3, 8, 8) and y.dtype == torch.float32 and y.isfinite().all()
            tensors[c["name"]] = y.contiguous()
            cases.append(c)
            print(f"{c['name']:55s} mean {y.mean():+.4f} std {y.std():.4f}")

    (out / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    save_file(tensors, str(out / "expected.safetensors"), metadata={
        "diffunet_version": diffunet.__version__, "diffunet_commit": commit,
        "torch_version": torch.__version__, "num_threads": "1"})
    print(f"{len(cases)} cases written to {out}; refused: {refused or 'none'}")


if __name__ == "__main__":
    main()
