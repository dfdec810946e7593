"""05 -- Denoising Diffusion Probabilistic Models (Ho, Jain, Abbeel 2020), arXiv:2006.11239.

A U-Net learns to predict the noise eps that the fixed forward process q(x_t | x_0) (Eq. 4)
added to an MNIST digit, trained with the simple loss L_simple (Eq. 14, Algorithm 1). New
digits come from pure noise by ancestral sampling (Algorithm 2) or, in far fewer steps, by DDIM
(Song, Meng, Ermon 2021, arXiv:2010.02502). The variational bound (Eq. 5) with the discretised
decoder of Sec. 3.3 gives test bits/dim. Equation numbers are Ho et al.'s. Here t runs from 1 to
T as in the paper: index t of every schedule tensor is the paper's t, and index 0 is t = 0.

    python 05_ddpm_mnist.py                    # no GPU: --preset cpu, about 13 minutes on 2 cores
    python 05_ddpm_mnist.py --sample-only --sampler ancestral      # reuse the checkpoint
    torchrun --nproc_per_node 2 05_ddpm_mnist.py --preset gpu      # --batch-size is per process

Writes to --out (default runs/05_ddpm_mnist): config.json, ckpt.pt, samples.png, samples.pt
(N, 1, 28, 28) in [-1, 1], loss.png, denoising.png (x_T ... x_0 of a few samples), reverse.gif,
samplers.png (one row per sampler of the timing table, same x_T), bound_terms.png and
metrics.json (loss, steps/s, samples/s, the sampler x steps x wall-time table, test bits/dim).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

import common

# -- config: presets + argparse ------------------------------------------------------------


@dataclass
class Config:
    dataset: str = "mnist"
    T: int = 1000  # paper: 1000
    schedule: str = "linear"  # paper: linear, beta_1 = 1e-4 .. beta_T = 0.02; or "cosine" (Nichol & Dhariwal)
    base: int = 128  # U-Net, Appendix B; paper (CIFAR-10, 32x32): 128, mults (1, 2, 2, 2)
    mults: tuple = (1, 2, 2)  # 28 -> 14 -> 7
    num_res_blocks: int | tuple[int, ...] = 2  # paper: 2 (a number, or one per level)
    attn_levels: tuple = (1,)  # paper: attention at 16x16 (here 14x14) and in the middle
    dropout: float = 0.1  # paper: 0.1
    batch_size: int = 128  # per process; paper: 128
    steps: int = 40_000  # paper: 800k on CIFAR-10
    lr: float = 2e-4  # paper: 2e-4
    warmup: int = 5000  # paper: 5000 linear warm-up steps
    lr_decay: bool = False  # paper: constant after warm-up
    grad_clip: float = 1.0  # paper: 1.0
    ema_decay: float = 0.9999  # paper: 0.9999
    bf16: bool = False  # bf16 autocast
    sampler: str = "ancestral"  # the final samples; paper: Algorithm 2
    sampling_steps: int = 1000  # DDIM steps (ancestral always takes T)
    eta: float = 0.0  # DDIM: 0 deterministic, 1 the ancestral process with sigma_t^2 = posterior variance
    sigma: str = "beta"  # Algorithm 2's sigma_t^2: beta_t or the posterior variance beta~_t (Eq. 7)
    clip_x0: bool = False  # DDIM: clip the predicted x_0 to [-1, 1]
    n_samples: int = 1000
    sample_batch: int = 500
    table: tuple = (("ancestral", 1000), ("ddim", 100), ("ddim", 50), ("ddim", 20), ("ddim", 10))
    table_n: int = 100
    bound_images: int = 1000
    bound_strata: int = 999  # t in 2..T split in this many strata, one t each per image; T - 1: the full sum
    judge: bool = True  # FID and confident share of the final samples by common's digit judge
    log_every: int = 100
    ckpt_every: int = 2000


PRESETS = {
    # seconds, for tests: every code path of the gpu preset at toy size
    "smoke": dict(T=50, base=8, mults=(1, 2), num_res_blocks=1, attn_levels=(), batch_size=8, steps=6,
                  warmup=2, lr=1e-3, ema_decay=0.9, sampler="ddim", sampling_steps=5, n_samples=8, sample_batch=8,
                  table=(("ancestral", 50), ("ddim", 5)), table_n=4, bound_images=4, bound_strata=3,
                  log_every=2, ckpt_every=4),
    # about 13 minutes end to end on 2 CPU cores; tuned for digits per CPU-minute (see README): a
    # narrow 28x28 level buys twice the steps of a uniform width-32 net in the same time, and the
    # extra depth goes to 7x7, where a convolution is cheapest
    "cpu": dict(base=16, mults=(1, 2, 4), num_res_blocks=(1, 1, 2), attn_levels=(2,), dropout=0.0, batch_size=64,
                steps=2700, lr=1e-3, warmup=100, lr_decay=True, ema_decay=0.998, bf16=True, sampler="ddim",
                sampling_steps=50, eta=1.0, clip_x0=True, n_samples=500, sample_batch=100,
                table=(("ancestral", 1000), ("ddim", 100), ("ddim", 50), ("ddim", 20), ("ddim", 10)),
                table_n=8, bound_images=200, bound_strata=20, ckpt_every=500),
    # the paper's recipe at MNIST size, about an hour on one GPU (40k of the paper's 800k steps)
    "gpu": dict(),
}
# A CPU without bf16 kernels (AVX2 only) runs the cpu preset in fp32, where a training step costs about
# twice as much on 2 cores (0.56 s vs 0.27 s): fewer steps keep the run near 13 minutes (see README)
FP32 = {"cpu": dict(steps=1100)}

STEM = "05_ddpm_mnist"
FIXED = ("dataset", "schedule", "batch_size", "lr", "preset")  # a resumed run keeps these
FLAGS = {  # command-line overrides of Config (None = take the preset's value)
    "dataset": dict(choices=["mnist", "fashion-mnist"], help="training data"),
    "schedule": dict(choices=["linear", "cosine"], help="linear (Ho et al.) or cosine (Nichol & Dhariwal) betas"),
    "steps": dict(type=common.positive_int,
                  help="training steps (with --resume: extend the run to this many; the lr "
                  "schedule then spans the new total)"),
    "batch_size": dict(type=common.positive_int, help="batch size PER PROCESS (global batch = world size x this)"),
    "lr": dict(type=common.positive_float, help="peak Adam learning rate"),
    "sampler": dict(choices=["ancestral", "ddim"], help="sampler of the final samples"),
    "sampling_steps": dict(type=common.positive_int, help="DDIM steps (ancestral always takes T)"),
    "eta": dict(type=common.nonnegative_float, help="DDIM eta: 0 deterministic, 1 ancestral"),
    "sigma": dict(choices=["beta", "posterior"], help="ancestral sigma_t^2: beta_t or the posterior variance"),
    "clip_x0": dict(action=argparse.BooleanOptionalAction, help="DDIM: clip the predicted x_0 to [-1, 1]"),
    "n_samples": dict(type=common.positive_int, help="number of final samples"),
    "bound_images": dict(type=common.positive_int, help="test images for the bits/dim bound"),
    "bound_strata": dict(type=common.positive_int, help="t per image for the bound (T-1: every term)"),
    "bf16": dict(action=argparse.BooleanOptionalAction, help="bf16 autocast"),
    "judge": dict(action=argparse.BooleanOptionalAction,
                  help="judge the final samples with the digit classifier (FID, confident share)"),
}


def parse_args(argv):
    parser = common.base_parser(__doc__.split("\n\n")[0], STEM, image=True)
    for name, kw in FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), default=None, **kw)
    return parser.parse_args(argv)


def make_config(values: dict) -> Config:
    values = {k: v for k, v in values.items() if k in {f.name for f in fields(Config)}}
    for key in ("mults", "attn_levels"):
        values[key] = tuple(values.get(key, getattr(Config, key)))
    values["table"] = tuple(tuple(row) for row in values.get("table", Config.table))
    cfg = Config(**values)
    if cfg.eta < 0 or cfg.sampling_steps > cfg.T or cfg.bound_strata > cfg.T - 1:
        raise common.UserError(f"need --eta >= 0, --sampling-steps <= T = {cfg.T} and --bound-strata <= T - 1")
    return cfg


# -- data --------------------------------------------------------------------------------------


def load_images(name: str, root, train: bool) -> torch.Tensor:
    """(N, 1, 28, 28) float images, {0, ..., 255} scaled linearly to [-1, 1] (Sec. 3.3)."""
    ds = common.torchvision_dataset(name, root, train, transform=None)
    return ds.data.unsqueeze(1).float().div(127.5).sub(1)


def batches(x: torch.Tensor, batch_size: int, dist, seed: int, step: int):
    """Endless shuffled batches; DistributedSampler gives each process its share of each epoch.
    Starting at `step` replays the same order, so --resume continues the same run."""
    sampler = DistributedSampler(x, dist.world_size, dist.rank, shuffle=True, seed=seed, drop_last=True)
    per_epoch = len(sampler) // batch_size
    if per_epoch == 0:
        raise common.UserError(f"{len(x)} training images are fewer than one batch; lower --batch-size")
    epoch, skip = divmod(step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        idx = torch.tensor(list(sampler))
        for i in range(skip, per_epoch):
            yield x[idx[i * batch_size:(i + 1) * batch_size]]
        epoch, skip = epoch + 1, 0


# -- the method: forward process, loss, samplers, bound ----------------------------------------


def make_schedule(name: str, T: int) -> dict:
    """beta_t and the products the paper names, float64, index t = 0 .. T (t = 0: no noise)."""
    if name == "linear":  # Sec. 4: 1e-4 .. 0.02 for T = 1000 (scaled by 1000 / T otherwise)
        beta = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    elif name == "cosine":  # Nichol & Dhariwal 2021, Eq. 17, s = 0.008, beta clipped at 0.999
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
        beta = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        raise common.UserError(f"unknown schedule {name!r}; use linear or cosine")
    beta = torch.cat([torch.zeros(1, dtype=torch.float64), beta])
    alpha = 1 - beta
    alpha_bar = torch.cumprod(alpha, 0)  # alpha_bar_0 = 1
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar).clamp(min=1e-20) * beta  # Eq. 7
    return dict(beta=beta, alpha=alpha, alpha_bar=alpha_bar, alpha_bar_prev=alpha_bar_prev, beta_tilde=beta_tilde)


def at(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] for a batch of t, shaped to broadcast against x."""
    return a.to(x.device)[t].to(x.dtype).view(-1, *[1] * (x.dim() - 1))


