"""02 -- Noise Conditional Score Networks on 2-D data.

Song & Ermon, "Generative Modeling by Estimating Gradients of the Data Distribution" (NeurIPS
2019), arXiv:1907.05600, Sec. 4: a noise-conditional score network s_theta(x, sigma_i) trained
by denoising score matching at L noise levels (Eq. 5-6, lambda(sigma) = sigma^2), sampled by
annealed Langevin dynamics (Algorithm 1).

What it shows: a score learned from samples alone is good enough for annealed Langevin to
reproduce the data, mixture weights included. On the Gaussian mixture of 01 the exact score of
every noisy distribution q_sigma is known in closed form, so the learned score is compared with
it at each sigma_i; the Swiss roll and the checkerboard have no closed form and are judged by
the distance of the samples to fresh data. `--loss ssm` trains by sliced score matching (Eq. 3
applied to q_sigma) instead of denoising score matching.

Conditioning: NCSN's. The paper gives every noise level i its own scale and shift in each
conditional instance normalisation of a RefineNet; this MLP gives every level i its own scale
and shift (gamma_i, beta_i) after each hidden layer. From NCSNv2 (arXiv:2006.09011, technique 3)
we also divide the output by sigma_i, so that sigma_i s_theta -- what Eq. 6 with sigma^2
weighting asks the network for -- is of unit size at every level.

    python 02_ncsn_toy.py                          # the mixture, --preset cpu, ~2.5 min on a CPU
    python 02_ncsn_toy.py --dataset swissroll      # or checkerboard; --loss ssm

Writes to runs/02_ncsn_toy/: config.json, ckpt.pt, loss.png, metrics.json, samples.pt,
samples.png (samples over the data), noise_levels.png (the data at several sigma_i),
score_field.png (learned score, and for the mixture the exact one beside it),
score_error.png (mixture: the score error per sigma_i), annealed_langevin.gif.
`--resume` continues an interrupted run to its own step count, `--resume --steps N` extends it
(the learning rate is constant, so the extension simply goes on), `--sample-only` samples again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import common

# -- config ---------------------------------------------------------------------------------


@dataclass
class Config:
    dataset: Literal["mixture", "swissroll", "checkerboard"] = "mixture"  # 2-D data to learn
    loss: Literal["dsm", "ssm"] = "dsm"  # dsm: Eq. 5-6 (the paper's); ssm: Eq. 3 on q_sigma
    # noise levels: geometric sigma_1 > ... > sigma_L. The paper's 1 and 0.01 are for images in
    # [0, 1]. Here sigma_1 ~ the largest distance in the data (NCSNv2, technique 1); our data
    # span ~12 units and their finest detail is ~0.3 wide, so sigma_L = 0.05 gives q_sigma_L ~ p.
    sigma_1: float = 10.0  # largest noise level (paper 1, for images in [0, 1])
    sigma_L: float = 0.05  # smallest noise level (paper 0.01, for images in [0, 1])
    n_levels: int = 10  # L, the number of noise levels (the paper's)
    # annealed Langevin, Algorithm 1: T steps per level, alpha_i = eps sigma_i^2 / sigma_L^2
    T: int = 100  # annealed Langevin steps per noise level (the paper's)
    eps: float = 5e-4  # alpha_i = eps sigma_i^2 / sigma_L^2 (paper 2e-5 at sigma_L 0.01: same 0.2)
    box: float = 8.0  # the chains start uniform on [-box, box]^2
    # network (the paper's is a RefineNet) and training
    width: int = 96  # hidden units; 64 biases the weights toward the heavy mode (~0.03, 3 seeds)
    depth: int = 3  # hidden layers
    steps: int = 200_000  # training steps (the paper's); with --resume: extend the run to this
    batch_size: int = 128  # fresh data points per step (the paper's)
    lr: float = 1e-3  # Adam's learning rate, constant (the paper's)
    ema_decay: float = 0.999  # EMA of the weights for sampling: NCSNv2, technique 5 (NCSN: none)
    n_samples: int = 2000  # particles sampled and compared with the data
    gif_frames: int = 20  # frames of annealed_langevin.gif

    def __post_init__(self):  # one line naming the flag for a value out of range
        for name in ("n_levels", "T", "width", "depth", "steps", "batch_size", "n_samples",
                     "gif_frames"):
            common.check(getattr(self, name) >= 1, name, "at least 1")
        for name in ("eps", "box", "lr"):
            common.check(getattr(self, name) > 0, name, "above 0")
        common.check(0 < self.sigma_L < self.sigma_1, "sigma_L", "above 0 and below --sigma-1")
        common.check(0 <= self.ema_decay < 1, "ema_decay", "in [0, 1)")


# A small MLP on 2-D data takes more steps at a larger batch and lr than the paper's RefineNet
# (200k steps at batch 128, lr 1e-3), and the paper's L = 10 levels over 2-3 decades quench
# rather than anneal: the mixture weights come out ~0.03 off even with the exact score (see 01).
PRESETS = {
    "smoke": {"steps": 1200, "batch_size": 512, "lr": 2e-3, "n_levels": 30, "T": 40,
              "n_samples": 1000, "width": 64, "gif_frames": 4},
    "cpu": {"steps": 4000, "batch_size": 512, "lr": 2e-3, "n_levels": 50},
    "gpu": {"steps": 20_000, "batch_size": 512, "lr": 2e-3, "n_levels": 100, "n_samples": 10_000,
            "width": 256},
}
FREE = ("T", "eps", "box", "n_samples", "gif_frames")  # sampling: a resumed run may change them
STEM = "02_ncsn_toy"


# -- data: the Gaussian mixture of 01 (with its exact noisy scores), Swiss roll, checkerboard ----


class Mixture(NamedTuple):
    weights: torch.Tensor  # (K,)
    means: torch.Tensor  # (K, 2)
    covs: torch.Tensor  # (K, 2, 2)


def make_mixture(k: int = 3, radius: float = 5.0) -> Mixture:
    """As in 01: K Gaussians on a circle, weights proportional to 2^-k, standard deviations
    1.0 along the circle and 0.3 across it."""
    angles = math.pi / 2 + 2 * math.pi * torch.arange(k, dtype=torch.float64) / k
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    weights = 0.5 ** torch.arange(k, dtype=torch.float64)
    turn = angles + math.pi / 2
    rot = torch.stack([torch.stack([turn.cos(), -turn.sin()], -1),
                       torch.stack([turn.sin(), turn.cos()], -1)], -2)
    covs = rot @ torch.diag(torch.tensor([1.0, 0.09], dtype=torch.float64)) @ rot.transpose(-1, -2)
    return Mixture((weights / weights.sum()).float(), means.float(), covs.float())


MIXTURE = make_mixture()


def noisy_components(x: torch.Tensor, mix: Mixture, sigma: float = 0.0):
    """q_sigma = p * N(0, sigma^2 I) is the mixture with covariances C_k = Sigma_k + sigma^2 I.
    Returns log w_k + log N(x; mu_k, C_k), shape (K, N), and C_k^-1 (x - mu_k), shape (K, N, 2)."""
    cov = mix.covs + sigma**2 * torch.eye(2, dtype=mix.covs.dtype, device=mix.covs.device)
    diff = x[None] - mix.means[:, None]
    prec_diff = diff @ torch.linalg.inv(cov)
    maha = (prec_diff * diff).sum(-1)
    log_comp = mix.weights.log()[:, None] - 0.5 * maha - 0.5 * torch.logdet(cov)[:, None]
    return log_comp - math.log(2 * math.pi), prec_diff


def mixture_log_prob(x: torch.Tensor, mix: Mixture, sigma: float = 0.0) -> torch.Tensor:
    return torch.logsumexp(noisy_components(x, mix, sigma)[0], dim=0)


def mixture_score(x: torch.Tensor, mix: Mixture, sigma: float = 0.0) -> torch.Tensor:
    """Exact grad_x log q_sigma(x) = -sum_k r_k(x) C_k^-1 (x - mu_k), r_k the responsibilities."""
    log_comp, prec_diff = noisy_components(x, mix, sigma)
    return -(torch.softmax(log_comp, dim=0)[:, :, None] * prec_diff).sum(0)


def sample_data(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n points of a 2-D dataset, all spanning about [-6, 6]^2."""
    g = generator
    if name == "mixture":
        mix = MIXTURE
        k = torch.multinomial(mix.weights, n, replacement=True, generator=g)
        z = torch.randn(n, 2, 1, generator=g)
        return mix.means[k] + (torch.linalg.cholesky(mix.covs)[k] @ z)[:, :, 0]
    if name == "swissroll":  # the usual t (cos t, sin t), t in [1.5 pi, 4.5 pi], scaled by 0.4
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
        noise = 0.15 * torch.randn(n, 2, generator=g)
        return 0.4 * torch.stack([t * t.cos(), t * t.sin()], 1) + noise
    if name == "checkerboard":  # 8 squares of side 2 on alternate cells of a 4 x 4 board
        x1 = 8 * torch.rand(n, generator=g) - 4
        x2 = 2 * torch.rand(n, generator=g) - 4 + 4 * torch.randint(0, 2, (n,), generator=g)
        x2 = x2 + 2 * ((x1 + 4).div(2, rounding_mode="floor") % 2)
        return torch.stack([x1, x2], 1)
    raise ValueError(f"unknown dataset {name!r}; choose mixture, swissroll or checkerboard")


