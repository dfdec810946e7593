"""06 score SDEs: the math against closed forms and Monte Carlo, the samplers and the likelihood
on Gaussians with their analytic scores, and the script end to end on tiny data."""

import inspect
import json
import math

import pytest
import torch
from conftest import load_script

m = load_script("06_sde_mnist")

SDES = {
    "ve": lambda: m.VESDE(0.01, 5.0),
    "vp": lambda: m.VPSDE(0.1, 20.0),
    "subvp": lambda: m.SubVPSDE(0.1, 20.0),
}


def gaussian_score(sde, mu, s):
    """Exact score of p_t when p_0 = N(mu, diag(s^2)): p_t = N(m mu, m^2 s^2 + std^2) (Eq. 29)."""

    def score(x, t):
        mt, st = m.bcast(sde.mean_coeff(t), x), m.bcast(sde.std(t), x)
        return -(x - mt * mu) / (mt**2 * s**2 + st**2)

    return score


@pytest.mark.parametrize("name", ["ve", "vp", "subvp"])
def test_marginal_prob_matches_monte_carlo_of_the_forward_sde(name):
    torch.manual_seed(0)
    sde, n, steps = SDES[name](), 20_000, 1000
    x0 = torch.full((n, 1), 0.8)
    # The VE kernel of Eq. 29 treats x(0) as data already perturbed by sigma_min (the paper's
    # convention).
    x = x0 + (sde.sigma_min * torch.randn_like(x0) if name == "ve" else 0)
    dt, checks = 1.0 / steps, {100: 0.1, 500: 0.5, 1000: 1.0}
    for i in range(1, steps + 1):
        drift, g = sde.sde(x, torch.full((n,), (i - 1) * dt))
        x = x + drift * dt + m.bcast(g, x) * math.sqrt(dt) * torch.randn_like(x)
        if i in checks:
            t = torch.full((n,), checks[i])
            mean, std = sde.marginal_prob(x0, t)
            # Monte-Carlo s.e. of the mean is std / sqrt(n) < 0.6% of std; Euler-Maruyama's bias is
            # O(dt).
            assert abs(x.mean() - mean.mean()) < 0.02 * float(std[0]) + 0.01
            assert abs(x.std() / std[0] - 1) < 0.03


@pytest.mark.parametrize("name", ["ve", "vp", "subvp"])
def test_probability_flow_likelihood_of_a_gaussian_matches_the_closed_form(name):
    torch.manual_seed(1)
    sde = {"ve": m.VESDE(0.01, 50.0), "vp": m.VPSDE(0.1, 20.0), "subvp": m.SubVPSDE(0.1, 20.0)}[
        name
    ]
    mu, s, eps = torch.zeros(4), torch.tensor([0.3, 0.7, 1.0, 1.5]), 1e-5
    x = mu + s * torch.randn(6, 4)
    logp, _, nfe = m.ode_log_likelihood(gaussian_score(sde, mu, s), sde, x, eps, 1e-6, 1e-6)
    var = sde.mean_coeff(torch.tensor(eps)) ** 2 * s**2 + sde.std(torch.tensor(eps)) ** 2
    exact = torch.distributions.Normal(mu, var.sqrt()).log_prob(x).sum(1)
    # The only gaps are the ODE tolerance and p_T != prior (relative 1e-4 in variance): far below
    # 0.01 nats.
    assert torch.allclose(logp, exact, atol=1e-2), (logp, exact)
    assert nfe > 10


def test_hutchinson_estimator_is_unbiased_on_a_small_jacobian():
    torch.manual_seed(2)
    d, n = 6, 20_000
    a = torch.randn(d, d)
    x0 = torch.randn(d)
    fn = lambda x: x @ a.T + torch.sin(x)  # Jacobian A + diag(cos x): trace tr(A) + sum cos x
    exact = float(a.trace() + torch.cos(x0).sum())
    noise = torch.randint(0, 2, (n, d)).float() * 2 - 1
    _, est = m.hutchinson_divergence(fn, x0.expand(n, d), noise)
    se = float(est.std()) / math.sqrt(n)
    assert abs(float(est.mean()) - exact) < 4 * se, (float(est.mean()), exact, se)
    assert se < 0.05  # the check above is not vacuous
    # A diagonal Jacobian makes the Rademacher estimate exact, sample by sample.
    _, est_diag = m.hutchinson_divergence(torch.sin, x0.expand(8, d), noise[:8])
    assert torch.allclose(est_diag, torch.cos(x0).sum().expand(8), atol=1e-5)