def q_sample(x0, t, eps, S):
    """Eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps ~ q(x_t | x_0)."""
    return at(S["alpha_bar"].sqrt(), t, x0) * x0 + at((1 - S["alpha_bar"]).sqrt(), t, x0) * eps


def q_posterior(x0, xt, t, S):
    """Eq. 6-7: mean and variance of q(x_{t-1} | x_t, x_0)."""
    c0 = S["alpha_bar_prev"].sqrt() * S["beta"] / (1 - S["alpha_bar"])
    ct = S["alpha"].sqrt() * (1 - S["alpha_bar_prev"]) / (1 - S["alpha_bar"])
    return at(c0, t, x0) * x0 + at(ct, t, xt) * xt, at(S["beta_tilde"], t, x0)


def predict_x0(xt, t, eps, S):
    """Eq. 4 solved for x_0 (Eq. 15): the model's estimate of the clean image."""
    return (xt - at((1 - S["alpha_bar"]).sqrt(), t, xt) * eps) / at(S["alpha_bar"].sqrt(), t, xt)


def p_mean(xt, t, eps, S):
    """Eq. 11: mu_theta(x_t, t) = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps_theta) / sqrt(alpha_t)."""
    return (xt - at(S["beta"] / (1 - S["alpha_bar"]).sqrt(), t, xt) * eps) / at(S["alpha"].sqrt(), t, xt)


