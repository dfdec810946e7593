"""04 -- Deep Unsupervised Learning using Nonequilibrium Thermodynamics on the Swiss roll.

Sohl-Dickstein, Weiss, Maheswaranathan, Ganguli (ICML 2015), arXiv:1503.03585, Sec. 2, 3.1,
Appendix A (Table App.1), Appendix B (the bound K) and D.1.1 (the Swiss roll), Figure 1.

What it shows: the first diffusion model, as the paper built it rather than as DDPM later
simplified it. The forward process slowly turns a 2-D Swiss roll into N(0, I) in T = 40 Gaussian
steps (Eq. 1-3); the reverse process (Eq. 4-5) is Gaussian with a *learned mean and a learned
diagonal covariance*, both read out of a network of (x_t, t); and training maximises the lower
bound K on the log likelihood (Eq. 14: a sum of KL divergences to the forward posterior plus
three entropy terms, Appendix B), not a noise-prediction loss; as in Sec. 2.4.1, beta_1 is a
small constant and beta_2..T are learned by gradient ascent on K, too. K is reported in bits per
2-D sample next to the paper's Table 1, with the exact log likelihood of the data beside it as
the ceiling no model can pass.

    python 04_sohl_dickstein_swissroll.py --preset cpu     # about 50 s of CPU time, one core

Writes to runs/04_sohl_dickstein_swissroll/: config.json, ckpt.pt, metrics.json (K and K - L_null
in bits, the data's own log likelihood, sliced Wasserstein / MMD of samples to fresh data beside
the real-vs-real floor, wall times), samples.pt, samples.png, loss.png (-K in bits during
training), figure1.png (the paper's Figure 1: forward and reverse trajectories at t = 0, T/2, T
and the drift mu(x_t, t) - x_t), variance.png (learned reverse variance against the learned
forward beta_t), reverse_chain.gif.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

import common

# -- config ---------------------------------------------------------------------------------


@dataclass
class Config:
    T: int = 40  # trajectory length; paper: 40 for the Swiss roll (App. D.1.1)
    # beta_2..T learned on K (the paper, Sec. 2.4.1) or fixed (the authors' code)
    schedule: Literal["learned", "fixed"] = "learned"
    # variance of the fixed first step; paper: "a small constant" (Sec. 2.4.1); the authors'
    # code: 1/T + 1e-3 = 0.026
    beta1: float = 1e-3
    # jitter of the roll in raw units (arms ~6.3 apart; 0.15 after scaling), not in the paper;
    # the model's last step adds fixed noise of variance beta_1 (App. B.2), so sqrt(beta_1)
    # should stay below it
    roll_noise: float = 1.0
    # shared layers: the paper's normalized RBF network, or a tanh MLP with the same readouts
    trunk: Literal["rbf", "mlp"] = "rbf"
    hidden: int = 16  # RBF units (MLP width); paper: 16 RBF units
    # training steps (the paper does not say); with --resume: extend the run to this many, the
    # cosine lr decay then spans the new total
    steps: int = 4000
    batch_size: int = 512  # Swiss-roll points per step; the authors' code: 512
    # Adam learning rate, cosine decay; the authors' code: RMSProp, 1e-3 decayed towards 1e-5
    lr: float = 1e-2
    ema_decay: float = 0.995  # EMA of the weights, evaluated and sampled (not in the paper)
    n_eval: int = 4000  # held-out points for K, and samples drawn for the distances
    gif_stride: int = 1  # every how many reverse steps a GIF frame is drawn

    def __post_init__(self):  # one line naming the flag for a value out of range
        least = {"T": 2, "steps": 1, "batch_size": 1, "hidden": 1, "n_eval": 2, "gif_stride": 1}
        for name, n in least.items():
            common.check(getattr(self, name) >= n, name, f"at least {n}")
        common.check(0 < self.beta1 < 1, "beta1", "in (0, 1)")
        common.check(0 <= self.ema_decay < 1, "ema_decay", "in [0, 1)")
        for name in ("lr", "roll_noise"):
            common.check(getattr(self, name) > 0, name, "above 0")


PRESETS = {
    "smoke": {"steps": 300, "batch_size": 256, "ema_decay": 0.9, "n_eval": 500, "gif_stride": 10},
    "cpu": {"hidden": 64, "gif_stride": 2},  # paper: 16 RBF units
    "gpu": {"hidden": 64, "steps": 20000, "batch_size": 1024, "ema_decay": 0.999,  # paper: 16
            "n_eval": 20000},
}
FREE = ("n_eval", "gif_stride")  # what a resumed run may change: evaluation and figures
STEM = "04_sohl_dickstein_swissroll"
PAPER_TABLE1_BITS = {"K": 2.35, "K_minus_L_null": 6.45}  # Table 1, Swiss roll, bits per sample

# -- data: the Swiss roll, scaled to zero mean and E|x|^2 = 2 ----------------------------------

D = 2  # data dimension


def roll_curve(tau: np.ndarray) -> np.ndarray:
    """The spiral (tau cos tau, tau sin tau), tau in [1.5 pi, 4.5 pi] (as sklearn's
    make_swiss_roll)."""
    return np.stack([tau * np.cos(tau), tau * np.sin(tau)], -1)


TAU_LO, TAU_HI = 1.5 * math.pi, 4.5 * math.pi
# the midpoint rule for expectations over tau
_TAU_GRID = TAU_LO + (TAU_HI - TAU_LO) * (np.arange(4096) + 0.5) / 4096


@functools.lru_cache
def roll_scaling(noise: float) -> tuple[np.ndarray, float]:
    """Mean m and one isotropic scale s with E|s (x - m)|^2 = D: the reference code's scaling
    (zero mean, unit variance per coordinate on average), under which L_null = -D/2 log(2 pi e)."""
    c = roll_curve(_TAU_GRID)
    m = c.mean(0)
    var = ((c - m) ** 2).sum(-1).mean() + D * noise**2
    return m, math.sqrt(D / var)


def swiss_roll(n: int, seed: int, noise: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = roll_curve(rng.uniform(TAU_LO, TAU_HI, n)) + noise * rng.normal(size=(n, D))
    m, s = roll_scaling(noise)
    return ((x - m) * s).astype(np.float32)


def held_out(cfg: Config, seed: int, n: int | None = None) -> np.ndarray:
    """Test points: their seeds are never used in training (those are seed * 1_000_003 + step)."""
    return swiss_roll(cfg.n_eval if n is None else n, seed + 999_983, cfg.roll_noise)


def data_log_density(x: np.ndarray, noise: float) -> np.ndarray:
    """Exact log q(x^(0)) of the scaled roll: a uniform mixture over tau of N(curve(tau),
    noise^2 I), integrated by the midpoint rule. E[log q] is the largest log likelihood any model
    can reach."""
    m, s = roll_scaling(noise)
    raw = x.astype(np.float64) / s + m
    d2 = ((raw[:, None, :] - roll_curve(_TAU_GRID)[None]) ** 2).sum(-1)
    logn = -d2 / (2 * noise**2) - D / 2 * math.log(2 * math.pi * noise**2)
    mx = logn.max(1, keepdims=True)
    return (mx[:, 0] + np.log(np.exp(logn - mx).mean(1))) - D * math.log(s)


# -- the method: forward process, posterior, bound K, reverse sampler -----------------------


def beta_schedule(T: int, beta1: float, theta: torch.Tensor | None = None) -> torch.Tensor:
    """beta_1..T of the forward kernel (Eq. 2, Table App.1). beta_1 is the fixed small constant of
    Sec. 2.4.1; beta_2..T are sigmoid(logit b_t + theta_t) around the authors' code's baseline
    b_t = 1 / (T - (t-1)(T-2)/(T-1)) (from 1/T to 1/2: each step removes the same fraction of the
    variance still left, about 1/T of it survives to t = T). theta = 0 is that fixed schedule;
    the paper learns theta by gradient ascent on K (Sec. 2.4.1)."""
    baseline = 1.0 / torch.linspace(T, 2.0, T, dtype=torch.float32)[1:]
    theta = torch.zeros(T - 1) if theta is None else theta
    rest = torch.sigmoid(torch.logit(baseline) + theta)
    return torch.cat([torch.full((1,), beta1, dtype=rest.dtype), rest])


def alpha_bar(beta: torch.Tensor) -> torch.Tensor:
    """prod_{s<=t} (1 - beta_s): the fraction of the data variance left at step t (Eq. 2-3)."""
    return torch.cumprod(1 - beta, 0)


def q_sample(x0: torch.Tensor, t: torch.Tensor, beta: torch.Tensor,
             noise: torch.Tensor) -> torch.Tensor:
    """x^(t) ~ q(x^(t) | x^(0)) = N(sqrt(abar_t) x0, (1 - abar_t) I): T_pi of Table App.1 applied
    t times."""
    ab = alpha_bar(beta)[t - 1][:, None]
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def q_posterior(x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, beta: torch.Tensor):
    """Mean and variance of q(x^(t-1) | x^(t), x^(0)) for t >= 2 (App. B.3): by Bayes' rule the
    product of q(x^(t) | x^(t-1)) = N(sqrt(1 - beta_t) x^(t-1), beta_t) and q(x^(t-1) | x^(0)),
    two Gaussians in x^(t-1), so precisions add and precision-weighted means add."""
    ab = alpha_bar(beta)
    b, ab_prev = beta[t - 1][:, None], ab[t - 2][:, None]
    prec = (1 - b) / b + 1 / (1 - ab_prev)
    mean = ((1 - b).sqrt() / b * xt + ab_prev.sqrt() / (1 - ab_prev) * x0) / prec
    return mean, (1 / prec).expand_as(mean)


def gaussian_kl(mu_q, var_q, mu_p, var_p) -> torch.Tensor:
    """D_KL(N(mu_q, var_q) || N(mu_p, var_p)) for diagonal Gaussians, summed over dimensions, in
    nats."""
    return 0.5 * (torch.log(var_p / var_q) + (var_q + (mu_q - mu_p) ** 2) / var_p - 1).sum(-1)


def gaussian_entropy(var: torch.Tensor, d: int) -> torch.Tensor:
    """H[N(., var I_d)] = d/2 log(2 pi e var), in nats."""
    return 0.5 * d * torch.log(2 * math.pi * math.e * var)


def entropy_terms(beta: torch.Tensor, d: int) -> torch.Tensor:
    """H_q(X^(T) | X^(0)) - H_q(X^(1) | X^(0)) - H_p(X^(T)) of Eq. 14 (App. B.1-B.4), in nats, for
    d-dimensional data. H_p(X^(T)) stands for the cross entropy -E_q log pi(x^(T)); the two are
    equal when E|x0|^2 = d."""
    ab_T = alpha_bar(beta)[-1]
    return (gaussian_entropy(1 - ab_T, d) - gaussian_entropy(beta[0], d)
            - gaussian_entropy(torch.ones(()), d))


def bound_K(model, x0: torch.Tensor, t: torch.Tensor, beta: torch.Tensor, noise: torch.Tensor):
    """Single-sample estimate of K (Eq. 14) per data point, in nats: the KL term of one step
    t ~ U{2..T}, times the T - 1 terms of the sum, plus the entropy terms. Step t = 1 is the
    fixed reversal p(x^(0) | x^(1)) = T_pi(x^(0) | x^(1); beta_1) (App. B.2) and adds nothing.
    model(x^(t), t, beta) returns the mean and diagonal variance of p(x^(t-1) | x^(t))."""
    T = len(beta)
    xt = q_sample(x0, t, beta, noise)
    mu_q, var_q = q_posterior(x0, xt, t, beta)
    mu_p, var_p = model(xt, t, beta)
    return -(T - 1) * gaussian_kl(mu_q, var_q, mu_p, var_p) + entropy_terms(beta, x0.shape[-1])


@torch.no_grad()
def bound_K_full(model, x0: torch.Tensor, beta: torch.Tensor, generator=None) -> torch.Tensor:
    """K per data point with every KL term t = 2..T evaluated (one x^(t) each), in nats."""
    kl = torch.zeros(len(x0), device=x0.device)
    for t in range(2, len(beta) + 1):
        tt = torch.full((len(x0),), t, device=x0.device)
        xt = q_sample(x0, tt, beta, torch.randn(x0.shape, generator=generator, device=x0.device))
        kl += gaussian_kl(*q_posterior(x0, xt, tt, beta), *model(xt, tt, beta))
    return -kl + entropy_terms(beta, x0.shape[-1])


def log_pi(x: torch.Tensor) -> torch.Tensor:
    """log N(x; 0, I): the tractable end distribution pi(x^(T)) (Eq. 4), also the null model
    L_null."""
    return -0.5 * (x**2).sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)


@torch.no_grad()
def p_sample_loop(model, x: torch.Tensor, beta: torch.Tensor, generator=None, record=None):
    """Ancestral sampling of Eq. 5 from x = x^(T) ~ pi: x^(t-1) ~ N(f_mu(x^(t), t), f_Sigma(x^(t),
    t)) for t = T..2, then the fixed last step x^(0) ~ N(sqrt(1 - beta_1) x^(1), beta_1 I)
    (App. B.2). Returns x^(0); record(t, x^(t)) sees every step, t = T..0."""
    T = len(beta)
    if record:
        record(T, x)
    for t in range(T, 1, -1):
        mu, var = model(x, torch.full((len(x),), t, device=x.device), beta)
        x = mu + var.sqrt() * torch.randn(x.shape, generator=generator, device=x.device)
        if record:
            record(t - 1, x)
    noise = torch.randn(x.shape, generator=generator, device=x.device)
    x = (1 - beta[0]).sqrt() * x + beta[0].sqrt() * noise
    if record:
        record(0, x)
    return x


# -- model: shared layers, one readout per time step (App. D.1.1) ------------------------------


class ReverseModel(nn.Module):
    """f_mu(x^(t), t) and a diagonal f_Sigma(x^(t), t) of p(x^(t-1) | x^(t)) (Table App.1).
    Shared layers map x^(t) to features; the top (readout) layer is learned independently for each
    t (the paper). As in the authors' code, both are perturbations of the forward step:
    f_mu = sqrt(1 - beta_t) x + sqrt(beta_t) z_mu and f_Sigma = sigmoid(z_Sigma + logit beta_t),
    so the sigmoid keeps the variance in (0, 1) and zero readouts give the exact reversal of
    diffusion on N(0, I) data, for which K = L_null. theta holds the learned beta_2..T."""

    def __init__(self, T: int, trunk: str = "rbf", hidden: int = 16, beta1: float = 1e-3,
                 learn_schedule: bool = True, dim: int = 2):
        super().__init__()
        self.T, self.beta1, self.dim = T, beta1, dim
        self.theta = nn.Parameter(torch.zeros(T - 1), requires_grad=learn_schedule)
        self.trunk = trunk
        if trunk == "rbf":  # normalized RBF: softmax over -|x - c_j|^2 / (2 w_j^2)
            self.centers = nn.Parameter(torch.randn(hidden, dim))
            self.log_width = nn.Parameter(torch.full((hidden,), math.log(0.5)))
        else:
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(),
                                     nn.Linear(hidden, hidden), nn.Tanh())
        self.readout_w = nn.Parameter(torch.zeros(T, hidden, 2 * dim))
        self.readout_b = nn.Parameter(torch.zeros(T, 2 * dim))

    def beta(self) -> torch.Tensor:
        return beta_schedule(self.T, self.beta1, self.theta)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.trunk == "rbf":
            d2 = torch.cdist(x, self.centers).pow(2)
            return torch.softmax(-d2 / (2 * torch.exp(2 * self.log_width)), dim=-1)
        return self.mlp(x)

    def forward(self, x: torch.Tensor, t: torch.Tensor, beta: torch.Tensor):
        w = self.readout_w.transpose(0, 1).flatten(1)  # every step's readout in one matmul
        z = (self.features(x) @ w).view(len(x), self.T, 2 * self.dim)
        z = z[torch.arange(len(x), device=x.device), t - 1] + self.readout_b[t - 1]
        z_mu, z_sigma = z.chunk(2, dim=-1)
        b = beta[t - 1][:, None]
        return (1 - b).sqrt() * x + b.sqrt() * z_mu, torch.sigmoid(z_sigma + torch.logit(b))


# -- training: gradient ascent on K (Sec. 2.4) ---------------------------------------------------


def train(run, model, ema, opt) -> dict:
    """Maximise K on fresh Swiss-roll batches, with -K in bits as the loss. One t per example
    (the reference code draws one t per minibatch). A learned schedule gets its gradient through
    the frozen noise of q_sample (Sec. 2.4.1)."""
    cfg = run.cfg
    for step in run.steps(every=1000):
        x0 = torch.from_numpy(swiss_roll(cfg.batch_size, run.seed * 1_000_003 + step,
                                         cfg.roll_noise))
        t = torch.randint(2, cfg.T + 1, (cfg.batch_size,))
        for group in opt.param_groups:  # cosine decay (the reference code decays its lr, too)
            group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        loss = -bound_K(model, x0, t, model.beta(), torch.randn_like(x0)).mean() / math.log(2)
        run.log(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(model)
    return run.trained


# -- evaluation and figures ------------------------------------------------------------------


def bits(nats) -> float:
    return float(nats) / math.log(2)


def evaluate(model, cfg: Config, beta: torch.Tensor, seed: int) -> tuple[dict, list]:
    """K on held-out points, the data's own log likelihood, samples and their distances to fresh
    data. Returns the metrics and the reverse chain [x^(T), ..., x^(0)] of the samples."""
    gen, x_test = torch.Generator().manual_seed(seed + 1), held_out(cfg, seed)
    x0 = torch.from_numpy(x_test)
    K = bits(bound_K_full(model, x0, beta, gen).mean())
    L_null = bits(log_pi(x0).mean())
    L_data = bits(data_log_density(x_test[:2000], cfg.roll_noise).mean())
    t0, chain = time.perf_counter(), []
    x_T = torch.randn(cfg.n_eval, D, generator=gen)
    samples = p_sample_loop(model, x_T, beta, gen, record=lambda t, x: chain.append(x))
    wall = time.perf_counter() - t0
    common.check_finite(samples, cfg.steps, "a sample", "try a lower --lr")
    truth = lambda n, s: swiss_roll(n, s, cfg.roll_noise)
    dist = common.distance_report(samples.numpy(), truth, seed=seed)
    return {
        "K_bits": K, "K_cap_from_beta1_bits": bits(entropy_terms(beta, D)), "beta": beta.tolist(),
        "K_minus_L_null_bits": K - L_null, "L_null_bits": L_null,
        "data_log_likelihood_bits": L_data, "gap_to_data_bits": L_data - K,
        "paper_table1_bits": PAPER_TABLE1_BITS,
        "units": "bits per 2-D sample (summed over both coordinates), held-out data, data scaled "
                 "to zero mean and E|x|^2 = 2 as in the authors' code, so that "
                 "L_null = -log2(2 pi e) = -4.094 bits",
        "comparability": "K - L_null uses the same null and units as Table 1, but the paper does "
                         "not state the roll's thickness or extent (its code for the roll is not "
                         "public), and K is capped by the data's own log likelihood "
                         "(data_log_likelihood_bits), which is set by that thickness and by "
                         "beta_1; so the values are comparable in kind, not in size",
        "distances": dist, "swd_over_floor": dist["swd"] / dist["swd_floor"],
        "ancestral": {"n": cfg.n_eval, "wall_s": wall, "samples_per_s": cfg.n_eval / wall},
    }, chain


def plot_figure1(traj_q, traj_p, model, beta, truth, path):
    """The paper's Figure 1: forward q (top) and reverse p (middle) at t = 0, T/2, T, and the
    drift f_mu(x^(t), t) - x^(t) of the reverse process (bottom)."""
    T, lim = len(beta), 2.6
    fig, axes = common.pyplot().subplots(3, 3, figsize=(10, 10))
    for j, t in enumerate([0, T // 2, T]):
        for i, (pts, name) in enumerate([(traj_q[t], "q"), (traj_p[T - t], "p")]):
            ax = axes[i, j]
            ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5, c="C0" if i == 0 else "C1")
            ax.set_title(f"{name}(x$^{{({t})}}$)", fontsize=10)
        # drift of the step leaving x^(t); t = 0 has none, so draw the first learned step, t = 2
        td = max(t, 2)
        g = torch.linspace(-lim, lim, 21)
        grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, D)
        with torch.no_grad():
            mu, _ = model(grid, torch.full((len(grid),), td), beta)
        drift = (mu - grid).numpy()
        ax = axes[2, j]
        ax.scatter(truth[:, 0], truth[:, 1], s=1, c="0.85")
        ax.quiver(grid[:, 0], grid[:, 1], drift[:, 0], drift[:, 1], color="C3", angles="xy")
        ax.set_title(f"f$_\\mu$(x$^{{({td})}}$, {td}) - x$^{{({td})}}$", fontsize=10)
    for ax in axes.flat:
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[])
        ax.set_aspect("equal")
    common.save_figure(fig, path)


def plot_variance(model, beta, cfg: Config, seed: int, path):
    """Learned reverse variance f_Sigma(x^(t), t) over x^(t) ~ q against the forward beta_t and
    the posterior variance of q(x^(t-1) | x^(t), x^(0))."""
    x0 = torch.from_numpy(swiss_roll(2000, seed + 7, cfg.roll_noise))
    ts, spread, post = np.arange(2, cfg.T + 1), [], []
    with torch.no_grad():
        for t in ts:
            tt = torch.full((len(x0),), int(t))
            xt = q_sample(x0, tt, beta, torch.randn_like(x0))
            var = model(xt, tt, beta)[1].flatten().numpy()
            spread.append(np.quantile(var, [0.1, 0.5, 0.9]))
            post.append(q_posterior(x0[:1], xt[:1], tt[:1], beta)[1][0, 0].item())
    lo, med, hi = np.array(spread).T
    fig, ax = common.pyplot().subplots(figsize=(6, 3.8))
    ax.plot(np.arange(1, cfg.T + 1), beta.numpy(), "k-", label=r"forward $\beta_t$")
    ax.plot(ts, post, "k--", label=r"posterior var of q(x$^{(t-1)}$|x$^{(t)}$,x$^{(0)}$)")
    ax.plot(ts, med, "C1-", label=r"learned f$_\Sigma$(x$^{(t)}$, t), median")
    ax.fill_between(ts, lo, hi, color="C1", alpha=0.3, label="10-90% over x$^{(t)}$ ~ q")
    ax.set(xlabel="t", ylabel="variance", yscale="log", title="reverse variance vs forward beta")
    ax.legend(fontsize=8)
    common.save_figure(fig, path)


def figures(run, model, beta, chain: list) -> None:
    """samples.png, loss.png, figure1.png, variance.png and reverse_chain.gif."""
    cfg, seed, out = run.cfg, run.seed, run.out
    x_test, samples = held_out(cfg, seed), chain[-1].numpy()
    common.scatter_2d({"data (held out)": x_test, f"samples, T = {cfg.T} reverse steps": samples},
                      x_test, out / "samples.png", lim=2.6)
    common.plot_loss(run.losses, out / "loss.png", title="-K (bits per sample), lower is better")
    gen, x0 = torch.Generator().manual_seed(seed + 2), torch.from_numpy(x_test)
    ab = alpha_bar(beta)
    traj_q = [x0] + [ab[t - 1].sqrt() * x0 + (1 - ab[t - 1]).sqrt()
                     * torch.randn(x0.shape, generator=gen) for t in range(1, cfg.T + 1)]
    plot_figure1([x.numpy() for x in traj_q], [x.numpy() for x in chain], model, beta, x_test,
                 out / "figure1.png")
    plot_variance(model, beta, cfg, seed, out / "variance.png")
    keep = list(range(0, cfg.T + 1, cfg.gif_stride)) + ([cfg.T] if cfg.T % cfg.gif_stride else [])
    frames = [chain[i][:1500].numpy() for i in keep]
    titles = [f"reverse chain: x$^{{({cfg.T - i})}}$" for i in keep]
    common.gif_points(out / "reverse_chain.gif", frames + frames[-1:] * 8,
                      titles + titles[-1:] * 8, truth=x_test[:1500], lim=2.6, fps=8)


# -- main ---------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    run = common.Run(argv, __doc__, Config, PRESETS, FREE, STEM)
    cfg, seed, t_start = run.cfg, run.seed, time.perf_counter()
    if run.device.type != "cpu":
        print(f"a 2-D model this small is fastest on the CPU; running there, not on {run.device}")
    with common.one_thread():  # tensors of a few thousand 2-D points: one thread is fastest
        model = ReverseModel(cfg.T, cfg.trunk, cfg.hidden, cfg.beta1, cfg.schedule == "learned", D)
        ema = common.make_ema(model, cfg.ema_decay)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        run.restore(model=model, ema=ema, optimizer=opt)
        K_init = None
        if run.trains and run.step == 0:  # zero readouts: K = L_null
            x_test, gen = torch.from_numpy(held_out(cfg, seed)), torch.Generator().manual_seed(0)
            K_init = bits(bound_K_full(model, x_test, model.beta().detach(), gen).mean())
        trained = train(run, model, ema, opt) if run.trains else {  # or the checkpoint's run
            "steps": run.step, "steps_this_run": 0, "final_loss": np.mean(run.losses[-100:])}
        run.finish()
        beta = ema.module.beta().detach()
        metrics, chain = evaluate(ema.module, cfg, beta, seed)
        torch.save(chain[-1], run.out / "samples.pt")
        figures(run, ema.module, beta, chain)
    metrics = {"preset": run.preset, "seed": seed, "train": trained, "K_bits_at_init": K_init,
               **metrics, "params": common.count_params(model),
               "wall_s_total": time.perf_counter() - t_start}
    common.write_json(run.out / "metrics.json", metrics)
    d = metrics["distances"]
    print(f"K = {metrics['K_bits']:.3f} bits, K - L_null = {metrics['K_minus_L_null_bits']:.3f} "
          f"bits (paper: 2.35, 6.45); data log-likelihood {metrics['data_log_likelihood_bits']:.3f}"
          f" bits; swd {d['swd']:.4f} (floor {d['swd_floor']:.4f})")
    return metrics


if __name__ == "__main__":
    common.cli_entry(main)
