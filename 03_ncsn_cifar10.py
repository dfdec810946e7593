"""03 -- Improved Techniques for Training Score-Based Generative Models (Song & Ermon 2020),
arXiv:2006.09011 (NCSNv2), on CIFAR-10.

What it shows: the paper's five techniques computed, not copied -- sigma_1 from the data
(Technique 1), the number of noise levels L from the paper's overlap condition on gamma
(Technique 2), the score network s(x, sigma) = s(x) / sigma (Technique 3), the Langevin step
size eps from the paper's Eq. (4) for the given T (Technique 4) and an EMA of the weights for
sampling (Technique 5) -- trained with denoising score matching (lambda(sigma) = sigma^2) and
sampled by annealed Langevin dynamics from uniform noise, with the final denoising step
(Tweedie's formula). Equation and algorithm numbers below are the paper's.

    python 03_ncsn_cifar10.py --image-folder DATA/cifar10/train --test-folder DATA/cifar10/test
    python 03_ncsn_cifar10.py --data-dir ./data          # torchvision CIFAR-10 (downloads it)

Writes to runs/03_ncsn_cifar10/: config.json, ckpt.pt, samples.png, samples.pt (in [0, 1]),
loss.png, metrics.json, ald_strip.png (one chain per row across the noise levels),
sigmas.png (Techniques 2 and 4: the schedule and the two equations solved),
dsm_per_level.png (held-out DSM loss per noise level).

Time: `--preset cpu` (16x16 images, a 1.5M-parameter U-Net) takes about 15 minutes on a
2-core CPU, 12 of them training (the step count that fits is measured at the start: 750-820 steps
on AVX2-only CPUs in fp32, about 1,700 with bf16 kernels), and gives coherent colour layouts,
not CIFAR-quality objects; `--preset gpu` is the paper's 32x32 setting (CIFAR-10 needs about a
day of one GPU for the paper's 300k steps). The paper used a RefineNet (NCSNv2's ResNet with
dilated convolutions and RefineNet blocks). Here `common.UNet` without a time embedding plays
its part: Technique 3 only asks for a network that maps an image to an image of the same size
without being told sigma, which any encoder-decoder with skips does.
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

# -- config: the paper's CIFAR-10 values; presets hold what differs ----------------------------


@dataclasses.dataclass
class Config:
    # training images: "" reads CIFAR-10 through torchvision from --data-dir; else a folder with
    # one sub-folder per class (torchvision ImageFolder), resized and centre-cropped
    image_folder: str = ""
    # held-out images for the DSM curve; "" = CIFAR-10's test split, or n_test images held out
    # of image_folder
    test_folder: str = ""
    image_size: int = 32  # side of the square images; D = 3 * size^2 drives Techniques 2 and 4
    sigma_end: float = 0.01  # sigma_L, the smallest noise level
    n_steps_each: int = 5  # T, Langevin steps per noise level (Technique 4 solves eps for it)
    sigma1_subset: int = 50000  # images searched for sigma_1 (Technique 1); paper: all
    ema_decay: float = 0.999  # Technique 5
    steps: int = 300_000  # training steps
    # > 0: train for about this many minutes, the step count measured at the start and then
    # fixed; 0: exactly `steps`
    minutes: float = 0.0
    batch_size: int = 128  # per process; under torchrun the global batch is world_size x this
    lr: float = 1e-4  # Adam learning rate, constant after the warm-up
    warmup: int = 0  # linear lr warm-up steps
    base: int = 128  # U-Net width at full resolution; paper: a RefineNet with ngf = 128
    mults: tuple = (1, 2, 2, 2)  # U-Net width multipliers, one per resolution
    num_res_blocks: int = 2  # ResBlocks per U-Net resolution
    attn_levels: tuple = (2,)  # U-Net resolutions with self-attention
    dropout: float = 0.0  # U-Net dropout
    bf16: bool = False  # bf16 autocast (fast on CPUs with AVX-512/AMX and on GPUs)
    n_samples: int = 100  # images drawn by annealed Langevin at the end
    n_test: int = 1000  # held-out images for the per-level DSM curve
    eval_levels: int = 24  # noise levels on that curve (evenly spaced indices)

    def __post_init__(self):
        least = max(4, 2 ** (len(self.mults) - 1))
        if self.image_size < least:
            raise common.UserError(f"--image-size {self.image_size} is too small for this U-Net "
                                   f"(--mults {self.mults}); use at least {least}")
        for name in ("steps", "batch_size", "lr", "sigma_end", "n_steps_each", "sigma1_subset",
                     "n_samples", "n_test", "eval_levels"):
            if not getattr(self, name) > 0:
                raise common.UserError(f"--{name.replace('_', '-')} must be above 0")
        if not self.ema_decay < 1:
            raise common.UserError("--ema-decay must be below 1")


PRESETS = {
    # seconds, for the tests: 8x8 images and a large sigma_L keep L and T tiny
    "smoke": dict(image_size=8, sigma_end=0.5, n_steps_each=2, sigma1_subset=256, steps=6,
                  batch_size=8, lr=1e-3, base=8, mults=(1, 2), num_res_blocks=1, attn_levels=(),
                  n_samples=8, n_test=16, eval_levels=4, ema_decay=0.9),
    # ~15 min on 2 CPU cores: 16x16 images (D = 768; gamma, L and eps follow from the
    # techniques), a small U-Net at 16/8/4, a shorter EMA and a higher lr with warm-up for a
    # short run; 12 minutes of training (`steps` counts only with --minutes 0)
    "cpu": dict(image_size=16, sigma1_subset=10000, steps=1800, minutes=12.0, lr=5e-4,
                warmup=200, base=32, mults=(1, 2, 2), ema_decay=0.995, bf16=True),
    # the paper's CIFAR-10 setting on one GPU: 100k of its 300k steps (about 1/3 of the time)
    "gpu": dict(steps=100_000),
}
# what a resumed run may change: where the images are, sampling and evaluation, precision
FREE = ("image_folder", "test_folder", "n_steps_each", "n_samples", "n_test", "eval_levels",
        "bf16")
STEM = "03_ncsn_cifar10"
CKPT_EVERY = 500  # training steps between checkpoints (also every 2 minutes)

# -- data ------------------------------------------------------------------------------------


def read_image(path: str):
    """An image file as RGB, or None (with a warning) when it is truncated or not an image."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        print(f"warning: skipping {path}: {err}")
        return None


