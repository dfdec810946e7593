"""04 Sohl-Dickstein et al. 2015: forward process, posterior and entropy terms against closed forms
and numerical integration, the bound K, learning, and the script end to end."""

import ast
import inspect
import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

m = load_script("04_sohl_dickstein_swissroll")
T = 40
BETA = m.beta_schedule(T, 1 / T + 1e-3)  # the authors' code's fixed schedule


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A few thousand 2-D points: one thread is faster than two, much faster on a busy CPU."""
    with m.common.one_thread():
        yield


def test_beta_schedule_is_the_reference_baseline():
    # from 1/T (+ 0.001 on beta_1) to 1/2; about 1/T of the data variance survives to t = T
    assert BETA[0].item() == pytest.approx(1 / T + 1e-3, rel=1e-3)
    assert BETA[-1].item() == pytest.approx(0.5, rel=1e-3)
    assert (BETA[2:] > BETA[1:-1]).all()  # beta_1 carries the extra 0.001
    assert m.alpha_bar(BETA)[-1].item() == pytest.approx(1 / T, rel=0.25)


def test_learned_schedule_keeps_beta1_and_gets_the_frozen_noise_gradient():
    # Sec. 2.4.1: beta_1 stays the fixed constant; beta_2..T follow theta, and the gradient of K
    # in theta, with the noise of q(x^(t) | x^(0)) held fixed, matches a finite difference
    theta = (0.5 * torch.randn(T - 1, generator=torch.Generator().manual_seed(5))).double()
    beta = m.beta_schedule(T, 1e-3, theta)
    assert beta[0].item() == pytest.approx(1e-3) and torch.equal(
        m.beta_schedule(T, 1e-3, torch.zeros(T - 1))[1:], BETA[1:])
    torch.manual_seed(5)
    model = m.ReverseModel(T, "mlp", 16).double()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    x0 = torch.from_numpy(m.swiss_roll(256, 5, 1.0)).double()
    t, noise = torch.randint(2, T + 1, (256,)), torch.randn_like(x0)
    K = lambda th: m.bound_K(model, x0, t, m.beta_schedule(T, 1e-3, th), noise).mean()
    theta.requires_grad_(True)
    grad = torch.autograd.grad(K(theta), theta)[0]
    e = torch.zeros(T - 1, dtype=torch.float64)
    for i in (0, 9, 30):
        e.zero_()
        e[i] = 1e-5
        with torch.no_grad():
            fd = (K(theta + e) - K(theta - e)) / 2e-5
        assert grad[i].item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-7)


def test_q_sample_matches_the_chain_of_single_steps():
    # T_pi applied step by step (Eq. 2) has the closed-form marginal of q_sample at every t
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([[1.5, -0.5]]).repeat(200_000, 1)
    x = x0.clone()
    for t in range(1, 21):
        x = (1 - BETA[t - 1]).sqrt() * x + BETA[t - 1].sqrt() * torch.randn(x.shape, generator=g)
    ab = m.alpha_bar(BETA)[19]
    xt = m.q_sample(x0, torch.full((len(x0),), 20), BETA, torch.randn(x0.shape, generator=g))
    # 200k samples: standard errors ~0.002 for the mean and ~0.003 for the variance
    for y in (x, xt):
        assert y.mean(0).numpy() == pytest.approx((ab.sqrt() * x0[0]).numpy(), abs=0.01)
        assert y.var(0).numpy() == pytest.approx([1 - ab.item()] * 2, abs=0.01)


@pytest.mark.parametrize("t", [2, 3, 20, 40])
def test_q_posterior_is_bayes_rule_on_a_grid(t):
    # q(x_{t-1} | x_t, x0) proportional to q(x_t | x_{t-1}) q(x_{t-1} | x0), normalised numerically
    x0, xt = torch.tensor([[0.7, -1.2]]), torch.tensor([[0.3, 0.9]])
    mean, var = m.q_posterior(x0, xt, torch.tensor([t]), BETA)
    b, ab_prev = BETA[t - 1].double(), m.alpha_bar(BETA)[t - 2].double()
    for i in range(2):
        y = torch.linspace(-6, 6, 200_001, dtype=torch.float64)
        logw = (-(xt[0, i] - (1 - b).sqrt() * y) ** 2 / (2 * b)
                - (y - ab_prev.sqrt() * x0[0, i]) ** 2 / (2 * (1 - ab_prev)))
        w = torch.exp(logw - logw.max())
        w /= w.sum()
        grid_mean = (w * y).sum()
        grid_var = (w * (y - grid_mean) ** 2).sum()
        assert mean[0, i].item() == pytest.approx(grid_mean.item(), abs=1e-5)
        assert var[0, i].item() == pytest.approx(grid_var.item(), rel=1e-4)


def test_gaussian_entropy_and_kl_match_monte_carlo():
    g = torch.Generator().manual_seed(1)
    var = torch.tensor(0.3)
    x = var.sqrt() * torch.randn(400_000, 2, generator=g)
    mc_entropy = -(-(x**2).sum(-1) / (2 * var) - torch.log(2 * math.pi * var)).mean()
    # standard error ~0.002
    assert m.gaussian_entropy(var, 2).item() == pytest.approx(mc_entropy.item(), abs=0.01)
    mu_q, var_q = torch.tensor([0.2, -0.1]), torch.tensor([0.3, 0.5])
    mu_p, var_p = torch.tensor([0.0, 0.4]), torch.tensor([0.6, 0.2])
    y = mu_q + var_q.sqrt() * torch.randn(400_000, 2, generator=g)
    logn = lambda z, mu, v: (-(z - mu) ** 2 / (2 * v) - 0.5 * torch.log(2 * math.pi * v)).sum(-1)
    mc_kl = (logn(y, mu_q, var_q) - logn(y, mu_p, var_p)).mean()
    assert m.gaussian_kl(mu_q, var_q, mu_p, var_p).item() == pytest.approx(mc_kl.item(), abs=0.01)


def test_entropy_terms_are_the_three_conditional_entropies():
    # H_q(X^T | X^0) - H_q(X^1 | X^0) - H_p(X^T), each the entropy of a Gaussian with that variance,
    # each checked here by sampling: q(x^1 | x^0) has variance beta_1, q(x^T | x^0) has 1 - abar_T.
    # beta_1 = 0.001 keeps beta_1 apart from beta_2 (the fixed schedule has both near 1/T).
    g, beta = torch.Generator().manual_seed(2), m.beta_schedule(T, 1e-3)
    x0 = torch.zeros(400_000, 2)
    h = []
    for t, var in [(T, 1 - m.alpha_bar(beta)[-1]), (1, beta[0]), (None, torch.tensor(1.0))]:
        noise = torch.randn(x0.shape, generator=g)
        x = m.q_sample(x0, torch.full((len(x0),), t), beta, noise) if t else noise
        h.append(-(-(x**2).sum(-1) / (2 * var) - torch.log(2 * math.pi * var)).mean())
    assert m.entropy_terms(beta, 2).item() == pytest.approx((h[0] - h[1] - h[2]).item(), abs=0.02)


@pytest.mark.parametrize("data", ["gaussian", "swiss_roll"])
def test_zero_readouts_give_K_equal_to_L_null(data):
    # Zero readouts make p the exact reversal of diffusion on N(0, I) data (the authors' code's
    # check), so p(x^0) = N(0, I) and the bound is tight: K = E log N(x0; 0, I) = L_null. The Swiss
    # roll is scaled to E|x|^2 = 2, so its L_null is the same -log(2 pi e) nats; per-point K has std
    # ~1.5 nats, so 10k points give a standard error ~0.015 nats.
    g = torch.Generator().manual_seed(3)
    roll = torch.from_numpy(m.swiss_roll(10_000, 3, 1.0))
    x0 = torch.randn(10_000, 2, generator=g) if data == "gaussian" else roll
    model = m.ReverseModel(T)
    K = m.bound_K_full(model, x0, BETA, g).mean().item()
    assert K == pytest.approx(m.log_pi(x0).mean().item(), abs=0.05)
    assert K == pytest.approx(-math.log(2 * math.pi * math.e), abs=0.06)


def test_zero_readouts_sample_the_reversal_of_diffusion_on_gaussian_data():
    # Eq. 5 with zero readouts is the exact reversal of diffusion on N(0, I) data (each forward
    # step keeps N(0, I), so does its reverse): every x^(t) of the chain is N(0, I). A large
    # beta_1 makes an error in the fixed last step (App. B.2) visible.
    t_len, g, chain = 10, torch.Generator().manual_seed(6), {}
    x_T = torch.randn(50_000, 2, generator=g)
    x0 = m.p_sample_loop(m.ReverseModel(t_len), x_T, m.beta_schedule(t_len, 0.1), g,
                         record=lambda t, x: chain.setdefault(t, x))
    assert sorted(chain) == list(range(t_len + 1)) and chain[t_len] is x_T and chain[0] is x0
    for x in (chain[t_len // 2], x0):  # standard errors 0.0045 (mean), 0.0063 (variance)
        assert x.mean(0).numpy() == pytest.approx([0, 0], abs=0.02)
        assert x.var(0).numpy() == pytest.approx([1, 1], abs=0.025)


def test_single_t_estimate_is_unbiased_for_the_full_bound():
    # Within 4 standard errors, computed from the per-point estimates. T = 10 keeps the spread of
    # the (T - 1)-scaled KL term small: scaling by T, or dropping the entropy terms, moves the
    # mean by ~18 standard errors here.
    t_len = 10
    beta = m.beta_schedule(t_len, 1 / t_len + 1e-3)
    torch.manual_seed(4)
    model = m.ReverseModel(t_len, "mlp", 16)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    x0 = torch.from_numpy(m.swiss_roll(4000, 4, 1.0))
    full = m.bound_K_full(model, x0, beta)
    x0 = x0.repeat(10, 1)
    with torch.no_grad():
        single = m.bound_K(model, x0, torch.randint(2, t_len + 1, (len(x0),)), beta,
                           torch.randn_like(x0))
    se = math.sqrt(single.var() / len(single) + full.var() / len(full))
    assert abs(single.mean().item() - full.mean().item()) < 4 * se


def test_data_scaling_and_exact_density():
    x = m.swiss_roll(100_000, 5, 1.0)
    assert np.abs(x.mean(0)).max() < 0.01 and (x**2).sum(1).mean() == pytest.approx(2.0, abs=0.02)
    # the quadrature density integrates to one over a grid that covers the roll
    g = np.linspace(-2.8, 2.8, 101)
    grid = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2).astype(np.float32)
    mass = np.exp(m.data_log_density(grid, 1.0)).sum() * (g[1] - g[0]) ** 2
    assert mass == pytest.approx(1.0, abs=0.01)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("r04")
    return out, m.main(["--preset", "smoke", "--out", str(out), "--seed", "0"])


def test_smoke_run_writes_every_output_and_K_increases(smoke_run):
    out, metrics = smoke_run
    for name in ["config.json", "ckpt.pt", "metrics.json", "samples.pt", "samples.png",
                 "loss.png", "figure1.png", "variance.png", "reverse_chain.gif"]:
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["K_bits"] == pytest.approx(metrics["K_bits"])
    assert torch.load(out / "samples.pt").shape == (500, 2)
    train = metrics["train"]
    assert train["steps"] == train["steps_this_run"] == 300 and train["steps_per_s"] > 0
    losses = torch.load(out / "ckpt.pt")["losses"]
    assert len(losses) == 300 and train["final_loss"] == pytest.approx(np.mean(losses[-100:]))
    assert metrics["ancestral"]["n"] == 500 and metrics["ancestral"]["samples_per_s"] > 0
    assert metrics["params"] > 0 and metrics["wall_s_total"] > train["wall_s"]
    assert json.loads((out / "config.json").read_text())["hidden"] == 16  # the paper's, in smoke
    # at init K = L_null (zero readouts; measured within 0.03 bits on the same 500 held-out points);
    # the smoke run's 300 steps raise K by 0.21 bits (measured), the full cpu run by ~0.5
    assert metrics["K_bits_at_init"] == pytest.approx(metrics["L_null_bits"], abs=0.1)
    assert metrics["K_bits"] > metrics["K_bits_at_init"] + 0.1
    # a lower bound cannot pass the data's own log likelihood
    assert metrics["K_bits"] < metrics["data_log_likelihood_bits"] + 0.2


def test_resume_and_sample_only(smoke_run, tmp_path):
    out, metrics = smoke_run
    resumed = m.main(["--preset", "smoke", "--out", str(out), "--resume", "--steps", "320"])
    assert resumed["train"]["steps"] == 320 and resumed["train"]["steps_this_run"] == 20
    sampled = m.main(["--preset", "smoke", "--out", str(out), "--sample-only"])
    assert sampled["train"]["steps"] == 320 and sampled["train"]["steps_this_run"] == 0
    assert sampled["K_bits"] == pytest.approx(resumed["K_bits"])  # same weights, same seeds
    # what defines the run may not change (what happens after training may: see the next test)
    with pytest.raises(m.common.UserError, match="no checkpoint"):
        m.main(["--preset", "smoke", "--out", str(tmp_path / "empty"), "--sample-only"])
    refused = [(["--trunk", "mlp"], "trunk=rbf"), (["--lr", "0.1"], "lr=0.01"),
               (["--ema-decay", "0.5"], "ema_decay=0.9"), (["--preset", "cpu"], "preset=smoke"),
               (["--seed", "3"], "seed=0")]
    for flags, word in refused:
        for mode in ("--sample-only", "--resume"):
            with pytest.raises(m.common.UserError, match=word) as err:
                m.main(["--out", str(out), mode, *flags])
            assert "\n" not in str(err.value)
    with pytest.raises(m.common.UserError, match="at step 320"):
        m.main(["--out", str(out), "--resume", "--steps", "310"])
    for flags in (["--steps", "0"], ["--beta1", "1"], ["--T", "1"]):
        with pytest.raises(m.common.UserError):
            m.main(["--preset", "smoke", "--out", str(tmp_path / "bad"), *flags])
    assert not (tmp_path / "bad").exists()  # refused before any file is written


@pytest.mark.parametrize("flag, value, allowed", [
    ("--T", "1", "at least 2"), ("--steps", "0", "at least 1"), ("--batch-size", "0", "at least 1"),
    ("--hidden", "0", "at least 1"), ("--n-eval", "1", "at least 2"),
    ("--gif-stride", "0", "at least 1"), ("--beta1", "0", "in (0, 1)"),
    ("--beta1", "1", "in (0, 1)"), ("--ema-decay", "1", "in [0, 1)"), ("--lr", "0", "above 0"),
    ("--roll-noise", "0", "above 0")])
def test_every_setting_out_of_range_is_one_line_naming_its_flag(tmp_path, flag, value, allowed):
    with pytest.raises(m.common.UserError) as err:
        m.main(["--preset", "smoke", "--out", str(tmp_path), flag, value])
    assert str(err.value) == f"{flag} must be {allowed}"
    assert not list(tmp_path.iterdir())  # refused before any work
    for bad in ("-1", "nan", "inf"):  # negative or non-finite numbers: refused by the flag parser
        with pytest.raises(SystemExit):
            m.main(["--preset", "smoke", "--out", str(tmp_path), flag, bad])
    with pytest.raises(SystemExit):
        m.main(["--preset", "smoke", "--out", str(tmp_path), "--trunk", "cnn"])


def test_resume_alone_after_sigterm_is_the_same_run(tmp_path, monkeypatch):
    # SIGTERM at step 12 saves that step and stops; --resume with no other flag that defines the
    # run (only evaluation's --n-eval and --gif-stride) then trains to the checkpoint's own 30
    # steps and ends exactly where an uninterrupted run ends.
    flags = ["--preset", "smoke", "--steps", "30", "--n-eval", "100"]
    m.main([*flags, "--out", str(tmp_path / "whole")])
    original, calls = m.bound_K, []

    def bound_K(*a, **k):
        calls.append(1)
        if len(calls) == 13:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*a, **k)

    monkeypatch.setattr(m, "bound_K", bound_K)
    with pytest.raises(m.common.Interrupted, match="at step 12"):
        m.main([*flags, "--out", str(tmp_path / "cut")])
    monkeypatch.setattr(m, "bound_K", original)
    assert torch.load(tmp_path / "cut" / "ckpt.pt")["step"] == 12
    resumed = m.main(["--resume", "--out", str(tmp_path / "cut"), "--n-eval", "50",
                      "--gif-stride", "40"])
    assert resumed["train"]["steps"] == 30 and resumed["train"]["steps_this_run"] == 18
    assert resumed["ancestral"]["n"] == 50
    a, b = (torch.load(tmp_path / run / "ckpt.pt") for run in ("whole", "cut"))
    for key in ("model", "ema", "optimizer"):
        assert equal(a[key], b[key]), key
    assert a["losses"] == b["losses"] and a["step"] == b["step"] == 30
    assert {**a["config"], "n_eval": 50, "gif_stride": 40} == b["config"]


def equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_bound_K_works_copied_out_alone():
    # bound_K with the helpers it names, the model and the sampler, in a namespace holding only
    # math, numpy and torch: no common, nothing else from the script. Trained there for 200 steps
    # on four clusters (E|x|^2 = 2, as the bound's entropy terms assume), K rises far above L_null.
    names = ["beta_schedule", "alpha_bar", "q_sample", "q_posterior", "gaussian_kl",
             "gaussian_entropy", "entropy_terms", "bound_K", "bound_K_full", "log_pi",
             "p_sample_loop", "ReverseModel"]
    header = ("from __future__ import annotations\nimport math\nimport numpy as np\n"
              "import torch\nimport torch.nn as nn\n\n")
    ns = {}
    exec(header + "\n\n".join(inspect.getsource(getattr(m, n)) for n in names), ns)
    torch.manual_seed(0)
    model, T = ns["ReverseModel"](10), 10
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    centers = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]) * 0.95

    def data(n):
        return centers[torch.randint(4, (n,))] + 0.3 * torch.randn(n, 2)

    x_test = data(2000)
    L_null = ns["log_pi"](x_test).mean().item()
    K0 = ns["bound_K_full"](model, x_test, model.beta().detach()).mean().item()
    x0, t = data(64), torch.randint(2, T + 1, (64,))
    noise = torch.randn_like(x0)
    assert torch.equal(ns["bound_K"](model, x0, t, model.beta(), noise),
                       m.bound_K(model, x0, t, model.beta(), noise))
    for _ in range(200):
        x0 = data(256)
        loss = -ns["bound_K"](model, x0, torch.randint(2, T + 1, (256,)), model.beta(),
                              torch.randn_like(x0)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    K = ns["bound_K_full"](model, x_test, model.beta().detach()).mean().item()
    assert K0 == pytest.approx(L_null, abs=0.1) and K > L_null + 0.5
    steps = []
    x = ns["p_sample_loop"](model, torch.randn(500, 2), model.beta().detach(),
                            record=lambda t, x: steps.append(t))
    assert steps == list(range(T, -1, -1)) and torch.isfinite(x).all()


def test_the_script_reads_in_one_sitting():
    # lines of at most 100 characters, no function over 60 lines
    source = Path(inspect.getsourcefile(m)).read_text()
    assert [i for i, line in enumerate(source.splitlines(), 1) if len(line) > 100] == []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno - node.lineno + 1 <= 60, node.name
