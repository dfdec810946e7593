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
dsm_per_level.png (held-out DSM loss per noise level). The samples are judged by judge.py's
colour judge, a small classifier trained once (2-4 minutes on one CPU thread at 16x16) on the
training images and their classes and cached beside them: FID in its 32 features against the
held-out images, beside the floor of as many training images, and the confident share. Unlike
the pixel-space sliced Wasserstein distance it tells colour blobs from objects (at n = 100:
real held-out images 12, blurred 40, images low-passed to 4x4 100, smooth colour fields 550).

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

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import brentq, minimize_scalar
from scipy.stats import norm
from tqdm import tqdm

import common
import judge

# -- config: the paper's CIFAR-10 values; presets hold what differs ----------------------------


@dataclass
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
    # judge the samples by a small classifier trained once on the training images and their
    # classes (judge.py, cached beside the data): FID in its features, confident share
    judge: bool = True

    def __post_init__(self):
        for name in ("image_size", "n_steps_each", "sigma1_subset", "steps", "batch_size",
                     "n_samples", "n_test", "eval_levels"):
            common.check(getattr(self, name) >= 1, name, "at least 1")
        common.check_unet(self)
        if self.image_size < (least := max(4, 2 ** (len(self.mults) - 1))):
            raise common.UserError(f"--image-size {self.image_size} is too small for this U-Net "
                                   f"(--mults {self.mults}); use at least {least}")
        common.check(self.sigma_end > 0, "sigma_end", "above 0 (and below sigma_1)")
        common.check(self.lr > 0, "lr", "above 0")
        common.check(0 <= self.ema_decay < 1, "ema_decay", "below 1 (and at least 0)")
        common.check(self.warmup >= 0, "warmup", "at least 0")
        common.check(self.minutes >= 0, "minutes", "at least 0")


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
        "bf16", "judge")
STEM = "03_ncsn_cifar10"
CKPT_EVERY = 500  # training steps between checkpoints (also every 2 minutes)

# -- data ------------------------------------------------------------------------------------