@pytest.mark.parametrize(
    "sampler,name",
    [
        ("em", "vp"),
        ("pc", "vp"),
        ("rd", "vp"),
        ("ode", "vp"),
        ("em", "subvp"),
        ("pc", "ve"),
        ("em", "ve"),
    ],
)
def test_samplers_reach_the_moments_of_a_gaussian_with_its_exact_score(sampler, name):
    sde = {"ve": m.VESDE(0.01, 10.0), "vp": m.VPSDE(0.1, 20.0), "subvp": m.SubVPSDE(0.1, 20.0)}[
        name
    ]
    mu, s, n = torch.tensor([1.0, -0.5]), torch.tensor([0.5, 1.0]), 4000
    score, gen, eps = (
        gaussian_score(sde, mu, s),
        torch.Generator().manual_seed(3),
        m.SAMPLE_EPS[name],
    )
    x_T = sde.prior_sampling((n, 2), gen)
    if sampler == "ode":
        x, nfe = m.sample_ode(score, sde, x_T, eps, 1e-4, 1e-4)
    else:
        x, nfe = m.sample_sde(
            score,
            sde,
            x_T,
            200,
            eps,
            "rd" if sampler in ("rd", "pc") else "em",
            0.16 if sampler == "pc" else None,
            generator=gen,
        )
    # s.e. of the mean <= 1/sqrt(4000) = 0.016, of the std about 1.1%; N = 200 steps add ~1% bias.
    assert torch.allclose(x.mean(0), mu, atol=0.06), x.mean(0)
    assert torch.allclose(x.std(0) / s, torch.ones(2), atol=0.06), x.std(0)


def test_bits_per_dim_of_a_uniform_density_is_eight():
    # p(x) = 2^-D on [-1, 1]^D is the uniform dequantisation of equiprobable bytes: exactly 8
    # bits/dim.
    assert float(m.bits_per_dim(torch.tensor([-784 * math.log(2.0)]), 784)) == pytest.approx(8.0)


def run(tiny, out, *extra):
    return m.main(
        ["--preset", "smoke", "--data-dir", str(tiny), "--out", str(out), "--device", "cpu", *extra]
    )


