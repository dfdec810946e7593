"""06 -- Score-Based Generative Modeling through Stochastic Differential Equations
(Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole, ICLR 2021), arXiv:2011.13456.

Data are turned into noise by a forward SDE dx = f(x, t) dt + g(t) dw (Eq. 5) and turned back
by the reverse-time SDE (Eq. 6), which needs only the score grad_x log p_t(x). One network
s(x, t) learns that score for all t in [eps, 1] by continuous-time denoising score matching
(Eq. 7). This script shows, on MNIST:
  - the three SDEs of the paper, VE (Eq. 9), VP (Eq. 11) and sub-VP (Eq. 12), each with its
    perturbation kernel p_0t (Eq. 29), prior and prior log-density;
  - four samplers on the same network: Euler-Maruyama, the reverse-diffusion predictor, the
    predictor-corrector sampler with Langevin correction (Algorithms 1-5) and the probability
    flow ODE (Eq. 13) solved by scipy's RK45, with the number of function evaluations (NFE);
  - exact log-likelihoods in bits/dim through the probability flow ODE with the
    Skilling-Hutchinson trace estimator (Appendix D.2).

Run:    python 06_sde_mnist.py --preset cpu            (--sde ve|vp|subvp, --help for all flags)
Writes: runs/06_sde_mnist/{config.json, ckpt.pt, samples.png, samples.pt, samplers.png,
        trajectories.png, reverse.gif, marginals.png, loss.png, metrics.json}
Time:   --preset cpu about 14 minutes on 2 CPU cores: 10 minutes of training (the step count
        fitted to the CPU at the start), then sampling and likelihoods; --preset gpu follows
        the paper for 200k of its 1.3M steps on one GPU.
Scale:  torchrun --nproc_per_node N 06_sde_mnist.py ... (--batch-size is per process).
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

# -- config ---------------------------------------------------------------------------------


@dataclass
class Config:
    """The paper's values (DDPM++ settings of Appendix H, scaled to 28x28 where it is a model
    size); the presets below hold what differs."""

    sde: Literal["ve", "vp", "subvp"] = "vp"  # the forward SDE (Eq. 9, 11, 12)
    sigma_min: float = 0.01  # VE: sigma(0)
    # VE: sigma(1); 0 = the paper's rule: the largest pairwise distance of training images
    sigma_max: float = 0.0
    beta_min: float = 0.1  # VP / sub-VP: beta(0)
    beta_max: float = 20.0  # VP / sub-VP: beta(1)
    train_eps: float = 1e-5  # t ~ U(eps, 1) in Eq. 7 (paper and reference code, all SDEs)
    # model: common.UNet with Gaussian Fourier features of t. Paper (DDPM++, CIFAR-10 32x32):
    # 128 channels, multipliers 1,2,2,2, 4 ResBlocks, attention at 16x16, dropout 0.1
    base: int = 64  # U-Net width at 28x28
    mults: tuple = (1, 2, 2)  # width multiplier per resolution (28, 14, 7)
    num_res_blocks: int | tuple = 2  # ResBlocks per level (a number, or one per level)
    attn_levels: tuple = (1,)  # levels with self-attention (1: 14x14)
    dropout: float = 0.1  # dropout in the ResBlocks
    fourier_scale: float = 16.0  # std of the random frequencies of t
    embed_dim: int = 64  # random Fourier features of t (half as many frequencies)
    # training
    steps: int = 1_300_000  # training steps (with --resume: extend the run to this many)
    # > 0: train for about this many minutes, the step count measured at the start and then
    # fixed; 0: exactly `steps`
    minutes: float = 0.0
    batch_size: int = 128  # per process; under torchrun the global batch is world size x this
    lr: float = 2e-4  # peak Adam learning rate
    warmup: int = 5000  # steps of linear learning-rate warm-up
    # cosine decay of the lr to 0 after warm-up (with --resume --steps N the cosine then spans
    # the new total); paper: constant
    lr_decay: bool = False
    grad_clip: float = 1.0  # gradient-norm clipping
    ema_decay: float = 0.9999  # EMA of the weights; paper: 0.9999 for VP and sub-VP, 0.999 VE
    bf16: bool = False  # bf16 autocast for training and the SDE samplers (ODE in fp32)
    channels_last: bool = False  # channels_last memory format for the network
    compile: bool = False  # torch.compile the network for training
    ckpt_every: int = 500  # steps between checkpoints (and at least every 2 minutes)
    # sampling
    sampler: Literal["em", "rd", "pc", "ode"] = "pc"  # the sampler that writes samples.pt
    n_samples: int = 50_000  # final samples (paper: 50k for FID)
    n_compare: int = 500  # samples of each of the other samplers in the comparison
    sample_batch: int = 1000  # the SDE samplers run in batches of this many
    # N of Euler-Maruyama / reverse diffusion / PC (Table 1: PC1000 = 1000 predictor + 1000
    # corrector steps)
    n_steps: int = 1000
    snr: float = 0.16  # signal-to-noise ratio r of the Langevin corrector (Algorithms 4-5)
    ode_tol: float = 1e-5  # rtol = atol of RK45 for sampling with the probability flow ODE
    # likelihood
    lik_images: int = 10_000  # test images for bits/dim (0 skips; paper: the whole test set)
    lik_repeats: int = 8  # extra estimates of the first image: the estimator's own spread
    lik_tol: float = 1e-5  # rtol = atol of RK45 for the likelihood
    lik_eps: float = 1e-5  # the likelihood ODE starts at t = eps
    judge: bool = True  # FID and confident share of every sampler's samples (judge.py)

    def __post_init__(self):
        for name in ("steps batch_size ckpt_every n_samples n_compare sample_batch n_steps lr "
                     "grad_clip snr ode_tol lik_tol sigma_min train_eps lik_eps").split():
            common.check(getattr(self, name) > 0, name, "> 0")
        for name in ("train_eps", "lik_eps", "ema_decay"):
            common.check(getattr(self, name) < 1, name, "below 1")
        common.check_unet(self)
        common.check(self.embed_dim >= 2 and self.embed_dim % 2 == 0, "embed_dim", "even, >= 2")
        common.check(self.beta_max > self.beta_min, "beta_max", f"above --beta-min {self.beta_min}")
        common.check(self.sigma_max == 0 or self.sigma_max > self.sigma_min, "sigma_max",
                     f"0 (the largest pairwise distance) or above --sigma-min {self.sigma_min}")


PRESETS = {
    "smoke": dict(base=8, mults=(1, 2), num_res_blocks=1, attn_levels=(), dropout=0.0, steps=4,
                  batch_size=8, lr=2e-3, warmup=2, lr_decay=True, ema_decay=0.999, sampler="em",
                  n_samples=8, n_compare=8, sample_batch=4, n_steps=4, ode_tol=0.1,
                  lik_images=2, lik_repeats=2, lik_tol=0.1),
    # 10 minutes of training (1,000-1,300 fp32 steps on 2-core AVX2 EPYCs; with bf16 kernels about
    # 2,350), then ~4 minutes of sampling and likelihoods. A narrow U-Net with the extra depth
    # at 7x7, batch 64 and a 10x larger, cosine-decayed lr: short CPU runs gain more from steps
    # than from batch. Euler-Maruyama writes samples.pt (half the NFE of PC at equal N).
    "cpu": dict(base=16, mults=(1, 2, 4), num_res_blocks=(1, 1, 2), attn_levels=(2,),
                dropout=0.0, minutes=10.0, batch_size=64, lr=2e-3, warmup=100, lr_decay=True,
                ema_decay=0.999, bf16=True, sampler="em", n_samples=500, n_compare=50,
                sample_batch=100, n_steps=100, ode_tol=1e-3, lik_images=32, lik_tol=1e-4),
    "gpu": dict(steps=200_000, bf16=True, n_samples=10_000, lik_images=1000),
}
# what a resumed run may change: what happens after training, and how to run
FREE = ("bf16", "channels_last", "compile", "ckpt_every", "sampler", "n_samples", "n_compare",
        "sample_batch", "n_steps", "snr", "ode_tol", "lik_images", "lik_repeats", "lik_tol",
        "lik_eps", "judge")
STEM = "06_sde_mnist"
# Sampling ends at t = eps (then one Tweedie denoising step): paper and reference code.
SAMPLE_EPS = {"ve": 1e-5, "vp": 1e-3, "subvp": 1e-3}

# -- data -----------------------------------------------------------------------------------


def load_mnist(root, train: bool) -> torch.Tensor:
    """All MNIST images of a split as uint8 (N, 1, 28, 28); torchvision reads or downloads them."""
    data = common.torchvision_dataset("mnist", root, train, transform=None).data
    return data[:, None].contiguous()


def to_model_space(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0  # [0, 255] -> [-1, 1]


def dequantize(pixels: torch.Tensor, generator=None) -> torch.Tensor:
    """Uniform dequantisation: (k + U) / 256 in [0, 1], then mapped to [-1, 1]."""
    u = (pixels.float() + torch.rand(pixels.shape, generator=generator, device=pixels.device)) / 256
    return 2.0 * u - 1.0


def largest_pairwise_distance(x: torch.Tensor, max_n: int = 10_000) -> float:
    """sigma_max by Song & Ermon 2020, Technique 1: max_ij ||x_i - x_j||, on max_n images."""
    flat = x[:max_n].flatten(1)
    return max(float(torch.cdist(flat[i:i + 1000], flat).max()) for i in range(0, len(flat), 1000))


# -- the method: SDEs, loss, samplers, likelihood -------------------------------------------


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample vector (B,) shaped to broadcast against x (B, ...)."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


class SDE:
    """dx = f(x, t) dt + g(t) dw on t in [0, T=1] (Eq. 5), with a Gaussian kernel
    p_0t(x(t) | x(0)) = N(m(t) x(0), std(t)^2 I) (Eq. 29) and the prior p_T = N(0, prior_std^2 I).

    A subclass provides sde(x, t), mean_coeff(t), std(t) and the attribute prior_std. It may
    replace discretize (its own chain of Eq. 45 for the reverse-diffusion predictor; default
    Euler-Maruyama) and corrector_alpha (alpha_i of the Langevin corrector; default 1)."""

    T = 1.0
    prior_std: float  # p_T = N(0, prior_std^2 I)

    def sde(self, x, t):
        """Drift f(x, t) (shaped like x) and diffusion g(t) (shape (B,)) of Eq. 5."""
        raise NotImplementedError

    def mean_coeff(self, t):
        """m(t) of the kernel p_0t (Eq. 29), shape (B,)."""
        raise NotImplementedError

    def std(self, t):
        """std(t) of the kernel p_0t (Eq. 29), shape (B,)."""
        raise NotImplementedError

    def marginal_prob(self, x0, t):
        """Mean and std of p_0t(x(t) | x(0)) (Eq. 29)."""
        return bcast(self.mean_coeff(t), x0) * x0, self.std(t)

    def prior_sampling(self, shape, generator=None, device=None):
        """x(T) ~ N(0, prior_std^2 I); a generator must live on `device`."""
        return self.prior_std * torch.randn(shape, generator=generator, device=device)

    def prior_logp(self, z):
        """log N(z; 0, prior_std^2 I), summed over all but the batch dimension."""
        d = z[0].numel()
        var = self.prior_std**2
        return -0.5 * d * math.log(2 * math.pi * var) - z.flatten(1).pow(2).sum(1) / (2 * var)

    def discretize(self, x, t, dt):
        """x_{i+1} = x_i + f_i(x_i) + G_i z_i (Eq. 45); Euler-Maruyama by default."""
        drift, g = self.sde(x, t)
        return drift * dt, g * math.sqrt(dt)

    def corrector_alpha(self, t, dt):
        """alpha_i of the Langevin step size (Algorithms 4-5); 1 unless a subclass knows better."""
        return torch.ones_like(t)


class VESDE(SDE):
    """Variance exploding: sigma(t) = sigma_min (sigma_max / sigma_min)^t,
    dx = sqrt(d sigma^2 / dt) dw (Eq. 9, 30)."""

    def __init__(self, sigma_min, sigma_max):
        self.sigma_min, self.sigma_max, self.prior_std = sigma_min, sigma_max, sigma_max

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x, t):
        rate = math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))
        return torch.zeros_like(x), self.sigma(t) * rate

    def mean_coeff(self, t):
        return torch.ones_like(t)

    def std(self, t):
        # Eq. 29 with sigma(0)^2 neglected, as in the paper: x(0) is data + N(0, sigma_min^2)
        return self.sigma(t)

    def discretize(self, x, t, dt):
        """The SMLD chain (Eq. 8 = Eq. 20) in the form of Eq. 45: f_i = 0,
        G_i = sqrt(sigma_i^2 - sigma_{i-1}^2)."""
        G = (self.sigma(t) ** 2 - self.sigma(t - dt) ** 2).clamp_min(0).sqrt()
        return torch.zeros_like(x), G


class LinearBetaSDE(SDE):
    """What VP and sub-VP share: beta(t) linear in t (Eq. 32), the drift -beta(t) x / 2 and
    m(t) = exp(-1/2 int_0^t beta) (Eq. 29); prior N(0, I)."""

    prior_std = 1.0

    def __init__(self, beta_min, beta_max):
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t):
        # log m(t) = -1/2 int_0^t beta(s) ds
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def drift(self, x, t):
        return -0.5 * bcast(self.beta(t), x) * x

    def mean_coeff(self, t):
        return self.log_mean_coeff(t).exp()


class VPSDE(LinearBetaSDE):
    """Variance preserving: dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw (Eq. 11, 32)."""

    def sde(self, x, t):
        return self.drift(x, t), self.beta(t).sqrt()

    def std(self, t):
        return (-torch.expm1(2 * self.log_mean_coeff(t))).sqrt()  # Eq. 29: 1 - e^{-int beta}

    def discrete_beta(self, t, dt):
        """beta_i = 1 - m(t)^2 / m(t - dt)^2, so that the chain matches the marginals for any N;
        it is beta(t) dt (the reference code's beta_i) for large N."""
        return -torch.expm1(2 * (self.log_mean_coeff(t) - self.log_mean_coeff(t - dt)))

    def discretize(self, x, t, dt):
        """The DDPM chain (Eq. 10 = Eq. 22) in the form of Eq. 45:
        x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z."""
        b = self.discrete_beta(t, dt)
        return (bcast((1 - b).sqrt(), x) - 1) * x, b.sqrt()

    def corrector_alpha(self, t, dt):
        return 1 - self.discrete_beta(t, dt)  # alpha_i of Algorithm 5


class SubVPSDE(LinearBetaSDE):
    """sub-VP: the VP drift with diffusion sqrt(beta(t) (1 - e^{-2 int_0^t beta})) (Eq. 12);
    its variance is below the VP one at every t, which helps likelihoods. It keeps the base
    class's Euler-Maruyama discretize, as the reference code, and alpha_i = 1 in the Langevin
    step size: Algorithm 5's alpha_i = 1 - beta_i is given for VP only, the paper states no
    sub-VP rule, alpha_i -> 1 as N grows, and r sets the step size in any case."""

    def sde(self, x, t):
        return self.drift(x, t), (self.beta(t) * -torch.expm1(4 * self.log_mean_coeff(t))).sqrt()

    def std(self, t):
        return -torch.expm1(2 * self.log_mean_coeff(t))  # Eq. 29: std = 1 - e^{-int beta}


def make_sde(cfg: Config) -> SDE:
    if cfg.sde == "ve":
        return VESDE(cfg.sigma_min, cfg.sigma_max)
    return (VPSDE if cfg.sde == "vp" else SubVPSDE)(cfg.beta_min, cfg.beta_max)


def score_model(net, sde: SDE):
    """s(x, t) = net(x, t) / std(t): the network predicts -z, so the loss of Eq. 7 is
    || net + z ||^2 (the reference code's parameterisation)."""
    return lambda x, t: net(x, t) / bcast(sde.std(t), x)


def dsm_loss(score_fn, sde: SDE, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """Continuous-time denoising score matching, Eq. 7 with lambda(t) = std(t)^2:
    E_t E_x0 E_z || std(t) s(m x0 + std z, t) + z ||^2 (mean over pixels), t ~ U(eps, 1)."""
    t = eps + (sde.T - eps) * torch.rand(x0.shape[0], device=x0.device)
    z = torch.randn_like(x0)
    mean, std = sde.marginal_prob(x0, t)
    score = score_fn(mean + bcast(std, x0) * z, t)
    return (score.float() * bcast(std, x0) + z).pow(2).mean()


def reverse_drift(score_fn, sde: SDE, x, t, probability_flow=False):
    """Drift of the reverse-time SDE f - g^2 s (Eq. 6), or of the probability flow ODE
    f - g^2 s / 2 (Eq. 13)."""
    drift, g = sde.sde(x, t)
    return drift - bcast(g**2, x) * score_fn(x, t) * (0.5 if probability_flow else 1.0), g


def euler_maruyama_step(score_fn, sde, x, t, dt, generator=None):
    """One step of the reverse SDE (Eq. 6) from t to t - dt:
    x <- x - [f - g^2 s] dt + g sqrt(dt) z."""
    drift, g = reverse_drift(score_fn, sde, x, t)
    x_mean = x - drift * dt
    return x_mean + bcast(g, x) * math.sqrt(dt) * torch.randn(x.shape, generator=generator,
                                                              device=x.device)


def reverse_diffusion_step(score_fn, sde, x, t, dt, generator=None):
    """Reverse-diffusion predictor (Appendix E, Eq. 46):
    x_i = x_{i+1} - f_{i+1} + G_{i+1} G_{i+1}^T s + G_{i+1} z."""
    f, G = sde.discretize(x, t, dt)
    x_mean = x - f + bcast(G**2, x) * score_fn(x, t)
    return x_mean + bcast(G, x) * torch.randn(x.shape, generator=generator, device=x.device)


def langevin_corrector(score_fn, sde, x, t, dt, snr, generator=None):
    """One Langevin step with step size 2 alpha (r ||z|| / ||s||)^2 (Algorithms 4-5; norms
    averaged over the batch as in the reference code)."""
    s = score_fn(x, t)
    z = torch.randn(x.shape, generator=generator, device=x.device)
    ratio = z.flatten(1).norm(dim=1).mean() / s.flatten(1).norm(dim=1).mean()
    step = bcast(2 * sde.corrector_alpha(t, dt) * (snr * ratio) ** 2, x)
    return x + step * s + (2 * step).sqrt() * z


def tweedie_denoise(score_fn, sde, x, t):
    """E[x(0) | x(t)] = (x + std^2 s(x, t)) / m(t) (Tweedie's formula): removes the noise left
    at t = eps."""
    std = bcast(sde.std(t), x)
    return (x + std**2 * score_fn(x, t)) / bcast(sde.mean_coeff(t), x)


@torch.no_grad()
def sample_sde(score_fn, sde, x, n_steps, eps, predictor="em", snr=None, generator=None,
               record=None):
    """Predictor-corrector sampling (Algorithm 1) from x = x(T): N predictor steps from T to
    eps ("em": Euler-Maruyama, "rd": reverse diffusion), each followed by one Langevin corrector
    step when snr is given, then Tweedie denoising at eps. Returns x and the NFE; record(t, x),
    if given, sees x(T) and x after every step."""
    step = {"em": euler_maruyama_step, "rd": reverse_diffusion_step}[predictor]
    ts, dt = torch.linspace(sde.T, eps, n_steps + 1, device=x.device), (sde.T - eps) / n_steps
    for i in range(n_steps):
        t = ts[i].expand(x.shape[0])
        if record is not None:
            record(float(ts[i]), x)
        x = step(score_fn, sde, x, t, dt, generator)
        if snr:
            x = langevin_corrector(score_fn, sde, x, t - dt, dt, snr, generator)
    if record is not None:
        record(float(ts[-1]), x)
    x = tweedie_denoise(score_fn, sde, x, ts[-1].expand(x.shape[0]))
    return x, n_steps * (2 if snr else 1) + 1


@torch.no_grad()
def sample_ode(score_fn, sde, x, eps, rtol, atol, record=None):
    """Probability flow ODE dx/dt = f - g^2 s / 2 (Eq. 13) from x = x(T) to eps by RK45 (scipy's
    solve_ivp, on the CPU), then Tweedie denoising. Returns x and the NFE (solver evaluations
    + 1); record(t, x), if given, sees the points at every step the solver accepted."""

    def rhs(t, y):
        xt = torch.from_numpy(y).reshape(x.shape).to(x)
        drift, _ = reverse_drift(score_fn, sde, xt, torch.full((x.shape[0],), t, device=x.device),
                                 probability_flow=True)
        return drift.double().flatten().cpu().numpy()

    y0 = x.double().flatten().cpu().numpy()
    sol = integrate.solve_ivp(rhs, (sde.T, eps), y0, method="RK45", rtol=rtol, atol=atol)
    if record is not None:
        for t, y in zip(sol.t, sol.y.T):
            record(float(t), torch.from_numpy(y).reshape(x.shape).to(x))
    x = torch.from_numpy(sol.y[:, -1]).reshape(x.shape).to(x)
    x = tweedie_denoise(score_fn, sde, x, torch.full((x.shape[0],), eps, device=x.device))
    return x, sol.nfev + 1


def hutchinson_divergence(fn, x, noise):
    """Skilling-Hutchinson estimate of div fn(x) = E_v[v^T (d fn / dx) v] with E[v v^T] = I, one
    vector-Jacobian product per sample. Returns fn(x) and the estimate, shape (B,)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x)
        (vjp,) = torch.autograd.grad((out * noise).sum(), x)
    return out.detach(), (vjp * noise).flatten(1).sum(1)


def ode_log_likelihood(score_fn, sde, x, eps, rtol, atol, generator=None):
    """log p_0(x) = log p_T(x(T)) + int_eps^T div f~(x(t), t) dt, with f~ the probability flow
    drift (Eq. 13) and the instantaneous change of variables (Appendix D.2), integrated forward by
    RK45 (on the CPU) with one Rademacher probe per sample (drawn on x's device). Returns log p
    (nats, shape (B,)), x(T) and NFE."""
    shape, b = x.shape, x.shape[0]
    noise = torch.randint(0, 2, shape, generator=generator, device=x.device).float() * 2 - 1

    def rhs(t, y):
        xt = torch.from_numpy(y[:-b]).reshape(shape).to(x)
        tt = torch.full((b,), t, device=x.device)
        drift_fn = lambda z: reverse_drift(score_fn, sde, z, tt, probability_flow=True)[0]
        drift, div = hutchinson_divergence(drift_fn, xt, noise)
        return np.concatenate([drift.double().flatten().cpu().numpy(), div.double().cpu().numpy()])

    y0 = np.concatenate([x.double().flatten().cpu().numpy(), np.zeros(b)])
    sol = integrate.solve_ivp(rhs, (eps, sde.T), y0, method="RK45", rtol=rtol, atol=atol)
    z = torch.from_numpy(sol.y[:-b, -1]).reshape(shape).to(x)
    delta = torch.from_numpy(sol.y[-b:, -1]).to(x)
    return sde.prior_logp(z) + delta, z, sol.nfev


def bits_per_dim(logp_x: torch.Tensor, dims: int) -> torch.Tensor:
    """Bits/dim of 8-bit data from the density of dequantised x = 2 (k + U) / 256 - 1: the map to
    [0, 1] adds log 2 per dim, the 256 bins add 8 bits."""
    return -logp_x / (dims * math.log(2)) + 7.0


# -- model (assembled from common.py) -------------------------------------------------------


def build_model(cfg: Config) -> torch.nn.Module:
    """U-Net with Gaussian Fourier features of t; score_model divides its output by std(t)."""
    net = common.UNet(1, cfg.base, cfg.mults, cfg.num_res_blocks, cfg.attn_levels, cfg.dropout,
                      "fourier", cfg.fourier_scale, embed_dim=cfg.embed_dim)
    return net.to(memory_format=torch.channels_last) if cfg.channels_last else net


# -- training -------------------------------------------------------------------------------


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up, times a cosine decay to 0 over cfg.steps (short runs) or 1 (paper:
    constant). With --resume --steps N the cosine then spans the new total."""
    decay = 0.5 * (1 + math.cos(math.pi * step / cfg.steps)) if cfg.lr_decay else 1.0
    return cfg.lr * (min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0) * decay


def train(run, model, ema, opt, sde, pixels) -> dict:
    """The paper's training (Appendix H): Eq. 7 by Adam with linear warm-up (then cosine decay
    when lr_decay), gradient clipping and an EMA of the weights, from the run's step to cfg.steps
    (run.log checks each loss and checkpoints when due)."""
    cfg, device = run.cfg, run.device
    score_fn = score_model(run.ddp(torch.compile(model) if cfg.compile else model), sde)
    batches = run.batches(len(pixels), cfg.batch_size)
    for step in run.steps(every=cfg.ckpt_every):
        x0 = to_model_space(pixels[next(batches)]).to(device)  # x(0) ~ p_0 (1 channel: also
        # channels_last)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with common.autocast(device, cfg.bf16):
            loss = dsm_loss(score_fn, sde, x0, cfg.train_eps)  # t ~ U(eps, 1), z ~ N(0, I), Eq. 7
        run.log(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema.update_parameters(model)
    return run.trained


# -- evaluation (rank 0 only) ---------------------------------------------------------------

SAMPLER_NAMES = {"em": "Euler-Maruyama", "rd": "reverse diffusion",
                 "pc": "PC (rev. diff. + Langevin)", "ode": "probability flow ODE (RK45)"}


def run_sampler(name, run, sde, ema, gen, frames: list) -> tuple[torch.Tensor, dict]:
    """cfg.n_samples of cfg.sampler (frames gets (t, x[:6]) of its first batch), cfg.n_compare of
    another, from x(T) ~ prior with the EMA weights: the SDE samplers in batches of
    cfg.sample_batch (in bf16 if cfg.bf16), the ODE in fp32 as one system (RK45 picks its steps
    for the whole batch). Returns x and its metrics entry, judged if cfg.judge."""
    cfg, eps, device, t0 = run.cfg, SAMPLE_EPS[run.cfg.sde], gen.device, time.perf_counter()
    score = score_model(common.network_fn(ema, device, cfg.bf16 and name != "ode"), sde)
    n = cfg.n_samples if name == cfg.sampler else cfg.n_compare
    rec = (lambda t, x: frames.append((t, x[:6].cpu().clone()))) if name == cfg.sampler else None
    xs, batch = [], n if name == "ode" else cfg.sample_batch
    for i in tqdm(range(0, n, batch), desc=f"sample {name}", mininterval=2):
        x_T = sde.prior_sampling((min(batch, n - i), 1, 28, 28), gen, device)
        if name == "ode":  # one batch
            x, nfe = sample_ode(score, sde, x_T, eps, cfg.ode_tol, cfg.ode_tol, rec)
        else:
            x, nfe = sample_sde(score, sde, x_T, cfg.n_steps, eps, "em" if name == "em" else "rd",
                                cfg.snr if name == "pc" else None, gen, rec if i == 0 else None)
        xs.append(x.cpu())
    x, wall = torch.cat(xs), time.perf_counter() - t0
    print(f"{SAMPLER_NAMES[name]}: {n} samples, NFE {nfe}, {wall:.1f} s")
    entry = {"n": n, "nfe": nfe, "wall_s": wall, "samples_per_s": n / wall}
    if cfg.judge:
        entry["judge"] = judge.judge_samples(x.clamp(-1, 1), "mnist", run.args.data_dir, run.seed)
        print("  " + judge.judge_line(entry["judge"]))
    return x, entry


def likelihood(run, sde, ema) -> dict:
    """Bits/dim of the first cfg.lik_images test images through the probability flow ODE (EMA
    weights, fp32), and cfg.lik_repeats more estimates of the first image: the estimator's own
    spread."""
    cfg, t0, gen = run.cfg, time.perf_counter(), torch.Generator(run.device).manual_seed(run.seed)
    score_fn = score_model(common.network_fn(ema, run.device, False), sde)
    pix = load_mnist(run.args.data_dir, train=False)[:cfg.lik_images]
    batch = torch.cat([pix, pix[:1].expand(cfg.lik_repeats, -1, -1, -1)]).to(run.device)
    logp, _, nfe = ode_log_likelihood(score_fn, sde, dequantize(batch, gen), cfg.lik_eps,
                                      cfg.lik_tol, cfg.lik_tol, gen)
    img, rep = bits_per_dim(logp, 28 * 28).double().cpu().split([len(pix), cfg.lik_repeats])
    lk = {"bpd_mean": float(img.mean()), "bpd_std": float(img.std()),
          "bpd_se": float(img.std() / math.sqrt(len(img))), "n_images": len(img),
          "estimator_std_one_image": float(rep.std()) if len(rep) > 1 else None,
          "repeats": len(rep), "nfe": nfe, "rtol_atol": cfg.lik_tol, "eps": cfg.lik_eps,
          "wall_s": time.perf_counter() - t0}
    print(f"bits/dim on {len(img)} test images: {lk['bpd_mean']:.3f} +- {lk['bpd_se']:.3f} "
          f"(s.e.); NFE {nfe}, {lk['wall_s']:.0f} s")
    return lk


# -- figures --------------------------------------------------------------------------------


def plot_marginals(cfg, path):
    """std(t) of the three kernels p_0t (Eq. 29) and m(t) of VP and sub-VP, on log axes: near
    t = 0 sub-VP's std, about beta_min t, is far below VP's sqrt(beta_min t)."""
    t = torch.logspace(-4, 0, 200)
    ve = VESDE(cfg.sigma_min, cfg.sigma_max or 32.0)  # 32: the rule of thumb on MNIST in [-1, 1]
    vp = VPSDE(cfg.beta_min, cfg.beta_max)
    fig, ax = common.pyplot().subplots(figsize=(6.5, 4))
    for name, s in {"VE": ve, "VP": vp, "sub-VP": SubVPSDE(cfg.beta_min, cfg.beta_max)}.items():
        ax.loglog(t, s.std(t), label=f"{name} std(t)")
    ax.loglog(t, vp.mean_coeff(t), "k--", lw=1, label="m(t) of VP and sub-VP (VE: m = 1)")
    ax.set(xlabel="t", title=f"p_0t = N(m(t) x(0), std(t)^2 I); beta in [{cfg.beta_min}, "
           f"{cfg.beta_max}], sigma in [{cfg.sigma_min}, {ve.sigma_max:.1f}]")
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


def write_figures(run, samples, frames) -> None:
    """loss.png; samples.pt (and samples_<sampler>.pt), samples.png; samplers.png; trajectories.png
    and reverse.gif (x(T) .. x(eps) of a few samples, each frame scaled into [-1, 1], then the
    denoised x(0)); marginals.png."""
    cfg, out = run.cfg, run.out
    if run.losses:
        common.plot_loss(run.losses, out / "loss.png", title=f"Eq. 7 loss, {cfg.sde} SDE")
    for name, x in samples.items():
        torch.save(x.clamp(-1, 1), out / f"samples_{name}.pt")
    final = samples[cfg.sampler].clamp(-1, 1)
    torch.save(final, out / "samples.pt")
    common.save_image_grid(final[:100], out / "samples.png", nrow=10)
    k = min(10, cfg.n_samples, cfg.n_compare)  # a row per sampler, em rd pc ode, same x(T)
    common.save_image_grid(torch.cat([x[:k] for x in samples.values()]), out / "samplers.png", k)
    keep = np.linspace(0, len(frames) - 2, 12).round().astype(int)  # [-1]: x(eps), not shown
    shown = [frames[i] for i in sorted(set(keep))] + [(0.0, final[:len(frames[-1][1])])]
    scaled = torch.stack([x / max(1.0, x.abs().max().item()) for _, x in shown], 1)
    common.save_image_grid(scaled.flatten(0, 1), out / "trajectories.png", nrow=len(shown))
    titles = [f"t = {t:.3f}" if t > 0 else "denoised" for t, _ in shown]
    common.gif_images(out / "reverse.gif", [x for _, x in shown], titles, nrow=6, fps=3)
    plot_marginals(cfg, out / "marginals.png")


def main(argv=None) -> dict:
    run = common.Run(argv, __doc__, Config, PRESETS, FREE, STEM, image=True)
    cfg, device, wall0 = run.cfg, run.device, time.perf_counter()
    pixels = load_mnist(run.args.data_dir, train=True) if run.trains else None
    if cfg.sde == "ve" and cfg.sigma_max == 0:  # a new VE run: Song & Ermon 2020, Technique 1
        cfg.sigma_max = largest_pairwise_distance(to_model_space(pixels))
        common.check(cfg.sigma_max > cfg.sigma_min, "sigma_min", f"below {cfg.sigma_max:.2f}, "
                     "the largest pairwise distance of the training images")
        run.print(f"VE sigma_max = {cfg.sigma_max:.2f}, the largest distance of training images")
    sde = make_sde(cfg)
    with torch.random.fork_rng(devices=[]):  # the training noise does not depend on the init
        model = build_model(cfg).to(device)
    ema = common.make_ema(model, cfg.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    run.restore(model=model, ema=ema, optimizer=opt)
    metrics = {"preset": run.preset, "sde": cfg.sde, "params": common.count_params(model),
               **({"sigma_max": cfg.sigma_max} if cfg.sde == "ve" else {})}
    run.print(f"{cfg.sde} SDE, U-Net of {metrics['params'] / 1e6:.2f}M parameters, {run.preset} "
              f"preset, on {device}")
    if run.trains:
        x0 = to_model_space(pixels[:cfg.batch_size]).to(device)

        def probe(net):  # a training step's loss, for the --minutes budget
            with common.autocast(device, cfg.bf16):
                return dsm_loss(score_model(net, sde), sde, x0, cfg.train_eps)

        run.budget(probe, model, opt)
        metrics["train"] = train(run, model, ema, opt, sde, pixels)
    if not run.finish():
        return {}
    gen, samples, frames = torch.Generator(device).manual_seed(run.seed * 7919 + 1), {}, []
    metrics.update(samplers={}, sampler=cfg.sampler)
    for name in ["em", "rd", "pc", "ode"]:  # all x(T) and noise from gen; frames: of cfg.sampler
        samples[name], metrics["samplers"][name] = run_sampler(name, run, sde, ema, gen, frames)
    if cfg.judge:
        metrics["judge"] = metrics["samplers"][cfg.sampler]["judge"]
    if cfg.lik_images > 0:
        metrics["likelihood"] = likelihood(run, sde, ema)
    write_figures(run, samples, frames)
    metrics["wall_s_total"] = time.perf_counter() - wall0
    common.write_json(run.out / "metrics.json", metrics)
    print(f"wrote {run.out}/ in {metrics['wall_s_total']:.0f} s")
    return metrics


if __name__ == "__main__":
    common.cli_entry(main)