def image_tensor(dataset, max_n: int | None = None) -> torch.Tensor:
    """All (or the first max_n) images of a torchvision dataset as one uint8 tensor (N, C, H, W);
    images the folder reader returned as None (unreadable files) are left out."""
    n = len(dataset) if max_n is None else min(max_n, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)),
                                         batch_size=500,
                                         collate_fn=lambda b: [x for x, _ in b if x is not None])
    images = [x for batch in loader for x in batch]
    if not images:
        raise common.UserError("no readable images found")
    return torch.stack(images)


def load_data(cfg: Config, data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out images, uint8 (N, 3, size, size); CIFAR-10 or any ImageFolder."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize(cfg.image_size),
                             transforms.CenterCrop(cfg.image_size), transforms.PILToTensor()])

    def folder(path: str):
        try:
            return datasets.ImageFolder(path, loader=read_image,
                                        transform=lambda img: img if img is None else tf(img))
        except (FileNotFoundError, OSError) as err:
            raise common.UserError(f"cannot read images from {path}: {err}") from None

    if not cfg.image_folder:
        try:
            train = image_tensor(common.torchvision_dataset("cifar10", data_dir, True, tf))
            test = image_tensor(common.torchvision_dataset("cifar10", data_dir, False, tf),
                                cfg.n_test)
        except common.UserError:
            raise common.UserError(
                "could not load or download CIFAR-10: put cifar-10-python.tar.gz (or its "
                f"cifar-10-batches-py folder) in {data_dir}, or train on a folder of images "
                "with --image-folder PATH") from None
    elif cfg.test_folder:
        train = image_tensor(folder(cfg.image_folder))
        test = image_tensor(folder(cfg.test_folder), cfg.n_test)
    else:  # hold out a fixed random part of the folder
        images = image_tensor(folder(cfg.image_folder))
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(1234))
        n_test = min(cfg.n_test, len(images) // 10)
        if n_test < 1:
            raise common.UserError(f"{cfg.image_folder} holds {len(images)} images; "
                                   "need at least 10 (or pass --test-folder)")
        train, test = images[perm[n_test:]], images[perm[:n_test]]
    return train, test


def to_float(x: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """uint8 images -> [0, 1] as in the paper (no rescaling to [-1, 1]); with flip, random
    horizontal flips (the paper's CIFAR-10 training does them)."""
    x = x.float() / 255.0
    if flip:
        x = torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    return x


# -- the method: the five techniques, the loss, annealed Langevin dynamics ----------------------


def max_pairwise_distance(x: torch.Tensor, chunk: int = 1024) -> float:
    """Technique 1: sigma_1 = max_{i,j} ||x_i - x_j||_2 over the training images (rows of x)."""
    x = x.flatten(1).float()
    return max(torch.cdist(x[i:i + chunk], x).max().item() for i in range(0, len(x), chunk))


def shell_overlap(gamma: float, D: int) -> float:
    """Technique 2's condition:
    Phi(sqrt(2D)(gamma-1) + 3 gamma) - Phi(sqrt(2D)(gamma-1) - 3 gamma)."""
    r = math.sqrt(2 * D) * (gamma - 1)
    return float(norm.cdf(r + 3 * gamma) - norm.cdf(r - 3 * gamma))


def solve_gamma(D: int, target: float = 0.5) -> float:
    """Technique 2: the ratio gamma = sigma_{i-1} / sigma_i with shell_overlap(gamma, D) = 0.5."""
    return brentq(lambda g: shell_overlap(g, D) - target, 1.0 + 1e-12, 10.0, xtol=1e-14)


def num_noise_levels(sigma_1: float, sigma_L: float, gamma: float) -> int:
    """Technique 2: the smallest L with sigma_1 / sigma_L <= gamma^(L-1), i.e. ratios at most
    gamma."""
    return max(2, math.ceil(1 + math.log(sigma_1 / sigma_L) / math.log(gamma) - 1e-9))


def geometric_sigmas(sigma_1: float, sigma_L: float, L: int) -> torch.Tensor:
    """Technique 2: sigma_1 > ... > sigma_L, a geometric progression."""
    logs = torch.linspace(math.log(sigma_1), math.log(sigma_L), L, dtype=torch.float64)
    return torch.exp(logs).float()


def langevin_variance_ratio(eps: float, gamma: float, sigma_L: float, T: int) -> float:
    """Eq. (4): s_T^2 / sigma_i^2 after T steps of Algorithm 1 at level i, for data = one point and
    x_0 ~ N(0, (gamma sigma_i)^2 I) (from level i-1); it does not depend on i."""
    a = eps / sigma_L**2
    b = 2 * eps / (sigma_L**2 - sigma_L**2 * (1 - a) ** 2)
    return (1 - a) ** (2 * T) * (gamma**2 - b) + b


def solve_step_size(gamma: float, sigma_L: float, T: int) -> float:
    """Technique 4: eps that brings Eq. (4) closest to 1 for the given T (eps < sigma_L^2)."""
    res = minimize_scalar(
        lambda log_eps: abs(langevin_variance_ratio(math.exp(log_eps), gamma, sigma_L, T) - 1),
        bounds=(math.log(sigma_L**2) - 30, math.log(sigma_L**2) - 1e-6), method="bounded",
        options={"xatol": 1e-10})
    return math.exp(res.x)


def divide_by_sigma(out: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Technique 3: s_theta(x, sigma) = s_theta(x) / sigma (the network is not told sigma)."""
    return out / sigma.view(-1, *[1] * (out.dim() - 1))


def dsm_loss(score_fn, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Eq. (2) with lambda(sigma) = sigma^2, per sample and divided by D:
    1/2 ||sigma s(x + sigma z, sigma) + z||^2 / D; the target score of x + sigma z given x is
    -z / sigma."""
    z = torch.randn_like(x)
    s = score_fn(x + sigma.view(-1, 1, 1, 1) * z, sigma)
    return 0.5 * (sigma.view(-1, 1, 1, 1) * s + z).pow(2).flatten(1).mean(1)


def langevin_step(x: torch.Tensor, score: torch.Tensor, alpha: float,
                  z: torch.Tensor) -> torch.Tensor:
    """Algorithm 1, inner step:
    x_t = x_{t-1} + alpha_i s(x_{t-1}, sigma_i) + sqrt(2 alpha_i) z_t."""
    return x + alpha * score + math.sqrt(2 * alpha) * z


def tweedie_denoise(x: torch.Tensor, score: torch.Tensor, sigma: float) -> torch.Tensor:
    """The final denoising step: E[x_0 | x] = x + sigma^2 grad log p_sigma(x) (Tweedie's
    formula)."""
    return x + sigma**2 * score


@torch.no_grad()
def annealed_langevin(score_fn, x: torch.Tensor, sigmas: torch.Tensor, eps: float, T: int,
                      denoise: bool = True, record=None) -> torch.Tensor:
    """Algorithm 1 (annealed Langevin dynamics) from x, with alpha_i = eps sigma_i^2 / sigma_L^2,
    then the denoising step; record(i, t, x), if given, sees x after step t of level i."""
    for i in range(len(sigmas)):
        sigma = sigmas[i].expand(len(x)).to(x.device)
        alpha = eps * (sigmas[i] / sigmas[-1]).item() ** 2
        for t in range(T):
            x = langevin_step(x, score_fn(x, sigma), alpha, torch.randn_like(x))
            if record is not None:
                record(i, t, x)
    if denoise:
        sigma_L = sigmas[-1].expand(len(x)).to(x.device)
        x = tweedie_denoise(x, score_fn(x, sigma_L), sigmas[-1].item())
    return x


def techniques(train: torch.Tensor, cfg: Config, device) -> dict:
    """Techniques 1, 2 and 4 computed from the training images."""
    D = train[0].numel()
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    subset = train[perm[:cfg.sigma1_subset]]
    sigma_1 = max_pairwise_distance(to_float(subset.to(device)))  # Technique 1
    if not cfg.sigma_end < sigma_1:
        raise common.UserError(f"--sigma-end {cfg.sigma_end} is not below sigma_1 = "
                               f"{sigma_1:.3g} (the largest distance between training images); "
                               "lower it")
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


# -- model ------------------------------------------------------------------------------------


def build_model(cfg: Config) -> torch.nn.Module:
    """s_theta(x, sigma) = net(x) / sigma (Technique 3): a U-Net without time embedding."""
    return common.UNet(channels=3, base=cfg.base, mults=cfg.mults,
                       num_res_blocks=cfg.num_res_blocks, attn_levels=cfg.attn_levels,
                       dropout=cfg.dropout, time_emb=None, out_scale=divide_by_sigma)


# -- training -----------------------------------------------------------------------------------


def batch_loss(net, images: torch.Tensor, sigmas: torch.Tensor, bf16: bool, device) -> torch.Tensor:
    """Eq. (2) averaged over a batch of training images (randomly flipped), each at a random
    level of the schedule."""
    x = to_float(images.to(device), flip=True)
    sigma = sigmas[torch.randint(len(sigmas), (len(x),), device=device)]

    def score(y, s):
        with common.autocast(device, bf16):
            return net(y, s).float()

    return dsm_loss(score, x, sigma).mean()


def train(cfg: Config, meta: dict, path: Path, images, sigmas, model, ema, opt, dist, device,
          ckpt: dict | None = None, skip: bool = False) -> tuple[dict, list]:
    """Denoising score matching over all levels with Adam and the EMA (Technique 5), from the
    checkpoint's step when resuming. The lr is constant after the warm-up, so `--resume --steps N`
    is the same run made longer. meta (preset, seed, schedule) goes into every checkpoint."""
    start = done = ckpt["step"] if ckpt else 0
    losses = list(ckpt["losses"]) if ckpt else []
    if ckpt is not None:
        common.set_rng_state(ckpt["rng_state"])

    def save(at_step: int, rng: dict):
        if dist.is_main:
            common.save_checkpoint(path, {
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "step": at_step, "losses": losses[:at_step], "config": dataclasses.asdict(cfg),
                "rng_state": rng, **meta}, STEM)

    t0 = time.time()
    if not skip and start < cfg.steps:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        ) if dist.enabled else model
        batches = common.epoch_batches(len(images), cfg.batch_size, dist, meta["seed"], start)
        bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=not dist.is_main,
                   mininterval=2)
        with common.Checkpointer(save, CKPT_EVERY, path) as checkpointer:
            for step in range(start, cfg.steps + 1):
                checkpointer.begin(step)
                batch = images[next(batches)]
                for group in opt.param_groups:  # linear warm-up, then constant
                    group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
                loss = batch_loss(net, batch, sigmas, cfg.bf16, device)
                checkpointer.verified(loss, step, last=step == cfg.steps)  # finite, saved if due
                if step == cfg.steps:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ema.update_parameters(model)
                losses.append(loss.item())
                done = step + 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.close()
    wall = time.time() - t0
    return {"steps": done, "steps_this_run": done - start, "wall_s": wall,
            "steps_per_s": (done - start) / wall if done > start else None,
            "final_loss": float(np.mean(losses[-100:])) if losses else None}, losses


# -- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def heldout_dsm_per_level(score_fn, test: torch.Tensor, sigmas: torch.Tensor, levels, device,
                          batch: int = 250) -> list:
    """The per-dimension DSM loss on held-out images at each level in levels (fixed noise seed)."""
    torch.manual_seed(0)
    out = []
    for i in levels:
        losses = [dsm_loss(score_fn, to_float(test[j:j + batch].to(device)),
                           sigmas[i].expand(len(test[j:j + batch])).to(device))
                  for j in range(0, len(test), batch)]
        out.append(torch.cat(losses).mean().item())
    return out


