"""01: the mixture's closed-form score against autograd, Langevin and MALA against the closed-form
stationary law of a Gaussian, and the script's claims (annealing gets the weights right, plain
Langevin does not) end to end at the smoke size. The VP SDE part: the perturbed mixture's score
against autograd of p_t computed by quadrature of Eq. 29's kernel, the ODE log-likelihood against
the true log-density, SDE and ODE samples against the real-vs-real floor, and the method functions
copied out of the file working alone."""

import dataclasses
import inspect
import json
import math

import numpy as np
import pytest
import torch
from conftest import load_script

import common

m = load_script("01_exact_score_langevin")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """2-D work on a few thousand points: one thread is faster than two, much faster on a busy
    CPU."""
    with common.one_thread():
        yield


def double(mix):
    return m.Mixture(*(t.double() for t in mix))


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("sigma", [0.0, 0.5, 3.0])
def test_score_is_the_gradient_of_the_log_density(k, sigma):
    mix = double(m.make_mixture(k))
    x = (torch.rand(256, 2, dtype=torch.float64) * 16 - 8).requires_grad_(True)
    (autograd,) = torch.autograd.grad(m.log_prob(x, mix, sigma).sum(), x)
    torch.testing.assert_close(m.score(x.detach(), mix, sigma), autograd, rtol=1e-9, atol=1e-9)
    logp, s = m.log_prob_and_score(x.detach(), mix, sigma)
    torch.testing.assert_close(logp, m.log_prob(x.detach(), mix, sigma))
    torch.testing.assert_close(s, autograd, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_noisy_mixture_is_normalised_and_is_the_convolution(sigma):
    mix = double(m.make_mixture())
    g = torch.linspace(-16, 16, 801, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    mass = m.log_prob(grid, mix, sigma).exp().sum() * (g[1] - g[0]) ** 2
    assert abs(mass.item() - 1) < 1e-6
    # q_sigma is the law of x + sigma z: same mean, covariance grown by sigma^2 I (20k draws: 1%
    # slack)
    gen = torch.Generator().manual_seed(0)
    x = m.sample_mixture(mix, 20000, gen)
    y = x + sigma * torch.randn(20000, 2, generator=gen, dtype=torch.float64)
    mean = (mix.weights[:, None] * mix.means).sum(0)
    second = mix.covs + torch.einsum("ki,kj->kij", mix.means, mix.means)
    cov = (mix.weights[:, None, None] * second).sum(0)
    cov = cov - torch.outer(mean, mean) + sigma**2 * torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(torch.cov(y.T), cov, rtol=0.03, atol=0.1)


def test_langevin_bias_matches_closed_form_and_mala_removes_it():
    # On N(0, v) the unadjusted step x' = (1 - h / 2v) x + sqrt(h) z keeps variance
    # v / (1 - h / 4v):
    # with v = 0.09, h = 0.1 that is 0.1246, 38% too wide. MALA's law is exactly N(0, v).
    # 4000 chains estimate a variance to ~2.2% (one sd), hence the 8% tolerance.
    v, h = 0.09, 0.1
    gauss = m.Mixture(torch.ones(1), torch.zeros(1, 2), torch.diag(torch.tensor([1.0, v]))[None])
    gen = torch.Generator().manual_seed(0)
    x0 = m.sample_mixture(gauss, 4000, gen)
    ula = m.langevin(x0, lambda y: m.score(y, gauss), h, 200, gen)
    exact, rate = m.mala(x0, lambda y: m.log_prob_and_score(y, gauss), h, 200, gen)
    assert ula[:, 1].var().item() == pytest.approx(v / (1 - h / (4 * v)), rel=0.08)
    assert exact[:, 1].var().item() == pytest.approx(v, rel=0.08)
    assert 0.5 < rate < 1.0


def test_weights_of_true_samples_are_recovered_and_distances_match_common():
    mix = m.make_mixture()
    truth = lambda n, seed: m.sample_mixture(mix, n, torch.Generator().manual_seed(seed)).numpy()
    w = m.recovered_weights(torch.from_numpy(truth(20000, 1)), mix)
    assert np.abs(w - mix.weights.numpy()).max() < 0.015  # 20k draws: sd of a weight <= 0.0035
    sets = {"a": truth(400, 2), "b": truth(400, 3)}
    shared = m.distance_reports(sets, truth, seed=5)
    for name, x in sets.items():
        assert shared[name] == pytest.approx(common.distance_report(x, truth, seed=5))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run01")
    return out, m.main(["--preset", "smoke", "--seed", "0", "--out", str(out)])


def test_smoke_run_writes_its_outputs(smoke_run):
    out, metrics = smoke_run
    for name in ("config.json", "metrics.json", "samples.pt", "samples.png", "score_field.png",
                 "annealed_langevin.gif", "sde_ode_trajectories.png"):
        assert (out / name).stat().st_size > 0, name
    names = list(metrics["samplers"])
    assert any("SDE" in n for n in names) and any("ODE" in n for n in names)
    assert metrics["ode_likelihood"]["mae_nats"] < 0.01
    written = json.loads((out / "metrics.json").read_text())
    assert written["samplers"].keys() == metrics["samplers"].keys()
    assert metrics["samplers"]["Langevin"]["n"] == 1000 and metrics["wall_s_total"] > 0
    samples = torch.load(out / "samples.pt", weights_only=True)
    assert samples["annealed Langevin"].shape == (1000, 2)


def test_annealing_gets_the_weights_right_and_plain_langevin_does_not(smoke_run):
    # Smoke size (1000 particles, L = 50, T = 40). Measured over seeds 0-4: annealed Langevin's
    # sliced W2 is 0.84-1.15 x the real-vs-real floor and its largest weight error 0.008-0.030
    # (one sd of a weight estimated from 1000 points is 0.016); plain Langevin's weight error is
    # 0.20-0.21 and its sliced W2 3.6-5.1 x the floor. The bounds below leave room for other
    # platforms' random streams.
    _, metrics = smoke_run
    annealed, plain = metrics["samplers"]["annealed Langevin"], metrics["samplers"]["Langevin"]
    assert annealed["swd"] < 1.5 * annealed["swd_floor"]
    assert annealed["weight_error"] < 0.045
    assert plain["weight_error"] > 0.15
    assert plain["swd"] > 3 * plain["swd_floor"]
    assert metrics["samplers"]["annealed MALA"]["weight_error"] < 0.045


def test_resume_is_refused_and_bad_flags_fail(tmp_path):
    for flag in ("--resume", "--sample-only"):  # nothing is trained: no checkpoint to use
        with pytest.raises(SystemExit):
            m.main([flag, "--out", str(tmp_path)])
    with pytest.raises(common.UserError, match="--components must be > 0"):
        m.main(["--components", "0", "--out", str(tmp_path)])
    with pytest.raises(common.UserError, match="--sigma-L must be below --sigma-1"):
        m.main(["--sigma-L", "20", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        m.main(["--step", "-1", "--out", str(tmp_path)])
    assert not (tmp_path / "config.json").exists()


BAD_VALUES = [  # (flag, value, message): every Config field at least once
    ("--components", "0", "--components must be > 0"),
    ("--radius", "0", "--radius must be > 0"),
    ("--n-samples", "1", "--n-samples must be at least 2"),
    ("--box", "0", "--box must be > 0"),
    ("--step", "0", "--step must be > 0"),
    ("--n-steps", "0", "--n-steps must be > 0"),
    ("--sigma-1", "0", "--sigma-1 must be > 0"),
    ("--sigma-L", "0", "--sigma-L must be > 0"),
    ("--sigma-L", "10", "--sigma-L must be below --sigma-1"),
    ("--n-levels", "0", "--n-levels must be > 0"),
    ("--coarse-levels", "0", "--coarse-levels must be > 0"),
    ("--T", "0", "--T must be > 0"),
    ("--eps", "0", "--eps must be > 0"),
    ("--gif-frames", "0", "--gif-frames must be > 0"),
    ("--beta-min", "0", "--beta-min must be > 0"),
    ("--beta-min", "30", "--beta-min must be <= --beta-max"),
    ("--beta-max", "0", "--beta-max must be > 0"),
    ("--sde-steps", "0", "--sde-steps must be > 0"),
    ("--sde-eps", "1", "--sde-eps must be in \\(0, 1\\)"),
    ("--ode-tol", "0", "--ode-tol must be > 0"),
    ("--likelihood-eps", "2", "--likelihood-eps must be in \\(0, 1\\)"),
    ("--likelihood-points", "0", "--likelihood-points must be > 0"),
    ("--trajectories", "0", "--trajectories must be > 0"),
]


@pytest.mark.parametrize("flag, value, match", BAD_VALUES)
def test_every_setting_is_checked_with_one_line_naming_its_flag(tmp_path, flag, value, match):
    with pytest.raises(common.UserError, match=match) as err:
        m.main(["--preset", "smoke", "--out", str(tmp_path), flag, value])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "config.json").exists()  # refused before any work


def test_bad_values_cover_every_config_field():
    flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(m.Config)}
    assert flags == {flag for flag, _, _ in BAD_VALUES}


def test_presets_are_differences_from_the_papers_values():
    # Config holds the paper's values (L = 10, T = 100, eps = 2e-5, sigma_L = 0.01, the VP SDE's
    # beta 0.1 to 20 and N = 1000); the cpu preset differs only in L.
    cfg = m.Config()
    assert (cfg.n_levels, cfg.T, cfg.eps, cfg.sigma_L) == (10, 100, 2e-5, 0.01)
    assert (cfg.beta_min, cfg.beta_max, cfg.sde_steps) == (0.1, 20.0, 1000)
    assert m.PRESETS["cpu"] == {"n_levels": 100}
    names = {f.name for f in dataclasses.fields(m.Config)}
    assert all(set(p) <= names for p in m.PRESETS.values())


# -- the VP SDE part -----------------------------------------------------------------------------


def test_vp_kernel_solves_the_moment_equations_of_the_sde():
    # Eq. 11 gives d log m / dt = -beta / 2 and d std^2 / dt = beta (1 - std^2); Eq. 29 obeys both.
    sde, h = m.VPSDE(), 1e-6
    for t in (0.05, 0.3, 0.7, 0.95):
        dlogm = (sde.log_mean_coeff(t + h) - sde.log_mean_coeff(t - h)) / (2 * h)
        dvar = (sde.std(t + h) ** 2 - sde.std(t - h) ** 2) / (2 * h)
        assert dlogm == pytest.approx(-sde.beta(t) / 2, rel=1e-6)
        assert dvar == pytest.approx(sde.beta(t) * (1 - sde.std(t) ** 2), rel=1e-6)
    assert sde.std(0.0) == 0 and sde.mean_coeff(1.0) == pytest.approx(math.exp(-5.025))


@pytest.mark.parametrize("t", [0.05, 0.5])
def test_perturbed_score_is_the_gradient_of_the_convolved_density(t):
    # log p_t(x) = log int p_0(x0) N(x; m x0, std^2 I) dx0 by quadrature on a grid (Eq. 29's kernel,
    # not the closed form under test); its autograd gradient must be the closed-form score of p_t.
    mix, sde = double(m.make_mixture()), m.VPSDE()
    g = torch.linspace(-16, 16, 401, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    log_p0 = m.log_prob(grid, mix) + 2 * torch.log(g[1] - g[0])
    mean, std = sde.mean_coeff(t), sde.std(t)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    x = (mean * m.sample_mixture(mix, 12, gen) + std * z).requires_grad_(True)
    sq = ((x[:, None] - mean * grid[None]) ** 2).sum(-1)
    kernel = -sq / (2 * std**2) - math.log(2 * math.pi * std**2)
    log_pt = torch.logsumexp(log_p0[None] + kernel, dim=1)
    (autograd,) = torch.autograd.grad(log_pt.sum(), x)
    p_t = m.perturbed_mixture(mix, sde, t)
    torch.testing.assert_close(m.log_prob(x.detach(), p_t), log_pt.detach(), rtol=0, atol=1e-8)
    torch.testing.assert_close(m.score(x.detach(), p_t), autograd, rtol=1e-6, atol=1e-7)


def test_ode_log_likelihood_matches_the_true_log_density():
    # 300 mixture draws; measured mean |error| 7e-5 nats with the exact p_T, 0.010 with N(0, I)
    # (p_T is not exactly N(0, I): m(1) = 0.0066 leaves its mean 0.012 off the origin).
    mix, sde = double(m.make_mixture()), m.VPSDE()
    x = m.sample_mixture(mix, 300, torch.Generator().manual_seed(1))
    score_t = lambda y, t: m.score(y, m.perturbed_mixture(mix, sde, t))
    log_p_T = lambda z: m.log_prob(z, m.perturbed_mixture(mix, sde, sde.T))
    logp, z, _ = m.ode_log_likelihood(score_t, sde, x, 1e-5, 1e-5, 1e-5, prior_logp=log_p_T)
    err = logp - m.log_prob(x, mix)
    assert err.abs().mean().item() < 0.01
    assert (err + sde.prior_logp(z) - log_p_T(z)).abs().mean().item() < 0.02


def test_exact_divergence_of_a_linear_map_is_its_trace():
    a = torch.tensor([[1.5, -2.0], [0.3, -0.25]], dtype=torch.float64)
    x = torch.randn(5, 2, dtype=torch.float64)
    out, div = m.exact_divergence(lambda y: y @ a.T, x)
    torch.testing.assert_close(out, x @ a.T)
    torch.testing.assert_close(div, torch.full((5,), 1.25, dtype=torch.float64))


def swd_over_floor(x: np.ndarray, truth, batches: int) -> float:
    """Sliced W2 of `batches` equal chunks of x, each to its own truth draw, over the mean of as
    many real-vs-real pairs: 4 chunks halve the ratio's noise (one sd ~0.25 for a single chunk)."""
    chunks = np.split(x, batches)
    n = len(chunks[0])
    swd = np.mean([common.sliced_wasserstein(c, truth(n, 500 + r), seed=r)
                   for r, c in enumerate(chunks)])
    floor = np.mean([common.sliced_wasserstein(truth(n, 600 + r), truth(n, 700 + r), seed=r)
                     for r in range(batches)])
    return swd / floor


def test_reverse_sde_and_probability_flow_ode_sample_the_mixture():
    # 4 x 1000 points from one x(T), 250 Euler-Maruyama steps. Measured over seeds 0-7: the ratio
    # 0.84-1.18 (SDE) and 0.97-1.27 (ODE), the largest weight error 0.003-0.014 (one sd of a weight
    # from 4000 points is at most 0.008).
    mix, sde = m.make_mixture(), m.VPSDE()
    truth = lambda n, seed: m.sample_mixture(mix, n, torch.Generator().manual_seed(seed)).numpy()
    score_t = lambda y, t: m.score(y, m.perturbed_mixture(mix, sde, t))
    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(4000, 2, generator=gen)
    samples = {"SDE": m.sample_sde(score_t, sde, x_T, 250, 1e-3, gen),
               "ODE": m.sample_ode(score_t, sde, x_T, 1e-3, 1e-5, 1e-5)[0]}
    for name, x in samples.items():
        assert swd_over_floor(x.numpy(), truth, 4) < 1.5, name
        assert np.abs(m.recovered_weights(x, mix) - mix.weights.numpy()).max() < 0.03, name


def test_method_functions_work_copied_out_alone():
    # The samplers with the helpers they name, in a namespace holding only math, numpy, torch
    # and scipy: no common, nothing else from the script.
    names = ["Mixture", "make_mixture", "sample_mixture", "noisy_components", "log_prob", "score",
             "log_prob_and_score", "langevin", "mala", "geometric_sigmas", "annealed_langevin",
             "annealed_mala", "VPSDE", "perturbed_mixture", "reverse_drift", "sample_sde",
             "sample_ode", "exact_divergence", "ode_log_likelihood"]
    header = ("from __future__ import annotations\nimport math\nfrom dataclasses import dataclass\n"
              "from typing import NamedTuple\nimport numpy as np\nimport torch\n"
              "from scipy import integrate\n\n")
    ns = {}
    exec(header + "\n\n".join(inspect.getsource(getattr(m, n)) for n in names), ns)
    mix, sde = ns["make_mixture"](), ns["VPSDE"]()
    score_t = lambda y, t: ns["score"](y, ns["perturbed_mixture"](mix, sde, t))
    x_T = torch.randn(20, 2, generator=torch.Generator().manual_seed(0))
    x = ns["sample_ode"](score_t, sde, x_T, 1e-3, 1e-5, 1e-5)[0]
    assert ns["sample_sde"](score_t, sde, x_T, 20, 1e-3).shape == x.shape
    logp = ns["ode_log_likelihood"](score_t, sde, x, 1e-3, 1e-5, 1e-5)[0]
    assert torch.isfinite(logp).all()
    # the Langevin samplers, each with a record callback
    seen = []
    exact = lambda y, sigma=0.0: ns["score"](y, mix, sigma)
    both = lambda y, sigma=0.0: ns["log_prob_and_score"](y, mix, sigma)
    sigmas = ns["geometric_sigmas"](10.0, 0.01, 3)
    x = ns["langevin"](x_T, exact, 0.05, 5, record=lambda t, y: seen.append(("langevin", t)))
    x, rate = ns["mala"](x, both, 0.05, 5, record=lambda t, y: seen.append(("mala", t)))
    x = ns["annealed_langevin"](x, exact, sigmas, 2e-5, 2,
                                record=lambda i, t, y: seen.append(("annealed", i, t)))
    x, rate = ns["annealed_mala"](x, both, sigmas, 2e-5, 2,
                                  record=lambda i, t, y: seen.append(("annealed MALA", i, t)))
    assert torch.isfinite(x).all() and x.shape == x_T.shape and 0 <= rate <= 1
    assert seen.count(("langevin", 4)) == 1 and seen[-1] == ("annealed MALA", 2, 1)
    assert len(seen) == 5 + 5 + 6 + 6
