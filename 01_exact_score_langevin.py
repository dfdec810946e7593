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

    python 01_exact_score_langevin.py                # --preset cpu, about 15 s on a laptop CPU

Writes to runs/01_exact_score_langevin/: config.json, metrics.json (per sampler: sliced
Wasserstein and MMD to fresh ground truth beside the real-vs-real floor, recovered mixture
weights, within-mode spread), samples.pt (a dict sampler name -> (N, 2) tensor), samples.png
(each sampler over the truth), score_field.png (density contours and the score as arrows at
three noise levels), weights.png (the weight bar chart), annealed_langevin.gif. Nothing is
trained here, so there is no ckpt.pt and no loss.png.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

import common

# -- config: presets + argparse -----------------------------------------------------------


@dataclass
class Config:
    components: int = 3  # K; weights proportional to 2^-k: (4, 2, 1) / 7 for K = 3
    radius: float = 5.0  # the means sit on a circle this wide; modes are ~8.7 apart for K = 3
    n_samples: int = 5000  # particles per sampler (and size of each ground-truth draw)
    box: float = 8.0  # every chain starts uniform on [-box, box]^2 (the paper: uniform, too)
    # plain Langevin / MALA (Eq. 4): a fixed step, many steps. The step is large enough that
    # the discretisation bias shows (modes ~4% too wide) and MALA can remove it.
    step: float = 0.05
    n_steps: int = 1000
    # annealed Langevin (Algorithm 1). Paper (images in [0, 1]): sigma 1 -> 0.01, L = 10,
    # T = 100, eps = 2e-5. sigma_1 here is ~ the largest distance between modes (as NCSNv2,
    # technique 1, advises), so that at sigma_1 the modes overlap.
    sigma_1: float = 10.0
    sigma_L: float = 0.01
    n_levels: int = 100  # L; paper 10. Ten levels over three decades quench rather than anneal
    coarse_levels: int = 10  # the paper's L, run beside ours to show it (weights ~0.02 off)
    T: int = 100  # steps per noise level (paper 100)
    eps: float = 2e-5  # alpha_i = eps sigma_i^2 / sigma_L^2, so alpha_i / sigma_i^2 = 0.2 (paper 2e-5)
    gif_frames: int = 40


PRESETS = {
    "smoke": Config(n_samples=1000, n_steps=400, n_levels=50, T=40, gif_frames=4),
    "cpu": Config(),
    "gpu": Config(n_samples=20000, n_steps=4000, n_levels=200),
}


def parse_args(argv):
    parser = common.base_parser(__doc__, "01_exact_score_langevin")
    parser.epilog = ("Nothing is trained here: --sample-only is accepted and changes nothing (this script only "
                     "samples), --resume is refused (there is no training run to continue).")
    parser.add_argument("--components", type=common.positive_int, help="number of mixture components (default: 3)")
    parser.add_argument("--n-samples", type=common.positive_int, help="particles per sampler")
    parser.add_argument("--step", type=common.positive_float, help="step size of plain Langevin and MALA")
    parser.add_argument("--n-steps", type=common.positive_int, help="steps of plain Langevin and MALA")
    parser.add_argument("--T", type=common.positive_int, help="annealed Langevin: steps per noise level")
    parser.add_argument("--eps", type=common.positive_float, help="annealed Langevin: eps of alpha_i")
    parser.set_defaults(seed=0)
    return parser.parse_args(argv)


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
    rot = torch.stack([torch.stack([turn.cos(), -turn.sin()], -1), torch.stack([turn.sin(), turn.cos()], -1)], -2)
    covs = rot @ torch.diag(torch.tensor([1.0, 0.09], dtype=torch.float64)) @ rot.transpose(-1, -2)
    return Mixture((weights / weights.sum()).float(), means.float(), covs.float())