def image_stats(x: torch.Tensor) -> dict:
    """Saturation (pixels at the ends of [0, 1]) and noise (mean |discrete Laplacian|) of images
    in [0, 1]."""
    lap = (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2]
           - x[..., 1:-1, 2:])
    return {"saturated": float(((x <= 0.01) | (x >= 0.99)).float().mean()),
            "laplacian": float(lap.abs().mean()), "mean": float(x.mean()), "std": float(x.std())}


def evaluate(cfg: Config, seed: int, sched: dict, sigmas, ema, train, test,
             device) -> tuple[dict, dict]:
    """Annealed Langevin samples with the EMA weights, the held-out DSM loss per level, image
    statistics and sliced Wasserstein distances; returns the metrics and the figures' images."""
    score = common.network_fn(ema, device, cfg.bf16)  # s(x, sigma): net(x) / sigma
    torch.manual_seed(seed + 1000)
    size = cfg.image_size
    x0 = torch.rand(cfg.n_samples, 3, size, size, device=device)  # uniform noise, as in the paper
    snap_levels = sorted({round(v) for v in np.linspace(0, len(sigmas) - 1, 9)})
    snaps, bar = [], tqdm(total=len(sigmas), desc="annealed Langevin", mininterval=2)

    def record(i, t, x):  # at the end of each level: the bar, and the strip's snapshots
        if t == sched["T"] - 1:
            bar.update(1)
            snaps.extend([x[:8].cpu()] if i in snap_levels else [])

    t0 = time.time()
    samples = annealed_langevin(score, x0, sigmas, sched["eps"], sched["T"], record=record).cpu()
    wall = time.time() - t0
    bar.close()
    metrics = {"annealed_langevin": {"n": len(samples), "wall_s": wall,
                                     "samples_per_s": len(samples) / wall,
                                     "score_evals_per_sample": sched["L"] * sched["T"] + 1}}
    levels = sorted({round(v) for v in np.linspace(0, len(sigmas) - 1, cfg.eval_levels)})
    dsm = heldout_dsm_per_level(score, test, sigmas, levels, device)
    metrics["heldout_dsm"] = {"sigma": [sigmas[i].item() for i in levels], "loss": dsm,
                              "mean": float(np.mean(dsm))}
    clamped, real = samples.clamp(0, 1), to_float(test[:len(samples)])
    metrics["samples"] = {**image_stats(clamped),
                          "outside_0_1": float(((samples < 0) | (samples > 1)).float().mean())}
    metrics["heldout_images"] = image_stats(real)
    n = min(len(samples), len(real), len(train))
    flat = lambda x: x[:n].cpu().flatten(1).numpy()
    # pixel-space sliced W2; the floor is train vs held-out, uniform noise for scale
    metrics["swd_to_heldout"] = {
        "samples": common.sliced_wasserstein(flat(clamped), flat(real)),
        "floor_train": common.sliced_wasserstein(flat(to_float(train[:n])), flat(real)),
        "uniform_noise": common.sliced_wasserstein(flat(x0), flat(real))}
    images = {"samples": samples, "x0": x0.cpu(), "snaps": snaps, "snap_levels": snap_levels}
    return metrics, images


