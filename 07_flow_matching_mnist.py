"""07 -- Flow Matching for Generative Modeling (Lipman, Chen, Ben-Hamu, Nickel, Le, ICLR 2023),
arXiv:2210.02747, with classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598).

A U-Net v_t(x) learns the velocity of an ODE dx/dt = v_t(x) (Eq. 1) that carries noise
x_0 ~ N(0, I) at t = 0 to MNIST digits at t = 1. It regresses, at a random t, the velocity of
one straight path: the conditional optimal-transport flow psi_t(x_0) = (1 - (1 - sigma_min) t)
x_0 + t x_1 from a noise image x_0 to a data image x_1 (Eq. 20-22), whose conditional flow
matching loss (Eq. 23) has the gradient of the intractable flow matching loss (Eq. 5; Theorem
2). Sampling is any ODE solver from x_0: Euler or midpoint at a fixed number of network
evaluations (NFE), or adaptive RK45 (the paper's dopri5). Log-likelihoods follow from the
instantaneous change of variables with the Hutchinson trace estimator, as in 06. With labels
dropped at random in training, one network is conditional and unconditional, and the guided
velocity v_uncond + w (v_cond - v_uncond) trades diversity for fidelity. Equation numbers are
Lipman et al.'s unless another paper is named; t = 0 is noise, t = 1 data.

Rectified flow (Liu, Gong, Liu 2023) trains the same straight path with sigma_min = 0 (target
x_1 - x_0), then may straighten it further by "reflow". A diffusion is another choice of the
Gaussian path's (mu_t, sigma_t) (Eq. 10, 15): the VP path mu_t = alpha_{1-t} x_1, sigma_t =
sqrt(1 - alpha_{1-t}^2) (Eq. 18-19) makes the marginal field the drift of 06's VP probability
flow ODE (time reversed), which 06 reaches through the score; here the velocity is regressed
directly, and the path is straight, so few steps go far.

    python 07_flow_matching_mnist.py                   # no GPU: --preset cpu, 12-15 minutes
    python 07_flow_matching_mnist.py --sample-only --solver euler --nfe 8 --guidance 2
    python 07_flow_matching_mnist.py --p-uncond 1 --guidance 0   # unconditional, as the paper
    torchrun --nproc_per_node 2 07_flow_matching_mnist.py --preset gpu  # --batch-size per process

The cpu preset trains for 10 minutes (the step count that fits is measured at the start), then
samples, judges and measures likelihoods for about four more; the gpu preset about an hour on
one GPU. Writes to --out (default runs/07_flow_matching_mnist): config.json, ckpt.pt,
samples.png, samples.pt (N, 1, 28, 28) in [-1, 1] (for w > 0 the digits 0, 1, ..., 9 in turn),
loss.png, nfe.png (one row per solver x NFE, same x_0, with the judge's FID), guidance.png (a
row per digit, columns w = 0, 1, 2, 4), trajectory.png (x_t of a few samples), flow.gif and
metrics.json (loss, steps/s, the NFE table, the guidance table with the share on target, test
bits/dim, the judge's FID and confident share).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import integrate
from tqdm import tqdm

import common
import judge

# -- config ----------------------------------------------------------------------------------

SOLVERS = ("euler", "midpoint", "rk45")
NUM_CLASSES = 10  # digits; label 10 is "no label"


# The paper's recipe (Lipman et al., Sec. 6 and Appendix E, CIFAR-10) at MNIST size, with the
# label dropout of Ho & Salimans; the presets below differ.
@dataclass
class Config:
    dataset: Literal["mnist", "fashion-mnist"] = "mnist"  # training data
    sigma_min: float = 1e-4  # std of p_1(x | x_1) = N(x_1, sigma_min^2 I) (Eq. 20); small
    # t in the loss: U[0, 1] (paper) or logit-normal (Esser et al. 2024, Sec. 3.1)
    t_sampling: Literal["uniform", "logit-normal"] = "uniform"
    # label dropped (the "no label" embedding) with this probability (Ho & Salimans: 0.1 or
    # 0.2); 1: an unconditional model without labels, as in Lipman et al. (with --guidance 0)
    p_uncond: float = 0.2
    # U-Net (the ADM U-Net of the paper at MNIST size, as 05): width, multipliers 28 -> 14 -> 7
    base: int = 128
    mults: tuple[int, ...] = (1, 2, 2)  # width multipliers per level
    num_res_blocks: int | tuple[int, ...] = 2  # ResBlocks per level (or one per level)
    attn_levels: tuple[int, ...] = (1,)  # levels with attention (14x14)
    dropout: float = 0.1  # dropout in the ResBlocks
    fourier_scale: float = 16.0  # Gaussian Fourier features of t in [0, 1] (as 06)
    embed_dim: int = 64  # Fourier features of t
    batch_size: int = 128  # per process (global batch = world size x this)
    # training steps (--resume --steps N extends a run to N steps; the lr decay then spans it)
    steps: int = 40_000
    # > 0: train for about this many minutes, the step count measured at the start and then
    # fixed; 0: exactly `steps`
    minutes: float = 0.0
    lr: float = 5e-4  # peak Adam learning rate
    warmup: int = 5000  # linear warm-up steps
    lr_decay: bool = True  # decay of the lr to 0 after warm-up (here cosine)
    grad_clip: float = 1.0  # gradient norm clipping
    ema_decay: float = 0.9999  # EMA of the weights
    bf16: bool = False  # bf16 autocast for training and fixed-step sampling (RK45 in fp32)
    solver: Literal["euler", "midpoint", "rk45"] = "rk45"  # final samples; paper: dopri5
    nfe: int = 32  # network evaluations of a fixed-step solver (midpoint: 2 per step)
    ode_tol: float = 1e-5  # rtol = atol of RK45 sampling
    # w of the final samples and the NFE table: 1 conditional (labels 0..9 in turn; at equal
    # training far better than w = 0, README), 0 unconditional, > 1 guided
    guidance: float = 1.0
    n_samples: int = 1000  # final samples (with w > 0: labels 0..9 in turn)
    sample_batch: int = 500  # samples per network call
    # (solver, NFE) rows of the NFE table, all from the same x_0; rk45's NFE is its own (put 0)
    table: tuple[tuple[str, int], ...] = (
        ("euler", 1), ("euler", 2), ("euler", 4), ("euler", 8), ("euler", 16), ("euler", 32),
        ("midpoint", 2), ("midpoint", 4), ("midpoint", 8), ("midpoint", 16), ("midpoint", 32),
        ("rk45", 0))
    table_n: int = 1000  # samples per row of the NFE table (FID needs at least 128)
    guide_ws: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)  # w of the guidance table and figure
    guide_n: int = 1000  # samples per w, labels 0..9 in turn, with the final solver
    lik_images: int = 1000  # test images for bits/dim through the ODE (0 skips)
    lik_repeats: int = 8  # extra estimates of the first image: the estimator's own spread
    lik_tol: float = 1e-5  # rtol = atol of RK45 for the likelihood
    judge: bool = True  # FID, confident share (and share on target) by the digit judge
    ckpt_every: int = 2000  # steps between checkpoints

    def __post_init__(self):
        for name in ("steps", "batch_size", "nfe", "n_samples", "sample_batch", "table_n",
                     "ckpt_every", "embed_dim"):
            common.check(getattr(self, name) >= 1, name, "at least 1")
        common.check(self.guide_n >= NUM_CLASSES, "guide_n", "at least 10 (one per digit)")
        common.check_unet(self)
        common.check(self.sigma_min < 1, "sigma_min", "in [0, 1)")
        common.check(self.p_uncond <= 1, "p_uncond", "in [0, 1]")
        common.check(self.ode_tol > 0 and self.lik_tol > 0 and self.grad_clip > 0, "ode_tol",
                     "> 0 (and --lik-tol, --grad-clip > 0)")
        common.check(self.solver in ("euler", "rk45") or self.nfe % 2 == 0, "nfe",
                     f"even for {self.solver} (two evaluations per step)")
        common.check(isinstance(self.table, tuple) and len(self.table) > 0 and all(
            table_row_ok(row) for row in self.table), "table", "rows (solver, NFE): euler NFE "
            ">= 1, midpoint an even NFE, rk45 0 (adaptive), e.g. (('euler', 8),)")
        common.check(isinstance(self.guide_ws, tuple) and all(
            isinstance(w, (int, float)) and w >= 0 for w in self.guide_ws),
                     "guide_ws", "a tuple of weights >= 0, e.g. 0,1,2,4")
        common.check(self.guidance == 0 or self.p_uncond < 1, "guidance",
                     "0 for an unconditional model (--p-uncond 1 --guidance 0)")


def table_row_ok(row) -> bool:
    if not (isinstance(row, tuple) and len(row) == 2 and row[0] in SOLVERS
            and isinstance(row[1], int)):
        return False
    solver, nfe = row
    return solver == "rk45" or (nfe >= 1 if solver == "euler" else nfe >= 2 and nfe % 2 == 0)


PRESETS = {
    # seconds, for tests: every code path of the gpu preset at toy size
    "smoke": dict(base=8, mults=(1, 2), num_res_blocks=1, attn_levels=(), dropout=0.0,
                  embed_dim=8, batch_size=8, steps=6, warmup=2, lr=1e-3, lr_decay=False,
                  ema_decay=0.9, solver="midpoint", nfe=4, ode_tol=0.1, n_samples=8, sample_batch=8,
                  table=(("euler", 1), ("midpoint", 2), ("rk45", 0)), table_n=4,
                  guide_ws=(0.0, 1.0, 2.0), guide_n=10, lik_images=2, lik_repeats=2, lik_tol=0.1,
                  ckpt_every=4),
    # 10 minutes of training on 2 CPU cores, then ~4 of evaluation: 05's cpu U-Net and recipe
    # (a narrow 28x28 level, the extra depth at 7x7, batch 64, a cosine-decayed higher lr)
    "cpu": dict(base=16, mults=(1, 2, 4), num_res_blocks=(1, 1, 2), attn_levels=(2,), dropout=0.0,
                embed_dim=32, batch_size=64, minutes=10.0, lr=1e-3, warmup=100, ema_decay=0.998,
                bf16=True, solver="midpoint", nfe=16, ode_tol=1e-3, n_samples=500,
                sample_batch=250, table_n=250, guide_n=250, lik_images=32, lik_tol=1e-4,
                ckpt_every=500),
    # the paper's recipe at MNIST size, about an hour on one GPU (40k steps)
    "gpu": dict(bf16=True),
}
# what a --resume or --sample-only may change: what happens after training, and how to run
FREE = ("solver", "nfe", "ode_tol", "guidance", "n_samples", "sample_batch", "table", "table_n",
        "guide_ws", "guide_n", "lik_images", "lik_repeats", "lik_tol", "judge", "bf16",
        "ckpt_every")
STEM = "07_flow_matching_mnist"

# -- data ------------------------------------------------------------------------------------


def load_data(name: str, root, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 28, 28) uint8 pixels and (N,) labels of a split."""
    ds = common.torchvision_dataset(name, root, train, transform=None)
    return ds.data.unsqueeze(1).contiguous(), torch.as_tensor(ds.targets).long()


