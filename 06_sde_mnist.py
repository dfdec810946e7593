"""06 -- Score-Based Generative Modeling through Stochastic Differential Equations
(Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole, ICLR 2021), arXiv:2011.13456.

Data are turned into noise by a forward SDE dx = f(x, t) dt + g(t) dw (Eq. 5) and turned back by
the reverse-time SDE (Eq. 6), which needs only the score grad_x log p_t(x). One network s(x, t)
learns that score for all t in [eps, 1] by continuous-time denoising score matching (Eq. 7).
This script shows, on MNIST:
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
Time:   --preset cpu 12.5-13 minutes end to end on 2 CPU cores (bf16 with AVX-512/AMX, else fp32 and fewer steps);
        --preset gpu follows the paper (1.3M steps would be days; see PRESETS) on one GPU.
Scale:  torchrun --nproc_per_node N 06_sde_mnist.py ... (--batch-size is per process).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy import integrate
from tqdm import tqdm

import common

STEM = "06_sde_mnist"

# -- config: presets + argparse ---------------------------------------------------------------


@dataclass
class Config:
    sde: str = "vp"  # paper: VE with NCSN++, VP and sub-VP with DDPM++ (CIFAR-10)
    sigma_min: float = 0.01  # VE; paper 0.01
    sigma_max: float = 0.0  # VE; 0 = the paper's rule: the largest pairwise distance of training images
    beta_min: float = 0.1  # VP / sub-VP; paper 0.1
    beta_max: float = 20.0  # VP / sub-VP; paper 20
    train_eps: float = 1e-5  # t ~ U(eps, 1) in Eq. 7; paper/reference 1e-5 for all SDEs
    # model: common.UNet with Gaussian Fourier features of t
    base: int = 16  # narrow at 28x28, where a convolution costs most
    mults: tuple = (1, 2, 4)
    num_res_blocks: int | tuple = (1, 1, 2)  # per level: the extra depth where a convolution is cheapest
    attn_levels: tuple = (2,)
    dropout: float = 0.0
    fourier_scale: float = 16.0  # paper 16
    embed_dim: int = 64  # number of random Fourier features of t (32 frequencies)
    # training
    steps: int = 2350
    batch_size: int = 64  # per process; paper 128. Short CPU runs gain more from steps than from batch
    lr: float = 2e-3  # paper 2e-4 (with 5000 warm-up steps)
    warmup: int = 100
    lr_decay: bool = True  # cosine decay to 0 after warm-up (a short run ends on small steps); paper: constant
    grad_clip: float = 1.0  # paper 1.0
    ckpt_every: int = 500  # steps between checkpoints (and at least every 2 minutes)
    # paper (App. H.1): 0.999 for VE (NCSN++), 0.9999 for VP and sub-VP (DDPM++); the gpu
    # preset uses 0.9999 whatever the SDE
    ema_decay: float = 0.999
    bf16: bool = True
    channels_last: bool = False
    compile: bool = False
    # sampling
    sampler: str = "em"  # the one that writes samples.pt; paper: PC (half the NFE per step here)
    n_samples: int = 500
    n_compare: int = 100  # samples per sampler in the comparison (the quality check uses as many)
    sample_batch: int = 100  # SDE samplers run in batches of this many (on a CPU, per image faster than 500 at once)
    # N of EM / reverse diffusion / PC; paper N = 1000 (Table 1 sets PC1000, 1000 predictor +
    # 1000 corrector steps, beside P2000 and C2000 at the same NFE)
    n_steps: int = 100
    snr: float = 0.16  # Langevin corrector signal-to-noise ratio r; paper 0.16 (VE, CIFAR-10)
    ode_tol: float = 1e-5  # rtol = atol of RK45 for sampling; paper 1e-5 (231 NFE here; 1e-3 takes 63 and
    # gave samples of the same quality on the cpu preset's network, see README)
    # likelihood
    lik_images: int = 32  # test images; paper: the whole CIFAR-10 test set
    lik_repeats: int = 8  # extra estimates of the first image: the estimator's own spread
    lik_tol: float = 1e-4  # rtol = atol of RK45 for the likelihood; paper 1e-5
    lik_eps: float = 1e-5  # the ODE starts at t = eps; paper 1e-5
    judge: bool = True  # FID and confident share of every sampler's samples by common's digit judge


# Sampling ends at t = eps (then one Tweedie denoising step): paper and reference code.
SAMPLE_EPS = {"ve": 1e-5, "vp": 1e-3, "subvp": 1e-3}
FIXED = ("sde", "batch_size", "lr", "preset")  # a resumed run keeps these; --steps may extend it

PRESETS = {
    "smoke": dict(base=8, mults=(1, 2), num_res_blocks=1, attn_levels=(), steps=4, batch_size=8, warmup=2, n_samples=8,
                  sample_batch=4, n_compare=8, n_steps=4, ode_tol=0.1, lik_images=2, lik_repeats=2, lik_tol=0.1,
                  bf16=False),
    # ~10 minutes of training on 2 cores, then ~2.5 minutes of sampling and likelihoods (see Config).
    "cpu": dict(),
    "gpu": dict(base=64, mults=(1, 2, 2), num_res_blocks=2, attn_levels=(1,), dropout=0.1, steps=200_000,
                batch_size=128, lr=2e-4, warmup=5000, lr_decay=False, ema_decay=0.9999, sampler="pc",
                n_samples=10_000, n_compare=500, sample_batch=1000, n_steps=1000, ode_tol=1e-5, lik_images=1000,
                lik_tol=1e-5),
}
# A CPU without bf16 kernels (AVX2 only) runs the cpu preset in fp32, where a training step costs 2.2x more
# on 2 cores and sampling 2-4x: fewer steps, half the samples for the other samplers and a looser ODE
# tolerance (same samples, see README) keep the run under 15 minutes
FP32 = {"cpu": dict(steps=1000, n_compare=50, ode_tol=1e-3)}


def parse_args(argv):
    p = common.base_parser(__doc__.split("\n\n")[0], STEM, image=True)
    p.add_argument("--sde", choices=["ve", "vp", "subvp"], help="the forward SDE (default: vp)")
    p.add_argument("--steps", type=common.positive_int,
                   help="training steps (with --resume: extend the run to this many; the cosine "
                   "lr decay then spans the new total)")
    p.add_argument("--batch-size", type=common.positive_int,
                   help="batch size PER PROCESS; under torchrun the global batch is world size x this")
    p.add_argument("--lr", type=common.positive_float, help="peak Adam learning rate")
    p.add_argument("--sampler", choices=["em", "rd", "pc", "ode"], help="sampler for samples.pt (cpu: em, gpu: pc)")
    p.add_argument("--n-samples", type=common.positive_int, help="number of final samples")
    p.add_argument("--n-steps", type=common.positive_int, help="discretisation steps N of em / rd / pc")
    p.add_argument("--snr", type=common.positive_float, help="signal-to-noise ratio of the Langevin corrector")
    p.add_argument("--ode-tol", type=common.positive_float, help="RK45 rtol = atol for ODE sampling")
    p.add_argument("--n-compare", type=common.positive_int,
                   help="samples of each of the other samplers in the comparison")
    p.add_argument("--lik-images", type=int, help="test images for bits/dim (0 skips the likelihood)")
    p.add_argument("--judge", action=argparse.BooleanOptionalAction, default=None,
                   help="judge every sampler's samples with the digit classifier (FID, confident share)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for training and the SDE samplers (the ODE runs in fp32)")
    p.add_argument("--channels-last", action="store_true", default=None, help="channels_last memory format")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the network for training")
    return p.parse_args(argv)


def make_config(args, device, quiet: bool = False) -> tuple[str, Config, dict | None]:
    """Preset, config and checkpoint: from the preset and flags, or for --resume and --sample-only
    from the checkpoint, with only the flags that keep its run."""
    flags = {"sde": args.sde, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
             "sampler": args.sampler, "n_samples": args.n_samples, "n_steps": args.n_steps, "snr": args.snr,
             "ode_tol": args.ode_tol, "lik_images": args.lik_images, "bf16": args.bf16,
             "n_compare": args.n_compare, "judge": args.judge,
             "channels_last": args.channels_last, "compile": args.compile}
    if args.lik_images is not None and args.lik_images < 0:
        raise common.UserError(f"--lik-images must be 0 or positive, got {args.lik_images}")
    if args.resume or args.sample_only:
        path = args.out / "ckpt.pt"
        ckpt = common.load_checkpoint(path, STEM)
        saved = {**ckpt["config"], "preset": ckpt["preset"], "seed": ckpt["seed"]}
        fixed = FIXED + (("seed",) if args.resume else ())
        given = {**flags, "preset": args.preset, "seed": args.seed}
        values = common.resume_config(saved, given, fixed, ckpt["step"], path, extend=args.resume)
        args.seed, preset = values.pop("seed"), values.pop("preset")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return preset, Config(**values), ckpt
    args.seed = 0 if args.seed is None else args.seed
    preset = common.resolve_preset(args.preset, device, quiet=quiet)
    values = {**asdict(Config()), **PRESETS[preset]}
    values = common.fit_preset(values, device, FP32.get(preset, {}), quiet)
    cfg = Config(**values)
    return preset, replace(cfg, **{k: v for k, v in flags.items() if v is not None}), None


# -- data -----------------------------------------------------------------------------------------


def load_mnist(root: Path, train: bool) -> torch.Tensor:
    """All MNIST images of a split as uint8 (N, 1, 28, 28); torchvision reads or downloads them."""
    return common.torchvision_dataset("mnist", root, train, transform=None).data[:, None].contiguous()


def to_model_space(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0  # [0, 255] -> [-1, 1]


def dequantize(pixels: torch.Tensor, generator=None) -> torch.Tensor:
    """Uniform dequantisation: (k + U) / 256 in [0, 1], then mapped to [-1, 1]."""
    u = (pixels.float() + torch.rand(pixels.shape, generator=generator)) / 256.0
    return 2.0 * u - 1.0


def largest_pairwise_distance(x: torch.Tensor, max_n: int = 10_000) -> float:
    """sigma_max by Song & Ermon 2020, Technique 1: max_ij ||x_i - x_j||, on max_n images."""
    flat = x[:max_n].flatten(1)
    return max(float(torch.cdist(flat[i:i + 1000], flat).max()) for i in range(0, len(flat), 1000))


# -- the method: SDEs, loss, samplers, likelihood ------------------------------------------------


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample vector (B,) shaped to broadcast against x (B, ...)."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


class SDE:
    """dx = f(x, t) dt + g(t) dw on t in [0, T=1] (Eq. 5), with a Gaussian kernel
    p_0t(x(t) | x(0)) = N(m(t) x(0), std(t)^2 I) (Eq. 29)."""

    T = 1.0

    def marginal_prob(self, x0, t):
        """Mean and std of p_0t(x(t) | x(0)) (Eq. 29)."""
        return bcast(self.mean_coeff(t), x0) * x0, self.std(t)

    def prior_sampling(self, shape, generator=None):
        return self.prior_std * torch.randn(shape, generator=generator)

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
        return torch.ones_like(t)


class VESDE(SDE):
    """Variance exploding: sigma(t) = sigma_min (sigma_max / sigma_min)^t, dx = sqrt(d sigma^2 / dt) dw (Eq. 9, 30)."""

    def __init__(self, sigma_min, sigma_max):
        self.sigma_min, self.sigma_max, self.prior_std = sigma_min, sigma_max, sigma_max

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x, t):
        return torch.zeros_like(x), self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))

    def mean_coeff(self, t):
        return torch.ones_like(t)

    def std(self, t):
        return self.sigma(t)  # Eq. 29 with sigma(0)^2 neglected, as in the paper: x(0) is data + N(0, sigma_min^2)

    def discretize(self, x, t, dt):
        """The SMLD chain (Eq. 8 = Eq. 20) in the form of Eq. 45: f_i = 0,
        G_i = sqrt(sigma_i^2 - sigma_{i-1}^2)."""
        return torch.zeros_like(x), (self.sigma(t) ** 2 - self.sigma(t - dt) ** 2).clamp_min(0).sqrt()


class VPSDE(SDE):
    """Variance preserving: dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw, beta linear in t (Eq. 11, 32)."""

    prior_std = 1.0

    def __init__(self, beta_min, beta_max):
        self.beta_min, self.beta_max = beta_min, beta_max

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t):
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min  # -1/2 int_0^t beta

    def sde(self, x, t):
        return -0.5 * bcast(self.beta(t), x) * x, self.beta(t).sqrt()

    def mean_coeff(self, t):
        return self.log_mean_coeff(t).exp()

    def std(self, t):
        return (-torch.expm1(2 * self.log_mean_coeff(t))).sqrt()  # Eq. 29: 1 - e^{-int beta}

    def discrete_beta(self, t, dt):
        """beta_i = 1 - m(t)^2 / m(t - dt)^2, so that the chain matches the marginals for any N; it is
        beta(t) dt (the reference code's beta_i) for large N."""
        return -torch.expm1(2 * (self.log_mean_coeff(t) - self.log_mean_coeff(t - dt)))

    def discretize(self, x, t, dt):
        """The DDPM chain (Eq. 10 = Eq. 22) in the form of Eq. 45:
        x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z."""
        b = self.discrete_beta(t, dt)
        return (bcast((1 - b).sqrt(), x) - 1) * x, b.sqrt()

    def corrector_alpha(self, t, dt):
        return 1 - self.discrete_beta(t, dt)  # alpha_i of Algorithm 5


class SubVPSDE(VPSDE):
    """sub-VP: the VP drift with diffusion sqrt(beta(t) (1 - e^{-2 int_0^t beta})) (Eq. 12);
    its variance is below the VP one at every t, which helps likelihoods."""

    def sde(self, x, t):
        drift, _ = super().sde(x, t)
        return drift, (self.beta(t) * -torch.expm1(4 * self.log_mean_coeff(t))).sqrt()

    def std(self, t):
        return -torch.expm1(2 * self.log_mean_coeff(t))  # Eq. 29: std = 1 - e^{-int beta}

    discretize = SDE.discretize  # Euler-Maruyama, as in the reference code
    # alpha_i = 1 in the Langevin step size: Algorithm 5's alpha_i = 1 - beta_i is given for VP
    # only, and the paper states no sub-VP rule (the reference code reaches for VP's alpha_i, which
    # its sub-VP class lacks). alpha_i -> 1 as N grows, and r sets the step size in any case.
    corrector_alpha = SDE.corrector_alpha


def make_sde(cfg: Config) -> SDE:
    if cfg.sde == "ve":
        return VESDE(cfg.sigma_min, cfg.sigma_max)
    return (VPSDE if cfg.sde == "vp" else SubVPSDE)(cfg.beta_min, cfg.beta_max)


def dsm_loss(score_fn, sde: SDE, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """Continuous-time denoising score matching, Eq. 7 with lambda(t) = std(t)^2:
    E_t E_x0 E_z || std(t) s(m x0 + std z, t) + z ||^2 (mean over pixels), t ~ U(eps, 1)."""
    t = eps + (sde.T - eps) * torch.rand(x0.shape[0], device=x0.device)
    z = torch.randn_like(x0)
    mean, std = sde.marginal_prob(x0, t)
    score = score_fn(mean + bcast(std, x0) * z, t)
    return (score.float() * bcast(std, x0) + z).pow(2).mean()


def reverse_drift(score_fn, sde: SDE, x, t, probability_flow=False):
    """Drift of the reverse-time SDE f - g^2 s (Eq. 6), or of the probability flow ODE f - g^2 s / 2 (Eq. 13)."""
    drift, g = sde.sde(x, t)
    return drift - bcast(g**2, x) * score_fn(x, t) * (0.5 if probability_flow else 1.0), g


def euler_maruyama_step(score_fn, sde, x, t, dt, generator=None):
    """One step of the reverse SDE (Eq. 6) from t to t - dt: x <- x - [f - g^2 s] dt + g sqrt(dt) z."""
    drift, g = reverse_drift(score_fn, sde, x, t)
    x_mean = x - drift * dt
    return x_mean + bcast(g, x) * math.sqrt(dt) * torch.randn(x.shape, generator=generator)


def reverse_diffusion_step(score_fn, sde, x, t, dt, generator=None):
    """Reverse-diffusion predictor (Appendix E, Eq. 46):
    x_i = x_{i+1} - f_{i+1} + G_{i+1} G_{i+1}^T s + G_{i+1} z."""
    f, G = sde.discretize(x, t, dt)
    x_mean = x - f + bcast(G**2, x) * score_fn(x, t)
    return x_mean + bcast(G, x) * torch.randn(x.shape, generator=generator)


def langevin_corrector(score_fn, sde, x, t, dt, snr, generator=None):
    """One Langevin step with step size 2 alpha (r ||z|| / ||s||)^2 (Algorithms 4-5; norms averaged
    over the batch as in the reference code)."""
    s = score_fn(x, t)
    z = torch.randn(x.shape, generator=generator)
    ratio = z.flatten(1).norm(dim=1).mean() / s.flatten(1).norm(dim=1).mean()
    step = bcast(2 * sde.corrector_alpha(t, dt) * (snr * ratio) ** 2, x)
    return x + step * s + (2 * step).sqrt() * z


def tweedie_denoise(score_fn, sde, x, t):
    """E[x(0) | x(t)] = (x + std^2 s(x, t)) / m(t) (Tweedie's formula): removes the noise left at t = eps."""
    std = bcast(sde.std(t), x)
    return (x + std**2 * score_fn(x, t)) / bcast(sde.mean_coeff(t), x)


@torch.no_grad()
def sample_sde(score_fn, sde, shape, n_steps, eps, predictor="em", snr=None, corrector_first=False,
               generator=None, record=0, n_frames=12, progress=False):
    """Predictor-corrector sampling (Algorithm 1): N predictor steps from T to eps, each followed by
    one Langevin corrector step when snr is given (the reference code runs it before the predictor:
    corrector_first=True), then Tweedie denoising at eps. Returns x, NFE and n_frames snapshots (t, x[:record])."""
    step = {"em": euler_maruyama_step, "rd": reverse_diffusion_step}[predictor]
    x = sde.prior_sampling(shape, generator)
    ts, dt = torch.linspace(sde.T, eps, n_steps + 1), (sde.T - eps) / n_steps
    frames, keep = [], set(np.linspace(0, n_steps - 1, n_frames).round().astype(int)) if record else set()
    for i in tqdm(range(n_steps), desc=f"sample {predictor}{'+langevin' if snr else ''}", disable=not progress,
                  mininterval=2):
        t = ts[i].expand(shape[0])
        if i in keep:
            frames.append((float(ts[i]), x[:record].clone()))
        if snr and corrector_first:
            x = langevin_corrector(score_fn, sde, x, t, dt, snr, generator)
        x = step(score_fn, sde, x, t, dt, generator)
        if snr and not corrector_first:
            x = langevin_corrector(score_fn, sde, x, t - dt, dt, snr, generator)
    x = tweedie_denoise(score_fn, sde, x, ts[-1].expand(shape[0]))
    if record:
        frames.append((0.0, x[:record].clone()))
    return x, n_steps * (2 if snr else 1) + 1, frames


@torch.no_grad()
def sample_ode(score_fn, sde, shape, eps, rtol, atol, generator=None, record=0, n_frames=12):
    """Probability flow ODE dx/dt = f - g^2 s / 2 (Eq. 13) from T to eps by RK45 (scipy's solve_ivp),
    then Tweedie denoising. Returns x, NFE (solver evaluations + 1) and `record` snapshots."""
    x = sde.prior_sampling(shape, generator)

    def rhs(t, y):
        xt = torch.from_numpy(y).float().reshape(shape)
        drift, _ = reverse_drift(score_fn, sde, xt, torch.full((shape[0],), t), probability_flow=True)
        return drift.double().flatten().numpy()

    t_eval = np.linspace(sde.T, eps, n_frames) if record else None
    sol = integrate.solve_ivp(rhs, (sde.T, eps), x.double().flatten().numpy(), method="RK45", rtol=rtol,
                              atol=atol, t_eval=t_eval)
    x = torch.from_numpy(sol.y[:, -1]).float().reshape(shape)
    frames = [(float(t), torch.from_numpy(y).float().reshape(shape)[:record]) for t, y in zip(sol.t, sol.y.T)
              if record]
    x = tweedie_denoise(score_fn, sde, x, torch.full((shape[0],), eps))
    if record:
        frames.append((0.0, x[:record].clone()))
    return x, sol.nfev + 1, frames


def hutchinson_divergence(fn, x, noise):
    """Skilling-Hutchinson estimate of div fn(x) = E_v[v^T (d fn / dx) v] with E[v v^T] = I, one
    vector-Jacobian product per sample. Returns fn(x) and the estimate, shape (B,)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x)
        (vjp,) = torch.autograd.grad((out * noise).sum(), x)
    return out.detach(), (vjp * noise).flatten(1).sum(1)


def ode_log_likelihood(score_fn, sde, x, eps, rtol, atol, generator=None):
    """log p_0(x) = log p_T(x(T)) + int_eps^T div f~(x(t), t) dt, with f~ the probability flow drift
    (Eq. 13) and the instantaneous change of variables (Appendix D.2), integrated forward by RK45 with
    one Rademacher probe per sample. Returns log p (nats, shape (B,)), x(T) and NFE."""
    shape, b = x.shape, x.shape[0]
    noise = torch.randint(0, 2, shape, generator=generator).float() * 2 - 1

    def rhs(t, y):
        xt = torch.from_numpy(y[:-b]).float().reshape(shape)
        drift_fn = lambda z: reverse_drift(score_fn, sde, z, torch.full((b,), t), probability_flow=True)[0]
        drift, div = hutchinson_divergence(drift_fn, xt, noise)
        return np.concatenate([drift.double().flatten().numpy(), div.double().numpy()])

    y0 = np.concatenate([x.double().flatten().numpy(), np.zeros(b)])
    sol = integrate.solve_ivp(rhs, (eps, sde.T), y0, method="RK45", rtol=rtol, atol=atol)
    z = torch.from_numpy(sol.y[:-b, -1]).float().reshape(shape)
    delta = torch.from_numpy(sol.y[-b:, -1]).float()
    return sde.prior_logp(z) + delta, z, sol.nfev


def bits_per_dim(logp_x: torch.Tensor, dims: int) -> torch.Tensor:
    """Bits/dim of 8-bit data from the density of dequantised x = 2 (k + U) / 256 - 1: the map to
    [0, 1] adds log 2 per dim, the 256 bins add 8 bits."""
    return -logp_x / (dims * math.log(2)) + 7.0


# -- model (assembled from common.py) ---------------------------------------------------------------


def build_model(cfg: Config, sde: SDE) -> torch.nn.Module:
    """U-Net with Gaussian Fourier features of t; the output divided by std(t) is the score, so the
    loss of Eq. 7 is || net + z ||^2 (the reference code's parameterisation)."""
    return common.UNet(1, cfg.base, cfg.mults, cfg.num_res_blocks, cfg.attn_levels, cfg.dropout, "fourier",
                       cfg.fourier_scale, out_scale=lambda out, t: out / bcast(sde.std(t), out),
                       embed_dim=cfg.embed_dim)


def score_fn_of(net, bf16: bool, device, channels_last=False):
    """s(x, t) on `device` for CPU tensors in and out (the samplers keep their state on the CPU)."""

    def score(x, t):
        xd = x.to(device)
        if channels_last:
            xd = xd.contiguous(memory_format=torch.channels_last)
        with common.autocast(device, bf16):
            return net(xd, t.to(device)).float().cpu()

    return score


# -- training loop ----------------------------------------------------------------------------------


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up, times a cosine decay to 0 over the run (short runs) or 1 (paper: constant)."""
    decay = 0.5 * (1 + math.cos(math.pi * step / cfg.steps)) if cfg.lr_decay else 1.0
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup) * decay


def train(cfg, sde, model, ema, opt, data, state, dist, device, seed, ckpt) -> float:
    """Adam with linear warm-up (then cosine decay), gradient clipping, EMA after every step; the
    checkpointer checks every loss and saves verified steps. Returns the training seconds."""
    net = model
    if cfg.compile:
        net = torch.compile(net)
    if dist.enabled:
        ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids)
    batches = common.epoch_batches(len(data), cfg.batch_size, dist, seed, state["step"])
    bar = tqdm(total=cfg.steps, initial=state["step"], desc="train", disable=not dist.is_main,
               mininterval=2)
    t0 = time.perf_counter()
    with ckpt:
        for step in range(state["step"], cfg.steps + 1):
            ckpt.begin(step)
            x0 = to_model_space(data[next(batches)]).to(device)
            if cfg.channels_last:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            with common.autocast(device, cfg.bf16):
                loss = dsm_loss(net, sde, x0, cfg.train_eps)
            ckpt.verified(loss, step, last=step == cfg.steps)
            if step == cfg.steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            ema.update_parameters(model)
            state["losses"].append(loss.item())
            state["step"] = step + 1
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(state['losses'][-20:]):.4f}")
    bar.close()
    return time.perf_counter() - t0


def save(out, cfg, model, ema, opt, state, preset, seed, step, rng):
    common.save_checkpoint(out / "ckpt.pt", {
        "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
        "step": step, "config": asdict(cfg), "preset": preset, "seed": seed, "rng_state": rng,
        "losses": state["losses"][:step]}, STEM)


# -- evaluation and figures --------------------------------------------------------------------------


def run_sampler(name, cfg, sde, score32, score_lp, n, generator, record=0, progress=False):
    """n samples; the SDE samplers in batches of cfg.sample_batch, the ODE as one system (RK45 picks
    its steps for the whole batch). Returns x, NFE per sample and the first batch's frames."""
    eps = SAMPLE_EPS[cfg.sde]
    if name == "ode":
        return sample_ode(score32, sde, (n, 1, 28, 28), eps, cfg.ode_tol, cfg.ode_tol, generator, record)
    xs, frames = [], []
    for i in range(0, n, cfg.sample_batch):
        x, nfe, fr = sample_sde(score_lp, sde, (min(cfg.sample_batch, n - i), 1, 28, 28), cfg.n_steps, eps,
                                "em" if name == "em" else "rd", cfg.snr if name == "pc" else None,
                                generator=generator, record=record if i == 0 else 0, progress=progress)
        xs.append(x)
        frames = frames or fr
    return torch.cat(xs), nfe, frames


SAMPLER_NAMES = {"em": "Euler-Maruyama", "rd": "reverse diffusion", "pc": "PC (rev. diff. + Langevin)",
                 "ode": "probability flow ODE (RK45)"}


def plot_samplers(results, path):
    from torchvision.utils import make_grid

    plt = common._plt()
    fig, axes = plt.subplots(1, len(results), figsize=(3.3 * len(results), 3.8))
    for ax, (name, r) in zip(np.atleast_1d(axes), results.items()):
        grid = make_grid(((r["x"][:36] + 1) / 2).clamp(0, 1), nrow=6).permute(1, 2, 0).numpy()
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(f"{SAMPLER_NAMES[name]}\nNFE {r['nfe']}, {r['seconds_per_sample']*1000:.0f} ms/sample", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_trajectories(frames, path, n_cols=8):
    plt = common._plt()
    pick = [frames[int(i)] for i in np.linspace(0, len(frames) - 1, n_cols).round()]
    rows = pick[0][1].shape[0]
    fig, axes = plt.subplots(rows, n_cols, figsize=(1.1 * n_cols, 1.15 * rows + 0.3), squeeze=False)
    for j, (t, x) in enumerate(pick):
        lo, hi = float(x.min()), float(x.max())
        for i in range(rows):
            axes[i, j].imshow(x[i, 0].numpy(), cmap="gray", vmin=min(lo, -1), vmax=max(hi, 1))
            axes[i, j].axis("off")
        axes[0, j].set_title("denoised" if j == n_cols - 1 else f"t={t:.2f}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_marginals(cfg, path):
    plt = common._plt()
    t = torch.linspace(0, 1, 200)
    sdes = {"VP": VPSDE(cfg.beta_min, cfg.beta_max), "sub-VP": SubVPSDE(cfg.beta_min, cfg.beta_max)}
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, s in sdes.items():
        a.plot(t, s.std(t), label=f"{name} std(t)")
    a.plot(t, sdes["VP"].mean_coeff(t), "k--", lw=1, label="VP, sub-VP mean coefficient m(t)")
    a.set(xlabel="t", title=f"p_0t = N(m(t) x(0), std(t)^2 I), beta in [{cfg.beta_min}, {cfg.beta_max}]")
    a.legend(fontsize=8)
    ve = VESDE(cfg.sigma_min, cfg.sigma_max or 32.0)  # 32: the rule of thumb on MNIST in [-1, 1] units
    b.semilogy(t, ve.std(t), "C2", label=f"VE std(t) = sigma(t), sigma_max={ve.sigma_max:.1f}")
    b.set(xlabel="t", title="VE: m(t) = 1, std grows geometrically")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------------


def prepare(args, dist, device) -> tuple:
    """Config, data, SDE, model, EMA, optimizer and training state (from the checkpoint)."""
    common.prepare_out(args.out)
    preset, cfg, ckpt = make_config(args, device, quiet=not dist.is_main)
    common.seed_everything(args.seed)
    train_pixels = None if args.sample_only else load_mnist(args.data_dir, train=True)
    test_pixels = load_mnist(args.data_dir, train=False)
    if cfg.sde == "ve" and cfg.sigma_max == 0:
        cfg.sigma_max = largest_pairwise_distance(to_model_space(train_pixels))
        if dist.is_main:
            n = min(10_000, len(train_pixels))
            print(f"VE sigma_max = largest pairwise distance of {n} training images "
                  f"(in [-1, 1] units) = {cfg.sigma_max:.2f}")
    sde = make_sde(cfg)
    model = build_model(cfg, sde).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = common.make_ema(model, cfg.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state = {"step": 0, "losses": []}
    if ckpt is not None:
        for obj, key in ((model, "model"), (ema, "ema"), (opt, "optimizer")):
            common.load_state(obj, ckpt[key], args.out / "ckpt.pt")
        state = {"step": ckpt["step"], "losses": list(ckpt["losses"])}
        if args.resume:
            common.set_rng_state(ckpt["rng_state"])
    if not args.resume or dist.rank > 0:
        torch.manual_seed(args.seed + 1000 * dist.rank + state["step"])  # each rank its own noise
    return preset, cfg, train_pixels, test_pixels, sde, model, ema, opt, state


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.get_device(args.device)
    dist, device = common.ddp_setup(device)
    out, log = args.out, (print if dist.is_main else (lambda *a, **k: None))
    t_start = time.perf_counter()
    with common.all_ranks_agree(dist, device):
        prepared = prepare(args, dist, device)
    preset, cfg, train_pixels, test_pixels, sde, model, ema, opt, state = prepared
    metrics = {"preset": preset, "sde": cfg.sde, "params": common.count_params(model)}
    if cfg.sde == "ve":
        metrics["sigma_max"] = cfg.sigma_max
    if dist.is_main:
        common.write_json(out / "config.json", {**asdict(cfg), "preset": preset, "world_size": dist.world_size})
    log(f"{cfg.sde} SDE, U-Net with {metrics['params'] / 1e6:.2f}M parameters, preset {preset}, device {device}")

    if not args.sample_only and state["step"] < cfg.steps:
        step0 = state["step"]
        ckpt = common.Checkpointer(lambda step, rng: dist.is_main and save(
            out, cfg, model, ema, opt, state, preset, args.seed, step, rng),
            cfg.ckpt_every, out / "ckpt.pt")
        seconds = train(cfg, sde, model, ema, opt, train_pixels, state, dist, device, args.seed,
                        ckpt)
        metrics.update(train_seconds=seconds, steps=state["step"],
                       steps_per_s=(state["step"] - step0) / max(seconds, 1e-9),
                       final_loss=float(np.mean(state["losses"][-50:])) if state["losses"] else None)
        if dist.enabled:
            metrics["ddp"] = {"world_size": dist.world_size,
                              "param_max_abs_diff": common.ddp_param_divergence(model, dist, device)}
        if dist.is_main:
            common.plot_loss(state["losses"], out / "loss.png", title=f"Eq. 7 loss, {cfg.sde} SDE")

    # Evaluation with the EMA weights; every rank samples its share, rank 0 writes.
    net = ema.module.eval()
    score32 = score_fn_of(net, False, device, cfg.channels_last)
    score_lp = score_fn_of(net, cfg.bf16, device, cfg.channels_last)
    gen = torch.Generator().manual_seed(args.seed * 7919 + dist.rank + 1)
    per = lambda n: math.ceil(n / dist.world_size)
    results, frames = {}, []
    for name in ["em", "rd", "pc", "ode"]:
        n = cfg.n_samples if name == cfg.sampler else cfg.n_compare
        t0 = time.perf_counter()
        x, nfe, fr = run_sampler(name, cfg, sde, score32, score_lp, per(n), gen,
                                 record=6 if name == cfg.sampler else 0, progress=dist.is_main)
        wall = common.all_reduce_mean(time.perf_counter() - t0, dist, device)
        x = common.all_gather_cat(x.to(device), dist).cpu()[:n]
        frames = fr or frames
        results[name] = {"x": x, "nfe": nfe, "n": n, "wall_s": wall, "seconds_per_sample": wall / per(n)}
        log(f"{SAMPLER_NAMES[name]}: {n} samples, NFE {nfe}, {wall:.1f} s")
        if cfg.judge and dist.is_main:
            results[name]["judge"] = common.judge_samples(x.clamp(-1, 1), "mnist", args.data_dir,
                                                          seed=args.seed)
            log("  " + common.judge_line(results[name]["judge"]))
    metrics["samplers"] = {k: {kk: v for kk, v in r.items() if kk != "x"} for k, r in results.items()}
    metrics["sampler"] = cfg.sampler
    if "judge" in results[cfg.sampler]:
        metrics["judge"] = results[cfg.sampler]["judge"]
    final = results[cfg.sampler]["x"].clamp(-1, 1)

    if cfg.lik_images > 0:
        t0 = time.perf_counter()
        k = per(cfg.lik_images)
        lik_gen = torch.Generator().manual_seed(args.seed + 17 * dist.rank)
        pix = test_pixels[dist.rank * k:(dist.rank + 1) * k]
        batch = torch.cat([pix, pix[:1].expand(cfg.lik_repeats, -1, -1, -1)])  # + copies of the first image
        logp, _, nfe = ode_log_likelihood(score32, sde, dequantize(batch, lik_gen), cfg.lik_eps, cfg.lik_tol,
                                          cfg.lik_tol, lik_gen)
        bpd = bits_per_dim(logp, 28 * 28)
        bpd_img = common.all_gather_cat(bpd[:len(pix)].to(device), dist).cpu().double()
        rep = bpd[len(pix):].double()
        metrics["likelihood"] = {
            "bpd_mean": float(bpd_img.mean()), "bpd_std": float(bpd_img.std()),
            "bpd_se": float(bpd_img.std() / math.sqrt(len(bpd_img))), "n_images": len(bpd_img),
            "estimator_std_one_image": float(rep.std()) if len(rep) > 1 else None, "repeats": len(rep),
            "nfe": nfe, "rtol_atol": cfg.lik_tol, "eps": cfg.lik_eps,
            "wall_s": common.all_reduce_mean(time.perf_counter() - t0, dist, device)}
        lk = metrics["likelihood"]
        log(f"bits/dim on {lk['n_images']} test images: {lk['bpd_mean']:.3f} +- {lk['bpd_se']:.3f} (s.e.); "
            f"NFE {nfe}, {lk['wall_s']:.0f} s")

    if dist.is_main:
        torch.save(final, out / "samples.pt")
        for name, r in results.items():
            torch.save(r["x"].clamp(-1, 1), out / f"samples_{name}.pt")
        common.save_image_grid(final[:100], out / "samples.png", nrow=10)
        plot_samplers(results, out / "samplers.png")
        plot_trajectories(frames, out / "trajectories.png")
        titles = [f"t = {t:.3f}" if t > 0 else "denoised" for t, _ in frames]
        common.gif_images(out / "reverse.gif", [x for _, x in frames], titles, nrow=6, fps=3)
        plot_marginals(cfg, out / "marginals.png")
        metrics["total_seconds"] = time.perf_counter() - t_start
        common.write_json(out / "metrics.json", metrics)
        log(f"wrote {out}/ in {metrics['total_seconds']:.0f} s")
    common.ddp_cleanup(dist)
    return metrics


if __name__ == "__main__":
    common.cli_entry(main)
