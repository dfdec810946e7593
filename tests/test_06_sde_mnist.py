"""06 score SDEs: the math against closed forms and Monte Carlo, the samplers and the likelihood
on Gaussians with their analytic scores, and the script end to end on tiny data."""

import json
import math

import pytest
import torch
from conftest import load_script

m = load_script("06_sde_mnist")

SDES = {"ve": lambda: m.VESDE(0.01, 5.0), "vp": lambda: m.VPSDE(0.1, 20.0), "subvp": lambda: m.SubVPSDE(0.1, 20.0)}


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
    # The VE kernel of Eq. 29 treats x(0) as data already perturbed by sigma_min (the paper's convention).
    x = x0 + (sde.sigma_min * torch.randn_like(x0) if name == "ve" else 0)
    dt, checks = 1.0 / steps, {100: 0.1, 500: 0.5, 1000: 1.0}
    for i in range(1, steps + 1):
        drift, g = sde.sde(x, torch.full((n,), (i - 1) * dt))
        x = x + drift * dt + m.bcast(g, x) * math.sqrt(dt) * torch.randn_like(x)
        if i in checks:
            t = torch.full((n,), checks[i])
            mean, std = sde.marginal_prob(x0, t)
            # Monte-Carlo s.e. of the mean is std / sqrt(n) < 0.6% of std; Euler-Maruyama's bias is O(dt).
            assert abs(x.mean() - mean.mean()) < 0.02 * float(std[0]) + 0.01
            assert abs(x.std() / std[0] - 1) < 0.03


@pytest.mark.parametrize("name", ["ve", "vp", "subvp"])
def test_probability_flow_likelihood_of_a_gaussian_matches_the_closed_form(name):
    torch.manual_seed(1)
    sde = {"ve": m.VESDE(0.01, 50.0), "vp": m.VPSDE(0.1, 20.0), "subvp": m.SubVPSDE(0.1, 20.0)}[name]
    mu, s, eps = torch.zeros(4), torch.tensor([0.3, 0.7, 1.0, 1.5]), 1e-5
    x = mu + s * torch.randn(6, 4)
    logp, _, nfe = m.ode_log_likelihood(gaussian_score(sde, mu, s), sde, x, eps, 1e-6, 1e-6)
    var = sde.mean_coeff(torch.tensor(eps)) ** 2 * s**2 + sde.std(torch.tensor(eps)) ** 2
    exact = torch.distributions.Normal(mu, var.sqrt()).log_prob(x).sum(1)
    # The only gaps are the ODE tolerance and p_T != prior (relative 1e-4 in variance): far below 0.01 nats.
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


@pytest.mark.parametrize("sampler,name", [("em", "vp"), ("pc", "vp"), ("rd", "vp"), ("ode", "vp"), ("em", "subvp"),
                                          ("pc", "ve"), ("em", "ve")])
def test_samplers_reach_the_moments_of_a_gaussian_with_its_exact_score(sampler, name):
    sde = {"ve": m.VESDE(0.01, 10.0), "vp": m.VPSDE(0.1, 20.0), "subvp": m.SubVPSDE(0.1, 20.0)}[name]
    mu, s, n = torch.tensor([1.0, -0.5]), torch.tensor([0.5, 1.0]), 4000
    score, gen, eps = gaussian_score(sde, mu, s), torch.Generator().manual_seed(3), m.SAMPLE_EPS[name]
    if sampler == "ode":
        x, nfe, _ = m.sample_ode(score, sde, (n, 2), eps, 1e-4, 1e-4, gen)
    else:
        x, nfe, _ = m.sample_sde(score, sde, (n, 2), 200, eps, "rd" if sampler in ("rd", "pc") else "em",
                                 0.16 if sampler == "pc" else None, generator=gen)
    # s.e. of the mean <= 1/sqrt(4000) = 0.016, of the std about 1.1%; N = 200 steps add ~1% bias.
    assert torch.allclose(x.mean(0), mu, atol=0.06), x.mean(0)
    assert torch.allclose(x.std(0) / s, torch.ones(2), atol=0.06), x.std(0)


def test_bits_per_dim_of_a_uniform_density_is_eight():
    # p(x) = 2^-D on [-1, 1]^D is the uniform dequantisation of equiprobable bytes: exactly 8 bits/dim.
    assert float(m.bits_per_dim(torch.tensor([-784 * math.log(2.0)]), 784)) == pytest.approx(8.0)


def run(tiny, out, *extra):
    return m.main(["--preset", "smoke", "--data-dir", str(tiny), "--out", str(out), "--device", "cpu", *extra])


def test_smoke_run_resume_and_sample_only(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    metrics = run(tiny_mnist, out, "--steps", "20")
    for f in ["config.json", "ckpt.pt", "samples.png", "samples.pt", "loss.png", "metrics.json", "samplers.png",
              "trajectories.png", "reverse.gif", "marginals.png"]:
        assert (out / f).exists(), f
    x = torch.load(out / "samples.pt")
    assert x.shape == (8, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert set(metrics["samplers"]) == {"em", "rd", "pc", "ode"} and metrics["likelihood"]["nfe"] > 0
    for name, result in metrics["samplers"].items():  # each sampler judged; 8 samples: no FID
        assert result["judge"]["n"] == 8 and result["judge"]["fid"] is None, name
    assert metrics["judge"] == metrics["samplers"]["em"]["judge"]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 20
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    losses = ckpt["losses"]
    # Eq. 7's loss starts near 1 (the network outputs ~0, so the loss is E z^2); measured ~0.5 after 20 steps.
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:3]) / 3, losses

    metrics = run(tiny_mnist, out, "--resume", "--steps", "23", "--lik-images", "0")
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 23 and len(ckpt["losses"]) == 23 and "likelihood" not in metrics

    before = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    metrics = run(tiny_mnist, out, "--sample-only", "--lik-images", "0", "--sampler", "ode",
                  "--no-judge")
    assert "train_seconds" not in metrics and metrics["sampler"] == "ode" and "judge" not in metrics
    after = torch.load(out / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ve_sets_sigma_max_by_the_largest_pairwise_distance(tiny_mnist, tmp_path):
    metrics = run(tiny_mnist, tmp_path / "ve", "--sde", "ve", "--lik-images", "0", "--n-steps", "2")
    x = m.to_model_space(m.load_mnist(tiny_mnist, train=True))
    assert metrics["sigma_max"] == pytest.approx(float(torch.cdist(x.flatten(1), x.flatten(1)).max()), rel=1e-4)


def test_user_errors(tiny_mnist, tmp_path):
    import common

    with pytest.raises(common.UserError, match="no checkpoint"):
        run(tiny_mnist, tmp_path / "none", "--sample-only")
    with pytest.raises(common.UserError, match="MNIST"):
        run(tmp_path / "empty", tmp_path / "x")
