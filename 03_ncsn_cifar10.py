"""03 -- Improved Techniques for Training Score-Based Generative Models (Song & Ermon 2020),
arXiv:2006.09011 (NCSNv2), on CIFAR-10.

What it shows: the paper's five techniques computed, not copied -- sigma_1 from the data
(Technique 1), the number of noise levels L from the paper's overlap condition on gamma
(Technique 2), the score network s(x, sigma) = s(x) / sigma (Technique 3), the Langevin step
size eps from the paper's Eq. (4) for the given T (Technique 4) and an EMA of the weights for
sampling (Technique 5) -- trained with denoising score matching (lambda(sigma) = sigma^2) and
sampled by annealed Langevin dynamics from uniform noise, with the final denoising step
(Tweedie's formula). Equation and algorithm numbers below are the paper's.

    python 03_ncsn_cifar10.py --image-folder /path/to/cifar10/train --test-folder /path/to/cifar10/test
    python 03_ncsn_cifar10.py --data-dir ./data          # torchvision CIFAR-10 (downloads it)

Writes to runs/03_ncsn_cifar10/: config.json, ckpt.pt, samples.png, samples.pt (in [0, 1]),
loss.png, metrics.json, ald_strip.png (one chain per row across the noise levels),
sigmas.png (Techniques 2 and 4: the schedule and the two equations solved),
dsm_per_level.png (held-out DSM loss per noise level).

Time: `--preset cpu` (16x16 images, a 1.5M-parameter U-Net) takes about 15 minutes on a
2-core CPU and gives coherent colour layouts, not CIFAR-quality objects; `--preset gpu` is the
paper's 32x32 setting (CIFAR-10 needs about a day of one GPU for the paper's 300k steps).
The paper used a RefineNet (NCSNv2's ResNet with dilated convolutions and RefineNet blocks).
Here `common.UNet` without a time embedding plays its part: Technique 3 only asks for a
network that maps an image to an image of the same size without being told sigma, which any
encoder-decoder with skips does; the U-Net is shared with the other scripts and faster on CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import brentq, minimize_scalar
from scipy.stats import norm
from tqdm import tqdm

import common

# -- config: presets + argparse ------------------------------------------------------------


@dataclasses.dataclass
class Config:
    image_size: int = 32  # paper: 32 (CIFAR-10); D = 3 * size^2 drives Techniques 2 and 4
    sigma_end: float = 0.01  # sigma_L, paper: 0.01
    n_steps_each: int = 5  # T, Langevin steps per noise level, paper: 5 (CIFAR-10)
    sigma1_subset: int = 50000  # images searched for the largest pairwise distance, paper: all
    ema_decay: float = 0.999  # Technique 5, paper: 0.999
    steps: int = 300_000  # paper: 300k
    batch_size: int = 128  # per process, paper: 128
    lr: float = 1e-4  # Adam, paper: 1e-4
    warmup: int = 0  # linear lr warm-up steps, paper: none
    base: int = 128  # U-Net width; paper: RefineNet with ngf = 128
    mults: tuple = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_levels: tuple = (2,)
    dropout: float = 0.0
    bf16: bool = False  # bf16 autocast (fast on CPUs with AMX)
    n_samples: int = 100
    n_test: int = 1000  # held-out images for the per-level DSM curve
    eval_levels: int = 24  # noise levels on that curve (evenly spaced indices)


PRESETS = {
    # seconds, for the tests: 8x8 images and a large sigma_L keep L and T tiny
    "smoke": Config(image_size=8, sigma_end=0.5, n_steps_each=2, sigma1_subset=256, steps=6, batch_size=8,
                    lr=1e-3, base=8, mults=(1, 2), num_res_blocks=1, attn_levels=(), n_samples=8, n_test=16,
                    eval_levels=4, ema_decay=0.9),
    # ~15 min on 2 CPU cores: 16x16 images (D = 768, so gamma, L and eps follow from the techniques),
    # a small U-Net at 16/8/4, a shorter EMA for a 1.8k-step run, a higher lr with warm-up, bf16
    "cpu": Config(image_size=16, sigma1_subset=10000, steps=1800, batch_size=128, lr=5e-4, warmup=200,
                  base=32, mults=(1, 2, 2), num_res_blocks=2, attn_levels=(2,), ema_decay=0.995, bf16=True,
                  n_samples=100, n_test=1000, eval_levels=24),
    # the paper's CIFAR-10 setting on one GPU: 100k of its 300k steps (about 1/3 of the time)
    "gpu": Config(steps=100_000),
}
# A CPU without bf16 kernels (AVX2 only) runs the cpu preset in fp32, where a training step costs 2.2x
# more on 2 cores (0.96 s vs 0.43 s): fewer steps keep the run near 15 minutes (see README)
FP32 = {"cpu": dict(steps=750)}


STEM = "03_ncsn_cifar10"
FIXED = ("image_size", "batch_size", "lr", "sigma_end", "preset")  # a resumed run keeps these


def parse_args(argv):
    p = common.base_parser(__doc__.split("\n\n")[0], STEM, image=True)
    p.add_argument("--image-folder", type=Path, help="train on this folder of images (one sub-folder per class, "
                   "torchvision ImageFolder) instead of CIFAR-10; resized and centre-cropped to --image-size")
    p.add_argument("--test-folder", type=Path, help="held-out images for the DSM curve (default: the CIFAR-10 "
                   "test split, or 1,000 images held out of --image-folder)")
    p.add_argument("--image-size", type=common.positive_int, help="side of the square images (preset's default)")
    p.add_argument("--steps", type=common.positive_int,
                   help="training steps (with --resume: extend the run to this many; the lr is "
                   "constant after warm-up, so this is the longer run)")
    p.add_argument("--batch-size", type=common.positive_int,
                   help="batch size PER PROCESS; under torchrun the global batch is world_size x this")
    p.add_argument("--lr", type=common.positive_float, help="Adam learning rate")
    p.add_argument("--n-steps-each", type=common.positive_int, help="T, Langevin steps per noise level")
    p.add_argument("--sigma-end", type=common.positive_float, help="sigma_L, the smallest noise level")
    p.add_argument("--n-samples", type=common.positive_int, help="images to sample at the end")
    return p.parse_args(argv)


def make_config(args, device, quiet: bool = False) -> tuple[str, Config, dict | None]:
    """Preset, config and checkpoint: from the preset and flags, or for --resume and --sample-only
    from the checkpoint, with only the flags that keep its run."""
    flags = {"image_size": args.image_size, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
             "n_steps_each": args.n_steps_each, "sigma_end": args.sigma_end, "n_samples": args.n_samples}
    if args.resume or args.sample_only:
        ckpt = common.load_checkpoint(args.out / "ckpt.pt", STEM)
        saved = {**ckpt["config"], "preset": ckpt["preset"], "seed": ckpt["seed"]}
        fixed = FIXED + (("seed",) if args.resume else ())
        given = {**flags, "preset": args.preset, "seed": args.seed}
        cfg = common.resume_config(saved, given, fixed, ckpt["step"], args.out / "ckpt.pt",
                                   extend=args.resume)
        args.seed, preset = cfg.pop("seed"), cfg.pop("preset")
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
        return preset, Config(**cfg), ckpt
    args.seed = 0 if args.seed is None else args.seed
    preset = common.resolve_preset(args.preset, device, quiet)
    values = dataclasses.asdict(PRESETS[preset])
    values = common.fit_preset(values, device, FP32.get(preset, {}), quiet)
    cfg = dataclasses.replace(Config(**values), **{k: v for k, v in flags.items() if v is not None})
    if cfg.image_size < 2 ** (len(cfg.mults) - 1) or cfg.image_size < 4:
        least = max(4, 2 ** (len(cfg.mults) - 1))
        raise common.UserError(f"--image-size {cfg.image_size} is too small for this preset's "
                               f"U-Net; use at least {least}")
    return preset, cfg, None


# -- data ------------------------------------------------------------------------------------


def image_tensor(dataset, max_n: int | None = None) -> torch.Tensor:
    """All (or the first max_n) images of a torchvision dataset as one uint8 tensor (N, C, H, W);
    images the folder reader returned as None (unreadable files) are left out."""
    n = len(dataset) if max_n is None else min(max_n, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=500,
                                         collate_fn=lambda b: [x for x, _ in b if x is not None])
    images = [x for batch in loader for x in batch]
    if not images:
        raise common.UserError("no readable images found")
    return torch.stack(images)


def read_image(path: str):
    """An image file as RGB, or None (with a warning) when it is truncated or not an image."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        print(f"warning: skipping {path}: {err}")
        return None