def to_model_space(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0  # {0, ..., 255} -> [-1, 1]


def dequantize(pixels: torch.Tensor, generator=None) -> torch.Tensor:
    """Uniform dequantisation (as 06): (k + U) / 256 in [0, 1], then mapped to [-1, 1]."""
    u = (pixels.float() + torch.rand(pixels.shape, generator=generator, device=pixels.device)) / 256
    return 2.0 * u - 1.0


# -- the method: the conditional OT path, the CFM loss, guidance, solvers, likelihood --------


def bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t of shape (B,) shaped to broadcast against x (B, ...)."""
    return t.to(x.dtype).view(-1, *[1] * (x.dim() - 1))


def psi_t(x0, x1, t, sigma_min):
    """Eq. 22: the conditional OT flow psi_t(x_0) = (1 - (1 - sigma_min) t) x_0 + t x_1, pushing
    p_0 = N(0, I) to p_t(x | x_1) = N(t x_1, (1 - (1 - sigma_min) t)^2 I) (Eq. 10, 20)."""
    return (1 - (1 - sigma_min) * bcast(t, x0)) * x0 + bcast(t, x0) * x1


def u_t(x, x1, t, sigma_min):
    """Eq. 21: the conditional vector field u_t(x | x_1) = (x_1 - (1 - sigma_min) x) /
    (1 - (1 - sigma_min) t), which generates p_t(x | x_1) (Theorem 3, Eq. 15)."""
    return (x1 - (1 - sigma_min) * x) / (1 - (1 - sigma_min) * bcast(t, x))


def cfm_target(x0, x1, sigma_min):
    """d/dt psi_t(x_0) = u_t(psi_t(x_0) | x_1) = x_1 - (1 - sigma_min) x_0: the target of
    Eq. 23, the same for every t (the path is straight)."""
    return x1 - (1 - sigma_min) * x0


def sample_t(n: int, how: str, device) -> torch.Tensor:
    """t ~ U[0, 1] (paper) or logit-normal(0, 1) (Esser et al. 2024, Eq. 19 with m = 0, s = 1:
    more weight on the middle of the path)."""
    if how == "uniform":
        return torch.rand(n, device=device)
    return torch.sigmoid(torch.randn(n, device=device))


def cfm_loss(model, x1, sigma_min, y=None, t_sampling="uniform"):
    """Eq. 23: L_CFM = E_{t, q(x_1), p(x_0)} || v_t(psi_t(x_0)) - (x_1 - (1 - sigma_min) x_0) ||^2
    with x_0 ~ N(0, I); model(x, t[, y]) is v_t, y the (possibly dropped) labels."""
    t = sample_t(x1.shape[0], t_sampling, x1.device)
    x0 = torch.randn_like(x1)
    x = psi_t(x0, x1, t, sigma_min)
    v = model(x, t) if y is None else model(x, t, y)
    return torch.nn.functional.mse_loss(v.float(), cfm_target(x0, x1, sigma_min))


def drop_labels(y, p_uncond, null):
    """Ho & Salimans, Algorithm 1: each label c replaced by the null label with prob. p_uncond."""
    drop = torch.rand(y.shape, device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, null), y)


def guided_velocity(v, x, t, y, w):
    """Ho & Salimans, Eq. 6, eps~ = (1 + w') eps(z, c) - w' eps(z), in velocity form with
    w = 1 + w': v~ = v(x, t) + w (v(x, t, y) - v(x, t)). w = 0: the unconditional velocity,
    w = 1: the conditional one. (v is affine in eps at each t, and the weights sum to 1, so both
    forms give the same field.) y = None: unconditional."""
    if w == 0 or y is None:
        return v(x, t)
    v_cond = v(x, t, y)
    if w == 1:
        return v_cond
    v_uncond = v(x, t)
    return v_uncond + w * (v_cond - v_uncond)


def times(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)


@torch.no_grad()
def sample_euler(v, x, steps, record=None):
    """Euler on dx/dt = v_t(x) (Eq. 1) from x = x_0 at t = 0 to t = 1 in `steps` equal steps
    (NFE = steps). Returns x_1; record(t, x_t) after every step, if given."""
    h = 1.0 / steps
    for i in range(steps):
        x = x + h * v(x, times(i * h, x))
        if record is not None:
            record((i + 1) * h, x)
    return x


@torch.no_grad()
def sample_midpoint(v, x, steps, record=None):
    """The explicit midpoint rule, x + h v(x + h/2 v(x, t), t + h/2), 2 NFE per step."""
    h = 1.0 / steps
    for i in range(steps):
        x_mid = x + h / 2 * v(x, times(i * h, x))
        x = x + h * v(x_mid, times((i + 0.5) * h, x))
        if record is not None:
            record((i + 1) * h, x)
    return x


@torch.no_grad()
def sample_rk45(v, x, rtol, atol, record=None):
    """dx/dt = v_t(x) from t = 0 to 1 by adaptive RK45 (scipy's solve_ivp, the paper's dopri5's
    sibling), the whole batch as one system in float64 on the CPU. Returns x_1 and the NFE;
    record(t, x_t) sees the points of every accepted step."""

    def rhs(t, y):
        xt = torch.from_numpy(y).reshape(x.shape).to(x)
        return v(xt, times(t, xt)).double().flatten().cpu().numpy()

    sol = integrate.solve_ivp(rhs, (0.0, 1.0), x.double().flatten().cpu().numpy(),
                              method="RK45", rtol=rtol, atol=atol)
    if record is not None:
        for t, y in zip(sol.t[1:], sol.y.T[1:]):
            record(float(t), torch.from_numpy(y).reshape(x.shape).to(x))
    return torch.from_numpy(sol.y[:, -1]).reshape(x.shape).to(x), sol.nfev


def hutchinson_divergence(fn, x, noise):
    """Skilling-Hutchinson estimate of div fn(x) = E_v[v^T (d fn / dx) v] with E[v v^T] = I, one
    vector-Jacobian product per sample. Returns fn(x) and the estimate, shape (B,)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x)
        (vjp,) = torch.autograd.grad((out * noise).sum(), x)
    return out.detach(), (vjp * noise).flatten(1).sum(1)


def standard_normal_logp(z):
    """log N(z; 0, I) per sample: the density of p_0."""
    d = z[0].numel()
    return -0.5 * (z.flatten(1) ** 2).sum(1) - 0.5 * d * math.log(2 * math.pi)


def ode_log_likelihood(v, x, rtol, atol, generator=None):
    """log p_1(x) = log p_0(x(0)) - int_0^1 div v_t(x(t)) dt: the instantaneous change of
    variables (Chen et al. 2018) along the ODE (Eq. 1) from x(1) = x back to t = 0, by RK45 on
    the CPU with one Rademacher probe per sample (drawn on x's device). Returns log p (nats,
    (B,)), x(0) and the NFE."""
    shape, b = x.shape, x.shape[0]
    noise = torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1

    def rhs(t, y):  # d/dt [x, L] = [v_t(x), div v_t(x)], L(1) = 0
        xt = torch.from_numpy(y[:-b]).reshape(shape).to(x)
        vel, div = hutchinson_divergence(lambda z: v(z, times(t, z)), xt, noise)
        return np.concatenate([vel.double().flatten().cpu().numpy(), div.double().cpu().numpy()])

    y1 = np.concatenate([x.double().flatten().cpu().numpy(), np.zeros(b)])
    sol = integrate.solve_ivp(rhs, (1.0, 0.0), y1, method="RK45", rtol=rtol, atol=atol)
    z = torch.from_numpy(sol.y[:-b, -1]).reshape(shape).to(x)
    delta = torch.from_numpy(sol.y[-b:, -1]).to(x)  # L(0) = -int_0^1 div v_t dt
    return standard_normal_logp(z) + delta, z, sol.nfev


def bits_per_dim(logp_x: torch.Tensor, dims: int) -> torch.Tensor:
    """Bits/dim of 8-bit data from the density of dequantised x = 2 (k + U) / 256 - 1: the map
    to [0, 1] adds log 2 per dim, the 256 bins add 8 bits (as 06)."""
    return -logp_x / (dims * math.log(2)) + 7.0


# -- model (common.UNet with a label embedding) and learning rate ----------------------------


def build_model(cfg: Config) -> torch.nn.Module:
    """v_t(x, y): a U-Net with Fourier features of t and, unless p_uncond = 1, a label embedding
    (label NUM_CLASSES: no label) added to the time embedding."""
    return common.UNet(1, cfg.base, cfg.mults, cfg.num_res_blocks, cfg.attn_levels, cfg.dropout,
                       "fourier", cfg.fourier_scale, embed_dim=cfg.embed_dim,
                       num_classes=NUM_CLASSES if cfg.p_uncond < 1 else 0)


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up, then constant or cosine decay to 0."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if not cfg.lr_decay:
        return cfg.lr
    decay_steps = max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / decay_steps))