def p_variance(S, sigma: str) -> torch.Tensor:
    """sigma_t^2 (Sec. 3.2): beta_t or beta~_t, with sigma_1^2 = beta~_2 for both, as in the
    authors' code (diffusion_utils_2.py): "fixedlarge" sets its t = 1 log-variance to beta~_2
    for a better decoder likelihood, "fixedsmall" clips log beta~_1 = log 0 to log beta~_2.
    sigma_1 enters only the decoder L_0 (Algorithm 2 adds no noise at t = 1)."""
    var = (S["beta"] if sigma == "beta" else S["beta_tilde"]).clone()
    var[1] = S["beta_tilde"][2]
    return var


def loss_simple(model, x0, S):
    """Eq. 14 / Algorithm 1: || eps - eps_theta(sqrt(a_bar) x_0 + sqrt(1 - a_bar) eps, t) ||^2, t ~ U{1..T}."""
    t = torch.randint(1, len(S["beta"]), (x0.shape[0],), device=x0.device)
    eps = torch.randn_like(x0)
    return F.mse_loss(model(q_sample(x0, t, eps, S), t).float(), eps)


@torch.no_grad()
def sample_ancestral(eps_model, shape, S, sigma="beta", generator=None, device="cpu", keep=0, every=1):
    """Algorithm 2: x_T ~ N(0, I); x_{t-1} = mu_theta(x_t, t) + sigma_t z, z = 0 at t = 1.
    Returns x_0 and [(t, x_t[:keep])] every `every` steps."""
    var = p_variance(S, sigma)
    x = torch.randn(shape, generator=generator, device=device)
    frames = [(len(var) - 1, x[:keep].cpu())]
    for t in tqdm(range(len(var) - 1, 0, -1), desc="ancestral", leave=False, disable=None, mininterval=1):
        tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
        x_mean = p_mean(x, tt, eps_model(x, tt), S)
        z = torch.randn(shape, generator=generator, device=device) if t > 1 else torch.zeros_like(x)
        x = x_mean + math.sqrt(var[t]) * z
        if keep and ((t - 1) % every == 0):
            frames.append((t - 1, x[:keep].cpu()))
    return x, frames