def test_smoke_run_resume_and_sample_only(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    metrics = run(tiny_mnist, out, "--steps", "20")
    for f in [
        "config.json",
        "ckpt.pt",
        "samples.png",
        "samples.pt",
        "loss.png",
        "metrics.json",
        "samplers.png",
        "trajectories.png",
        "reverse.gif",
        "marginals.png",
    ]:
        assert (out / f).exists(), f
    x = torch.load(out / "samples.pt")
    assert x.shape == (8, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert (
        set(metrics["samplers"]) == {"em", "rd", "pc", "ode"} and metrics["likelihood"]["nfe"] > 0
    )
    for name, result in metrics["samplers"].items():  # each sampler judged; 8 samples: no FID
        assert result["judge"]["n"] == 8 and result["judge"]["fid"] is None, name
    assert metrics["judge"] == metrics["samplers"]["em"]["judge"]
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 20
    assert set(metrics["train"]) == {
        "steps",
        "steps_this_run",
        "wall_s",
        "steps_per_s",
        "final_loss",
    }
    assert {"n", "nfe", "wall_s", "samples_per_s"} <= set(metrics["samplers"]["pc"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    losses = ckpt["losses"]
    # Eq. 7's loss starts near 1 (the network outputs ~0, so the loss is E z^2); measured ~0.5 after
    # 20 steps.
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:3]) / 3, losses

    metrics = run(tiny_mnist, out, "--resume", "--steps", "23", "--lik-images", "0")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 23 and len(ckpt["losses"]) == 23 and "likelihood" not in metrics

    before = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    metrics = run(
        tiny_mnist, out, "--sample-only", "--lik-images", "0", "--sampler", "ode", "--no-judge"
    )
    assert "train" not in metrics and metrics["sampler"] == "ode" and "judge" not in metrics
    after = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ve_sets_sigma_max_by_the_largest_pairwise_distance(tiny_mnist, tmp_path):
    metrics = run(tiny_mnist, tmp_path / "ve", "--sde", "ve", "--lik-images", "0", "--n-steps", "2")
    x = m.to_model_space(m.load_mnist(tiny_mnist, train=True))
    assert metrics["sigma_max"] == pytest.approx(
        float(torch.cdist(x.flatten(1), x.flatten(1)).max()), rel=1e-4
    )


def test_user_errors(tiny_mnist, tmp_path):
    import common

    with pytest.raises(common.UserError, match="no checkpoint"):
        run(tiny_mnist, tmp_path / "none", "--sample-only")
    with pytest.raises(common.UserError, match="MNIST"):
        run(tmp_path / "empty", tmp_path / "x")


@pytest.mark.parametrize(
    "flags,word",
    [
        (["--sde", "ve", "--sigma-max", "0.001"], "--sigma-max must be 0 .* or above --sigma-min"),
        (["--sde", "ve", "--sigma-min", "1000"], "--sigma-min must be below"),  # > the data's
        (["--beta-max", "0.05"], "--beta-max must be above --beta-min"),
        (["--train-eps", "0"], "--train-eps must be > 0"),
        (["--lik-eps", "1"], "--lik-eps must be below 1"),
        (["--ema-decay", "1"], "--ema-decay must be below 1"),
        (["--n-steps", "0"], "--n-steps"),
        (["--sample-batch", "0"], "--sample-batch"),
        (["--snr", "0"], "--snr"),
        (["--ode-tol", "0"], "--ode-tol"),
        (["--embed-dim", "7"], "--embed-dim must be even"),
        (["--mults", "2"], "--mults"),
        (["--mults", "0,1"], "--mults"),
        (["--base", "7"], "--base"),
        (["--base", "0"], "--base"),
        (["--dropout", "2"], "--dropout"),
        (["--num-res-blocks", "1,1,1"], "--num-res-blocks"),
        (["--attn-levels", "1"], "--attn-levels"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_flag(flags, word, tiny_mnist, tmp_path):
    import common

    with pytest.raises(common.UserError, match=word) as err:
        run(tiny_mnist, tmp_path / "bad", *flags)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "bad" / "ckpt.pt").exists()


def test_ddpm_chain_reproduces_the_vp_marginals():
    """beta_i of the DDPM chain (Eq. 10) in the form of Eq. 45: prod_i (1 - beta_i) over steps from
    0 to t equals m(t)^2 of Eq. 29 for any N, and beta_i -> beta(t) dt for large N."""
    sde = m.VPSDE(0.1, 20.0)
    for n in (10, 1000):
        dt = 1.0 / n
        t = torch.arange(1, n + 1, dtype=torch.float64) * dt
        prod = torch.cumprod(1 - sde.discrete_beta(t, dt), 0)
        assert torch.allclose(prod, sde.mean_coeff(t) ** 2, rtol=1e-9)
        f, G = sde.discretize(torch.ones(n, 1, dtype=torch.float64), t, dt)
        beta = sde.discrete_beta(t, dt)
        assert torch.allclose(f[:, 0] + 1, (1 - beta).sqrt()) and torch.allclose(G**2, beta)
    t = torch.tensor([0.3, 0.9], dtype=torch.float64)
    assert torch.allclose(sde.discrete_beta(t, 1e-5), sde.beta(t) * 1e-5, rtol=1e-4)


def test_langevin_corrector_step_size_of_algorithms_4_and_5():
    """epsilon = 2 alpha_i (r ||z|| / ||s||)^2 (norms averaged over the batch),
    x <- x + eps s + sqrt(2 eps) z; alpha_i = 1 - beta_i for VP (Algorithm 5), 1 for VE
    (Algorithm 4) and sub-VP."""
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    score = lambda y, t: -2.0 * y
    t, dt, snr = torch.full((64,), 0.7), 0.01, 0.16
    vp = m.VPSDE(0.1, 20.0)
    for sde, alpha in (
        (vp, 1 - vp.discrete_beta(t, dt)),
        (m.VESDE(0.01, 5.0), torch.ones(64)),
        (m.SubVPSDE(0.1, 20.0), torch.ones(64)),
    ):
        out = m.langevin_corrector(score, sde, x, t, dt, snr, torch.Generator().manual_seed(1))
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        ratio = z.norm(dim=1).mean() / score(x, t).norm(dim=1).mean()
        eps = 2 * alpha[:, None] * (snr * ratio) ** 2
        assert torch.allclose(out, x + eps * score(x, t) + (2 * eps).sqrt() * z, atol=1e-6)


def test_tweedie_denoise_is_the_posterior_mean_of_x0():
    """Tweedie: E[x(0) | x(t)] = (x + std^2 grad log p_t(x)) / m(t); for p_0 = N(mu, s^2) this is
    mu + m s^2 (x - m mu) / (m^2 s^2 + std^2), at a t where m and std are both far from 0 and 1."""
    mu, s = torch.tensor([0.5, -1.0]), torch.tensor([0.4, 1.2])
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    for sde in SDES.values():
        sde, t = sde(), torch.full((16,), 0.2)
        mt, st = m.bcast(sde.mean_coeff(t), x), m.bcast(sde.std(t), x)
        post = mu + mt * s**2 * (x - mt * mu) / (mt**2 * s**2 + st**2)
        denoised = m.tweedie_denoise(gaussian_score(sde, mu, s), sde, x, t)
        assert torch.allclose(denoised, post, atol=1e-5)


@pytest.mark.parametrize("name", ["ve", "vp", "subvp"])
def test_dsm_loss_at_the_exact_score_takes_its_closed_form(name):
    """Eq. 7 with lambda(t) = std(t)^2 at the exact score of p_0 = N(0, s^2): per pixel,
    E|std s + z|^2 = E_t[m^2 s^2 / (m^2 s^2 + std^2)], t ~ U(eps, 1) (quadrature over t)."""
    torch.manual_seed(0)
    sde, s, eps = SDES[name](), 0.5, 1e-5
    x0 = s * torch.randn(40_000, 1, 2, 2, dtype=torch.float64)
    score = gaussian_score(sde, torch.zeros(()), torch.tensor(s))
    loss = m.dsm_loss(score, sde, x0, eps).item()
    t = torch.linspace(eps, 1, 20_001, dtype=torch.float64)
    ratio = sde.mean_coeff(t) ** 2 * s**2 / (sde.mean_coeff(t) ** 2 * s**2 + sde.std(t) ** 2)
    exact = torch.trapezoid(ratio, t).item() / (1 - eps)
    # per-image losses spread ~0.5 at most: s.e. below 0.004 over 40k images
    assert loss == pytest.approx(exact, abs=0.015)


def test_largest_pairwise_distance_hand_case():
    """Technique 1 of Song & Ermon 2020: max_ij ||x_i - x_j|| (here across two chunks)."""
    pts = torch.zeros(1500, 2)
    pts[3], pts[1400] = torch.tensor([3.0, 4.0]), torch.tensor([-3.0, 0.0])
    assert m.largest_pairwise_distance(pts) == pytest.approx(math.sqrt(52), rel=1e-6)


def test_smld_chain_reproduces_the_ve_marginals():
    """The SMLD chain (Eq. 8) in the form of Eq. 45 adds G_i^2 = sigma_i^2 - sigma_{i-1}^2 per
    step: summed from t_0 to t it is the kernel variance sigma(t)^2 - sigma(t_0)^2 (Eq. 29)."""
    sde, n = m.VESDE(0.01, 50.0), 100
    dt = 1.0 / n
    t = torch.arange(1, n + 1, dtype=torch.float64) * dt
    _, G = sde.discretize(torch.zeros(n, 1, dtype=torch.float64), t, dt)
    variance = sde.sigma(t) ** 2 - sde.sigma(torch.zeros((), dtype=torch.float64)) ** 2
    assert torch.allclose(torch.cumsum(G**2, 0), variance)


def test_record_sees_every_step_and_the_samplers_keep_x_on_its_device():
    """record(t, x) sees x(T) and x after each of the N steps; the noise is drawn on x's device
    (here float64 on the CPU: the state keeps its dtype and device) by the given generator."""
    sde, n_steps, eps = m.VPSDE(0.1, 20.0), 5, 1e-3
    score = gaussian_score(sde, torch.zeros(2), torch.ones(2))
    x_T = sde.prior_sampling((7, 2), torch.Generator().manual_seed(0)).double()
    seen = []
    x, nfe = m.sample_sde(
        score,
        sde,
        x_T,
        n_steps,
        eps,
        "rd",
        0.16,
        torch.Generator().manual_seed(1),
        record=lambda t, y: seen.append((t, y.clone())),
    )
    assert nfe == 2 * n_steps + 1 and x.dtype == torch.float64 and x.shape == (7, 2)
    ts = [1 - i * (1 - eps) / n_steps for i in range(n_steps + 1)]
    assert [t for t, _ in seen] == pytest.approx(ts)
    assert torch.equal(seen[0][1], x_T)
    again, _ = m.sample_sde(
        score, sde, x_T, n_steps, eps, "rd", 0.16, torch.Generator().manual_seed(1)
    )
    assert torch.equal(again, x)  # record only looks
    frames = []
    m.sample_ode(score, sde, x_T.float(), eps, 1e-3, 1e-3, record=lambda t, y: frames.append(t))
    assert frames[0] == 1.0 and frames[-1] == pytest.approx(eps) and len(frames) > 2


def test_sde_classes_declare_their_interface_and_sub_vp_does_not_undo_vp():
    base = m.SDE()
    for call in (
        lambda: base.sde(torch.zeros(1, 1), torch.zeros(1)),
        lambda: base.std(torch.zeros(1)),
        lambda: base.mean_coeff(torch.zeros(1)),
    ):
        with pytest.raises(NotImplementedError):
            call()
    assert not issubclass(m.SubVPSDE, m.VPSDE)
    t = torch.full((3,), 0.5)
    for make in SDES.values():  # each provides what SDE asks for
        sde = make()
        drift, g = sde.sde(torch.ones(3, 2), t)
        assert drift.shape == (3, 2) and g.shape == sde.std(t).shape == sde.mean_coeff(t).shape
        assert sde.prior_std > 0
    # sub-VP keeps the base class's Euler-Maruyama chain and alpha_i = 1
    assert m.SubVPSDE.discretize is m.SDE.discretize
    assert m.SubVPSDE.corrector_alpha is m.SDE.corrector_alpha


def test_method_functions_work_copied_out_alone():
    """VPSDE, sample_sde and dsm_loss with the helpers they name, in a namespace holding only
    math, numpy, torch and scipy: no common, nothing else from the script."""
    names = [
        "bcast",
        "SDE",
        "LinearBetaSDE",
        "VPSDE",
        "reverse_drift",
        "euler_maruyama_step",
        "reverse_diffusion_step",
        "langevin_corrector",
        "tweedie_denoise",
        "sample_sde",
        "dsm_loss",
    ]
    header = (
        "from __future__ import annotations\nimport math\nimport numpy as np\n"
        "import torch\nfrom scipy import integrate\n\n"
    )
    ns = {}
    exec(header + "\n\n".join(inspect.getsource(getattr(m, n)) for n in names), ns)
    sde = ns["VPSDE"](0.1, 20.0)
    mu, s = torch.tensor([1.0, -0.5]), torch.tensor([0.5, 1.0])
    score = gaussian_score(sde, mu, s)
    gen = torch.Generator().manual_seed(4)
    x_T = sde.prior_sampling((4000, 2), gen)
    x, nfe = ns["sample_sde"](score, sde, x_T, 200, 1e-3, "rd", 0.16, generator=gen)
    assert nfe == 401
    assert torch.allclose(x.mean(0), mu, atol=0.06)
    assert torch.allclose(x.std(0) / s, torch.ones(2), atol=0.06)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    score_fn = lambda y, t: net(y) / ns["bcast"](sde.std(t), y)
    loss = ns["dsm_loss"](score_fn, sde, torch.randn(8, 1, 6, 6), 1e-5)
    loss.backward()
    assert torch.isfinite(loss) and net.weight.grad is not None


def test_budget_fixes_the_step_count_and_resume_keeps_it(tiny_mnist, tmp_path):
    """--minutes: the step count measured at the start is stored; --resume alone trains no more."""
    out = tmp_path / "budget"
    metrics = run(tiny_mnist, out, "--minutes", "0.01", "--lik-images", "0", "--no-judge")
    steps = metrics["train"]["steps"]
    assert steps >= 1 and json.loads((out / "config.json").read_text())["steps"] == steps
    assert torch.load(out / "ckpt.pt", weights_only=True)["config"]["steps"] == steps
    assert "train" not in run(tiny_mnist, out, "--resume", "--lik-images", "0", "--no-judge")