def load_data(args, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out images, uint8 (N, 3, size, size); CIFAR-10 or any ImageFolder."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(cfg.image_size), transforms.CenterCrop(cfg.image_size),
                             transforms.PILToTensor()])

    def folder(path: Path):
        try:
            return datasets.ImageFolder(str(path), loader=read_image,
                                        transform=lambda img: img if img is None else tf(img))
        except (FileNotFoundError, OSError) as err:
            raise common.UserError(f"cannot read images from {path}: {err}") from None

    if args.image_folder is None:
        try:
            train = image_tensor(common.torchvision_dataset("cifar10", args.data_dir, True, tf))
            test = image_tensor(common.torchvision_dataset("cifar10", args.data_dir, False, tf), cfg.n_test)
        except common.UserError:
            raise common.UserError(f"could not load or download CIFAR-10: put cifar-10-python.tar.gz (or its "
                                   f"cifar-10-batches-py folder) in {args.data_dir}, or train on a folder of "
                                   "images with --image-folder PATH") from None
    elif args.test_folder is not None:
        train, test = image_tensor(folder(args.image_folder)), image_tensor(folder(args.test_folder), cfg.n_test)
    else:  # hold out a fixed random part of the folder
        images = image_tensor(folder(args.image_folder))
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(1234))
        n_test = min(cfg.n_test, len(images) // 10)
        if n_test < 1:
            raise common.UserError(f"{args.image_folder} holds {len(images)} images; "
                                   "need at least 10 (or pass --test-folder)")
        train, test = images[perm[n_test:]], images[perm[:n_test]]
    return train, test


def to_float(x: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """uint8 images -> [0, 1] as in the paper (no rescaling to [-1, 1]); random horizontal flips."""
    x = x.float() / 255.0
    if flip:
        x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    return x


# -- the method: the five techniques, the loss, annealed Langevin dynamics -----------------------


def max_pairwise_distance(x: torch.Tensor, chunk: int = 1024) -> float:
    """Technique 1: sigma_1 = max_{i,j} ||x_i - x_j||_2 over the training images (rows of x)."""
    x = x.flatten(1).float()
    return max(torch.cdist(x[i:i + chunk], x).max().item() for i in range(0, len(x), chunk))


def shell_overlap(gamma: float, D: int) -> float:
    """Technique 2's condition: Phi(sqrt(2D)(gamma-1) + 3 gamma) - Phi(sqrt(2D)(gamma-1) - 3 gamma)."""
    r = math.sqrt(2 * D) * (gamma - 1)
    return float(norm.cdf(r + 3 * gamma) - norm.cdf(r - 3 * gamma))


def solve_gamma(D: int, target: float = 0.5) -> float:
    """Technique 2: the ratio gamma = sigma_{i-1} / sigma_i with shell_overlap(gamma, D) = 0.5."""
    return brentq(lambda g: shell_overlap(g, D) - target, 1.0 + 1e-12, 10.0, xtol=1e-14)


def num_noise_levels(sigma_1: float, sigma_L: float, gamma: float) -> int:
    """Technique 2: the smallest L with sigma_1 / sigma_L <= gamma^(L-1), i.e. ratios at most gamma."""
    return max(2, math.ceil(1 + math.log(sigma_1 / sigma_L) / math.log(gamma) - 1e-9))


def geometric_sigmas(sigma_1: float, sigma_L: float, L: int) -> torch.Tensor:
    """Technique 2: sigma_1 > ... > sigma_L, a geometric progression."""
    return torch.exp(torch.linspace(math.log(sigma_1), math.log(sigma_L), L, dtype=torch.float64)).float()


def langevin_variance_ratio(eps: float, gamma: float, sigma_L: float, T: int) -> float:
    """Eq. (4): s_T^2 / sigma_i^2 after T steps of Algorithm 1 at level i, for data = one point and
    x_0 ~ N(0, (gamma sigma_i)^2 I) (from level i-1); it does not depend on i."""
    a = eps / sigma_L**2
    b = 2 * eps / (sigma_L**2 - sigma_L**2 * (1 - a) ** 2)
    return (1 - a) ** (2 * T) * (gamma**2 - b) + b


def solve_step_size(gamma: float, sigma_L: float, T: int) -> float:
    """Technique 4: eps that brings Eq. (4) closest to 1 for the given T (eps < sigma_L^2)."""
    res = minimize_scalar(lambda log_eps: abs(langevin_variance_ratio(math.exp(log_eps), gamma, sigma_L, T) - 1),
                          bounds=(math.log(sigma_L**2) - 30, math.log(sigma_L**2) - 1e-6), method="bounded",
                          options={"xatol": 1e-10})
    return math.exp(res.x)


def divide_by_sigma(out: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Technique 3: s_theta(x, sigma) = s_theta(x) / sigma (the network is not told sigma)."""
    return out / sigma.view(-1, *[1] * (out.dim() - 1))


def dsm_loss(score_fn, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Eq. (2) with lambda(sigma) = sigma^2, per sample and divided by D:
    1/2 ||sigma s(x + sigma z, sigma) + z||^2 / D; the target score of x + sigma z given x is -z / sigma."""
    z = torch.randn_like(x)
    s = score_fn(x + sigma.view(-1, 1, 1, 1) * z, sigma)
    return 0.5 * (sigma.view(-1, 1, 1, 1) * s + z).pow(2).flatten(1).mean(1)


def langevin_step(x: torch.Tensor, score: torch.Tensor, alpha: float, z: torch.Tensor) -> torch.Tensor:
    """Algorithm 1, inner step: x_t = x_{t-1} + alpha_i s(x_{t-1}, sigma_i) + sqrt(2 alpha_i) z_t."""
    return x + alpha * score + math.sqrt(2 * alpha) * z


def tweedie_denoise(x: torch.Tensor, score: torch.Tensor, sigma: float) -> torch.Tensor:
    """The final denoising step: E[x_0 | x] = x + sigma^2 grad log p_sigma(x) (Tweedie's formula)."""
    return x + sigma**2 * score


@torch.no_grad()
def annealed_langevin(score_fn, x: torch.Tensor, sigmas: torch.Tensor, eps: float, T: int, snapshot_at=(),
                      denoise: bool = True, progress: bool = False):
    """Algorithm 1 (annealed Langevin dynamics) with alpha_i = eps sigma_i^2 / sigma_L^2, then the
    denoising step; returns the samples and snapshots of x after the levels in snapshot_at."""
    snapshots = []
    for i in tqdm(range(len(sigmas)), desc="annealed Langevin", disable=not progress, mininterval=2):
        sigma = sigmas[i].expand(len(x)).to(x.device)
        alpha = eps * (sigmas[i] / sigmas[-1]).item() ** 2
        for _ in range(T):
            x = langevin_step(x, score_fn(x, sigma), alpha, torch.randn_like(x))
        if i in snapshot_at:
            snapshots.append(x.clone())
    if denoise:
        x = tweedie_denoise(x, score_fn(x, sigmas[-1].expand(len(x)).to(x.device)), sigmas[-1].item())
    return x, snapshots


# -- model ------------------------------------------------------------------------------------


def build_model(cfg: Config) -> torch.nn.Module:
    return common.UNet(channels=3, base=cfg.base, mults=cfg.mults, num_res_blocks=cfg.num_res_blocks,
                       attn_levels=cfg.attn_levels, dropout=cfg.dropout, time_emb=None, out_scale=divide_by_sigma)


def score_in_fp32(model, bf16: bool, device):
    def score_fn(x, sigma):
        with common.autocast(device, bf16):
            return model(x, sigma).float()

    return score_fn


# -- evaluation and figures -----------------------------------------------------------------------


@torch.no_grad()
def heldout_dsm_per_level(score_fn, test: torch.Tensor, sigmas: torch.Tensor, levels, device, batch=250) -> list:
    """The per-dimension DSM loss on held-out images at each level in levels (fixed noise seed)."""
    torch.manual_seed(0)
    out = []
    for i in levels:
        losses = [dsm_loss(score_fn, to_float(test[j:j + batch].to(device)),
                           sigmas[i].expand(len(test[j:j + batch])).to(device)) for j in range(0, len(test), batch)]
        out.append(torch.cat(losses).mean().item())
    return out


def image_stats(x: torch.Tensor) -> dict:
    """Saturation (pixels at the ends of [0, 1]) and noise (mean |discrete Laplacian|) of images in [0, 1]."""
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return {"saturated": float(((x <= 0.01) | (x >= 0.99)).float().mean()), "laplacian": float(lap.abs().mean()),
            "mean": float(x.mean()), "std": float(x.std())}


def upscale(x: torch.Tensor, min_size: int = 32) -> torch.Tensor:
    k = max(1, math.ceil(min_size / x.shape[-1]))
    return F.interpolate(x.float().cpu(), scale_factor=k, mode="nearest") if k > 1 else x.float().cpu()


def plot_strip(snaps: list, titles: list, path: Path) -> None:
    """One chain per row, one column per snapshot, titled by the noise level."""
    from torchvision.utils import make_grid

    plt = common._plt()
    rows, cols = len(snaps[0]), len(snaps)
    grid = make_grid(torch.stack(snaps, 1).flatten(0, 1).clamp(0, 1), nrow=cols, padding=2, pad_value=1.0)
    fig, ax = plt.subplots(figsize=(0.85 * cols, 0.85 * rows + 0.5))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    step = grid.shape[-1] / cols
    ax.set_xticks([step * (c + 0.5) for c in range(cols)], titles, fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([])
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_techniques(sched: dict, sigmas: torch.Tensor, path: Path) -> None:
    plt = common._plt()
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.3))
    ax[0].semilogy(np.arange(1, len(sigmas) + 1), sigmas.numpy(), ".", ms=3)
    ax[0].set(xlabel="level i", ylabel="sigma_i", title=f"geometric sigmas, L = {len(sigmas)}")
    g = np.linspace(1, sched["gamma"] + 3 * (sched["gamma"] - 1), 200)
    ax[1].plot(g, [shell_overlap(v, sched["D"]) for v in g])
    ax[1].axhline(0.5, c="0.6", lw=0.8)
    ax[1].axvline(sched["gamma"], c="C3", lw=0.8, label=f"gamma = {sched['gamma']:.4f}")
    ax[1].set(xlabel="gamma", title=f"Technique 2 (D = {sched['D']})", ylabel="shell overlap")
    ax[1].legend(fontsize=8)
    e = np.logspace(math.log10(sched["eps"]) - 2, math.log10(0.99 * sched["sigma_L"] ** 2), 200)
    ax[2].semilogx(e, [langevin_variance_ratio(v, sched["gamma_used"], sched["sigma_L"], sched["T"]) for v in e])
    ax[2].axhline(1, c="0.6", lw=0.8)
    ax[2].axvline(sched["eps"], c="C3", lw=0.8, label=f"eps = {sched['eps']:.3g}")
    ax[2].set(xlabel="eps", ylabel="s_T^2 / sigma^2, Eq. (4)", title=f"Technique 4 (T = {sched['T']})", ylim=(0.9, 1.6))
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_dsm_curve(sigmas: list, losses: list, path: Path) -> None:
    plt = common._plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogx(sigmas, losses, "o-", ms=3, label="held-out, EMA weights")
    ax.axhline(0.5, c="0.6", ls="--", lw=0.8, label="s = 0 (knows nothing)")
    ax.set(xlabel="sigma", ylabel="1/2 ||sigma s + z||^2 / D", title="DSM loss per noise level")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(args, cfg, dist, device, sched, sigmas, ema, train, test, metrics) -> tuple:
    """Annealed Langevin samples with the EMA weights (split across ranks), the held-out DSM loss per
    level and image statistics, into metrics; returns the images the figures need."""
    ema_score = score_in_fp32(ema.module.eval(), cfg.bf16, device)
    t_sample = time.time()
    n_local = math.ceil(cfg.n_samples / dist.world_size)
    torch.manual_seed(args.seed + 1000 + dist.rank)
    snap_levels = sorted({round(v) for v in np.linspace(0, len(sigmas) - 1, 9)})
    x0 = torch.rand(n_local, 3, cfg.image_size, cfg.image_size, device=device)  # uniform noise, as in the paper
    x, snaps = annealed_langevin(ema_score, x0, sigmas, sched["eps"], sched["T"], snap_levels,
                                 progress=dist.is_main)
    samples = common.all_gather_cat(x, dist)[:cfg.n_samples].cpu()
    metrics["sample_time_s"] = time.time() - t_sample
    metrics["score_evals_per_sample"] = sched["L"] * sched["T"] + 1

    levels = sorted({round(v) for v in np.linspace(0, len(sigmas) - 1, cfg.eval_levels)})
    dsm = heldout_dsm_per_level(ema_score, test, sigmas, levels, device)
    dsm = [common.all_reduce_mean(v, dist, device) for v in dsm]
    metrics["heldout_dsm"] = {"sigma": [sigmas[i].item() for i in levels], "loss": dsm, "mean": float(np.mean(dsm))}
    clamped = samples.clamp(0, 1)
    real = to_float(test[:len(samples)])
    metrics["samples"] = {**image_stats(clamped), "outside_0_1": float(((samples < 0) | (samples > 1)).float().mean())}
    metrics["heldout_images"] = image_stats(real)
    n = min(len(samples), len(real), len(train))
    metrics["swd_to_heldout"] = {  # pixel-space sliced W2; the floor is train vs held-out, uniform noise for scale
        "samples": common.sliced_wasserstein(clamped[:n].flatten(1).numpy(), real[:n].flatten(1).numpy()),
        "floor_train": common.sliced_wasserstein(to_float(train[:n]).flatten(1).numpy(), real[:n].flatten(1).numpy()),
        "uniform_noise": common.sliced_wasserstein(x0[:n].cpu().flatten(1).numpy(), real[:n].flatten(1).numpy())}
    return samples, x0, x, snaps, snap_levels


def write_outputs(out, sched, sigmas, losses, metrics, samples, x0, x, snaps, snap_levels) -> None:
    clamped, k = samples.clamp(0, 1), min(8, len(x))
    torch.save(samples, out / "samples.pt")
    common.save_image_grid(upscale(clamped), out / "samples.png", nrow=10, value_range=(0, 1))
    plot_strip([upscale(x0[:k])] + [upscale(s[:k]) for s in snaps] + [upscale(x[:k])],
               ["uniform"] + [f"σ={sigmas[i].item():.2g}" for i in snap_levels] + ["denoised"],
               out / "ald_strip.png")
    plot_techniques(sched, sigmas.cpu(), out / "sigmas.png")
    dsm = metrics["heldout_dsm"]
    plot_dsm_curve(dsm["sigma"], dsm["loss"], out / "dsm_per_level.png")
    if losses:
        common.plot_loss(losses, out / "loss.png", title="DSM loss (per dimension), all levels")
    common.write_json(out / "metrics.json", metrics)


# -- training loop ------------------------------------------------------------------------------


def techniques(train: torch.Tensor, cfg: Config, dist, device) -> dict:
    """Techniques 1, 2 and 4 computed from the training images."""
    D = train[0].numel()
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    subset = train[perm[:cfg.sigma1_subset]]
    sigma_1 = max_pairwise_distance(to_float(subset.to(device)))  # Technique 1
    sigma_1 = common.all_reduce_mean(sigma_1, dist, device)  # the same value on every rank
    if not cfg.sigma_end < sigma_1:
        raise common.UserError(f"--sigma-end {cfg.sigma_end} is not below sigma_1 = {sigma_1:.3g} "
                               "(the largest distance between training images); lower it")
    gamma = solve_gamma(D)  # Technique 2
    L = num_noise_levels(sigma_1, cfg.sigma_end, gamma)
    gamma_used = (sigma_1 / cfg.sigma_end) ** (1 / (L - 1))
    sched = {"D": D, "sigma_1": sigma_1, "sigma_1_subset": len(subset), "sigma_L": cfg.sigma_end,
             "gamma": gamma, "L": L, "gamma_used": gamma_used}
    return technique4(sched, cfg.n_steps_each)


def technique4(sched: dict, T: int) -> dict:
    """Technique 4: the step size eps for T Langevin steps per level."""
    eps = solve_step_size(sched["gamma_used"], sched["sigma_L"], T)
    return {**sched, "T": T, "eps": eps,
            "eq4_ratio": langevin_variance_ratio(eps, sched["gamma_used"], sched["sigma_L"], T)}


def setup(args, dist, device, log) -> tuple:
    """Config, data, noise levels, model, EMA and optimizer (restored from the checkpoint)."""
    common.prepare_out(args.out)
    preset, cfg, ckpt = make_config(args, device, quiet=not dist.is_main)
    common.seed_everything(args.seed + dist.rank)
    t0 = time.time()
    train, test = load_data(args, cfg)
    log(f"{len(train)} training and {len(test)} held-out images of {tuple(train.shape[1:])} "
        f"({time.time() - t0:.0f} s to load)")
    sched = techniques(train, cfg, dist, device) if ckpt is None else ckpt["schedule"]
    if sched["T"] != cfg.n_steps_each:
        sched = technique4(sched, cfg.n_steps_each)
    model = build_model(cfg).to(device)
    ema = common.make_ema(model, cfg.ema_decay)  # Technique 5
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state = {"step": 0, "losses": []}
    if ckpt is not None:
        for obj, key in ((model, "model"), (ema, "ema"), (opt, "optimizer")):
            common.load_state(obj, ckpt[key], args.out / "ckpt.pt")
        state = {"step": ckpt["step"], "losses": list(ckpt["losses"])}
    return preset, cfg, ckpt, train, test, sched, model, ema, opt, state


def train_loop(args, cfg, dist, device, train, sigmas, model, ema, opt, state, ckpt) -> None:
    """Denoising score matching over all levels with Adam and EMA; the checkpointer checks every loss."""
    net = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if dist.enabled else model
    score_fn = score_in_fp32(net, cfg.bf16, device)
    batches = common.epoch_batches(len(train), cfg.batch_size, dist, args.seed, state["step"])
    bar = tqdm(total=cfg.steps, initial=state["step"], desc="train", disable=not dist.is_main, mininterval=2)
    with ckpt:
        for step in range(state["step"], cfg.steps + 1):
            ckpt.begin(step)
            x = to_float(train[next(batches)].to(device), flip=True)
            sigma = sigmas[torch.randint(len(sigmas), (len(x),), device=device)]
            for group in opt.param_groups:
                group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
            loss = dsm_loss(score_fn, x, sigma).mean()  # averaged over levels and images
            ckpt.verified(loss, step, last=step == cfg.steps)
            if step == cfg.steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update_parameters(model)
            state["losses"].append(loss.item())
            state["step"] = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.get_device(args.device)
    dist, device = common.ddp_setup(device)
    log = print if dist.is_main else (lambda *a, **k: None)
    out, ckpt_path, t0 = Path(args.out), Path(args.out) / "ckpt.pt", time.time()
    with common.all_ranks_agree(dist, device):
        preset, cfg, ckpt, train, test, sched, model, ema, opt, state = setup(args, dist, device, log)
    if dist.is_main:
        common.write_json(out / "config.json", {**dataclasses.asdict(cfg), "preset": preset,
                                                **{k: str(v) for k, v in vars(args).items()}})
    if ckpt is not None:
        common.set_rng_state(ckpt["rng_state"])
    sigmas = geometric_sigmas(sched["sigma_1"], sched["sigma_L"], sched["L"]).to(device)
    log(f"Technique 1: sigma_1 = {sched['sigma_1']:.2f} (largest distance among {sched['sigma_1_subset']} images) | "
        f"2: gamma = {sched['gamma']:.4f} -> L = {sched['L']} | 4: eps = {sched['eps']:.3g} for T = {sched['T']} "
        f"(Eq. 4 = {sched['eq4_ratio']:.3f})")
    log(f"U-Net without time embedding: {common.count_params(model) / 1e6:.2f}M parameters")

    def save(at_step: int, rng: dict):
        if dist.is_main:
            common.save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "step": at_step, "losses": state["losses"][:at_step], "config": dataclasses.asdict(cfg),
                "schedule": sched, "preset": preset, "seed": args.seed, "rng_state": rng}, STEM)

    t_train, start = time.time(), state["step"]
    if not args.sample_only and state["step"] < cfg.steps:
        checkpointer = common.Checkpointer(save, 500, ckpt_path)
        train_loop(args, cfg, dist, device, train, sigmas, model, ema, opt, state, checkpointer)
    step, losses = state["step"], state["losses"]
    train_time = time.time() - t_train
    metrics = {"preset": preset, "schedule": sched, "n_params": common.count_params(model), "steps": step,
               "train_time_s": train_time, "steps_per_s": (step - start) / train_time if step > start else None,
               "final_loss_mean_100": float(np.mean(losses[-100:])) if losses else None}
    if dist.enabled:
        metrics["ddp"] = {"world_size": dist.world_size,
                          "param_max_abs_diff": common.ddp_param_divergence(model, dist, device)}

    images = evaluate(args, cfg, dist, device, sched, sigmas, ema, train, test, metrics)
    metrics["total_time_s"] = time.time() - t0
    if dist.is_main:
        write_outputs(out, sched, sigmas, losses, metrics, *images)
        log(f"held-out DSM (mean over levels) {metrics['heldout_dsm']['mean']:.4f} | samples: saturated "
            f"{metrics['samples']['saturated']:.3f} (held-out {metrics['heldout_images']['saturated']:.3f}), "
            f"|Laplacian| {metrics['samples']['laplacian']:.3f} ({metrics['heldout_images']['laplacian']:.3f}) | "
            f"wrote {out}")
    common.ddp_cleanup(dist)
    return metrics


if __name__ == "__main__":
    common.cli_entry(main)
