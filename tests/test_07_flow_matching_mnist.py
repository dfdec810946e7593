"""07 flow matching: the conditional OT path and its CFM target against closed forms, the ODE
solvers and the likelihood on 2-D Gaussian data (whose marginal velocity field is closed-form),
classifier-free guidance at its ends, learning on tiny data, the method functions copied out
alone, and the script end to end (smoke, --resume, --sample-only, bad input)."""

import ast
import inspect
import math

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script

fm = load_script("07_flow_matching_mnist")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks and 2-D points: one thread is as fast, and far faster on a busy machine."""
    with fm.common.one_thread():
        yield

SIGMA = 0.05  # a sigma_min large enough to matter in the checks below


def test_conditional_path_marginals_and_target():
    """Eq. 20-22: psi_t(x_0) = sigma_t x_0 + mu_t with mu_t = t x_1, sigma_t = 1 - (1 - sigma) t,
    so p_t(x | x_1) = N(t x_1, sigma_t^2 I); the CFM target is d/dt psi_t and equals the
    conditional field u_t (Eq. 21) on the path, which is Eq. 15's sigma'/sigma (x - mu) + mu'."""
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    x0 = torch.randn(20000, 1, 4, 4, generator=g, dtype=torch.float64)
    for t_val in (0.0, 0.3, 0.9, 1.0):
        t = torch.full((3,), t_val, dtype=torch.float64)
        sigma_t = 1 - (1 - SIGMA) * t_val
        x = fm.psi_t(x0[:3], x1, t, SIGMA)
        assert torch.allclose(x, sigma_t * x0[:3] + t_val * x1, atol=1e-12)
        # the marginal of psi_t(x_0), x_0 ~ N(0, I), for one x_1: mean t x_1, std sigma_t
        xs = fm.psi_t(x0, x1[:1].expand_as(x0), torch.full((20000,), t_val), SIGMA)
        assert torch.allclose(xs.mean(0), t_val * x1[0], atol=4 * sigma_t / math.sqrt(20000))
        assert xs.std(0).sub(sigma_t).abs().max() < 0.03 * sigma_t
        # d/dt psi_t by central differences, u_t on the path, Eq. 15
        h = 1e-6
        fd = (fm.psi_t(x0[:3], x1, t + h, SIGMA) - fm.psi_t(x0[:3], x1, t - h, SIGMA)) / (2 * h)
        target = fm.cfm_target(x0[:3], x1, SIGMA)
        assert torch.allclose(fd, target, atol=1e-7)
        if t_val < 1 or SIGMA > 0:
            assert torch.allclose(fm.u_t(x, x1, t, SIGMA), target, atol=1e-10)
            eq15 = -(1 - SIGMA) / sigma_t * (x - t_val * x1) + x1
            assert torch.allclose(fm.u_t(x, x1, t, SIGMA), eq15, atol=1e-10)
    # sigma_min = 0 is rectified flow: x_t = (1 - t) x_0 + t x_1, target x_1 - x_0
    t = torch.full((3,), 0.4, dtype=torch.float64)
    assert torch.allclose(fm.psi_t(x0[:3], x1, t, 0.0), 0.6 * x0[:3] + 0.4 * x1)
    assert torch.equal(fm.cfm_target(x0[:3], x1, 0.0), x1 - x0[:3])


# 2-D data N(M, S): the OT path's marginals are Gaussian and its marginal field is closed-form
M = torch.tensor([1.0, -0.5], dtype=torch.float64)
S = torch.tensor([[0.5, 0.3], [0.3, 0.4]], dtype=torch.float64)


def exact_velocity(mean, cov, sigma):
    """u_t(x) = E[x_1 - (1 - sigma) x_0 | x_t = x] for x_1 ~ N(mean, cov), x_0 ~ N(0, I):
    mean + C V^-1 (x - t mean), C = t cov - (1 - sigma) a I, V = a^2 I + t^2 cov, a = sigma_t."""
    eye = torch.eye(2, dtype=torch.float64)

    def v(x, t):
        t = float(t[0])
        a = 1 - (1 - sigma) * t
        C, V = t * cov - (1 - sigma) * a * eye, a**2 * eye + t**2 * cov
        return (mean + (x.double() - t * mean) @ torch.linalg.solve(V, C.T)).to(x.dtype)

    return v