# -- figures ----------------------------------------------------------------------------------


def upscale(x: torch.Tensor, min_size: int = 32) -> torch.Tensor:
    k = max(1, math.ceil(min_size / x.shape[-1]))
    x = x.float().cpu()
    return F.interpolate(x, scale_factor=k, mode="nearest") if k > 1 else x


def plot_strip(snaps: list, titles: list, path: Path) -> None:
    """One chain per row, one column per snapshot, titled by the noise level."""
    from torchvision.utils import make_grid

    plt = common._plt()
    rows, cols = len(snaps[0]), len(snaps)
    grid = make_grid(torch.stack(snaps, 1).flatten(0, 1).clamp(0, 1), nrow=cols, padding=2,
                     pad_value=1.0)
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
    ratio = [langevin_variance_ratio(v, sched["gamma_used"], sched["sigma_L"], sched["T"])
             for v in e]
    ax[2].semilogx(e, ratio)
    ax[2].axhline(1, c="0.6", lw=0.8)
    ax[2].axvline(sched["eps"], c="C3", lw=0.8, label=f"eps = {sched['eps']:.3g}")
    ax[2].set(xlabel="eps", ylabel="s_T^2 / sigma^2, Eq. (4)", ylim=(0.9, 1.6),
              title=f"Technique 4 (T = {sched['T']})")
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