@torch.no_grad()
def sample_ddim(eps_model, shape, S, steps, eta=0.0, clip_x0=False, generator=None, device="cpu", keep=0):
    """DDIM (Song et al. 2021, Eq. 12) on tau = round(i T / steps), i = 0 .. steps, with
    sigma = eta sqrt((1 - a_prev) / (1 - a) (1 - a / a_prev)) (Eq. 16). eta = 1 with steps = T is
    Algorithm 2 with sigma_t^2 = beta~_t. Returns x_0 and [(t, x_t[:keep])] at every step."""
    T, ab = len(S["beta"]) - 1, S["alpha_bar"]
    tau = [round(i * T / steps) for i in range(steps + 1)]
    x = torch.randn(shape, generator=generator, device=device)
    frames = [(T, x[:keep].cpu())]
    for i in tqdm(range(steps, 0, -1), desc="ddim", leave=False, disable=None, mininterval=1):
        t, s = tau[i], tau[i - 1]
        tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
        eps = eps_model(x, tt)
        x0 = predict_x0(x, tt, eps, S)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (x - ab[t].sqrt().item() * x0) / (1 - ab[t]).sqrt().item()
        var = eta**2 * ((1 - ab[s]) / (1 - ab[t]) * (1 - ab[t] / ab[s])).item()
        x = ab[s].sqrt().item() * x0 + math.sqrt(max(1 - ab[s].item() - var, 0.0)) * eps
        if s > 0:
            x = x + math.sqrt(var) * torch.randn(shape, generator=generator, device=device)
        if keep:
            frames.append((s, x[:keep].cpu()))
    return x, frames