def test_solvers_on_the_exact_field_reproduce_the_target():
    """From x_0 ~ N(0, I), Euler with many steps (and midpoint and RK45 with few) on the exact
    marginal field ends at N(M, S + sigma^2 I), the marginal p_1 of the path (Eq. 20). The field
    is affine in x, so is the flow map: with x_0 whitened to sample mean 0 and covariance I the
    output's moments carry only the solver's error, no sampling noise."""
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x - x.mean(0)
    x0 = x @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(x.T))).T
    v, want = exact_velocity(M, S, SIGMA), S + SIGMA**2 * torch.eye(2, dtype=torch.float64)
    runs = {"euler 1000": fm.sample_euler(v, x0, 1000),
            "midpoint 10": fm.sample_midpoint(v, x0, 10)}
    runs["rk45"], nfe = fm.sample_rk45(v, x0, 1e-7, 1e-7)
    assert 6 <= nfe < 300
    for name, x in runs.items():
        tol = 1e-5 if name == "rk45" else 2e-3
        assert torch.allclose(x.mean(0), M, atol=tol), name
        assert torch.allclose(torch.cov(x.T), want, atol=tol), name
    # path by path against RK45: Euler's error is first order in the step, the midpoint rule's
    # second order (halving the step: 2x and about 4x smaller)
    err = lambda x: (x - runs["rk45"]).abs().max().item()
    assert 1.7 < err(fm.sample_euler(v, x0, 50)) / err(fm.sample_euler(v, x0, 100)) < 2.3
    assert 3 < err(fm.sample_midpoint(v, x0, 5)) / err(fm.sample_midpoint(v, x0, 10)) < 10


def test_ode_log_likelihood_of_a_known_gaussian():
    """Through the ODE, log p_1 of points equals log N(x; M, S + sigma^2 I). With a diagonal S the
    Jacobian of the field is diagonal and the Rademacher estimate of its trace is exact."""
    cov = torch.diag(torch.tensor([0.5, 0.2], dtype=torch.float64))
    v, want = exact_velocity(M, cov, SIGMA), cov + SIGMA**2 * torch.eye(2, dtype=torch.float64)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + M
    logp, z, nfe = fm.ode_log_likelihood(v, x, 1e-8, 1e-8)
    ref = torch.distributions.MultivariateNormal(M, want).log_prob(x)
    assert torch.allclose(logp, ref, atol=1e-5) and nfe > 0
    # x(0): the inverse flow, back to the noise that Euler carries to x
    assert torch.allclose(fm.sample_euler(v, z, 2000), x, atol=2e-3)
    # bits/dim of 8-bit data: the density of x in [-1, 1] to bits per dim plus 7 bits
    assert fm.bits_per_dim(torch.tensor([0.0]), 784).item() == pytest.approx(7.0)


def test_guidance_ends_are_the_unconditional_and_conditional_velocities():
    """Our w: v~ = v(x, t) + w (v(x, t, y) - v(x, t)); Ho & Salimans' w' = w - 1 (their Eq. 6)."""
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(2, 5, 5, generator=g)

    def v(x, t, y=None):  # conditional: a label-dependent shift
        return x @ A + t[:, None] + (0 if y is None else y[:, None].float() * B[0])

    x, t, y = torch.randn(4, 5, generator=g), torch.rand(4, generator=g), torch.tensor([0, 3, 9, 1])
    assert torch.equal(fm.guided_velocity(v, x, t, y, 0.0), v(x, t))
    assert torch.equal(fm.guided_velocity(v, x, t, y, 1.0), v(x, t, y))
    assert torch.equal(fm.guided_velocity(v, x, t, None, 3.0), v(x, t))
    w, w_prime = 3.0, 2.0
    ho_salimans = (1 + w_prime) * v(x, t, y) - w_prime * v(x, t)
    assert torch.allclose(fm.guided_velocity(v, x, t, y, w), ho_salimans, atol=1e-6)
    # label dropout (Algorithm 1 of Ho & Salimans): about p_uncond of the labels become null
    torch.manual_seed(0)
    y = torch.randint(0, 10, (20000,))
    dropped = fm.drop_labels(y, 0.2, 10)
    assert abs((dropped == 10).double().mean().item() - 0.2) < 0.01
    assert torch.equal(dropped[dropped != 10], y[dropped != 10])
    assert torch.equal(fm.drop_labels(y, 0.0, 10), y) and (fm.drop_labels(y, 1.0, 10) == 10).all()


def test_t_sampling():
    torch.manual_seed(0)
    u, ln = fm.sample_t(20000, "uniform", "cpu"), fm.sample_t(20000, "logit-normal", "cpu")
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    logit = torch.log(ln / (1 - ln))  # N(0, 1)
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03


