"""02: the exact mixture score, both losses against their closed-form values at the exact score,
the data generators, and that NCSN learns the mixture (distance, weights, score error per sigma)
at the smoke size; --resume, --sample-only, the other datasets, --loss ssm and user errors."""

import dataclasses
import inspect
import math

import numpy as np
import pytest
import torch
from conftest import equal_states, load_script

import common

m = load_script("02_ncsn_toy")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A small MLP on 2-D points: one thread is faster than two, much faster on a busy CPU."""
    with common.one_thread():
        yield


MIX64 = m.Mixture(*(t.double() for t in m.MIXTURE))


@pytest.mark.parametrize("sigma", [0.0, 0.3, 4.0])
def test_mixture_score_is_the_gradient_of_the_log_density(sigma):
    x = (torch.rand(256, 2, dtype=torch.float64) * 16 - 8).requires_grad_(True)
    (autograd,) = torch.autograd.grad(m.mixture_log_prob(x, MIX64, sigma).sum(), x)
    exact = m.mixture_score(x.detach(), MIX64, sigma)
    torch.testing.assert_close(exact, autograd, rtol=1e-9, atol=1e-9)


def test_losses_at_the_exact_score_take_their_closed_form_values():
    # At s = grad log q_sigma, Stein's identity E[s . z] = sigma E[div s] = -sigma E|s|^2 gives
    # DSM (Eq. 5, lambda = sigma^2) = (d - sigma^2 E|s|^2) / 2 and
    # SSM (Eq. 3) = -sigma^2 E|s|^2 / 2.
    # 40k points put both Monte Carlo estimates within ~0.01 (one sd); tolerance 0.04.
    torch.manual_seed(0)
    sigmas = torch.tensor([1.0], dtype=torch.float64)
    exact = lambda x, idx: m.mixture_score(x, MIX64, sigmas[idx][0].item())
    x = m.sample_data("mixture", 40000).double()
    idx = torch.zeros(len(x), dtype=torch.long)
    fisher = (exact(x + torch.randn_like(x), idx) ** 2).sum(1).mean().item()  # E_{q_sigma} |s|^2
    assert m.dsm_loss(exact, x, sigmas, idx).item() == pytest.approx((2 - fisher) / 2, abs=0.04)
    assert m.ssm_loss(exact, x, sigmas, idx).item() == pytest.approx(-fisher / 2, abs=0.04)
    wrong = lambda x, idx: 1.3 * exact(x, idx)  # any other field scores worse
    assert m.dsm_loss(wrong, x, sigmas, idx).item() > (2 - fisher) / 2 + 0.02


def test_datasets_have_their_shapes():
    g = torch.Generator().manual_seed(0)
    board = m.sample_data("checkerboard", 4000, g)
    cells = torch.floor(board / 2).long()
    assert board.abs().max() <= 4 and len(((cells[:, 0] + cells[:, 1]) % 2).unique()) == 1
    roll = m.sample_data("swissroll", 4000, g)
    radius = roll.norm(dim=1)
    assert 0.4 * 1.5 * math.pi - 0.8 < radius.min() and radius.max() < 0.4 * 4.5 * math.pi + 0.8
    w = m.recovered_weights(m.sample_data("mixture", 20000, g), m.MIXTURE)
    assert np.abs(w - m.MIXTURE.weights.numpy()).max() < 0.015
    with pytest.raises(ValueError):
        m.sample_data("moons", 10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run02")
    return out, m.main(["--preset", "smoke", "--seed", "0", "--out", str(out)])


def test_ncsn_learns_the_mixture(trained):
    # Smoke size: 1200 steps, L = 30, T = 40, 1000 particles. Measured over seeds 0-4: sliced W2
    # 0.60-1.28 x the real-vs-real floor, largest weight error 0.002-0.025 (one sd of a weight
    # from 1000 points: 0.016), relative score error at the worst sigma_i 0.045-0.071 (always the
    # smallest sigmas). Bounds: the targets of the cpu run (2x floor) or ~2x the worst seed.
    out, metrics = trained
    report = metrics["samplers"]["annealed Langevin"]
    assert report["swd"] < 2.0 * report["swd_floor"]
    assert report["weight_error"] < 0.06
    assert max(metrics["score_error"]["relative_mse"]) < 0.15
    assert metrics["train"]["steps"] == metrics["train"]["steps_this_run"] == 1200
    assert report["n"] == 1000 and report["samples_per_s"] > 0 and metrics["params"] > 0
    for name in ("config.json", "ckpt.pt", "loss.png", "metrics.json", "samples.pt", "samples.png",
                 "noise_levels.png", "score_field.png", "score_error.png", "annealed_langevin.gif"):
        assert (out / name).stat().st_size > 0, name


def test_sample_only_and_resume(trained):
    out, first = trained
    steps = first["train"]["steps"]
    again = m.main(["--preset", "smoke", "--out", str(out), "--sample-only", "--T", "3",
                    "--n-samples", "300"])
    assert again["train"]["steps"] == steps and again["train"]["steps_this_run"] == 0
    assert torch.load(out / "samples.pt").shape == (300, 2)
    assert again["train"]["final_loss"] == pytest.approx(first["train"]["final_loss"])
    more = m.main(["--preset", "smoke", "--out", str(out), "--resume", "--steps", str(steps + 20),
                   "--T", "2", "--n-samples", "200"])
    assert more["train"]["steps"] == steps + 20 and more["train"]["steps_this_run"] == 20
    ckpt = common.load_checkpoint(out / "ckpt.pt", "02_ncsn_toy")
    assert ckpt["step"] == steps + 20 and len(ckpt["losses"]) == steps + 20
    assert ckpt["config"]["steps"] == steps + 20
    with pytest.raises(common.UserError, match="dataset"):
        m.main(["--preset", "smoke", "--out", str(out), "--sample-only", "--dataset", "swissroll"])


def test_interrupted_run_resumes_to_its_own_step_count_bit_for_bit(tmp_path, monkeypatch):
    import os
    import signal

    base = ["--preset", "smoke", "--steps", "30", "--n-levels", "8", "--T", "2",
            "--n-samples", "100"]
    m.main(base + ["--out", str(tmp_path / "straight")])
    calls = []

    def sigterm_at_12(*a, **k):  # the loss of step 12 asks to stop: ckpt.pt then holds step 12
        calls.append(1)
        if len(calls) == 13:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*a, **k)

    original = m.dsm_loss
    with monkeypatch.context() as mp:
        mp.setattr(m, "dsm_loss", sigterm_at_12)
        with pytest.raises(common.Interrupted, match="SIGTERM.*step 12"):
            m.main(base + ["--out", str(tmp_path / "cut")])
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["step"] == 12
    resumed = m.main(["--resume", "--out", str(tmp_path / "cut")])  # no other flag
    assert resumed["train"]["steps"] == 30 and resumed["train"]["steps_this_run"] == 18
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("straight", "cut"))
    for key in ("model", "ema", "optimizer", "losses", "rng_state", "step", "config", "seed"):
        assert equal_states(a[key], b[key]), key
    # sampling goes on from the run's RNG stream: the same samples, and again with --sample-only
    samples = [torch.load(tmp_path / d / "samples.pt") for d in ("straight", "cut")]
    m.main(["--sample-only", "--out", str(tmp_path / "cut")])
    assert torch.equal(*samples) and torch.equal(torch.load(tmp_path / "cut" / "samples.pt"),
                                                 samples[0])
    # a flag that would change the run is refused in one line (sampling flags are free: above)
    for flag, value in (("--lr", "1"), ("--width", "8"), ("--n-levels", "9"), ("--seed", "4"),
                        ("--preset", "cpu")):
        with pytest.raises(common.UserError, match=f"drop {flag}"):
            m.main(["--resume", "--out", str(tmp_path / "cut"), flag, value])


def test_annealed_langevin_works_copied_out_alone():
    # annealed_langevin with the helpers a reader would take beside it (the noise levels, the loss,
    # the network), in a namespace holding only math, numpy and torch: no common, no globals.
    names = ["geometric_sigmas", "dsm_loss", "ScoreMLP", "annealed_langevin"]
    header = ("from __future__ import annotations\nimport math\nimport numpy as np\n"
              "import torch\nimport torch.nn as nn\n\n")
    ns = {}
    exec(header + "\n\n".join(inspect.getsource(getattr(m, n)) for n in names), ns)
    torch.manual_seed(0)
    sigmas = ns["geometric_sigmas"](3.0, 0.1, 4)
    net = ns["ScoreMLP"](sigmas, width=16, depth=2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(5):
        x = 0.5 * torch.randn(64, 2)
        loss = ns["dsm_loss"](net, x, sigmas, torch.randint(0, len(sigmas), (64,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    seen = []
    x = ns["annealed_langevin"](net, torch.rand(50, 2), sigmas, 2e-3, 3,
                                record=lambda i, t, y: seen.append((i, t)))
    assert x.shape == (50, 2) and torch.isfinite(x).all()
    assert seen == [(i, t) for i in range(4) for t in range(3)]
    # and on the exact score of N(0, s^2 I) the copy is the script's function, step for step
    exact = lambda y, idx: -y / (0.25 + sigmas[idx][:, None] ** 2)
    torch.manual_seed(1)
    a = ns["annealed_langevin"](exact, torch.ones(10, 2), sigmas, 2e-3, 3)
    torch.manual_seed(1)
    torch.testing.assert_close(a, m.annealed_langevin(exact, torch.ones(10, 2), sigmas, 2e-3, 3))


def test_presets_are_differences_from_the_papers_values():
    # Config holds the paper's values (L = 10, T = 100, Adam lr 1e-3, batch 128, 200k steps); the
    # cpu preset holds ours.
    cfg = m.Config()
    assert (cfg.n_levels, cfg.T, cfg.lr, cfg.batch_size, cfg.steps) == (10, 100, 1e-3, 128, 200_000)
    assert m.PRESETS["cpu"] == {"steps": 4000, "batch_size": 512, "lr": 2e-3, "n_levels": 50}
    names = {f.name for f in dataclasses.fields(m.Config)}
    assert all(set(p) <= names for p in m.PRESETS.values()) and set(m.FREE) <= names


@pytest.mark.parametrize("flags", [["--dataset", "swissroll"],
                                   ["--dataset", "checkerboard", "--loss", "ssm"]])
def test_other_datasets_and_sliced_score_matching_run(tmp_path, flags):
    metrics = m.main(["--preset", "smoke", "--out", str(tmp_path), "--steps", "60",
                      "--n-levels", "8", "--T", "3", "--n-samples", "200", *flags])
    report = metrics["samplers"]["annealed Langevin"]
    assert np.isfinite([metrics["train"]["final_loss"], report["swd"], report["mmd"]]).all()
    assert (tmp_path / "samples.png").exists() and (tmp_path / "ckpt.pt").exists()


def test_user_errors(tmp_path):
    with pytest.raises(common.UserError, match="no checkpoint"):
        m.main(["--preset", "smoke", "--out", str(tmp_path), "--sample-only"])
    with pytest.raises(SystemExit):
        m.main(["--dataset", "moons", "--out", str(tmp_path)])
    with pytest.raises(common.UserError, match="--sigma-L must be above 0 and below --sigma-1"):
        m.main(["--preset", "smoke", "--sigma-L", "20", "--out", str(tmp_path)])
    with pytest.raises(common.UserError, match="--T must be at least 1"):
        m.main(["--preset", "smoke", "--T", "0", "--out", str(tmp_path)])


@pytest.mark.parametrize("flag, value", [
    ("--n-levels", "0"), ("--T", "0"), ("--width", "0"), ("--depth", "0"), ("--steps", "0"),
    ("--batch-size", "0"), ("--n-samples", "0"), ("--gif-frames", "0"), ("--eps", "0"),
    ("--box", "0"), ("--lr", "0"), ("--sigma-L", "0"), ("--sigma-L", "10"), ("--sigma-1", "0.01"),
    ("--ema-decay", "1")])
def test_every_setting_out_of_range_is_one_line_naming_its_flag(tmp_path, flag, value):
    with pytest.raises(common.UserError) as err:
        m.main(["--preset", "smoke", "--out", str(tmp_path), flag, value])
    shown = "--sigma-L" if flag == "--sigma-1" else flag  # sigma_L < sigma_1: named by --sigma-L
    assert str(err.value).startswith(f"{shown} must be ") and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())  # refused before any work
    for bad in ("-1", "nan", "inf"):  # and negative or non-finite numbers by the flag parser
        with pytest.raises(SystemExit):
            m.main(["--preset", "smoke", "--out", str(tmp_path), flag, bad])


def test_noise_levels_are_geometric_from_sigma_1_to_sigma_L():
    """Sec. 4.1: sigma_1 > ... > sigma_L with a constant ratio sigma_{i-1} / sigma_i."""
    sig = m.geometric_sigmas(10.0, 0.05, 7).double()
    assert sig[0].item() == pytest.approx(10.0, rel=1e-5)
    assert sig[-1].item() == pytest.approx(0.05, rel=1e-5)
    ratios = sig[:-1] / sig[1:]
    assert torch.allclose(ratios, torch.full_like(ratios, (10.0 / 0.05) ** (1 / 6)), rtol=1e-5)


def test_dsm_loss_weights_each_level_by_sigma_squared():
    """Eq. 5-6 with lambda(sigma) = sigma^2 at the exact score of Gaussian data N(0, s^2 I) in 2-D:
    (1/2) E|sigma s + z|^2 = s^2 / (s^2 + sigma^2) at every level, for sigma far from 1."""
    torch.manual_seed(0)
    s, n = 0.6, 40_000
    sigmas = torch.tensor([0.3, 2.5], dtype=torch.float64)
    exact = lambda y, idx: -y / (s**2 + sigmas[idx][:, None] ** 2)
    x = s * torch.randn(n, 2, dtype=torch.float64)
    for i, sigma in enumerate(sigmas.tolist()):
        idx = torch.full((n,), i, dtype=torch.long)
        # Monte Carlo s.e. below 0.5% of the value; tolerance 3%
        loss = m.dsm_loss(exact, x, sigmas, idx).item()
        assert loss == pytest.approx(s**2 / (s**2 + sigma**2), rel=0.03)


def test_annealed_langevin_matches_the_gaussian_recursion():
    """Algorithm 1 on data N(0, s^2 I) with exact scores -x / v_i, v_i = s^2 + sigma_i^2: each step
    x <- x + (alpha_i / 2) s + sqrt(alpha_i) z maps mean m and variance q to
    (1 - alpha_i / (2 v_i)) m and (1 - alpha_i / (2 v_i))^2 q + alpha_i,
    with alpha_i = eps sigma_i^2 / sigma_L^2."""
    torch.manual_seed(0)
    s, eps, T = 0.5, 2e-3, 20
    sigmas = m.geometric_sigmas(3.0, 0.1, 6).double()
    exact = lambda y, idx: -y / (s**2 + sigmas[idx][:, None] ** 2)
    x = m.annealed_langevin(exact, 4.0 + torch.rand(20_000, 2, dtype=torch.float64), sigmas, eps, T)
    mean, q = 4.5, 1 / 12
    for sig in sigmas.tolist():
        v, alpha = s**2 + sig**2, eps * sig**2 / sigmas[-1].item() ** 2
        for _ in range(T):
            mean, q = (1 - alpha / (2 * v)) * mean, (1 - alpha / (2 * v)) ** 2 * q + alpha
    # 40,000 values: relative s.e. of the variance 0.7%, of the mean 0.005 / sqrt(q)
    assert x.var().item() == pytest.approx(q, rel=0.04)
    assert x.mean().item() == pytest.approx(mean, abs=0.02)
    assert abs(mean - 4.5) > 0.5 and abs(q - 1 / 12) > 0.05  # the chain moved: the check has teeth
