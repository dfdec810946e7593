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

    python 02_ncsn_toy.py                          # the mixture, --preset cpu, ~50 s on a CPU
    python 02_ncsn_toy.py --dataset swissroll      # or checkerboard; --loss ssm

Writes to runs/02_ncsn_toy/: config.json, ckpt.pt, loss.png, metrics.json, samples.pt,
samples.png (samples over the data), noise_levels.png (the data at several sigma_i),
score_field.png (learned score, and for the mixture the exact one beside it),
score_error.png (mixture: the score error per sigma_i), annealed_langevin.gif.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import common

# -- config: presets + argparse -----------------------------------------------------------------


@dataclass
class Config:
    dataset: str = "mixture"
    loss: str = "dsm"  # dsm: Eq. 5-6 (the paper's); ssm: sliced score matching, Eq. 3 on q_sigma
    # noise levels: geometric sigma_1 > ... > sigma_L. Paper (images in [0, 1]): 1 -> 0.01, L = 10.
    # sigma_1 ~ the largest distance in the data (NCSNv2, technique 1). Our data span ~12 units
    # and its finest detail is ~0.3 wide, so sigma_L = 0.05 already gives q_sigma_L ~ p.
    sigma_1: float = 10.0
    sigma_L: float = 0.05
    n_levels: int = 50  # L; paper 10. Ten levels over 2-3 decades quench rather than anneal:
    # the mixture weights come out ~0.03 off even with the exact score (see 01)
    # annealed Langevin, Algorithm 1: T steps per level, alpha_i = eps sigma_i^2 / sigma_L^2
    T: int = 100  # paper 100
    eps: float = 5e-4  # paper 2e-5 with sigma_L = 0.01; both give alpha_i / sigma_i^2 = 0.2
    box: float = 8.0  # the chains start uniform on [-box, box]^2
    # network and training
    width: int = 96  # 64 biases the weights toward the heavy mode (~0.03, measured over 3 seeds)
    depth: int = 3  # hidden layers
    n_iters: int = 4000
    batch_size: int = 512
    lr: float = 2e-3  # paper 1e-3 (Adam); a small MLP takes more
    ema_decay: float = 0.999  # NCSNv2 (technique 5); NCSN had none
    n_samples: int = 2000  # particles sampled and compared with the data
    gif_frames: int = 20


PRESETS = {
    "smoke": Config(n_iters=1200, n_levels=30, T=40, n_samples=1000, width=64, gif_frames=4),
    "cpu": Config(),
    "gpu": Config(n_iters=20000, n_levels=100, n_samples=10000, width=256),
}
DATASETS = ("mixture", "swissroll", "checkerboard")
STEM = "02_ncsn_toy"
FIXED = ("dataset", "loss", "n_levels", "lr")  # a resumed run keeps these; --n-iters may extend it


def parse_args(argv):
    parser = common.base_parser(__doc__, STEM)
    parser.add_argument("--dataset", choices=DATASETS, help="2-D data to learn (default: mixture)")
    parser.add_argument("--loss", choices=["dsm", "ssm"], help="denoising (default) or sliced score matching")
    parser.add_argument("--n-iters", type=common.positive_int,
                        help="training steps (with --resume: extend the run to this many; "
                        "the lr is constant)")
    parser.add_argument("--n-levels", type=common.positive_int, help="number of noise levels L")
    parser.add_argument("--T", type=common.positive_int, help="annealed Langevin steps per noise level")
    parser.add_argument("--n-samples", type=common.positive_int, help="particles to sample")
    parser.add_argument("--lr", type=common.positive_float, help="Adam learning rate")
    return parser.parse_args(argv)


# -- data: the Gaussian mixture of 01 (with its exact noisy scores), Swiss roll, checkerboard -----


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
    rot = torch.stack([torch.stack([turn.cos(), -turn.sin()], -1), torch.stack([turn.sin(), turn.cos()], -1)], -2)
    covs = rot @ torch.diag(torch.tensor([1.0, 0.09], dtype=torch.float64)) @ rot.transpose(-1, -2)
    return Mixture((weights / weights.sum()).float(), means.float(), covs.float())


MIXTURE = make_mixture()