def test_loss_falls_on_tiny_data(tiny_mnist):
    """Twenty steps of Eq. 23 on 64 blobs with CFG label dropout lower the loss, measured
    at fixed (t, x_0, labels) so that the comparison is free of sampling noise."""
    torch.manual_seed(0)
    pixels, labels = fm.load_data("mnist", tiny_mnist, train=True)
    x1 = fm.to_model_space(pixels)
    cfg = fm.Config(**fm.PRESETS["smoke"])
    model = fm.build_model(cfg)
    t_fix, x0_fix = torch.rand(64), torch.randn_like(x1)

    def fixed_loss():
        with torch.no_grad():
            v = model(fm.psi_t(x0_fix, x1, t_fix, cfg.sigma_min), t_fix, labels)
            return torch.nn.functional.mse_loss(v, fm.cfm_target(x0_fix, x1, cfg.sigma_min)).item()

    before, opt = fixed_loss(), torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(20):
        idx = torch.randint(0, 64, (16,))
        y = fm.drop_labels(labels[idx], 0.2, fm.NUM_CLASSES)
        loss = fm.cfm_loss(model, x1[idx], cfg.sigma_min, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # measured: 1.69 -> 0.43 on these blobs; half is a wide margin
    assert fixed_loss() < 0.5 * before


def test_method_functions_work_copied_out_alone():
    """cfm_loss and the three solvers with the helpers they name, in a namespace holding only
    math, numpy, scipy and torch: no common, nothing else from the script; the same numbers."""
    names = ["bcast", "psi_t", "cfm_target", "sample_t", "cfm_loss", "times", "sample_euler",
             "sample_midpoint", "sample_rk45", "guided_velocity"]
    header = ("from __future__ import annotations\nimport math\nimport numpy as np\nimport torch\n"
              "from scipy import integrate\n\n")
    ns = {}
    exec(header + "\n\n".join(inspect.getsource(getattr(fm, n)) for n in names), ns)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    model = lambda x, t, y=None: net(x) * (1 + fm.bcast(t, x)) + (0 if y is None else 0.1)
    x1 = torch.rand(4, 1, 8, 8) * 2 - 1
    y = torch.tensor([1, 2, 3, 4])
    for t_sampling in ("uniform", "logit-normal"):
        torch.manual_seed(0)
        loss = ns["cfm_loss"](model, x1, 1e-4, y, t_sampling)
        torch.manual_seed(0)
        assert torch.equal(loss, fm.cfm_loss(model, x1, 1e-4, y, t_sampling))
    loss.backward()
    assert net.weight.grad.abs().sum() > 0
    x0, v = torch.randn(4, 1, 8, 8), lambda x, t: ns["guided_velocity"](model, x, t, y, 2.0)
    for name in ("sample_euler", "sample_midpoint"):
        seen = []
        out = ns[name](v, x0, 4, record=lambda t, x: seen.append(t))
        assert torch.equal(out, getattr(fm, name)(v, x0, 4)) and seen == [0.25, 0.5, 0.75, 1.0]
    (a, nfe_a), (b, nfe_b) = ns["sample_rk45"](v, x0, 1e-3, 1e-3), fm.sample_rk45(v, x0, 1e-3, 1e-3)
    assert torch.equal(a, b) and nfe_a == nfe_b > 0


CKPT_KEYS = {"model", "ema", "optimizer", "step", "config", "preset", "seed", "losses", "rng_state"}
OUTPUTS = ("config.json", "ckpt.pt", "samples.png", "samples.pt", "loss.png", "metrics.json",
           "nfe.png", "guidance.png", "trajectory.png", "flow.gif")


def test_smoke_run_resume_and_sample_only(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    args = ["--preset", "smoke", "--data-dir", str(tiny_mnist), "--out", str(out)]
    metrics = fm.main(args + ["--steps", "4"])
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    samples = torch.load(out / "samples.pt")
    assert samples.shape == (8, 1, 28, 28) and torch.isfinite(samples).all()
    train = metrics["train"]
    assert train["steps"] == train["steps_this_run"] == 4 and math.isfinite(train["final_loss"])
    assert metrics["params"] > 0 and metrics["wall_s_total"] > 0
    assert metrics["samples"]["solver"] == "midpoint" and metrics["samples"]["nfe"] == 4
    assert [(r["solver"], r["n"]) for r in metrics["nfe_table"]] == [
        ("euler", 4), ("midpoint", 4), ("rk45", 4)]
    assert metrics["nfe_table"][0]["nfe"] == 1 and metrics["nfe_table"][2]["nfe"] >= 6
    assert [g["w"] for g in metrics["guidance"]] == [0.0, 1.0, 2.0]
    assert [g["nfe"] for g in metrics["guidance"]] == [4, 4, 8]  # w = 2: two calls per step
    assert all(0 <= g["judge"]["on_target"] <= 1 for g in metrics["guidance"])
    judge = metrics["judge"]  # 8 samples: too few for FID, the shares are still given
    assert judge["n"] == 8 and judge["fid"] is None and 0 <= judge["on_target"] <= 1  # w = 1
    lik = metrics["likelihood"]
    assert lik["n_images"] == 2 and math.isfinite(lik["bpd_mean"]) and lik["nfe"] > 0
    assert CKPT_KEYS <= set(torch.load(out / "ckpt.pt", weights_only=True))

    # --resume --steps 8 extends the run: 4 + 4 steps give the losses of 8 steps in one go
    quick = ["--no-judge", "--lik-images", "0", "--table", "(('euler', 1),)", "--guide-ws", "()"]
    fm.main(args + ["--steps", "8", "--resume", *quick])
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    fm.main(["--preset", "smoke", "--data-dir", str(tiny_mnist), "--out",
             str(tmp_path / "straight"), "--steps", "8", *quick])
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 8 and resumed["losses"] == straight["losses"]
    assert all(torch.equal(resumed["model"][k], straight["model"][k]) for k in resumed["model"])

    # --sample-only: no training, guided samples with another solver
    metrics = fm.main(args + ["--sample-only", "--solver", "euler", "--nfe", "3", "--guidance",
                              "2", "--n-samples", "5", *quick])
    assert "train" not in metrics and "judge" not in metrics and "likelihood" not in metrics
    assert {k: metrics["samples"][k] for k in ("solver", "nfe", "w", "n")} == {
        "solver": "euler", "nfe": 6, "w": 2.0, "n": 5}
    assert torch.load(out / "samples.pt").shape == (5, 1, 28, 28)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 8


def test_unconditional_model_and_logit_normal(tiny_mnist, tmp_path):
    """--p-uncond 1: no label embedding, no guidance table or figure; guidance is refused."""
    out = tmp_path / "uncond"
    args = ["--preset", "smoke", "--data-dir", str(tiny_mnist), "--out", str(out), "--no-judge"]
    metrics = fm.main(args + ["--p-uncond", "1", "--t-sampling", "logit-normal", "--steps", "2",
                              "--guidance", "0", "--lik-images", "0", "--table", "(('euler', 2),)"])
    assert metrics["guidance"] == [] and not (out / "guidance.png").exists()
    assert not any("label_emb" in k for k in torch.load(out / "ckpt.pt")["model"])
    with pytest.raises(fm.common.UserError, match="guidance must be 0 for an unconditional"):
        fm.main(args + ["--sample-only", "--guidance", "2"])


def test_user_errors(tmp_path):
    base = ["--preset", "smoke", "--out", str(tmp_path)]
    with pytest.raises(fm.common.UserError, match="no checkpoint"):
        fm.main(["--preset", "smoke", "--out", str(tmp_path / "none"), "--sample-only"])
    for flags in (["--guidance", "-1"], ["--sigma-min", "nan"], ["--solver", "rk4"],
                  ["--t-sampling", "beta"]):
        with pytest.raises(SystemExit):
            fm.main(base + flags)
    for flags, words in ((["--nfe", "3"], "nfe must be even for midpoint"),
                         (["--p-uncond", "1.5"], "p-uncond must be in"),
                         (["--sigma-min", "1"], "sigma-min must be in"),
                         (["--n-samples", "0"], "n-samples must be at least 1"),
                         (["--table", "(('midpoint', 3),)"], "--table must be rows"),
                         (["--table", "5"], "--table must be rows"),
                         (["--guide-ws", "2"], "--guide-ws must be a tuple"),
                         (["--guide-n", "9"], "guide-n must be at least 10"),
                         (["--ode-tol", "0"], "ode-tol must be > 0")):
        with pytest.raises(fm.common.UserError, match=words) as err:
            fm.main(base + flags)
        assert "\n" not in str(err.value)


def test_lines_and_functions_are_short():
    source = (ROOT / "07_flow_matching_mnist.py").read_text()
    assert max(len(line) for line in source.splitlines()) <= 100
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef):
            limit = 100 if node.name == "main" else 60
            assert node.end_lineno - node.lineno + 1 <= limit, node.name
    imports = {n.split(".")[0] for node in ast.walk(ast.parse(source))
               if isinstance(node, (ast.Import, ast.ImportFrom))
               for n in ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module])}
    assert imports <= {"__future__", "math", "time", "dataclasses", "typing", "numpy", "torch",
                       "scipy", "tqdm", "common", "judge", "torchvision"}, imports