def load_data(cfg: Config, data_dir: Path) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """Train and held-out images, uint8 (N, 3, size, size), and their class labels (train, test):
    CIFAR-10, or any ImageFolder (one class per sub-folder) whose unreadable files are skipped
    with a warning. A test folder gives a fixed random n_test of its images (all classes)."""
    from PIL import Image
    from torchvision import datasets, transforms as T

    tf = T.Compose([T.Resize(cfg.image_size), T.CenterCrop(cfg.image_size), T.PILToTensor()])

    def read(path: str):  # an image file as a tensor, or None when it is truncated or no image
        try:
            with Image.open(path) as img:
                return tf(img.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:
            print(f"warning: skipping {path}: {err}")

    def images(folder: str, train: bool = True, n: int | None = None):
        try:  # all (or a fixed random n) readable images of the folder (or CIFAR-10), labels
            ds = datasets.ImageFolder(folder, loader=read) if folder else \
                common.torchvision_dataset("cifar10", data_dir, train, tf)
        except common.UserError:
            raise common.UserError(
                "could not load or download CIFAR-10: put cifar-10-python.tar.gz (or its "
                f"cifar-10-batches-py folder) in {data_dir}, or train on a folder of images "
                "with --image-folder PATH") from None
        except OSError as err:
            raise common.UserError(f"cannot read images from {folder}: {err}") from None
        pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1234))[:n] \
            if n is not None else range(len(ds))  # folders are sorted by class
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(ds, pick), batch_size=500,
            collate_fn=lambda b: [(x, y) for x, y in b if x is not None])
        if not (found := [xy for batch in loader for xy in batch]):
            raise common.UserError("no readable images found")
        return torch.stack([x for x, _ in found]), torch.tensor([y for _, y in found])

    if not cfg.image_folder or cfg.test_folder:
        (train, train_y), (test, test_y) = images(cfg.image_folder), images(
            cfg.test_folder, False, cfg.n_test)
        return train, test, (train_y, test_y)
    every, labels = images(cfg.image_folder)  # hold out a fixed random part of the folder
    perm = torch.randperm(len(every), generator=torch.Generator().manual_seed(1234))
    if (n_test := min(cfg.n_test, len(every) // 10)) < 1:
        raise common.UserError(f"{cfg.image_folder} holds {len(every)} images; "
                               "need at least 10 (or pass --test-folder)")
    train, test = perm[n_test:], perm[:n_test]
    return every[train], every[test], (labels[train], labels[test])


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


def anneal_dsm_loss(score_fn, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Eq. (2) over all L levels: each image at a level i ~ U{1..L}, so the batch mean is an
    unbiased estimate of the mean over the levels of dsm_loss."""
    sigma = sigmas[torch.randint(len(sigmas), (len(x),), device=x.device)]
    return dsm_loss(score_fn, x, sigma).mean()


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
    """anneal_dsm_loss on a batch of training images, randomly flipped, the network under bf16
    autocast if asked."""
    def score(y, s):
        with common.autocast(device, bf16):
            return net(y, s).float()

    return anneal_dsm_loss(score, to_float(images.to(device), flip=True), sigmas)


def train(run, model, ema, opt, sigmas: torch.Tensor, images: torch.Tensor) -> dict:
    """Denoising score matching over all levels with Adam and the EMA (Technique 5), from the
    run's step. The lr is constant after the warm-up, so `--resume --steps N` is the same run
    made longer."""
    cfg, net = run.cfg, run.ddp(model)
    batches = run.batches(len(images), cfg.batch_size)
    for step in run.steps(every=CKPT_EVERY):
        for group in opt.param_groups:  # linear warm-up, then constant
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
        loss = batch_loss(net, images[next(batches)], sigmas, cfg.bf16, run.device)  # Eq. (2)
        run.log(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(model)  # Technique 5
    return run.trained


# -- evaluation (rank 0 only) -----------------------------------------------------------------


def image_stats(x: torch.Tensor) -> dict:
    """Saturation (pixels at the ends of [0, 1]) and noise (mean |discrete Laplacian|) of images
    in [0, 1]."""
    lap = (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2]
           - x[..., 1:-1, 2:])
    return {"saturated": float(((x <= 0.01) | (x >= 0.99)).float().mean()),
            "laplacian": float(lap.abs().mean()), "mean": float(x.mean()), "std": float(x.std())}


def judge_samples(run, samples: torch.Tensor, data: tuple) -> dict | None:
    """The judge's verdict on samples in [0, 1] (None without at least two classes): a small
    classifier trained once on the training images and their classes, cached beside them
    (judge.py): FID in its features against the held-out images, with the floor of as many
    training images beside it, and the share classified with p > 0.9 (held-out images' beside
    it). Unlike the pixel-space distance it sees whether the samples hold objects."""
    (train, test, (train_y, test_y)), cfg = data, run.cfg
    if not cfg.judge or len(train_y.unique()) < 2:
        return None
    root = Path(cfg.image_folder).resolve().parent if cfg.image_folder else run.args.data_dir
    labelled = ((train.float() / 127.5 - 1, train_y), (test.float() / 127.5 - 1, test_y))
    name = "cifar10" if not cfg.image_folder else "images"
    judged = judge.load_judge(name, root, data=labelled)
    verdict = judge.judge_with(samples.clamp(0, 1) * 2 - 1, judged, seed=run.seed)
    print(judge.judge_line(verdict))
    return verdict


@torch.no_grad()
def evaluate(run, ema, sched: dict, sigmas, data: tuple) -> tuple[dict, torch.Tensor, list]:
    """Annealed Langevin samples with the EMA weights, the held-out DSM loss per level (fixed
    noise), image statistics, sliced Wasserstein distances and the judge's verdict
    (judge_samples); data = (train, test, labels) from load_data: (metrics, samples, the
    strip's (title, images) columns)."""
    (train, test, _), cfg, device = data, run.cfg, run.device
    score = common.network_fn(ema, device, cfg.bf16)  # s(x, sigma): net(x) / sigma
    torch.manual_seed(run.seed + 1000)
    x0 = torch.rand(cfg.n_samples, 3, cfg.image_size, cfg.image_size, device=device)  # uniform
    shown = sorted({round(v) for v in np.linspace(0, len(sigmas) - 1, 9)})
    strip = [("uniform", x0[:8].cpu())]
    bar = tqdm(total=len(sigmas), desc="annealed Langevin", mininterval=2)

    def record(i, t, x):  # at the end of each level: the bar, and the strip's snapshots
        if t == sched["T"] - 1:
            bar.update(1)
            strip.extend([(f"σ={sigmas[i].item():.2g}", x[:8].cpu())] if i in shown else [])

    t0 = time.time()
    samples = annealed_langevin(score, x0, sigmas, sched["eps"], sched["T"], record=record).cpu()
    wall = time.time() - t0
    bar.close()
    levels = sorted({round(v) for v in np.linspace(0, len(sigmas) - 1, cfg.eval_levels)})
    torch.manual_seed(0)  # the held-out DSM loss per level, one fixed noise draw
    dsm = [torch.cat([dsm_loss(score, to_float(x.to(device)), sigmas[i].expand(len(x)).to(device))
                      for x in test.split(250)]).mean().item() for i in levels]
    clamped, real = samples.clamp(0, 1), to_float(test[:len(samples)])
    n = min(len(samples), len(real), len(train))
    flat = lambda x: x[:n].cpu().flatten(1).numpy()
    floor = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:n]]
    metrics = {
        "annealed_langevin": {"n": len(samples), "wall_s": wall, "samples_per_s": len(samples)
                              / wall, "score_evals_per_sample": sched["L"] * sched["T"] + 1},
        "heldout_dsm": {"sigma": [sigmas[i].item() for i in levels], "loss": dsm,
                        "mean": float(np.mean(dsm))},
        "samples": {**image_stats(clamped),
                    "outside_0_1": float(((samples < 0) | (samples > 1)).float().mean())},
        "heldout_images": image_stats(real),
        # pixel-space sliced W2; the floor is random training images (a folder is sorted by
        # class) vs held-out, uniform noise for scale
        "swd_to_heldout": {
            "samples": common.sliced_wasserstein(flat(clamped), flat(real)),
            "floor_train": common.sliced_wasserstein(flat(to_float(floor)), flat(real)),
            "uniform_noise": common.sliced_wasserstein(flat(x0), flat(real))},
        "judge": judge_samples(run, samples, data)}
    return metrics, samples, strip + [("denoised", samples[:8])]


# -- figures ----------------------------------------------------------------------------------


def plot_strip(strip: list, path: Path) -> None:
    """One chain per row, one column per (title, images) snapshot, titled by the noise level."""
    from torchvision.utils import make_grid

    cols, rows = len(strip), len(strip[0][1])
    grid = make_grid(torch.stack([x for _, x in strip], 1).flatten(0, 1).clamp(0, 1), nrow=cols,
                     padding=2, pad_value=1.0)
    fig, ax = common.pyplot().subplots(figsize=(0.85 * cols, 0.85 * rows + 0.5))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([grid.shape[-1] / cols * (c + 0.5) for c in range(cols)],
                  [title for title, _ in strip], fontsize=7)
    ax.xaxis.tick_top()
    ax.set_yticks([])
    common.save_figure(fig, path)


def plot_techniques(sched: dict, sigmas: torch.Tensor, path: Path) -> None:
    """The schedule (Technique 2), the overlap condition solved for gamma and Eq. (4) solved
    for eps (Technique 4)."""
    fig, ax = common.pyplot().subplots(1, 3, figsize=(12, 3.3))
    ax[0].semilogy(np.arange(1, len(sigmas) + 1), sigmas.numpy(), ".", ms=3)
    ax[0].set(xlabel="level i", ylabel="sigma_i", title=f"geometric sigmas, L = {len(sigmas)}")
    g = np.linspace(1, sched["gamma"] + 3 * (sched["gamma"] - 1), 200)
    ax[1].plot(g, [shell_overlap(v, sched["D"]) for v in g])
    ax[1].axhline(0.5, c="0.6", lw=0.8)
    ax[1].axvline(sched["gamma"], c="C3", lw=0.8, label=f"gamma = {sched['gamma']:.4f}")
    ax[1].set(xlabel="gamma", title=f"Technique 2 (D = {sched['D']})", ylabel="shell overlap")
    e = np.logspace(math.log10(sched["eps"]) - 2, math.log10(0.99 * sched["sigma_L"] ** 2), 200)
    ax[2].semilogx(e, [langevin_variance_ratio(v, sched["gamma_used"], sched["sigma_L"],
                                               sched["T"]) for v in e])
    ax[2].axhline(1, c="0.6", lw=0.8)
    ax[2].axvline(sched["eps"], c="C3", lw=0.8, label=f"eps = {sched['eps']:.3g}")
    ax[2].set(xlabel="eps", ylabel="s_T^2 / sigma^2, Eq. (4)", ylim=(0.9, 1.6),
              title=f"Technique 4 (T = {sched['T']})")
    for a in ax[1:]:
        a.legend(fontsize=8)
    common.save_figure(fig, path)


def figures(run, sched: dict, sigmas, dsm: dict, samples, strip: list) -> None:
    up = lambda x: F.interpolate(x.float(), scale_factor=math.ceil(32 / x.shape[-1]))  # nearest
    torch.save(samples, run.out / "samples.pt")
    common.save_image_grid(up(samples.clamp(0, 1)), run.out / "samples.png", nrow=10,
                           value_range=(0, 1))
    plot_strip([(title, up(x)) for title, x in strip], run.out / "ald_strip.png")
    plot_techniques(sched, sigmas.cpu(), run.out / "sigmas.png")
    fig, ax = common.pyplot().subplots(figsize=(6, 3.5))
    ax.semilogx(dsm["sigma"], dsm["loss"], "o-", ms=3, label="held-out, EMA weights")
    ax.axhline(0.5, c="0.6", ls="--", lw=0.8, label="s = 0 (knows nothing)")
    ax.set(xlabel="sigma", ylabel="1/2 ||sigma s + z||^2 / D", title="DSM loss per noise level")
    ax.legend(fontsize=8)
    common.save_figure(fig, run.out / "dsm_per_level.png")
    if run.losses:
        common.plot_loss(run.losses, run.out / "loss.png",
                         title="DSM loss (per dimension), all levels")


# -- main -----------------------------------------------------------------------------------


def main(argv=None) -> dict:
    run = common.Run(argv, __doc__, Config, PRESETS, FREE, STEM, image=True)
    cfg, device, t0 = run.cfg, run.device, time.time()
    train_x, test_x, labels = load_data(cfg, run.args.data_dir)
    run.print(f"{len(train_x)} training and {len(test_x)} held-out images of "
              f"{tuple(train_x.shape[1:])} ({time.time() - t0:.0f} s to load)")
    # Techniques 1, 2 and 4 from the data on a new run; a resumed run keeps its schedule and may
    # only sample with another T
    sched = techniques(train_x, cfg, device) if run.ckpt is None else run.ckpt["schedule"]
    if sched["T"] != cfg.n_steps_each:
        sched = technique4(sched, cfg.n_steps_each)
    run.extra["schedule"] = sched  # saved in every checkpoint
    sigmas = geometric_sigmas(sched["sigma_1"], sched["sigma_L"], sched["L"]).to(device)
    run.print(f"Technique 1: sigma_1 = {sched['sigma_1']:.2f} (largest distance among "
              f"{sched['sigma_1_subset']} images) | 2: gamma = {sched['gamma']:.4f} -> "
              f"L = {sched['L']} | 4: eps = {sched['eps']:.3g} for T = {sched['T']} "
              f"(Eq. 4 = {sched['eq4_ratio']:.3f})")

    model = build_model(cfg).to(device)
    ema = common.make_ema(model, cfg.ema_decay)  # Technique 5
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    run.print(f"U-Net without time embedding: {common.count_params(model) / 1e6:.2f}M parameters")
    run.restore(model=model, ema=ema, optimizer=opt)
    metrics = {"preset": run.preset, "schedule": sched, "params": common.count_params(model),
               "world_size": run.world_size, "train": {"steps": run.step, "steps_this_run": 0}}
    if run.trains:
        run.budget(lambda net: batch_loss(net, train_x[:cfg.batch_size], sigmas, cfg.bf16,
                                          device), model, opt)
        metrics["train"] = train(run, model, ema, opt, sigmas, train_x)
    if not run.finish():
        return {}

    evaluation, samples, strip = evaluate(run, ema, sched, sigmas, (train_x, test_x, labels))
    metrics.update(evaluation)
    figures(run, sched, sigmas, metrics["heldout_dsm"], samples, strip)
    metrics["wall_s_total"] = time.time() - t0
    common.write_json(run.out / "metrics.json", metrics)
    s, h = metrics["samples"], metrics["heldout_images"]
    print(f"held-out DSM (mean over levels) {metrics['heldout_dsm']['mean']:.4f} | samples: "
          f"saturated {s['saturated']:.3f} (held-out {h['saturated']:.3f}), |Laplacian| "
          f"{s['laplacian']:.3f} ({h['laplacian']:.3f}) | wrote {run.out}")
    return metrics


if __name__ == "__main__":
    common.cli_entry(main)
