"""01 -- Langevin dynamics with the exact score of a Gaussian mixture.

Song & Ermon, "Generative Modeling by Estimating Gradients of the Data Distribution" (NeurIPS
2019), arXiv:1907.05600, Sec. 2.2 and 3.2, Fig. 3 and Algorithm 1.

What it shows: a score is all Langevin dynamics needs, and with the *exact* score of a 2-D
Gaussian mixture (no learning at all) plain Langevin dynamics still gets the mixture weights
wrong: a particle falls into the mode whose basin it starts in, and the score inside a mode does
not depend on that mode's weight (Sec. 3.2.2). Annealed Langevin dynamics (Algorithm 1) runs
the same chain on the mixture convolved with N(0, sigma_i^2 I) for decreasing sigma_i: at large
sigma the modes overlap, particles move between them and settle in the right proportions. The
convolved mixture is still a mixture, so its score is still exact. MALA (the same step plus a
Metropolis-Hastings test) removes the discretisation bias of the fixed step, but not the
weight error of the plain chain: that one is about mixing, not about the step.

The bridge to 06 (Song et al. 2021, "Score-Based Generative Modeling through Stochastic
Differential Equations", arXiv:2011.13456): under the VP SDE (Eq. 11, the paper's beta_min 0.1,
beta_max 20) every component of the mixture stays Gaussian (Eq. 29), so the score of p_t is exact
at every t, and the samplers of 06 run here without a network: the reverse-time SDE (Eq. 6) by
Euler-Maruyama and the probability flow ODE (Eq. 13) by RK45, both from the same x(T) ~ N(0, I),
and the ODE's exact log-likelihood (Appendix D.2, with the exact divergence of the 2-D drift)
against the mixture's true log-density. VP rather than VE: the VE kernel turns the mixture into
q_sigma, the very path annealed Langevin already walks.

    python 01_exact_score_langevin.py                # --preset cpu, about a minute on 2 cores

Writes to runs/01_exact_score_langevin/: config.json, metrics.json (per sampler: sliced
Wasserstein and MMD to fresh ground truth beside the real-vs-real floor, recovered weights,
within-mode spread; the ODE log-likelihood's error), samples.pt (sampler name -> (N, 2) tensor),
samples.png, score_field.png, annealed_langevin.gif, sde_ode_trajectories.png. Nothing is
trained: no ckpt.pt, no loss.png, no --resume or --sample-only.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import numpy as np
import torch
from scipy import integrate
from tqdm import tqdm

import common

# -- config ---------------------------------------------------------------------------------


@dataclass
class Config:
    components: int = 3  # K mixture components, weights proportional to 2^-k: (4, 2, 1) / 7
    radius: float = 5.0  # the means sit on a circle this wide; modes ~8.7 apart for K = 3
    n_samples: int = 5000  # particles per sampler (and size of each ground-truth draw)
    box: float = 8.0  # every chain starts uniform on [-box, box]^2 (the paper: uniform, too)
    # plain Langevin / MALA (Eq. 4): a fixed step, many steps. The step is large enough that
    # the discretisation bias shows (modes ~4% too wide) and MALA can remove it.
    step: float = 0.05  # step size eps of plain Langevin and MALA (Eq. 4)
    n_steps: int = 1000  # steps of plain Langevin and MALA
    # annealed Langevin (Algorithm 1). The paper (images in [0, 1]): sigma 1 -> 0.01. sigma_1
    # here is ~ the largest distance between modes (as NCSNv2, technique 1, advises), so that
    # at sigma_1 the modes overlap.
    sigma_1: float = 10.0  # largest noise level (paper 1, for images in [0, 1])
    sigma_L: float = 0.01  # smallest noise level (the paper's)
    n_levels: int = 10  # L, the number of noise levels (the paper's)
    coarse_levels: int = 10  # the paper's L, run beside n_levels to show it (weights ~0.02 off)
    T: int = 100  # annealed Langevin steps per noise level (the paper's)
    eps: float = 2e-5  # alpha_i = eps sigma_i^2 / sigma_L^2, alpha_i / sigma_i^2 = 0.2 (paper's)
    gif_frames: int = 40  # frames of annealed_langevin.gif
    # score SDEs (Song et al. 2021) on the same mixture: the VP SDE with the paper's values
    beta_min: float = 0.1  # beta(0) of the VP SDE (Eq. 11)
    beta_max: float = 20.0  # beta(1) of the VP SDE
    sde_steps: int = 1000  # Euler-Maruyama steps of the reverse SDE (paper N = 1000)
    sde_eps: float = 1e-3  # sampling ends at t = eps (the paper's)
    ode_tol: float = 1e-5  # RK45 rtol = atol (the paper's)
    likelihood_eps: float = 1e-5  # the likelihood integral starts at t = eps (the paper's)
    likelihood_points: int = 500  # fresh mixture draws whose log-density the ODE computes
    trajectories: int = 16  # particles drawn in sde_ode_trajectories.png

    def __post_init__(self):
        for f in fields(self):  # every setting is a count or a size (the flags parse the type)
            common.check(getattr(self, f.name) > 0, f.name, "> 0")
        common.check(self.n_samples >= 2, "n_samples", "at least 2 (the MMD compares pairs)")
        common.check(self.sigma_L < self.sigma_1, "sigma_L", f"below --sigma-1 ({self.sigma_1})")
        common.check(self.beta_min <= self.beta_max, "beta_min", f"<= --beta-max ({self.beta_max})")
        common.check(self.sde_eps < 1, "sde_eps", "in (0, 1): the SDE runs on [0, T = 1]")
        common.check(self.likelihood_eps < 1, "likelihood_eps", "in (0, 1), as --sde-eps")


PRESETS = {
    "smoke": {"n_samples": 1000, "n_steps": 400, "n_levels": 50, "T": 40, "gif_frames": 4,
              "sde_steps": 250, "likelihood_points": 200},
    # L: the paper's 10 levels over three decades quench rather than anneal (weights ~0.02 off)
    "cpu": {"n_levels": 100},
    "gpu": {"n_samples": 20000, "n_steps": 4000, "n_levels": 200},
}
FREE = ()  # nothing is trained, so there is no run to resume
STEM = "01_exact_score_langevin"

# -- data: the Gaussian mixture and its exact scores ------------------------------------


class Mixture(NamedTuple):
    weights: torch.Tensor  # (K,)
    means: torch.Tensor  # (K, 2)
    covs: torch.Tensor  # (K, 2, 2)


def make_mixture(k: int = 3, radius: float = 5.0) -> Mixture:
    """K anisotropic Gaussians on a circle, weights proportional to 2^-k, each with standard
    deviations 1.0 and 0.3 along axes turned by a different angle."""
    angles = math.pi / 2 + 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    weights = 0.5 ** torch.arange(k, dtype=torch.float64)
    turn = angles + math.pi / 2
    rot = torch.stack([torch.stack([turn.cos(), -turn.sin()], -1),
                       torch.stack([turn.sin(), turn.cos()], -1)], -2)
    covs = rot @ torch.diag(torch.tensor([1.0, 0.09], dtype=torch.float64)) @ rot.transpose(-1, -2)
    return Mixture((weights / weights.sum()).float(), means.float(), covs.float())


def sample_mixture(mix: Mixture, n: int, generator: torch.Generator | None = None):
    """Ancestral sampling: a component k ~ Cat(w), then x ~ N(mu_k, Sigma_k)."""
    k = torch.multinomial(mix.weights, n, replacement=True, generator=generator)
    z = torch.randn(n, 2, generator=generator, dtype=mix.means.dtype)
    return mix.means[k] + (torch.linalg.cholesky(mix.covs)[k] @ z[:, :, None])[:, :, 0]


def noisy_components(x: torch.Tensor, mix: Mixture, sigma: float = 0.0):
    """The noisy data q_sigma = p * N(0, sigma^2 I) of a mixture is the same mixture with every
    covariance grown by sigma^2 I. Returns log w_k + log N(x; mu_k, C_k), shape (N, K), and
    C_k^-1 (x - mu_k), shape (K, N, 2), with C_k = Sigma_k + sigma^2 I. (Components first: fast.)"""
    cov = mix.covs + sigma**2 * torch.eye(2, dtype=mix.covs.dtype, device=mix.covs.device)
    diff = x[None] - mix.means[:, None]  # (K, N, 2)
    prec_diff = diff @ torch.linalg.inv(cov)  # C_k is symmetric: (x - mu) C^-1 = (C^-1 (x - mu))^T
    maha = (prec_diff * diff).sum(-1)
    log_comp = mix.weights.log()[:, None] - 0.5 * maha - 0.5 * torch.logdet(cov)[:, None]
    log_comp = log_comp - math.log(2 * math.pi)
    return log_comp, prec_diff


def log_prob(x: torch.Tensor, mix: Mixture, sigma: float = 0.0) -> torch.Tensor:
    """log q_sigma(x) = log sum_k w_k N(x; mu_k, Sigma_k + sigma^2 I)."""
    return torch.logsumexp(noisy_components(x, mix, sigma)[0], dim=0)


def score(x: torch.Tensor, mix: Mixture, sigma: float = 0.0) -> torch.Tensor:
    """The exact score grad_x log q_sigma(x) = -sum_k r_k(x) (Sigma_k + sigma^2 I)^-1 (x - mu_k),
    with r_k(x) = w_k N(x; mu_k, C_k) / q_sigma(x) the posterior responsibility of component k."""
    return log_prob_and_score(x, mix, sigma)[1]


def log_prob_and_score(x: torch.Tensor, mix: Mixture, sigma: float = 0.0):
    """Both of the above from one pass (MALA needs both at every proposal)."""
    log_comp, prec_diff = noisy_components(x, mix, sigma)
    r = torch.softmax(log_comp, dim=0)
    return torch.logsumexp(log_comp, dim=0), -(r[:, :, None] * prec_diff).sum(0)


# -- the method: Langevin, MALA, annealed Langevin (Algorithm 1) ---------------------------


def langevin(x: torch.Tensor, score_fn, step: float, n_steps: int, generator=None, record=None):
    """Langevin dynamics (Eq. 4): x_t = x_{t-1} + (eps/2) grad log p(x_{t-1}) + sqrt(eps) z_t.
    record(t, x), if given, sees the points after every step."""
    for t in range(n_steps):
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = x + 0.5 * step * score_fn(x) + math.sqrt(step) * z
        if record is not None:
            record(t, x)
    return x


def mala(x: torch.Tensor, log_prob_and_score_fn, step: float, n_steps: int, generator=None,
         record=None):
    """Metropolis-adjusted Langevin (Roberts & Tweedie 1996): the Eq. 4 step as a proposal x',
    accepted with probability min(1, p(x') q(x | x') / (p(x) q(x' | x))), where
    q(x' | x) = N(x'; x + (eps/2) grad log p(x), eps I). Its stationary law is exactly p.
    log_prob_and_score_fn(x) returns (log p(x) up to a constant, grad log p(x)).
    Returns the final points and the mean acceptance rate; record(t, x) as in langevin."""
    logp, s = log_prob_and_score_fn(x)
    accepted = torch.zeros((), device=x.device)
    for t in range(n_steps):
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        prop = x + 0.5 * step * s + math.sqrt(step) * z
        logp_prop, s_prop = log_prob_and_score_fn(prop)
        log_q_fwd = -(z**2).sum(1) / 2  # |x' - x - (eps/2) s(x)|^2 / (2 eps)
        log_q_bwd = -((x - prop - 0.5 * step * s_prop) ** 2).sum(1) / (2 * step)
        u = torch.rand(len(x), generator=generator, dtype=x.dtype, device=x.device)
        accept = u.log() < logp_prop + log_q_bwd - logp - log_q_fwd
        x = torch.where(accept[:, None], prop, x)
        logp, s = torch.where(accept, logp_prop, logp), torch.where(accept[:, None], s_prop, s)
        accepted += accept.float().mean()
        if record is not None:
            record(t, x)
    return x, accepted.item() / max(n_steps, 1)


def geometric_sigmas(sigma_1: float, sigma_L: float, n_levels: int) -> torch.Tensor:
    """sigma_1 > ... > sigma_L, a geometric sequence (Sec. 4.1)."""
    return torch.logspace(math.log10(sigma_1), math.log10(sigma_L), n_levels, dtype=torch.float64)


def annealed_langevin(x, score_fn, sigmas, eps: float, T: int, generator=None, record=None):
    """Annealed Langevin dynamics (Algorithm 1): for each sigma_i, alpha_i = eps sigma_i^2 /
    sigma_L^2, then T steps of Eq. 4 on q_{sigma_i}; score_fn(x, sigma) is the score of q_sigma.
    record(i, t, x), if given, sees the points after step t of level i."""
    for i, sigma in enumerate(sigmas.tolist()):
        alpha = eps * sigma**2 / sigmas[-1].item() ** 2
        for t in range(T):
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x = x + 0.5 * alpha * score_fn(x, sigma) + math.sqrt(alpha) * z
            if record is not None:
                record(i, t, x)
    return x


def annealed_mala(x, log_prob_and_score_fn, sigmas, eps: float, T: int, generator=None,
                  record=None):
    """Algorithm 1 with each level's T steps Metropolis-adjusted: on q_{sigma_i} with step
    alpha_i. log_prob_and_score_fn(x, sigma) gives log q_sigma and its score. Returns the points
    and the mean acceptance rate; record(i, t, x) as in annealed_langevin."""
    rates = []
    for i, sigma in enumerate(sigmas.tolist()):
        alpha = eps * sigma**2 / sigmas[-1].item() ** 2
        fn = lambda y, sigma=sigma: log_prob_and_score_fn(y, sigma)
        level = None if record is None else lambda t, y, i=i: record(i, t, y)
        x, rate = mala(x, fn, alpha, T, generator, level)
        rates.append(rate)
    return x, float(np.mean(rates))


# -- the same mixture under the VP SDE (Song et al. 2021, arXiv:2011.13456) ---------------------


@dataclass(frozen=True)
class VPSDE:
    """Variance preserving SDE dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw on t in [0, T = 1]
    (Eq. 11), beta(t) = beta_min + t (beta_max - beta_min) (Eq. 32; the paper's 0.1 and 20)."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    T: float = 1.0

    def beta(self, t: float) -> float:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t: float) -> float:
        """log m(t) = -1/2 int_0^t beta(s) ds."""
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def mean_coeff(self, t: float) -> float:
        return math.exp(self.log_mean_coeff(t))

    def std(self, t: float) -> float:
        """std(t) = sqrt(1 - e^{-int_0^t beta}) (Eq. 29)."""
        return math.sqrt(-math.expm1(2 * self.log_mean_coeff(t)))

    def sde(self, x: torch.Tensor, t: float):
        """f(x, t) = -beta(t) x / 2 and g(t) = sqrt(beta(t)) (Eq. 11)."""
        return -0.5 * self.beta(t) * x, math.sqrt(self.beta(t))

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I), the prior p_T, summed over the last dimension."""
        return -0.5 * z.shape[-1] * math.log(2 * math.pi) - 0.5 * z.pow(2).sum(-1)


def perturbed_mixture(mix: Mixture, sde: VPSDE, t: float) -> Mixture:
    """p_t, the mixture pushed through the kernel p_0t(x(t) | x(0)) = N(m(t) x(0), std(t)^2 I)
    (Eq. 29): component k becomes N(m mu_k, m^2 Sigma_k + std^2 I), its weight unchanged."""
    m, std = sde.mean_coeff(t), sde.std(t)
    eye = torch.eye(2, dtype=mix.covs.dtype, device=mix.covs.device)
    return Mixture(mix.weights, m * mix.means, m**2 * mix.covs + std**2 * eye)


def reverse_drift(score_fn, sde: VPSDE, x: torch.Tensor, t: float, probability_flow=False):
    """Drift of the reverse-time SDE f - g^2 s (Eq. 6), or of the probability flow ODE
    f - g^2 s / 2 (Eq. 13); score_fn(x, t) = grad_x log p_t(x). Returns the drift and g(t)."""
    f, g = sde.sde(x, t)
    return f - g**2 * score_fn(x, t) * (0.5 if probability_flow else 1.0), g


def sample_sde(score_fn, sde: VPSDE, x: torch.Tensor, n_steps: int, eps: float, generator=None,
               record=None) -> torch.Tensor:
    """The reverse-time SDE dx = [f - g^2 s] dt + g dw (Eq. 6) from x = x(T) down to t = eps by
    Euler-Maruyama: x <- x - [f - g^2 s] dt + g sqrt(dt) z. record(t, x), if given, sees x(T)
    and the points after every step."""
    dt = (sde.T - eps) / n_steps
    if record is not None:
        record(sde.T, x)
    for i in range(n_steps):
        t = sde.T - i * dt
        drift, g = reverse_drift(score_fn, sde, x, t)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = x - drift * dt + g * math.sqrt(dt) * z
        if record is not None:
            record(t - dt, x)
    return x


def sample_ode(score_fn, sde: VPSDE, x: torch.Tensor, eps: float, rtol: float, atol: float,
               record=None):
    """The probability flow ODE dx/dt = f - g^2 s / 2 (Eq. 13) from x = x(T) back to t = eps by
    RK45 (scipy's solve_ivp). Returns x(eps) and the number of drift evaluations (NFE);
    record(t, x), if given, sees the points at every step the solver accepted."""

    def rhs(t, y):
        xt = torch.from_numpy(y).reshape(x.shape).to(x)
        drift, _ = reverse_drift(score_fn, sde, xt, t, probability_flow=True)
        return drift.double().flatten().cpu().numpy()

    y0 = x.double().flatten().cpu().numpy()
    sol = integrate.solve_ivp(rhs, (sde.T, eps), y0, method="RK45", rtol=rtol, atol=atol)
    if record is not None:
        for t, y in zip(sol.t, sol.y.T):
            record(float(t), torch.from_numpy(y).reshape(x.shape).to(x))
    return torch.from_numpy(sol.y[:, -1]).reshape(x.shape).to(x), sol.nfev


def exact_divergence(fn, x: torch.Tensor):
    """div fn(x) = sum_i d fn_i / d x_i exactly, one vector-Jacobian product per dimension (two in
    2-D, where the Hutchinson estimate of Appendix D.2 is not needed). Returns fn(x), div."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x)
        div = sum(torch.autograd.grad(out[:, i].sum(), x, retain_graph=True)[0][:, i]
                  for i in range(x.shape[1]))
    return out.detach(), div.detach()


def ode_log_likelihood(score_fn, sde: VPSDE, x: torch.Tensor, eps: float, rtol: float,
                       atol: float, prior_logp=None):
    """log p_eps(x) = log p_T(x(T)) + int_eps^T div f~(x(t), t) dt, f~ the probability flow drift
    (Eq. 13): the instantaneous change of variables (Appendix D.2, Eq. 39), x and the integral
    carried forward together by RK45 with the exact divergence. prior_logp(z) defaults to
    sde.prior_logp, N(0, I). Returns log p (nats, shape (N,)), x(T) and the NFE."""
    n = len(x)

    def rhs(t, y):
        xt = torch.from_numpy(y[:-n]).reshape(x.shape).to(x)
        flow = lambda z: reverse_drift(score_fn, sde, z, t, probability_flow=True)[0]
        drift, div = exact_divergence(flow, xt)
        return np.concatenate([drift.double().flatten().cpu().numpy(), div.double().cpu().numpy()])

    y0 = np.concatenate([x.double().flatten().cpu().numpy(), np.zeros(n)])
    sol = integrate.solve_ivp(rhs, (eps, sde.T), y0, method="RK45", rtol=rtol, atol=atol)
    z = torch.from_numpy(sol.y[:-n, -1]).reshape(x.shape).to(x)
    delta = torch.from_numpy(sol.y[-n:, -1]).to(x)
    return (prior_logp or sde.prior_logp)(z) + delta, z, sol.nfev


# -- evaluation, then the figures ------------------------------------------------------------


def recovered_weights(x: torch.Tensor, mix: Mixture) -> np.ndarray:
    """Fraction of samples whose most responsible component (argmax_k r_k(x)) is k."""
    k = noisy_components(x, mix)[0].argmax(0)
    return np.bincount(k.numpy(), minlength=len(mix.weights)) / len(x)


def spread_ratio(x: torch.Tensor, mix: Mixture) -> float:
    """Mean over components k of sqrt(tr(Sigma_k^-1 S_k) / 2), S_k the covariance of the samples
    assigned to k: 1 when every mode has the right shape, > 1 when the modes come out too wide
    (the fixed-step bias of unadjusted Langevin); both axes count alike, however thin."""
    k = noisy_components(x, mix)[0].argmax(0)
    ratios = [torch.trace(torch.linalg.solve(mix.covs[j], torch.cov(x[k == j].T))).item() / 2
              for j in range(len(mix.weights)) if (k == j).sum() > 2]
    return float(np.mean([math.sqrt(r) for r in ratios]))


def distance_reports(sets: dict, sample_truth, repeats: int = 3, seed: int = 0) -> dict:
    """common.distance_report for several sample sets of one size, with the real-vs-real floor
    (the same for all of them: same size, same truth draws) computed once instead of per set."""
    n = len(next(iter(sets.values())))
    draws = [(sample_truth(n, seed + 1000 + 2 * r), sample_truth(n, seed + 1001 + 2 * r))
             for r in range(repeats)]
    swd = lambda x: float(np.mean([common.sliced_wasserstein(x, a, seed=r)
                                   for r, (a, _) in enumerate(draws)]))
    mmd = lambda x: float(np.mean([common.mmd_rbf(x, a) for a, _ in draws]))
    floor_swd = np.mean([common.sliced_wasserstein(b, a, seed=r) for r, (a, b) in enumerate(draws)])
    floor_mmd = np.mean([common.mmd_rbf(b, a) for a, b in draws])
    return {name: {"swd": swd(x), "swd_floor": float(floor_swd), "mmd": mmd(x),
                   "mmd_floor": float(floor_mmd), "n": n} for name, x in sets.items()}


def evaluate(cfg: Config, mix: Mixture, samples: dict, timings: dict, seed: int) -> dict:
    """Per sampler: distances to fresh draws beside their floor, weights, spread. Then the ODE's
    log p(x) (Appendix D.2) in float64 against the truth, with the exact prior p_T (so only the
    ODE solve errs) and with the paper's N(0, I) (p_T is not exactly N(0, I): m(1) = 0.0066)."""
    t0 = time.perf_counter()
    truth = lambda n, s: sample_mixture(mix, n, torch.Generator().manual_seed(s)).numpy()
    reports = distance_reports({k: x.numpy() for k, x in samples.items()}, truth, seed=seed)
    true_w, results = mix.weights.numpy(), {}
    for name, x in samples.items():
        w = recovered_weights(x, mix)
        r = results[name] = {**timings[name], **reports[name], "weights": w.tolist(),
                             "weight_error": float(np.abs(w - true_w).max()),
                             "spread_ratio": spread_ratio(x, mix)}
        print(f"{name:24s} sliced W2 {r['swd']:.3f} (floor {r['swd_floor']:.3f})  weights "
              f"{np.round(w, 3).tolist()} (true {np.round(true_w.astype(float), 3).tolist()})  "
              f"mode width x{r['spread_ratio']:.3f}")
    mix64, sde = Mixture(*(v.double() for v in mix)), VPSDE(cfg.beta_min, cfg.beta_max)
    x = torch.from_numpy(truth(cfg.likelihood_points, seed + 9)).double()
    log_p_T = lambda z: log_prob(z, perturbed_mixture(mix64, sde, sde.T))
    t1 = time.perf_counter()
    logp, z, nfe = ode_log_likelihood(lambda y, t: score(y, perturbed_mixture(mix64, sde, t)), sde,
                                      x, cfg.likelihood_eps, cfg.ode_tol, cfg.ode_tol, log_p_T)
    wall, err = time.perf_counter() - t1, logp - log_prob(x, mix64)
    err_normal_prior = err + sde.prior_logp(z) - log_p_T(z)
    likelihood = {"n": len(x), "mean_log_p": log_prob(x, mix64).mean().item(),
                  "mae_nats": err.abs().mean().item(), "max_abs_error_nats": err.abs().max().item(),
                  "mae_nats_normal_prior": err_normal_prior.abs().mean().item(),
                  "nfe": nfe, "wall_s": wall}
    print(f"ODE log-likelihood of {len(x)} mixture draws: mean |error| {likelihood['mae_nats']:.2e}"
          f" nats with the exact p_T, {likelihood['mae_nats_normal_prior']:.2e} with N(0, I)")
    reference = torch.from_numpy(truth(cfg.n_samples, seed + 7))  # as in samples.png
    return {"true_weights": mix.weights.tolist(),
            "weights_of_true_samples": recovered_weights(reference, mix).tolist(),
            "samplers": results, "ode_likelihood": likelihood,
            "sampling_s": sum(t["wall_s"] for t in timings.values()),
            "evaluation_s": time.perf_counter() - t0}


def plot_trajectories(cfg: Config, mix: Mixture, x_T: torch.Tensor, path) -> None:
    """The same x(T) ~ N(0, I) taken to t = eps by the reverse SDE and by the probability flow
    ODE: in the plane over log p_0, and the first coordinate against t over the density of p_t."""
    sde, lim, paths = VPSDE(cfg.beta_min, cfg.beta_max), cfg.box, {"SDE": [], "ODE": []}
    score_t = lambda y, t: score(y, perturbed_mixture(mix, sde, t))
    keep = lambda kind: lambda t, x: paths[kind].append((t, x.numpy().copy()))
    sample_sde(score_t, sde, x_T, cfg.sde_steps, cfg.sde_eps, torch.Generator().manual_seed(0),
               record=keep("SDE"))
    sample_ode(score_t, sde, x_T, cfg.sde_eps, cfg.ode_tol, cfg.ode_tol, record=keep("ODE"))
    colors = common.pyplot().get_cmap("tab20")
    fig, axes = common.pyplot().subplots(1, 3, figsize=(15, 5),
                                         gridspec_kw={"width_ratios": [1, 1, 1.4]})
    g = torch.linspace(-lim, lim, 200)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    logp = log_prob(grid, mix).reshape(200, 200)
    titles = ("reverse-time SDE (Eq. 6), Euler-Maruyama", "probability flow ODE (Eq. 13), RK45")
    for ax, kind, title, lw, ls in zip(axes, paths, titles, (0.6, 1.8), ("-", "--")):
        ts, xs = np.array([t for t, _ in paths[kind]]), np.stack([x for _, x in paths[kind]])
        ax.contourf(g, g, logp.clamp_min(logp.max() - 12), levels=12, cmap="Greys", alpha=0.5)
        for j in range(xs.shape[1]):  # xs: (steps, particles, 2)
            ax.plot(xs[:, j, 0], xs[:, j, 1], color=colors(j % 20), lw=0.5 if ls == "-" else 1.5)
            axes[2].plot(ts, xs[:, j, 0], color=colors(j % 20), lw=lw, ls=ls)
        axes[2].plot([], [], "k", lw=lw, ls=ls, label=kind)
        ax.scatter(xs[0, :, 0], xs[0, :, 1], s=25, c="k", zorder=3, label="x(T) ~ N(0, I)")
        ax.scatter(xs[-1, :, 0], xs[-1, :, 1], s=40, c="w", edgecolors="k", marker="*", zorder=3,
                   label="x(eps)")
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), title=title, aspect="equal")
        ax.legend(fontsize=8, loc="lower center")
    x1 = torch.linspace(-lim, lim, 300)
    normal = lambda mu, var: torch.exp(-0.5 * (x1 - mu) ** 2 / var) / (2 * math.pi * var) ** 0.5
    p_t = [perturbed_mixture(mix, sde, t) for t in torch.linspace(sde.T, 0, 200).tolist()]
    dens = torch.stack([sum(w * normal(mu[0], c[0, 0]) for w, mu, c in zip(*p)) for p in p_t])
    axes[2].imshow(dens.T.sqrt(), origin="lower", aspect="auto", cmap="Greys",
                   extent=(sde.T, 0, -lim, lim))
    axes[2].set(xlim=(sde.T, 0), ylim=(-lim, lim), xlabel="t (from T = 1 to eps)", ylabel="x_1",
                title="first coordinate against t over the density of p_t(x_1) (VP SDE)")
    axes[2].legend(fontsize=8, loc="lower left")
    common.save_figure(fig, path)


def figures(cfg: Config, mix: Mixture, samples: dict, frames: list, seed: int, out) -> None:
    lim, shown = cfg.box, min(cfg.n_samples, 2000)  # fewer points: the density of each mode shows
    reference = sample_mixture(mix, cfg.n_samples, torch.Generator().manual_seed(seed + 7)).numpy()
    panels = {f"{k}\nweights {np.round(recovered_weights(x, mix), 2).tolist()}": x[:shown].numpy()
              for k, x in samples.items()}
    truth_title = f"ground truth\nweights {np.round(mix.weights.double().numpy(), 2).tolist()}"
    common.scatter_2d({truth_title: reference[:shown], **panels}, reference[:shown],
                      out / "samples.png", lim=lim)
    fig, axes = common.pyplot().subplots(1, 3, figsize=(12, 4))
    g, q = torch.linspace(-lim, lim, 200), torch.linspace(-lim, lim, 17)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    qgrid = torch.stack(torch.meshgrid(q, q, indexing="xy"), -1).reshape(-1, 2)
    for ax, sigma in zip(axes, [0.0, 1.0, 3.0]):  # log q_sigma and its score at three levels
        logq = log_prob(grid, mix, sigma).reshape(200, 200)
        ax.contourf(g, g, logq.clamp_min(logq.max() - 12), levels=16, cmap="Blues")
        s = score(qgrid, mix, sigma)
        norm = s.norm(dim=1, keepdim=True)
        s = s / norm.clamp_min(1e-8) * norm.clamp_max(1).pow(0.5)  # length ~ sqrt, capped at 1
        ax.quiver(qgrid[:, 0], qgrid[:, 1], s[:, 0], s[:, 1], color="C3", width=0.004, scale=25)
        ax.set_title(f"log q_sigma (contours) and its score, sigma = {sigma:g}", fontsize=9)
        ax.set_aspect("equal")
    common.save_figure(fig, out / "score_field.png")
    titles, points = zip(*frames)
    common.gif_points(out / "annealed_langevin.gif", points, titles, truth=reference[:1000],
                      lim=lim)
    x_T = torch.randn(cfg.n_samples, 2, generator=torch.Generator().manual_seed(seed + 1))
    plot_trajectories(cfg, mix, x_T[:cfg.trajectories], out / "sde_ode_trajectories.png")


# -- main: every sampler on the same mixture, from the same start ----------------------------


def run_sampler(name: str, sample_fn, n_steps: int | None, extra: str | None, n: int):
    """sample_fn() -> (points, value of `extra`), timed; the points must be finite. Returns them
    and the sampler's entry of metrics.json (with n_steps None, steps/s counts the NFE)."""
    t0 = time.perf_counter()
    x, value = sample_fn()
    common.check_finite(x, None, f"a sample of {name}", "try a smaller --step or --eps")
    wall = time.perf_counter() - t0
    return x, {**({extra: value} if extra else {}), "n": n, "wall_s": wall,
               "samples_per_s": n / wall, "steps_per_s": (n_steps or value) / wall}


def main(argv=None) -> dict:
    args = common.parse_args(argv, __doc__, Config, PRESETS, STEM, trains=False)
    out, device = common.prepare_out(args.out), common.get_device(args.device)
    if device.type != "cpu":
        print(f"2-D chains run fastest on the CPU; ignoring --device {device}")
    preset, cfg, _ = common.run_config(args, Config, PRESETS, STEM, FREE, device)
    common.seed_everything(args.seed)
    common.write_json(out / "config.json", {"preset": preset, "seed": args.seed, **asdict(cfg)})
    t0 = time.perf_counter()
    with common.one_thread():
        mix, sde = make_mixture(cfg.components, cfg.radius), VPSDE(cfg.beta_min, cfg.beta_max)
        # Langevin chains start uniform on [-box, box]^2, the SDE and the ODE from x(T) ~ N(0, I)
        gen, gen_T = (torch.Generator().manual_seed(args.seed + i) for i in (0, 1))
        x0 = (torch.rand(cfg.n_samples, 2, generator=gen) * 2 - 1) * cfg.box
        x_T = torch.randn(cfg.n_samples, 2, generator=gen_T)
        sigmas, coarse = (geometric_sigmas(cfg.sigma_1, cfg.sigma_L, k)
                          for k in (cfg.n_levels, cfg.coarse_levels))
        exact = lambda y, sigma=0.0: score(y, mix, sigma)  # the exact scores: no network
        both = lambda y, sigma=0.0: log_prob_and_score(y, mix, sigma)
        score_t = lambda y, t: score(y, perturbed_mixture(mix, sde, t))
        acc, n, L = "accept_rate", cfg.n_steps, cfg.n_levels * cfg.T
        keep, frames = set(np.linspace(0, L - 1, cfg.gif_frames).round().astype(int)), []

        def record(i, t, x):  # the (title, first 1000 points) frames of annealed_langevin.gif
            if i * cfg.T + t in keep:
                frames.append((f"annealed Langevin, level {i + 1}/{cfg.n_levels}: sigma = "
                               f"{sigmas[i]:.3g}", x[:1000].numpy().copy()))
        samplers = {  # name: (sample_fn() -> (points, extra), its steps, the extra's name)
            "Langevin": (lambda: (langevin(x0, exact, cfg.step, n, gen), None), n, acc),
            "MALA": (lambda: mala(x0, both, cfg.step, n, gen), n, acc),
            f"annealed Langevin, L={cfg.coarse_levels}": (lambda: (annealed_langevin(
                x0, exact, coarse, cfg.eps, cfg.T, gen), None), cfg.coarse_levels * cfg.T, acc),
            "annealed Langevin": (lambda: (annealed_langevin(
                x0, exact, sigmas, cfg.eps, cfg.T, gen, record), None), L, acc),
            "annealed MALA": (lambda: annealed_mala(x0, both, sigmas, cfg.eps, cfg.T, gen), L, acc),
            "VP SDE, Euler-Maruyama": (lambda: (sample_sde(
                score_t, sde, x_T, cfg.sde_steps, cfg.sde_eps, gen_T), None), cfg.sde_steps, None),
            "VP prob. flow ODE, RK45": (lambda: sample_ode(
                score_t, sde, x_T, cfg.sde_eps, cfg.ode_tol, cfg.ode_tol), None, "nfe"),
        }
        samples, timings = {}, {}
        for name, spec in tqdm(samplers.items(), desc="samplers", mininterval=1.0):
            samples[name], timings[name] = run_sampler(name, *spec, cfg.n_samples)
        torch.save({k: v.clone() for k, v in samples.items()}, out / "samples.pt")
        metrics = {"preset": preset, **evaluate(cfg, mix, samples, timings, args.seed)}
        figures(cfg, mix, samples, frames, args.seed, out)
    metrics["wall_s_total"] = time.perf_counter() - t0
    common.write_json(out / "metrics.json", metrics)
    return metrics


if __name__ == "__main__":
    common.cli_entry(main)