def noisy_components(x: torch.Tensor, mix: Mixture, sigma: float = 0.0):
    """q_sigma = p * N(0, sigma^2 I) is the mixture with covariances C_k = Sigma_k + sigma^2 I.
    Returns log w_k + log N(x; mu_k, C_k), shape (K, N), and C_k^-1 (x - mu_k), shape (K, N, 2)."""
    cov = mix.covs + sigma**2 * torch.eye(2, dtype=mix.covs.dtype)
    diff = x[None] - mix.means[:, None]
    prec_diff = diff @ torch.linalg.inv(cov)
    maha = (prec_diff * diff).sum(-1)
    log_comp = mix.weights.log()[:, None] - 0.5 * maha - 0.5 * torch.logdet(cov)[:, None] - math.log(2 * math.pi)
    return log_comp, prec_diff


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
        return mix.means[k] + (torch.linalg.cholesky(mix.covs)[k] @ torch.randn(n, 2, 1, generator=g))[:, :, 0]
    if name == "swissroll":  # the usual t (cos t, sin t), t in [1.5 pi, 4.5 pi], scaled by 0.4
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
        return 0.4 * torch.stack([t * t.cos(), t * t.sin()], 1) + 0.15 * torch.randn(n, 2, generator=g)
    if name == "checkerboard":  # 8 squares of side 2 on alternate cells of a 4 x 4 board
        x1 = 8 * torch.rand(n, generator=g) - 4
        x2 = 2 * torch.rand(n, generator=g) - 4 + 4 * torch.randint(0, 2, (n,), generator=g)
        x2 = x2 + 2 * ((x1 + 4).div(2, rounding_mode="floor") % 2)
        return torch.stack([x1, x2], 1)
    raise common.UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# -- the method: noise levels, the two losses, annealed Langevin (Algorithm 1) -------------------


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
def annealed_langevin(score_fn, x: torch.Tensor, sigmas: torch.Tensor, eps: float, T: int, record=None):
    """Annealed Langevin dynamics (Algorithm 1): for i = 1..L, alpha_i = eps sigma_i^2 / sigma_L^2,
    then T times x <- x + (alpha_i / 2) s(x, sigma_i) + sqrt(alpha_i) z. record(i, t, x) sees
    every step."""
    for i in range(len(sigmas)):
        alpha = eps * (sigmas[i] / sigmas[-1]).item() ** 2
        idx = torch.full((len(x),), i, dtype=torch.long, device=x.device)
        for t in range(T):
            x = x + 0.5 * alpha * score_fn(x, idx) + math.sqrt(alpha) * torch.randn_like(x)
            if record is not None:
                record(i, t, x)
    return x


# -- model ------------------------------------------------------------------------------------------


class ScoreMLP(nn.Module):
    """s_theta(x, sigma_i) = f(x, i) / sigma_i: an MLP whose every hidden layer is followed by a
    per-level scale and shift (gamma_i, beta_i), as NCSN's conditional instance norm; the division
    by sigma_i is NCSNv2's technique 3."""

    def __init__(self, sigmas: torch.Tensor, width: int = 128, depth: int = 3):
        super().__init__()
        self.register_buffer("sigmas", sigmas.clone())
        self.layers = nn.ModuleList([nn.Linear(2 if j == 0 else width, width) for j in range(depth)])
        self.gamma = nn.Parameter(torch.ones(depth, len(sigmas), width))
        self.beta = nn.Parameter(torch.zeros(depth, len(sigmas), width))
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        h = x
        for j, layer in enumerate(self.layers):
            h = nn.functional.silu(self.gamma[j, idx] * layer(h) + self.beta[j, idx])
        return self.head(h) / self.sigmas[idx][:, None]


# -- training loop ----------------------------------------------------------------------------------


def train(model, ema, opt, cfg: Config, step: int, losses: list, device, ckpt) -> int:
    """Adam on the loss; the checkpointer checks every loss and saves verified steps."""
    loss_fn = dsm_loss if cfg.loss == "dsm" else ssm_loss
    bar = tqdm(total=cfg.n_iters, desc="train", initial=step, mininterval=1.0)
    with ckpt:
        for step in range(step, cfg.n_iters + 1):
            ckpt.begin(step)
            x = sample_data(cfg.dataset, cfg.batch_size).to(device)
            idx = torch.randint(0, len(model.sigmas), (cfg.batch_size,), device=device)
            loss = loss_fn(model, x, model.sigmas, idx)
            ckpt.verified(loss, step, last=step == cfg.n_iters)
            if step == cfg.n_iters:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update_parameters(model)
            losses.append(loss.item())
            bar.update(1)
            if step % 100 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}")
    bar.close()
    return step


# -- evaluation and figures -------------------------------------------------------------------------


def recovered_weights(x: torch.Tensor, mix: Mixture) -> np.ndarray:
    """Fraction of samples whose most responsible mixture component is k."""
    k = noisy_components(x, mix)[0].argmax(0)
    return np.bincount(k.numpy(), minlength=len(mix.weights)) / len(x)