def sample_mixture(mix: Mixture, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestral sampling: a component k ~ Cat(w), then x ~ N(mu_k, Sigma_k)."""
    k = torch.multinomial(mix.weights, n, replacement=True, generator=generator)
    z = torch.randn(n, 2, generator=generator, dtype=mix.means.dtype)
    return mix.means[k] + (torch.linalg.cholesky(mix.covs)[k] @ z[:, :, None])[:, :, 0]


def noisy_components(x: torch.Tensor, mix: Mixture, sigma: float = 0.0):
    """The noisy data q_sigma = p * N(0, sigma^2 I) of a mixture is the same mixture with every
    covariance grown by sigma^2 I. Returns log w_k + log N(x; mu_k, C_k), shape (N, K), and
    C_k^-1 (x - mu_k), shape (K, N, 2), with C_k = Sigma_k + sigma^2 I. (Components first: fast.)"""
    cov = mix.covs + sigma**2 * torch.eye(2, dtype=mix.covs.dtype)
    diff = x[None] - mix.means[:, None]  # (K, N, 2)
    prec_diff = diff @ torch.linalg.inv(cov)  # C_k is symmetric, so (x - mu) C^-1 = (C^-1 (x - mu))^T
    maha = (prec_diff * diff).sum(-1)
    log_comp = mix.weights.log()[:, None] - 0.5 * maha - 0.5 * torch.logdet(cov)[:, None] - math.log(2 * math.pi)
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


def langevin(x: torch.Tensor, score_fn, step: float, n_steps: int, generator=None) -> torch.Tensor:
    """Langevin dynamics (Eq. 4): x_t = x_{t-1} + (eps/2) grad log p(x_{t-1}) + sqrt(eps) z_t."""
    for _ in range(n_steps):
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = x + 0.5 * step * score_fn(x) + math.sqrt(step) * z
    return x


def mala(x: torch.Tensor, log_prob_and_score_fn, step: float, n_steps: int, generator=None):
    """Metropolis-adjusted Langevin (Roberts & Tweedie 1996): the Eq. 4 step as a proposal x',
    accepted with probability min(1, p(x') q(x | x') / (p(x) q(x' | x))), where
    q(x' | x) = N(x'; x + (eps/2) grad log p(x), eps I). Its stationary law is exactly p.
    log_prob_and_score_fn(x) returns (log p(x) up to a constant, grad log p(x)).
    Returns the final points and the mean acceptance rate."""
    logp, s = log_prob_and_score_fn(x)
    accepted = torch.zeros(())
    for _ in range(n_steps):
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        prop = x + 0.5 * step * s + math.sqrt(step) * z
        logp_prop, s_prop = log_prob_and_score_fn(prop)
        log_q_fwd = -(z**2).sum(1) / 2  # |x' - x - (eps/2) s(x)|^2 / (2 eps)
        log_q_bwd = -((x - prop - 0.5 * step * s_prop) ** 2).sum(1) / (2 * step)
        accept = torch.rand(len(x), generator=generator, dtype=x.dtype).log() < logp_prop + log_q_bwd - logp - log_q_fwd
        x = torch.where(accept[:, None], prop, x)
        logp, s = torch.where(accept, logp_prop, logp), torch.where(accept[:, None], s_prop, s)
        accepted += accept.float().mean()
    return x, accepted.item() / max(n_steps, 1)


def geometric_sigmas(sigma_1: float, sigma_L: float, n_levels: int) -> torch.Tensor:
    """sigma_1 > ... > sigma_L, a geometric sequence (Sec. 4.1)."""
    return torch.logspace(math.log10(sigma_1), math.log10(sigma_L), n_levels, dtype=torch.float64)


def annealed_langevin(x, score_fn, sigmas, eps: float, T: int, generator=None, record=None) -> torch.Tensor:
    """Annealed Langevin dynamics (Algorithm 1): for each sigma_i, alpha_i = eps sigma_i^2 / sigma_L^2,
    then T steps of Eq. 4 on q_{sigma_i}; score_fn(x, sigma) is the score of q_sigma.
    record(i, t, x), if given, sees the points after every step."""
    for i, sigma in enumerate(sigmas.tolist()):
        alpha = eps * sigma**2 / sigmas[-1].item() ** 2
        for t in range(T):
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
            x = x + 0.5 * alpha * score_fn(x, sigma) + math.sqrt(alpha) * z
            if record is not None:
                record(i, t, x)
    return x


def annealed_mala(x, log_prob_and_score_fn, sigmas, eps: float, T: int, generator=None):
    """Algorithm 1 with each level's T steps Metropolis-adjusted: on q_{sigma_i} with step alpha_i.
    log_prob_and_score_fn(x, sigma) gives log q_sigma and its score. Returns points, acceptance."""
    rates = []
    for sigma in sigmas.tolist():
        alpha = eps * sigma**2 / sigmas[-1].item() ** 2
        x, rate = mala(x, lambda y, sigma=sigma: log_prob_and_score_fn(y, sigma), alpha, T, generator)
        rates.append(rate)
    return x, float(np.mean(rates))


# -- evaluation and figures ------------------------------------------------------------------


def recovered_weights(x: torch.Tensor, mix: Mixture) -> np.ndarray:
    """Fraction of samples whose most responsible component (argmax_k r_k(x)) is k."""
    k = noisy_components(x, mix)[0].argmax(0)
    return np.bincount(k.numpy(), minlength=len(mix.weights)) / len(x)


def spread_ratio(x: torch.Tensor, mix: Mixture) -> float:
    """Mean over components k of sqrt(tr(Sigma_k^-1 S_k) / 2), S_k the covariance of the samples
    assigned to k: 1 when every mode has the right shape, > 1 when the modes come out too wide
    (the fixed-step bias of unadjusted Langevin); both axes count alike, however thin."""
    k = noisy_components(x, mix)[0].argmax(0)
    ratios = [math.sqrt(torch.trace(torch.linalg.solve(mix.covs[j], torch.cov(x[k == j].T))).item() / 2)
              for j in range(len(mix.weights)) if (k == j).sum() > 2]
    return float(np.mean(ratios))


def distance_reports(sets: dict, sample_truth, repeats: int = 3, seed: int = 0) -> dict:
    """common.distance_report for several sample sets of one size, with the real-vs-real floor
    (the same for all of them: same size, same truth draws) computed once instead of per set."""
    n = len(next(iter(sets.values())))
    draws = [(sample_truth(n, seed + 1000 + 2 * r), sample_truth(n, seed + 1001 + 2 * r)) for r in range(repeats)]
    floor_swd = np.mean([common.sliced_wasserstein(b, a, seed=r) for r, (a, b) in enumerate(draws)])
    floor_mmd = np.mean([common.mmd_rbf(b, a) for a, b in draws])
    return {name: {"swd": float(np.mean([common.sliced_wasserstein(x, a, seed=r) for r, (a, _) in enumerate(draws)])),
                   "swd_floor": float(floor_swd),
                   "mmd": float(np.mean([common.mmd_rbf(x, a) for a, _ in draws])),
                   "mmd_floor": float(floor_mmd), "n": n}
            for name, x in sets.items()}


def plot_score_field(mix: Mixture, sigmas, path, lim: float) -> None:
    plt = common._plt()
    fig, axes = plt.subplots(1, len(sigmas), figsize=(4 * len(sigmas), 4))
    g = torch.linspace(-lim, lim, 200)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    q = torch.linspace(-lim, lim, 17)
    qgrid = torch.stack(torch.meshgrid(q, q, indexing="xy"), -1).reshape(-1, 2)
    for ax, sigma in zip(axes, sigmas):
        logq = log_prob(grid, mix, sigma).reshape(200, 200)
        ax.contourf(g, g, logq.clamp_min(logq.max() - 12), levels=16, cmap="Blues")
        s = score(qgrid, mix, sigma)
        s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-8) * s.norm(dim=1, keepdim=True).clamp_max(1).pow(0.5)
        ax.quiver(qgrid[:, 0], qgrid[:, 1], s[:, 0], s[:, 1], color="C3", width=0.004, scale=25)
        ax.set_title(f"log q_sigma (contours) and its score, sigma = {sigma:g}", fontsize=9)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_weights(true_w, found: dict, path) -> None:
    plt = common._plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["truth"] + list(found)
    width = 0.8 / len(names)
    for j, (name, w) in enumerate(zip(names, [true_w] + list(found.values()))):
        ax.bar(np.arange(len(true_w)) + (j - len(names) / 2 + 0.5) * width, w, width, label=name,
               color="k" if name == "truth" else f"C{j - 1}")
    ax.set(xticks=range(len(true_w)), xticklabels=[f"mode {k}" for k in range(len(true_w))],
           ylabel="weight", title="mixture weights recovered from the samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few thousand 2-D points: one thread is fastest (and kind to a shared CPU)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args) -> dict:
    if args.resume:
        raise common.UserError("this script trains nothing, so there is nothing to --resume; run it without")
    device = common.get_device(args.device)
    if device.type != "cpu":
        print(f"2-D chains of a few thousand points are fastest on the CPU; ignoring --device {device}")
    preset = common.resolve_preset(args.preset, device)
    overrides = {f: getattr(args, f) for f in ("components", "n_samples", "step", "n_steps", "T", "eps")}
    cfg = replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    common.seed_everything(args.seed)
    out = common.prepare_out(args.out)
    common.write_json(out / "config.json", {"preset": preset, "seed": args.seed, **asdict(cfg)})

    mix = make_mixture(cfg.components, cfg.radius)
    gen = torch.Generator().manual_seed(args.seed)
    truth = lambda n, seed: sample_mixture(mix, n, torch.Generator().manual_seed(seed)).numpy()
    x0 = (torch.rand(cfg.n_samples, 2, generator=gen) * 2 - 1) * cfg.box
    sigmas = geometric_sigmas(cfg.sigma_1, cfg.sigma_L, cfg.n_levels)

    frames, titles = [], []
    total = cfg.n_levels * cfg.T
    keep = set(np.linspace(0, total - 1, cfg.gif_frames).round().astype(int).tolist())

    def record(i, t, x):
        if i * cfg.T + t in keep:
            frames.append(x[:1000].numpy().copy())
            titles.append(f"annealed Langevin, level {i + 1}/{cfg.n_levels}: sigma = {sigmas[i]:.3g}")

    coarse = geometric_sigmas(cfg.sigma_1, cfg.sigma_L, cfg.coarse_levels)
    exact_score = lambda y, sigma=0.0: score(y, mix, sigma)
    exact_both = lambda y, sigma=0.0: log_prob_and_score(y, mix, sigma)
    samplers = {  # name: (run, number of steps); every chain starts from the same x0
        "Langevin": (lambda: (langevin(x0, exact_score, cfg.step, cfg.n_steps, gen), None), cfg.n_steps),
        "MALA": (lambda: mala(x0, exact_both, cfg.step, cfg.n_steps, gen), cfg.n_steps),
        f"annealed Langevin, L={cfg.coarse_levels}": (
            lambda: (annealed_langevin(x0, exact_score, coarse, cfg.eps, cfg.T, gen), None), cfg.coarse_levels * cfg.T),
        "annealed Langevin": (
            lambda: (annealed_langevin(x0, exact_score, sigmas, cfg.eps, cfg.T, gen, record=record), None), total),
        "annealed MALA": (lambda: annealed_mala(x0, exact_both, sigmas, cfg.eps, cfg.T, gen), total),
    }
    t_start = time.perf_counter()
    results, samples = {}, {}
    for name, (sample_fn, n_steps) in tqdm(samplers.items(), desc="samplers", mininterval=1.0):
        t0 = time.perf_counter()
        samples[name], rate = sample_fn()
        common.check_finite(samples[name], None, f"a sample of {name}",
                            "try a smaller --step or --eps")
        seconds = time.perf_counter() - t0
        results[name] = {"accept_rate": rate, "seconds": seconds, "steps_per_s": n_steps / seconds}
    t_eval = time.perf_counter()
    reports = distance_reports({name: x.numpy() for name, x in samples.items()}, truth, seed=args.seed)
    for name, x in samples.items():
        w = recovered_weights(x, mix)
        results[name].update(reports[name], weights=w.tolist(),
                             weight_error=float(np.abs(w - mix.weights.numpy()).max()),
                             spread_ratio=spread_ratio(x, mix))
        print(f"{name:24s} sliced W2 {results[name]['swd']:.3f} (floor {results[name]['swd_floor']:.3f})  weights "
              f"{np.round(w, 3).tolist()} (true {np.round(mix.weights.double().numpy(), 3).tolist()})  "
              f"mode width x{results[name]['spread_ratio']:.3f}")
    reference = truth(cfg.n_samples, args.seed + 7)
    metrics = {
        "preset": preset,
        "true_weights": mix.weights.tolist(),
        "weights_of_true_samples": recovered_weights(torch.from_numpy(reference), mix).tolist(),
        "samplers": results,
        "sampling_s": t_eval - t_start,
        "evaluation_s": time.perf_counter() - t_eval,
    }
    torch.save({k: v.clone() for k, v in samples.items()}, out / "samples.pt")
    lim = cfg.box
    shown = min(cfg.n_samples, 2000)  # fewer points, so that the density of each mode shows
    panels = {f"{k}\nweights {np.round(results[k]['weights'], 2).tolist()}": v[:shown].numpy()
              for k, v in samples.items()}
    common.scatter_2d({f"ground truth\nweights {np.round(mix.weights.double().numpy(), 2).tolist()}": reference[:shown],
                       **panels}, reference[:shown], out / "samples.png", lim=lim)
    plot_score_field(mix, [0.0, 1.0, 3.0], out / "score_field.png", lim)
    plot_weights(mix.weights.numpy(), {k: np.asarray(v["weights"]) for k, v in results.items()}, out / "weights.png")
    common.gif_points(out / "annealed_langevin.gif", frames, titles, truth=reference[:1000], lim=lim)
    metrics["wall_time_s"] = time.perf_counter() - t_start
    common.write_json(out / "metrics.json", metrics)
    return metrics


if __name__ == "__main__":
    common.cli_entry(main)