def figures(out: Path, sched: dict, sigmas, losses: list, metrics: dict, images: dict) -> None:
    samples, x0, snaps = images["samples"], images["x0"], images["snaps"]
    k = min(8, len(samples))
    torch.save(samples, out / "samples.pt")
    common.save_image_grid(upscale(samples.clamp(0, 1)), out / "samples.png", nrow=10,
                           value_range=(0, 1))
    plot_strip([upscale(x0[:k])] + [upscale(s[:k]) for s in snaps] + [upscale(samples[:k])],
               ["uniform"] + [f"σ={sigmas[i].item():.2g}" for i in images["snap_levels"]]
               + ["denoised"], out / "ald_strip.png")
    plot_techniques(sched, sigmas.cpu(), out / "sigmas.png")
    plot_dsm_curve(metrics["heldout_dsm"]["sigma"], metrics["heldout_dsm"]["loss"],
                   out / "dsm_per_level.png")
    if losses:
        common.plot_loss(losses, out / "loss.png", title="DSM loss (per dimension), all levels")


# -- main -----------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = common.parse_args(argv, __doc__, Config, PRESETS, STEM, image=True)
    dist, device = common.ddp_setup(common.get_device(args.device))
    log = print if dist.is_main else (lambda *a, **k: None)
    t0, out = time.time(), Path(args.out)
    with common.all_ranks_agree(dist, device):
        common.prepare_out(out)
        preset, cfg, ckpt = common.run_config(args, Config, PRESETS, STEM, FREE, device,
                                              quiet=not dist.is_main)
        common.seed_everything(args.seed + dist.rank)
        train_x, test_x = load_data(cfg, args.data_dir)
        log(f"{len(train_x)} training and {len(test_x)} held-out images of "
            f"{tuple(train_x.shape[1:])} ({time.time() - t0:.0f} s to load)")
        sched = techniques(train_x, cfg, device) if ckpt is None else ckpt["schedule"]
    if sched["T"] != cfg.n_steps_each:  # a resumed run may sample with another T
        sched = technique4(sched, cfg.n_steps_each)
    sigmas = geometric_sigmas(sched["sigma_1"], sched["sigma_L"], sched["L"]).to(device)
    log(f"Technique 1: sigma_1 = {sched['sigma_1']:.2f} (largest distance among "
        f"{sched['sigma_1_subset']} images) | 2: gamma = {sched['gamma']:.4f} -> L = {sched['L']}"
        f" | 4: eps = {sched['eps']:.3g} for T = {sched['T']} (Eq. 4 = {sched['eq4_ratio']:.3f})")

    model = build_model(cfg).to(device)
    ema = common.make_ema(model, cfg.ema_decay)  # Technique 5
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    log(f"U-Net without time embedding: {common.count_params(model) / 1e6:.2f}M parameters")
    if ckpt is not None:
        for obj, key in ((model, "model"), (ema, "ema"), (opt, "optimizer")):
            common.load_state(obj, ckpt[key], out / "ckpt.pt")
    elif cfg.minutes > 0:  # a new run on a budget: its step count, measured once, is stored
        probe = lambda net: batch_loss(net, train_x[:cfg.batch_size], sigmas, cfg.bf16, device)
        cfg.steps = common.budget_steps(cfg.minutes, model, opt, probe, dist)
    if dist.is_main:
        common.write_json(out / "config.json",
                          {**dataclasses.asdict(cfg), "preset": preset, "seed": args.seed})

    meta = {"preset": preset, "seed": args.seed, "schedule": sched}
    metrics = {"preset": preset, "schedule": sched, "params": common.count_params(model)}
    metrics["train"], losses = train(cfg, meta, out / "ckpt.pt", train_x, sigmas, model, ema,
                                     opt, dist, device, ckpt, skip=args.sample_only)
    if dist.enabled:
        metrics["ddp"] = {"world_size": dist.world_size,
                          "param_max_abs_diff": common.ddp_param_divergence(model, dist, device)}
    common.ddp_cleanup(dist)
    if not dist.is_main:
        return {}

    evaluation, images = evaluate(cfg, args.seed, sched, sigmas, ema, train_x, test_x, device)
    metrics.update(evaluation)
    figures(out, sched, sigmas, losses, metrics, images)
    metrics["wall_s_total"] = time.time() - t0
    common.write_json(out / "metrics.json", metrics)
    s, h = metrics["samples"], metrics["heldout_images"]
    log(f"held-out DSM (mean over levels) {metrics['heldout_dsm']['mean']:.4f} | samples: "
        f"saturated {s['saturated']:.3f} (held-out {h['saturated']:.3f}), |Laplacian| "
        f"{s['laplacian']:.3f} ({h['laplacian']:.3f}) | wrote {out}")
    return metrics


if __name__ == "__main__":
    common.cli_entry(main)