@torch.no_grad()
def score_errors(score_fn, sigmas: torch.Tensor, mix: Mixture, n: int, device) -> dict:
    """Per sigma_i, on x ~ q_sigma_i: E|s_theta - grad log q_sigma|^2 and that divided by E|grad log q_sigma|^2."""
    gen = torch.Generator().manual_seed(123)
    mse, rel = [], []
    for i, sigma in enumerate(sigmas.tolist()):
        x = sample_data("mixture", n, gen) + sigma * torch.randn(n, 2, generator=gen)
        exact = mixture_score(x, mix, sigma)
        learned = score_fn(x.to(device), torch.full((n,), i, device=device)).cpu()
        mse.append(((learned - exact) ** 2).sum(1).mean().item())
        rel.append(mse[-1] / (exact**2).sum(1).mean().item())
    return {"sigmas": sigmas.tolist(), "mse": mse, "relative_mse": rel}


def plot_noise_levels(data: np.ndarray, sigmas: torch.Tensor, path, lim: float) -> None:
    show = np.unique(np.linspace(0, len(sigmas) - 1, 6).round().astype(int))[::-1]
    rng = np.random.default_rng(0)
    panels = {f"sigma_{i + 1} = {sigmas[i]:.3g}": data + sigmas[i].item() * rng.normal(size=data.shape) for i in show}
    common.scatter_2d(panels, None, path, lim=lim)


@torch.no_grad()
def plot_score_fields(score_fn, sigmas, mix: Mixture | None, path, lim: float, device) -> None:
    plt = common._plt()
    show = [0, len(sigmas) // 2, len(sigmas) - 1]
    rows = 2 if mix is not None else 1
    fig, axes = plt.subplots(rows, 3, figsize=(12, 4 * rows), squeeze=False)
    q = torch.linspace(-lim, lim, 17)
    grid = torch.stack(torch.meshgrid(q, q, indexing="xy"), -1).reshape(-1, 2)
    for col, i in enumerate(show):
        fields = {"learned": score_fn(grid.to(device), torch.full((len(grid),), i, device=device)).cpu()}
        if mix is not None:
            fields["exact"] = mixture_score(grid, mix, sigmas[i].item())
        for row, (name, s) in enumerate(fields.items()):
            s = sigmas[i] * s  # sigma_i s: of unit size at every level (arrow length ~ sqrt, capped at 1)
            s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-8) * s.norm(dim=1, keepdim=True).clamp_max(1).sqrt()
            ax = axes[row, col]
            ax.quiver(grid[:, 0], grid[:, 1], s[:, 0], s[:, 1], color="C3" if name == "exact" else "C0", scale=25)
            ax.set_title(f"{name}: sigma_i x score, sigma_{i + 1} = {sigmas[i]:.3g}", fontsize=9)
            ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_score_error(errors: dict, path) -> None:
    plt = common._plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogx(errors["sigmas"], errors["relative_mse"], "o-", ms=3)
    ax.set(xlabel="sigma_i", ylabel="E|s_theta - s|^2 / E|s|^2", title="learned vs exact score, per noise level")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small MLP on 2-D points: one thread is fastest (and kind to a shared CPU)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def prepare(args) -> tuple:
    """Device, output folder, preset and config; for --resume and --sample-only the checkpoint's."""
    device = common.get_device(args.device)
    out = common.prepare_out(args.out)
    flags = {"dataset": args.dataset, "loss": args.loss, "n_iters": args.n_iters, "n_levels": args.n_levels,
             "T": args.T, "n_samples": args.n_samples, "lr": args.lr}
    if not (args.resume or args.sample_only):
        args.seed = 0 if args.seed is None else args.seed
        preset = common.resolve_preset(args.preset, device)
        cfg = replace(PRESETS[preset], **{k: v for k, v in flags.items() if v is not None})
        return device, out, preset, cfg, None
    ckpt = common.load_checkpoint(out / "ckpt.pt", STEM)
    saved = {**ckpt["config"], "preset": ckpt["preset"], "seed": ckpt["seed"]}
    fixed = FIXED + ("preset", "seed") if args.resume else FIXED + ("preset",)
    given = {**flags, "preset": args.preset, "seed": args.seed}
    cfg = common.resume_config(saved, given, fixed, ckpt["step"], out / "ckpt.pt",
                               steps_key="n_iters", extend=args.resume)
    args.seed = cfg.pop("seed")
    return device, out, cfg.pop("preset"), Config(**cfg), ckpt