def normal_kl(mean1, var1, mean2, var2):
    """KL(N(mean1, var1) || N(mean2, var2)) per element, in nats."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def discretized_gaussian_log_likelihood(x, mean, std):
    """Sec. 3.3, Eq. 13: log of the N(mean, std^2) mass of x's bin [x - 1/255, x + 1/255], the
    outer bins reaching to -inf and +inf. float64, and each difference taken in the tail where
    it is accurate."""
    x, mean, std = x.double(), mean.double(), std.double()
    upper, lower = (x - mean + 1 / 255) / std, (x - mean - 1 / 255) / std
    left = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    right = torch.special.ndtr(-lower) - torch.special.ndtr(-upper)
    log_mid = torch.log(torch.where(x > mean, right, left).clamp(min=1e-300))
    return torch.where(x < -0.999, torch.special.log_ndtr(upper),
                       torch.where(x > 0.999, torch.special.log_ndtr(-lower), log_mid))


@torch.no_grad()
def vlb_terms(eps_model, x0, t, S, noise):
    """Eq. 5 per image, in nats: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t >= 2,
    L_0 = -log p(x_0 | x_1) for t = 1; for both choices of sigma_t^2 from one network call."""
    xt = q_sample(x0, t, noise, S)
    mean = p_mean(xt, t, eps_model(xt, t), S)
    post_mean, post_var = q_posterior(x0, xt, t, S)
    terms = {}
    for sigma in ("beta", "posterior"):
        var = at(p_variance(S, sigma), t, x0)
        kl = normal_kl(post_mean, post_var.clamp(min=1e-30), mean, var).flatten(1).sum(1)
        nll = -discretized_gaussian_log_likelihood(x0, mean, var.sqrt()).flatten(1).sum(1).float()
        terms[sigma] = torch.where(t == 1, nll, kl)
    return terms


def prior_kl(x0, S):
    """L_T = KL(q(x_T | x_0) || N(0, I)) per image, in nats (no parameters)."""
    ab = S["alpha_bar"][-1].item()
    kl = normal_kl(math.sqrt(ab) * x0, torch.tensor(1 - ab), torch.zeros_like(x0), torch.tensor(1.0))
    return kl.flatten(1).sum(1)


@torch.no_grad()
def bound_bpd(eps_model, x0, S, strata: int, generator=None):
    """Eq. 5 in bits/dim per image, unbiased: L_T in closed form; L_0 and every L_{t-1} at one
    x_t ~ q(x_t | x_0) per image (one-sample Monte Carlo); sum_{t=2}^{T} L_{t-1} by stratified
    Monte Carlo over t -- t in 2..T cut into `strata` contiguous strata, one uniform t per image
    in each, its term weighted by the stratum's size; strata = T - 1 takes every t once.
    Returns {sigma: bits/dim per image} and the sampled (t, term) pairs of the first image."""
    T, n = len(S["beta"]) - 1, x0.shape[0]
    edges = torch.linspace(2, T + 1, strata + 1, dtype=torch.float64).round().long().tolist()
    prior = prior_kl(x0, S)
    noise = lambda: torch.randn(x0.shape, generator=generator, device=x0.device)
    ones = torch.ones(n, dtype=torch.long, device=x0.device)
    l0 = vlb_terms(eps_model, x0, ones, S, noise())
    total = {k: prior + v for k, v in l0.items()}
    trace = [(1, l0["beta"][0].item())]
    for lo, hi in zip(edges[:-1], edges[1:]):
        t = torch.randint(lo, hi, (n,), generator=generator, device=x0.device)
        terms = vlb_terms(eps_model, x0, t, S, noise())
        total = {k: total[k] + (hi - lo) * terms[k] for k in total}
        trace.append((t[0].item(), terms["beta"][0].item()))
    trace.append((T + 1, prior[0].item()))
    dims = x0[0].numel() * math.log(2)
    return {k: v / dims for k, v in total.items()}, trace


# -- model (common.UNet, Appendix B) -----------------------------------------------------------


def build_model(cfg: Config) -> torch.nn.Module:
    return common.UNet(channels=1, base=cfg.base, mults=cfg.mults, num_res_blocks=cfg.num_res_blocks,
                       attn_levels=cfg.attn_levels, dropout=cfg.dropout, time_emb="sinusoidal")


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up (Appendix B), then constant (paper) or cosine decay to 0 (short runs)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if not cfg.lr_decay:
        return cfg.lr
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))


# -- training loop -------------------------------------------------------------------------------


def train(cfg, model, ema, opt, S, data, state, dist, device, ckpt) -> None:
    """Algorithm 1 with Adam, warm-up, gradient clipping and an EMA of the weights; the checkpointer
    checks every loss and saves verified steps."""
    net = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if dist.enabled else model
    model.train()
    losses = state["losses"]
    bar = tqdm(total=cfg.steps, initial=state["step"], disable=not dist.is_main, mininterval=2,
               desc="train")
    with ckpt:
        for step in range(state["step"], cfg.steps + 1):
            ckpt.begin(step)
            x0 = next(data).to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            with common.autocast(device, cfg.bf16):
                loss = loss_simple(net, x0, S)
            ckpt.verified(loss, step, last=step == cfg.steps)
            if step == cfg.steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            ema.update_parameters(model)
            losses.append(loss.item())
            state["step"] = step + 1
            bar.update(1)
            if state["step"] % cfg.log_every == 0:
                bar.set_postfix(loss=f"{sum(losses[-cfg.log_every:]) / cfg.log_every:.4f}")
    bar.close()


# -- evaluation and figures ---------------------------------------------------------------------


def make_eps_model(ema, device, bf16: bool):
    net = ema.module.eval()

    def eps_model(x, t):
        with common.autocast(device, bf16):
            return net(x, t).float()

    return eps_model


def run_sampler(eps_model, name, steps, n, cfg, S, device, seed, batch, keep=0):
    """n samples in batches; (samples, frames of the first batch, wall seconds)."""
    gen = torch.Generator(device).manual_seed(seed)
    out, frames, start = [], None, time.perf_counter()
    for i in range(0, n, batch):
        shape = (min(batch, n - i), 1, 28, 28)
        if name == "ancestral":
            x, fr = sample_ancestral(eps_model, shape, S, cfg.sigma, gen, device, keep, every=max(1, cfg.T // 100))
        else:
            x, fr = sample_ddim(eps_model, shape, S, steps, cfg.eta, cfg.clip_x0, gen, device, keep)
        out.append(x.cpu())
        frames = frames if frames is not None else fr
    return torch.cat(out), frames, time.perf_counter() - start


def denoising_strip(frames, path, columns=11):
    """x_T ... x_0 of a few samples, one row each."""
    pick = [frames[round(i * (len(frames) - 1) / (columns - 1))][1] for i in range(columns)]
    common.save_image_grid(torch.stack(pick, 1).flatten(0, 1), path, nrow=columns)


def plot_bound_terms(trace, path):
    plt = common._plt()
    t, v = zip(*trace)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.scatter(t, [x / 784 / math.log(2) for x in v], s=12)
    ax.set(xscale="log", yscale="log", xlabel="t (T + 1: the prior term L_T)",
           ylabel="bits/dim of the term", title="terms of the bound (Eq. 5), one test image")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    dist, device = common.ddp_setup(common.get_device(args.device))
    with common.all_ranks_agree(dist, device):
        prepared = prepare(args, dist, device)
    metrics = run(args, dist, device, *prepared)
    common.ddp_cleanup(dist)
    return metrics


def run_config(args, device, quiet: bool) -> tuple[str, Config, dict | None]:
    """Preset, config and checkpoint: from the preset and flags, or for --resume and --sample-only
    from the checkpoint, with only the flags that keep its run."""
    overrides = {k: getattr(args, k) for k in FLAGS}
    if args.resume or args.sample_only:
        path = args.out / "ckpt.pt"
        ckpt = common.load_checkpoint(path, STEM, map_location=device)
        saved = {**ckpt["config"], "preset": ckpt["preset"], "seed": ckpt["seed"]}
        given = {**overrides, "preset": args.preset, "seed": args.seed}
        fixed = FIXED + (("seed",) if args.resume else ())
        values = common.resume_config(saved, given, fixed, ckpt["step"], path, extend=args.resume)
        args.seed = values.pop("seed")
        return values.pop("preset"), make_config(values), ckpt
    args.seed = 0 if args.seed is None else args.seed
    preset = common.resolve_preset(args.preset, device, quiet=quiet)
    values = {**common.fit_preset(PRESETS[preset], device, FP32.get(preset, {}), quiet=quiet),
              **{k: v for k, v in overrides.items() if v is not None}}
    return preset, make_config(values), None


def prepare(args, dist, device) -> tuple:
    """Output folder, config, model, EMA, optimizer and training state (from the checkpoint)."""
    common.prepare_out(args.out)
    preset, cfg, ckpt = run_config(args, device, quiet=not dist.is_main)
    common.seed_everything(args.seed + dist.rank)
    model = build_model(cfg).to(device)
    ema = common.make_ema(model, cfg.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    state = {"step": 0, "losses": []}
    if ckpt is not None:
        for obj, key in ((model, "model"), (ema, "ema"), (opt, "opt")):
            common.load_state(obj, ckpt[key], args.out / "ckpt.pt")
        state = {"step": ckpt["step"], "losses": list(ckpt["losses"])}
        common.set_rng_state(ckpt["rng"])
        if dist.enabled:  # the checkpoint holds rank 0's RNG; give every rank its own stream again
            common.seed_everything(args.seed + 1000 * state["step"] + dist.rank)
    training = not args.sample_only and state["step"] < cfg.steps
    train_x = load_images(cfg.dataset, args.data_dir, train=True) if training else None
    return preset, cfg, model, ema, opt, state, train_x


def run(args, dist, device, preset, cfg, model, ema, opt, state, train_x) -> dict:
    wall0, out = time.perf_counter(), args.out
    if dist.is_main:
        common.write_json(out / "config.json", asdict(cfg))
    S = make_schedule(cfg.schedule, cfg.T)
    losses = state["losses"]
    metrics = {"params": common.count_params(model), "world_size": dist.world_size}

    def save(at_step: int, rng: dict):
        if dist.is_main:
            common.save_checkpoint(out / "ckpt.pt", dict(
                model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=at_step,
                config=asdict(cfg), preset=preset, seed=args.seed, losses=losses[:at_step],
                rng=rng), STEM)

    if train_x is not None:
        data = batches(train_x, cfg.batch_size, dist, args.seed, state["step"])
        start, t0 = state["step"], time.perf_counter()
        train(cfg, model, ema, opt, S, data, state, dist, device,
              common.Checkpointer(save, cfg.ckpt_every, out / "ckpt.pt"))
        train_s, step = time.perf_counter() - t0, state["step"]
        metrics["train"] = {"steps": step, "steps_this_run": step - start, "wall_s": train_s,
                            "steps_per_s": (step - start) / train_s, "images": len(train_x),
                            "global_batch": cfg.batch_size * dist.world_size,
                            "final_loss_mean_100": sum(losses[-100:]) / len(losses[-100:])}
        if dist.enabled:
            metrics["ddp"] = {"world_size": dist.world_size,
                              "param_max_abs_diff": common.ddp_param_divergence(model, dist, device)}
    if dist.is_main and losses:
        common.plot_loss(losses, out / "loss.png", title="L_simple (Eq. 14)")
    eps_model = make_eps_model(ema, device, cfg.bf16)

    # final samples: split across ranks, each with its own seed, gathered on every rank
    per_rank = math.ceil(cfg.n_samples / dist.world_size)
    samples, frames, sample_s = run_sampler(eps_model, cfg.sampler, cfg.sampling_steps, per_rank, cfg, S, device,
                                            seed=args.seed * 1000 + dist.rank + 1, batch=cfg.sample_batch, keep=64)
    samples = common.all_gather_cat(samples.to(device), dist).cpu()[:cfg.n_samples].clamp(-1, 1)
    metrics["samples"] = {"sampler": cfg.sampler, "steps": cfg.T if cfg.sampler == "ancestral" else cfg.sampling_steps,
                          "eta": cfg.eta, "sigma": cfg.sigma, "n": len(samples), "wall_s": sample_s,
                          "samples_per_s": common.all_reduce_mean(per_rank / sample_s, dist, device) * dist.world_size}

    # the variational bound on test images, split across ranks
    test_x = load_images(cfg.dataset, args.data_dir, train=False)[:cfg.bound_images]
    share = test_x[dist.rank * len(test_x) // dist.world_size:(dist.rank + 1) * len(test_x) // dist.world_size]
    gen, t0, parts, trace = torch.Generator(device).manual_seed(args.seed + 7 + dist.rank), time.perf_counter(), [], []
    bound_model = make_eps_model(ema, device, bf16=False)  # fp32: small-t terms are sensitive to eps errors
    for i in tqdm(range(0, len(share), cfg.sample_batch), desc="bound", disable=not dist.is_main):
        bpd, tr = bound_bpd(bound_model, share[i:i + cfg.sample_batch].to(device), S, cfg.bound_strata, gen)
        parts.append(torch.stack([bpd["beta"], bpd["posterior"]], 1))
        trace = trace or tr
    bpd = torch.cat(parts) if parts else torch.zeros(0, 2, device=device)
    n_min = len(test_x) // dist.world_size  # all_gather needs equal shapes
    bpd = common.all_gather_cat(bpd[:n_min].contiguous(), dist).cpu().double()
    exact = cfg.bound_strata == cfg.T - 1
    metrics["bound"] = {
        "images": len(bpd), "strata": cfg.bound_strata, "estimator":
        "L_T closed form + L_0 and L_{t-1} at one x_t ~ q each (unbiased) + "
        + ("every t = 2..T" if exact else "stratified Monte Carlo over t = 2..T")
        + "; stderr over images",
        "wall_s": time.perf_counter() - t0,
        **{f"bpd_sigma_{k}": bpd[:, i].mean().item() for i, k in enumerate(("beta", "posterior"))},
        **{f"bpd_sigma_{k}_stderr": (bpd[:, i].std() / math.sqrt(len(bpd))).item()
           for i, k in enumerate(("beta", "posterior"))}}

    if dist.is_main:
        torch.save(samples, out / "samples.pt")
        common.save_image_grid(samples[:100], out / "samples.png", nrow=10)
        denoising_strip([(t, f[:8]) for t, f in frames], out / "denoising.png")
        shown = frames[::max(1, len(frames) // 20)] + [frames[-1]] * 8  # hold x_0 at the end
        common.gif_images(out / "reverse.gif", [f[:16] for _, f in shown], [f"t = {t}" for t, _ in shown], nrow=4)
        plot_bound_terms(trace, out / "bound_terms.png")
        table, rows = [], []
        for name, steps in cfg.table:  # the same x_T for every sampler (same seed)
            x, _, secs = run_sampler(eps_model, name, steps, cfg.table_n, cfg, S, device, seed=args.seed + 99,
                                     batch=cfg.sample_batch)
            table.append({"sampler": name, "steps": steps, "n": cfg.table_n, "wall_s": secs,
                          "samples_per_s": cfg.table_n / secs})
            rows.append(x[:10])
        common.save_image_grid(torch.cat(rows), out / "samplers.png", nrow=len(rows[0]))
        metrics["sampler_table"] = table
        if cfg.judge:
            metrics["judge"] = common.judge_samples(samples, cfg.dataset, args.data_dir, seed=args.seed)
            print(common.judge_line(metrics["judge"]))
        metrics["wall_s_total"] = time.perf_counter() - wall0
        common.write_json(out / "metrics.json", metrics)
        b = metrics["bound"]
        print(f"{len(samples)} samples in {out}; test bound {b['bpd_sigma_beta']:.3f} +- "
              f"{b['bpd_sigma_beta_stderr']:.3f} bits/dim on {b['images']} images; "
              f"{metrics['wall_s_total']:.0f} s in all")
    return metrics


if __name__ == "__main__":
    common.cli_entry(main)