def training_labels(y, cfg: Config):
    """The labels the model sees: None for an unconditional model, else with CFG dropout."""
    return None if cfg.p_uncond >= 1 else drop_labels(y, cfg.p_uncond, NUM_CLASSES)


# -- training --------------------------------------------------------------------------------


def train(run, model, ema, opt, train_x, train_y) -> dict:
    """Minimise Eq. 23 with Adam, warm-up, gradient clipping and an EMA of the weights, from the
    run's step to cfg.steps (run.log checks each loss and checkpoints when due)."""
    cfg, device = run.cfg, run.device
    net, batches = run.ddp(model), run.batches(len(train_x), cfg.batch_size)
    model.train()
    for step in run.steps(every=cfg.ckpt_every):
        idx = next(batches)
        x1 = to_model_space(train_x[idx]).to(device, non_blocking=True)  # x_1 ~ q(x_1)
        y = training_labels(train_y[idx].to(device), cfg)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with common.autocast(device, cfg.bf16):
            loss = cfm_loss(net, x1, cfg.sigma_min, y, cfg.t_sampling)  # Eq. 23
        run.log(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update_parameters(model)
    return {**run.trained, "images": len(train_x), "global_batch": cfg.batch_size * run.world_size}


# -- evaluation (rank 0 only) ----------------------------------------------------------------


def target_labels(n: int, w: float, device):
    """Labels 0, 1, ..., 9, 0, ... for guided samples (w > 0), None for unconditional ones."""
    return torch.arange(n, device=device) % NUM_CLASSES if w > 0 else None


def solve(v, x, solver, nfe, tol, record=None):
    """One batch from x_0 with the named solver: (x_1, NFE)."""
    if solver == "rk45":
        return sample_rk45(v, x, tol, tol, record)
    if solver == "euler":
        return sample_euler(v, x, nfe, record), nfe
    return sample_midpoint(v, x, nfe // 2, record), nfe


def draw(nets, row: dict, cfg, device, seed, keep=0):
    """row["n"] samples of row["solver"] at row["nfe"] and guidance row["w"] in batches, x_0 from
    one generator seeded `seed`; nets = (bf16-or-fp32 net, fp32 net for RK45). Returns (samples,
    [(t, x_t[:keep])] of the first batch, metrics entry)."""
    gen, n, w = torch.Generator(device).manual_seed(seed), row["n"], row["w"]
    net = nets[1] if row["solver"] == "rk45" else nets[0]
    labels, out, frames, nfes, t0 = target_labels(n, w, device), [], [], [], time.perf_counter()
    bar = tqdm(desc=f"{row['solver']} NFE {row['nfe'] or 'adaptive'} w={w:g}", leave=False,
               disable=None, mininterval=1)
    for i in range(0, n, cfg.sample_batch):
        x = torch.randn((min(cfg.sample_batch, n - i), 1, 28, 28), generator=gen, device=device)
        y = None if labels is None else labels[i:i + len(x)]
        if keep and i == 0:
            frames.append((0.0, x[:keep].cpu()))

        def record(t, xt, first=i == 0):
            bar.update(1)
            if keep and first:
                frames.append((t, xt[:keep].cpu()))

        v = lambda xt, t, y=y: guided_velocity(net, xt, t, y, w)
        x, nfe = solve(v, x, row["solver"], row["nfe"], cfg.ode_tol, record)
        out.append(x.cpu())
        nfes.append(nfe)
    bar.close()
    secs = time.perf_counter() - t0
    nfe = float(np.mean(nfes)) * (2 if 0 < w != 1 else 1)
    return torch.cat(out).clamp(-1, 1), frames, {**row, "nfe": nfe, "wall_s": secs,
                                                 "samples_per_s": n / secs}


def judged(samples, info, cfg, args, labels=None):
    """info with the digit judge's verdict (and the share on target of the labels asked for)."""
    if not cfg.judge:
        return info
    j = judge.judge_samples(samples, cfg.dataset, args.data_dir, seed=args.seed, quiet=True,
                            labels=labels)
    print(f"{info['solver']} NFE {info['nfe']:g} w={info['w']:g}: {judge.judge_line(j)}")
    return {**info, "judge": j}


def likelihood(cfg, net, data_dir, device, seed) -> dict:
    """Bits/dim of the first cfg.lik_images test images (dequantised as 06), and lik_repeats
    more estimates of the first image: the estimator's own spread."""
    t0, gen = time.perf_counter(), torch.Generator(device).manual_seed(seed)
    pix = load_data(cfg.dataset, data_dir, train=False)[0][:cfg.lik_images]
    batch = torch.cat([pix, pix[:1].expand(cfg.lik_repeats, -1, -1, -1)]).to(device)
    v = lambda x, t: net(x, t)  # the unconditional velocity
    logp, _, nfe = ode_log_likelihood(v, dequantize(batch, gen), cfg.lik_tol, cfg.lik_tol, gen)
    bpd = bits_per_dim(logp, 28 * 28).double().cpu()
    img, rep = bpd[:len(pix)], bpd[len(pix):]
    lk = {"bpd_mean": float(img.mean()), "n_images": len(img), "nfe": nfe,
          "bpd_se": float(img.std() / math.sqrt(len(img))) if len(img) > 1 else None,
          "estimator_std_one_image": float(rep.std()) if len(rep) > 1 else None,
          "rtol_atol": cfg.lik_tol, "wall_s": time.perf_counter() - t0}
    print(f"bits/dim on {len(img)} test images: {lk['bpd_mean']:.3f}; NFE {nfe}")
    return lk


def evaluate(args, cfg, ema, device) -> tuple[dict, dict]:
    """The final samples, the NFE table, the guidance table and bits/dim: (metrics, figures)."""
    nets = (common.network_fn(ema, device, cfg.bf16), common.network_fn(ema, device, False))
    final = dict(solver=cfg.solver, nfe=cfg.nfe, n=cfg.n_samples, w=cfg.guidance)
    samples, frames, info = draw(nets, final, cfg, device, args.seed * 1000 + 1, keep=8)
    info = judged(samples, info, cfg, args, target_labels(cfg.n_samples, cfg.guidance, "cpu"))
    metrics = {"samples": {k: v for k, v in info.items() if k != "judge"}}
    if "judge" in info:
        metrics["judge"] = info["judge"]
    table, rows = [], []
    for solver, nfe in cfg.table:
        row = dict(solver=solver, nfe=nfe, n=cfg.table_n, w=cfg.guidance)
        x, _, info = draw(nets, row, cfg, device, args.seed + 99)
        table.append(judged(x, info, cfg, args, target_labels(len(x), cfg.guidance, "cpu")))
        rows.append(x[:10])
    guided = []
    for w in cfg.guide_ws if cfg.p_uncond < 1 else ():
        row = dict(solver=cfg.solver, nfe=cfg.nfe, n=cfg.guide_n, w=float(w))
        x, _, info = draw(nets, row, cfg, device, args.seed + 7)
        labels = target_labels(len(x), 1.0, "cpu")  # asked for, even at w = 0 (chance: ~10%)
        guided.append((judged(x, info, cfg, args, labels), x))
    metrics.update(nfe_table=table, guidance=[g for g, _ in guided])
    if cfg.lik_images > 0:
        metrics["likelihood"] = likelihood(cfg, nets[1], args.data_dir, device, args.seed)
    return metrics, dict(samples=samples, frames=frames, table=(table, rows), guided=guided)


# -- figures ---------------------------------------------------------------------------------


def score_text(info: dict) -> str:
    j = info.get("judge")
    if j is None:
        return ""
    fid = "n/a" if j["fid"] is None else f"{j['fid']:.1f}"
    target = f", on target {j['on_target']:.0%}" if "on_target" in j else ""
    return f"FID {fid}, confident {j['confident']:.0%}{target}"


def plot_nfe_table(table, rows, path):
    """One row of 10 samples per (solver, NFE), all from the same x_0, with the judge's numbers."""
    from torchvision.utils import make_grid

    plt = common.pyplot()
    fig, axes = plt.subplots(len(rows), 1, figsize=(6, 0.9 * len(rows) + 0.3), squeeze=False)
    for ax, info, x in zip(axes[:, 0], table, rows):
        ax.imshow(make_grid((x + 1) / 2, nrow=10, pad_value=1).permute(1, 2, 0).numpy())
        ax.axis("off")
        ax.set_title(f"{info['solver']}, NFE {info['nfe']:g}   {score_text(info)}", fontsize=7,
                     loc="left")
    common.save_figure(fig, path)


def plot_guidance(guided, path, per_digit=4):
    """A row per digit 0-9 and a panel per w: the labels asked for, and what guidance makes."""
    from torchvision.utils import make_grid

    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(guided), figsize=(2.3 * len(guided), 3.2), squeeze=False)
    for ax, (info, x) in zip(axes[0], guided):
        per = min(per_digit, len(x) // NUM_CLASSES)
        pick = torch.stack([x[d::NUM_CLASSES][:per] for d in range(NUM_CLASSES)])
        grid = make_grid((pick.flatten(0, 1) + 1) / 2, nrow=per, pad_value=1)
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_title(f"w = {info['w']:g}\n{score_text(info).replace(', on', chr(10) + 'on')}",
                     fontsize=7)
        ax.axis("off")
    common.save_figure(fig, path)


def figures(out, losses, samples, frames, table, guided) -> None:
    if losses:
        common.plot_loss(losses, out / "loss.png", title="L_CFM (Eq. 23)")
    torch.save(samples, out / "samples.pt")
    common.save_image_grid(samples[:100], out / "samples.png", nrow=10)
    pick = [frames[round(i * (len(frames) - 1) / 8)][1] for i in range(9)]  # t = 0 ... 1
    common.save_image_grid(torch.stack(pick, 1).flatten(0, 1), out / "trajectory.png", nrow=9)
    shown = frames + [frames[-1]] * 4  # hold x_1 at the end
    common.gif_images(out / "flow.gif", [f for _, f in shown], [f"t = {t:.2f}" for t, _ in shown],
                      nrow=4, fps=4)
    plot_nfe_table(*table, out / "nfe.png")
    if guided:
        plot_guidance(guided, out / "guidance.png")


def main(argv=None) -> dict:
    run = common.Run(argv, __doc__, Config, PRESETS, FREE, STEM, image=True)
    cfg, device, wall0 = run.cfg, run.device, time.perf_counter()
    model = build_model(cfg).to(device)
    ema = common.make_ema(model, cfg.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    run.restore(model=model, ema=ema, optimizer=opt)
    metrics = {"params": common.count_params(model), "world_size": run.world_size}
    if run.trains:
        train_x, train_y = load_data(cfg.dataset, run.args.data_dir, train=True)

        def probe(net):  # a training step's loss, for the --minutes budget
            x1, y = to_model_space(train_x[:cfg.batch_size]).to(device), train_y[:cfg.batch_size]
            with common.autocast(device, cfg.bf16):
                return cfm_loss(net, x1, cfg.sigma_min, training_labels(y.to(device), cfg))

        run.budget(probe, model, opt)
        metrics["train"] = train(run, model, ema, opt, train_x, train_y)
    if not run.finish():
        return {}
    evaluation, shown = evaluate(run.args, cfg, ema, device)
    metrics.update(evaluation)
    figures(run.out, run.losses, **shown)
    metrics["wall_s_total"] = time.perf_counter() - wall0
    common.write_json(run.out / "metrics.json", metrics)
    print(f"{len(shown['samples'])} samples in {run.out}; {metrics['wall_s_total']:.0f} s in all")
    return metrics


if __name__ == "__main__":
    common.cli_entry(main)