def run(args) -> dict:
    device, out, preset, cfg, ckpt = prepare(args)
    ckpt_path = out / "ckpt.pt"
    common.seed_everything(args.seed)
    common.write_json(out / "config.json", {"preset": preset, "seed": args.seed, **asdict(cfg)})

    sigmas = geometric_sigmas(cfg.sigma_1, cfg.sigma_L, cfg.n_levels)
    model = ScoreMLP(sigmas, cfg.width, cfg.depth).to(device)
    ema = common.make_ema(model, cfg.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step, losses = 0, []
    if ckpt is not None:
        for obj, key in ((model, "model"), (ema, "ema"), (opt, "optimizer")):
            common.load_state(obj, ckpt[key], ckpt_path)
        step, losses = ckpt["step"], ckpt["losses"].tolist()
        common.set_rng_state(ckpt["rng_state"])

    def save(at_step: int, rng: dict) -> None:
        common.save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "step": at_step, "config": asdict(cfg), "preset": preset, "seed": args.seed,
            "losses": torch.tensor(losses[:at_step]), "rng_state": rng}, STEM)

    t0, step0 = time.perf_counter(), step
    if not args.sample_only and step < cfg.n_iters:
        checkpointer = common.Checkpointer(save, 1000, ckpt_path)
        step = train(model, ema, opt, cfg, step, losses, device, checkpointer)
        print(f"trained {step - step0} steps in {time.perf_counter() - t0:.1f} s, "
              f"final loss {np.mean(losses[-200:]):.4f}")
    train_s = time.perf_counter() - t0
    if losses:
        common.plot_loss(losses, out / "loss.png", title=f"{cfg.loss} loss (Eq. 6), {cfg.dataset}")

    # -- sampling with the EMA weights --
    net = ema.module.eval()
    frames, titles = [], []
    keep = set(np.linspace(0, cfg.n_levels * cfg.T - 1, cfg.gif_frames).round().astype(int).tolist())

    def record(i, t, x):
        if i * cfg.T + t in keep:
            frames.append(x[:1000].cpu().numpy().copy())
            titles.append(f"annealed Langevin, level {i + 1}/{cfg.n_levels}: sigma = {sigmas[i]:.3g}")

    t1 = time.perf_counter()
    x0 = ((torch.rand(cfg.n_samples, 2) * 2 - 1) * cfg.box).to(device)
    samples = annealed_langevin(net, x0, sigmas.to(device), cfg.eps, cfg.T, record).cpu()
    common.check_finite(samples, step)
    sample_s = time.perf_counter() - t1
    torch.save(samples, out / "samples.pt")

    truth = lambda n, seed: sample_data(cfg.dataset, n, torch.Generator().manual_seed(seed)).numpy()
    metrics = {"dataset": cfg.dataset, "loss": cfg.loss, "preset": preset, "step": step,
               "final_loss": float(np.mean(losses[-200:])) if losses else None,
               **common.distance_report(samples.numpy(), truth, seed=args.seed)}
    metrics["swd_over_floor"] = metrics["swd"] / metrics["swd_floor"]
    mix = MIXTURE if cfg.dataset == "mixture" else None
    if mix is not None:
        w = recovered_weights(samples, mix)
        metrics.update(true_weights=mix.weights.tolist(), weights=w.tolist(),
                       weight_error=float(np.abs(w - mix.weights.numpy()).max()))
        errors = score_errors(net, sigmas, mix, 2000, device)
        metrics.update(score_error=errors, max_relative_score_error=max(errors["relative_mse"]))
        plot_score_error(errors, out / "score_error.png")
    print(f"sliced W2 {metrics['swd']:.3f} (floor {metrics['swd_floor']:.3f}, x{metrics['swd_over_floor']:.2f}), "
          f"MMD {metrics['mmd']:.4f} (floor {metrics['mmd_floor']:.4f})"
          + (f", weights {np.round(metrics['weights'], 3).tolist()} (true "
             f"{np.round(mix.weights.double().numpy(), 3).tolist()}), relative score error <= "
             f"{metrics['max_relative_score_error']:.3f}" if mix is not None else ""))

    data = truth(cfg.n_samples, args.seed + 7)
    lim = 8.0
    common.scatter_2d({"data": data, f"NCSN samples ({cfg.loss}), annealed Langevin": samples.numpy()}, data,
                      out / "samples.png", lim=lim)
    plot_noise_levels(data, sigmas, out / "noise_levels.png", lim)
    plot_score_fields(net, sigmas, mix, out / "score_field.png", lim, device)
    if frames:
        common.gif_points(out / "annealed_langevin.gif", frames, titles, truth=data[:1000], lim=lim)
    metrics.update(train_s=train_s, train_steps_per_s=(step - step0) / train_s if step > step0 else None,
                   sample_s=sample_s, sample_steps_per_s=cfg.n_levels * cfg.T / sample_s,
                   wall_time_s=time.perf_counter() - t0)
    common.write_json(out / "metrics.json", metrics)
    return metrics


if __name__ == "__main__":
    common.cli_entry(main)