# -- the method: noise levels, the two losses, annealed Langevin (Algorithm 1) -----------------


def geometric_sigmas(sigma_1: float, sigma_L: float, n_levels: int) -> torch.Tensor:
    """sigma_1 > ... > sigma_L with a constant ratio (Sec. 4.1)."""
    return torch.logspace(math.log10(sigma_1), math.log10(sigma_L), n_levels)


def dsm_loss(score_fn, x: torch.Tensor, sigmas: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Denoising score matching (Eq. 5-6) with lambda(sigma) = sigma^2: for x~ = x + sigma_i z,
    (1/2) sigma_i^2 |s(x~, i) + (x~ - x) / sigma_i^2|^2 = (1/2) |sigma_i s(x~, i) + z|^2, averaged
    over the batch, with i ~ Uniform{1..L} standing in for (1/L) sum_i of Eq. 6."""
    sigma = sigmas[idx][:, None]
    z = torch.randn_like(x)
    return 0.5 * ((sigma * score_fn(x + sigma * z, idx) + z) ** 2).sum(1).mean()


def ssm_loss(score_fn, x: torch.Tensor, sigmas: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Sliced score matching (Eq. 3) on q_sigma, weighted by lambda(sigma) = sigma^2:
    sigma_i^2 (v^T grad_x s(x~, i) v + (1/2) |s(x~, i)|^2), v ~ N(0, I), x~ = x + sigma_i z."""
    sigma = sigmas[idx][:, None]
    x_noisy = (x + sigma * torch.randn_like(x)).requires_grad_(True)
    s = score_fn(x_noisy, idx)
    v = torch.randn_like(x)
    (grad_sv,) = torch.autograd.grad((s * v).sum(), x_noisy, create_graph=True)
    return (sigma[:, 0] ** 2 * ((grad_sv * v).sum(1) + 0.5 * (s**2).sum(1))).mean()


@torch.no_grad()
def annealed_langevin(score_fn, x: torch.Tensor, sigmas: torch.Tensor, eps: float, T: int,
                      record=None) -> torch.Tensor:
    """Annealed Langevin dynamics (Algorithm 1): for i = 1..L, alpha_i = eps sigma_i^2 / sigma_L^2,
    then T times x <- x + (alpha_i / 2) s(x, sigma_i) + sqrt(alpha_i) z. score_fn(x, i) is the
    score at level i; record(i, t, x), if given, sees the points after step t of level i."""
    for i in range(len(sigmas)):
        alpha = eps * (sigmas[i] / sigmas[-1]).item() ** 2
        idx = torch.full((len(x),), i, dtype=torch.long, device=x.device)
        for t in range(T):
            x = x + 0.5 * alpha * score_fn(x, idx) + math.sqrt(alpha) * torch.randn_like(x)
            if record is not None:
                record(i, t, x)
    return x


# -- model -------------------------------------------------------------------------------------


class ScoreMLP(nn.Module):
    """s_theta(x, sigma_i) = f(x, i) / sigma_i: an MLP whose every hidden layer is followed by a
    per-level scale and shift (gamma_i, beta_i), as NCSN's conditional instance norm; the division
    by sigma_i is NCSNv2's technique 3."""

    def __init__(self, sigmas: torch.Tensor, width: int = 128, depth: int = 3):
        super().__init__()
        self.register_buffer("sigmas", sigmas.clone())
        self.layers = nn.ModuleList([nn.Linear(2 if j == 0 else width, width)
                                     for j in range(depth)])
        self.gamma = nn.Parameter(torch.ones(depth, len(sigmas), width))
        self.beta = nn.Parameter(torch.zeros(depth, len(sigmas), width))
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        h = x
        for j, layer in enumerate(self.layers):
            h = nn.functional.silu(self.gamma[j, idx] * layer(h) + self.beta[j, idx])
        return self.head(h) / self.sigmas[idx][:, None]


# -- training ----------------------------------------------------------------------------------


def train(run, model, ema, opt) -> dict:
    """Adam on the loss, fresh data every step, from the run's step to cfg.steps; the learning
    rate is constant, so a run extended by --resume --steps N simply goes on."""
    cfg, device, loss_fn = run.cfg, run.device, dsm_loss if run.cfg.loss == "dsm" else ssm_loss
    for step in run.steps(every=1000):
        x = sample_data(cfg.dataset, cfg.batch_size).to(device)
        idx = torch.randint(0, len(model.sigmas), (cfg.batch_size,), device=device)  # i ~ U{1..L}
        loss = loss_fn(model, x, model.sigmas, idx)
        run.log(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update_parameters(model)
    return run.trained


# -- evaluation --------------------------------------------------------------------------------


def recovered_weights(x: torch.Tensor, mix: Mixture) -> np.ndarray:
    """Fraction of samples whose most responsible mixture component is k."""
    k = noisy_components(x, mix)[0].argmax(0)
    return np.bincount(k.numpy(), minlength=len(mix.weights)) / len(x)


@torch.no_grad()
def score_errors(score_fn, sigmas: torch.Tensor, mix: Mixture, n: int, device) -> dict:
    """Per sigma_i, on x ~ q_sigma_i: E|s_theta - grad log q_sigma|^2, and that divided by
    E|grad log q_sigma|^2."""
    gen = torch.Generator().manual_seed(123)
    mse, rel = [], []
    for i, sigma in enumerate(sigmas.tolist()):
        x = sample_data("mixture", n, gen) + sigma * torch.randn(n, 2, generator=gen)
        exact = mixture_score(x, mix, sigma)
        learned = score_fn(x.to(device), torch.full((n,), i, device=device)).cpu()
        mse.append(((learned - exact) ** 2).sum(1).mean().item())
        rel.append(mse[-1] / (exact**2).sum(1).mean().item())
    return {"sigmas": sigmas.tolist(), "mse": mse, "relative_mse": rel}


def evaluate(net, cfg: Config, seed: int, device) -> tuple[dict, torch.Tensor, list]:
    """Annealed Langevin with the EMA network from uniform noise on [-box, box]^2, the samples'
    distances to fresh data beside the real-vs-real floor; on the mixture also the recovered
    weights and the score error at every sigma_i. Returns metrics, samples, the GIF's frames."""
    sigmas = geometric_sigmas(cfg.sigma_1, cfg.sigma_L, cfg.n_levels)
    total, frames = cfg.n_levels * cfg.T, []
    keep = set(np.linspace(0, total - 1, cfg.gif_frames).round().astype(int).tolist())
    bar = tqdm(total=total, desc="annealed Langevin", mininterval=1.0)

    def record(i, t, x):  # the progress bar and the GIF's frames (title, points)
        bar.update(1)
        if i * cfg.T + t in keep:
            title = f"annealed Langevin, level {i + 1}/{cfg.n_levels}: sigma = {sigmas[i]:.3g}"
            frames.append((title, x[:1000].cpu().numpy().copy()))

    t0 = time.perf_counter()
    x0 = ((torch.rand(cfg.n_samples, 2) * 2 - 1) * cfg.box).to(device)
    samples = annealed_langevin(net, x0, sigmas.to(device), cfg.eps, cfg.T, record).cpu()
    wall = time.perf_counter() - t0
    bar.close()
    common.check_finite(samples, None, "a sample", "try a smaller --eps")
    truth = lambda n, s: sample_data(cfg.dataset, n, torch.Generator().manual_seed(s)).numpy()
    r = {"n": cfg.n_samples, "wall_s": wall, "samples_per_s": cfg.n_samples / wall,
         "steps_per_s": total / wall, **common.distance_report(samples.numpy(), truth, seed=seed)}
    r["swd_over_floor"] = r["swd"] / r["swd_floor"]
    print(f"sliced W2 {r['swd']:.3f} (floor {r['swd_floor']:.3f}, x{r['swd_over_floor']:.2f}), "
          f"MMD {r['mmd']:.4f} (floor {r['mmd_floor']:.4f})")
    metrics = {"samplers": {"annealed Langevin": r}}
    if cfg.dataset == "mixture":
        w, true_w = recovered_weights(samples, MIXTURE), MIXTURE.weights.numpy()
        r.update(weights=w.tolist(), weight_error=float(np.abs(w - true_w).max()))
        errors = score_errors(net, sigmas, MIXTURE, 2000, device)
        metrics.update(true_weights=MIXTURE.weights.tolist(), score_error=errors,
                       max_relative_score_error=max(errors["relative_mse"]))
        print(f"weights {np.round(w, 3).tolist()} (true "
              f"{np.round(true_w.astype(float), 3).tolist()}), relative score error <= "
              f"{metrics['max_relative_score_error']:.3f}")
    return metrics, samples, frames


# -- figures -----------------------------------------------------------------------------------


@torch.no_grad()
def plot_score_fields(score_fn, sigmas, mix: Mixture | None, path, lim: float, device) -> None:
    show, rows = [0, len(sigmas) // 2, len(sigmas) - 1], 2 if mix is not None else 1
    fig, axes = common.pyplot().subplots(rows, 3, figsize=(12, 4 * rows), squeeze=False)
    q = torch.linspace(-lim, lim, 17)
    grid = torch.stack(torch.meshgrid(q, q, indexing="xy"), -1).reshape(-1, 2)
    for col, i in enumerate(show):
        fields = {"learned": score_fn(grid.to(device), torch.full((len(grid),), i, device=device))}
        if mix is not None:
            fields["exact"] = mixture_score(grid, mix, sigmas[i].item())
        for row, (name, s) in enumerate(fields.items()):
            s = sigmas[i] * s.cpu()  # sigma_i s: of unit size at every level
            norm = s.norm(dim=1, keepdim=True)
            s = s / norm.clamp_min(1e-8) * norm.clamp_max(1).sqrt()  # length ~ sqrt, capped at 1
            ax = axes[row, col]
            ax.quiver(*grid.T, *s.T, color="C3" if name == "exact" else "C0", scale=25)
            ax.set_title(f"{name}: sigma_i x score, sigma_{i + 1} = {sigmas[i]:.3g}", fontsize=9)
            ax.set_aspect("equal")
    common.save_figure(fig, path)


def figures(run, net, samples: torch.Tensor, metrics: dict, frames: list) -> None:
    """samples.png, loss.png, noise_levels.png, score_field.png, score_error.png, the GIF."""
    cfg, out, lim = run.cfg, run.out, 8.0
    sigmas = geometric_sigmas(cfg.sigma_1, cfg.sigma_L, cfg.n_levels)
    common.plot_loss(run.losses, out / "loss.png", title=f"{cfg.loss} loss (Eq. 6), {cfg.dataset}")
    gen = torch.Generator().manual_seed(run.seed + 7)
    data = sample_data(cfg.dataset, cfg.n_samples, gen).numpy()
    common.scatter_2d({"data": data, f"NCSN samples ({cfg.loss}), annealed Langevin":
                       samples.numpy()}, data, out / "samples.png", lim=lim)
    show = np.unique(np.linspace(0, len(sigmas) - 1, 6).round().astype(int))[::-1]
    rng = np.random.default_rng(0)
    common.scatter_2d({f"sigma_{i + 1} = {sigmas[i]:.3g}": data + sigmas[i].item() * rng.normal(
        size=data.shape) for i in show}, None, out / "noise_levels.png", lim=lim)
    mix = MIXTURE if cfg.dataset == "mixture" else None
    plot_score_fields(net, sigmas, mix, out / "score_field.png", lim, run.device)
    if mix is not None:
        fig, ax = common.pyplot().subplots(figsize=(6, 3.5))
        ax.semilogx(metrics["score_error"]["sigmas"], metrics["score_error"]["relative_mse"],
                    "o-", ms=3)
        ax.set(xlabel="sigma_i", ylabel="E|s_theta - s|^2 / E|s|^2", ylim=(0, None),
               title="learned vs exact score, per noise level")
        common.save_figure(fig, out / "score_error.png")
    titles, points = zip(*frames)
    common.gif_points(out / "annealed_langevin.gif", points, titles, truth=data[:1000], lim=lim)


# -- main ----------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    run = common.Run(argv, __doc__, Config, PRESETS, FREE, STEM)
    cfg, device, t0 = run.cfg, run.device, time.perf_counter()
    with common.one_thread():
        sigmas = geometric_sigmas(cfg.sigma_1, cfg.sigma_L, cfg.n_levels)
        model = ScoreMLP(sigmas, cfg.width, cfg.depth).to(device)
        ema = common.make_ema(model, cfg.ema_decay)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)  # the paper's optimiser
        run.restore(model=model, ema=ema, optimizer=opt)
        trained = train(run, model, ema, opt) if run.trains else {  # or the checkpoint's run
            "steps": run.step, "steps_this_run": 0, "final_loss": np.mean(run.losses[-100:])}
        run.finish()
        net = common.network_fn(ema, device, bf16=False)
        metrics, samples, frames = evaluate(net, cfg, run.seed, device)
        torch.save(samples, run.out / "samples.pt")
        figures(run, net, samples, metrics, frames)
    metrics = {"dataset": cfg.dataset, "loss": cfg.loss, "preset": run.preset,
               "params": common.count_params(model), "train": trained, **metrics,
               "wall_s_total": time.perf_counter() - t0}
    common.write_json(run.out / "metrics.json", metrics)
    return metrics


if __name__ == "__main__":
    common.cli_entry(main)
