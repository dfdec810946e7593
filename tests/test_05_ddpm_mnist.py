"""05 DDPM: the forward process and posterior against closed forms, DDIM vs ancestral sampling on
Gaussian data (whose optimal noise predictor is analytic), the bound's decomposition, learning on
tiny data, and the script end to end (smoke, --resume, --sample-only, data loading)."""

import ast
import dataclasses
import inspect
import json
import math

import numpy as np
import pytest
import torch
from conftest import ROOT, load_script

ddpm = load_script("05_ddpm_mnist")


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedule_identities(name):
    S = ddpm.make_schedule(name, 1000)
    beta, ab = S["beta"], S["alpha_bar"]
    if name == "linear":  # Sec. 4: beta_1 = 1e-4, beta_T = 0.02
        assert beta[1].item() == pytest.approx(1e-4) and beta[-1].item() == pytest.approx(0.02)
    assert ab[0] == 1 and torch.allclose(ab, torch.cumprod(1 - beta, 0))
    assert 0 < ab[-1] < 1e-4  # x_T is close to N(0, I)
    # q(x_t | x_0) of Eq. 4 is the composition of the single steps
    # q(x_t | x_{t-1}) = N(sqrt(alpha_t) x, beta_t)
    mean_coef, var = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for t in range(1, 1001):
        mean_coef, var = mean_coef * S["alpha"][t].sqrt(), S["alpha"][t] * var + beta[t]
        if t in (1, 10, 500, 1000):
            assert mean_coef.item() == pytest.approx(ab[t].sqrt().item(), rel=1e-9)
            assert var.item() == pytest.approx((1 - ab[t]).item(), rel=1e-9)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_is_gaussian_conditioning(name):
    """Eq. 6-7 equal the conditional of the joint Gaussian (x_{t-1}, x_t) given x_0, and Eq. 11 with
    the true eps equals the posterior mean (the identity behind eps-prediction)."""
    S = ddpm.make_schedule(name, 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 2, 2, generator=g) * 2 - 1
    eps = torch.randn(6, 1, 2, 2, generator=g, dtype=torch.float64)
    x0 = x0.double()
    for t_val in (2, 3, 50, 999, 1000):
        t = torch.full((6,), t_val)
        xt = ddpm.q_sample(x0, t, eps, S)
        a_prev, a, alpha = S["alpha_bar"][t_val - 1], S["alpha_bar"][t_val], S["alpha"][t_val]
        cov = alpha.sqrt() * (1 - a_prev)  # Cov(x_{t-1}, x_t | x_0)
        mean = a_prev.sqrt() * x0 + cov / (1 - a) * (xt - a.sqrt() * x0)
        var = (1 - a_prev) - cov**2 / (1 - a)
        post_mean, post_var = ddpm.q_posterior(x0, xt, t, S)
        assert torch.allclose(post_mean, mean, atol=1e-10)
        assert torch.allclose(post_var.flatten(), var.expand(6))
        assert torch.allclose(ddpm.p_mean(xt, t, eps, S), post_mean, atol=1e-9)
        assert torch.allclose(ddpm.predict_x0(xt, t, eps, S), x0, atol=1e-8)


# data N(MU, SD^2 I): the optimal eps-predictor and every sampler's output are known
MU, SD = 0.5, 0.3


def gaussian_eps_model(S):
    """E[eps | x_t] for x_0 ~ N(MU, SD^2): c_t (x_t - sqrt(a_t) MU),
    c_t = sqrt(1 - a_t) / (a_t SD^2 + 1 - a_t)."""

    def eps_model(x, t):
        a = ddpm.at(S["alpha_bar"], t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * SD**2 + 1 - a)

    return eps_model


def predicted_moments(S, sampler, sigma="beta", steps=1000, eta=0.0):
    """Mean and std of a sampler's output with the linear model above: each step is affine in x_t
    plus Gaussian noise, so (mean, var) follow a scalar recursion from (0, 1) at t = T."""
    T, ab = len(S["beta"]) - 1, S["alpha_bar"].tolist()
    m, v = 0.0, 1.0
    if sampler == "ancestral":  # Algorithm 2
        var = ddpm.p_variance(S, sigma).tolist()
        for t in range(T, 0, -1):
            a, b, alpha = ab[t], S["beta"][t].item(), S["alpha"][t].item()
            c = math.sqrt(1 - a) / (a * SD**2 + 1 - a)
            k = b / math.sqrt(1 - a) / math.sqrt(alpha)
            m = m / math.sqrt(alpha) - k * c * (m - math.sqrt(a) * MU)
            v = (1 / math.sqrt(alpha) - k * c) ** 2 * v
            v += var[t] if t > 1 else 0.0
        return m, math.sqrt(v)
    tau = [round(i * T / steps) for i in range(steps + 1)]
    for t, s in zip(tau[:0:-1], tau[-2::-1]):  # DDIM, Eq. 12
        a, a_s = ab[t], ab[s]
        c = math.sqrt(1 - a) / (a * SD**2 + 1 - a)
        noise = eta**2 * (1 - a_s) / (1 - a) * (1 - a / a_s)
        k = math.sqrt(1 - a_s - noise)
        gain = math.sqrt(a_s) * (1 - math.sqrt(1 - a) * c) / math.sqrt(a) + k * c
        m = gain * m + (math.sqrt(a_s) * math.sqrt(1 - a) - k * math.sqrt(a)) * c * MU
        v = gain**2 * v + noise
    return m, math.sqrt(v)


def test_ddim_eta1_is_ancestral_and_samplers_match_known_moments():
    S, shape = ddpm.make_schedule("linear", 1000), (4000, 1, 2, 2)
    model = gaussian_eps_model(S)
    gen = lambda seed: torch.Generator().manual_seed(seed)
    x_T = lambda g: torch.randn(shape, generator=g)  # the sampler's generator draws x_T first
    g1, g2 = gen(1), gen(1)
    anc = ddpm.sample_ancestral(model, x_T(g1), S, "posterior", g1)
    ddim1 = ddpm.sample_ddim(model, x_T(g2), S, 1000, eta=1.0, generator=g2)
    # same noise -> the same path: DDIM's eta = 1 update is Algorithm 2 with sigma_t^2 = beta~_t
    assert torch.allclose(anc, ddim1, atol=1e-4)
    assert predicted_moments(S, "ddim", steps=1000, eta=1.0) == pytest.approx(
        predicted_moments(S, "ancestral", "posterior"), rel=1e-9)
    g2, g3, g4 = gen(2), gen(3), gen(4)
    runs = {
        ("ancestral", "posterior", 1000, 1.0): anc,
        ("ancestral", "beta", 1000, 0.0): ddpm.sample_ancestral(model, x_T(g2), S, "beta", g2),
        ("ddim", "", 100, 1.0): ddpm.sample_ddim(model, x_T(g3), S, 100, 1.0, generator=g3),
        ("ddim", "", 50, 0.0): ddpm.sample_ddim(model, x_T(g4), S, 50, 0.0, generator=g4),
    }
    for (sampler, sigma, steps, eta), x in runs.items():
        m, sd = predicted_moments(S, sampler, sigma, steps, eta)
        # 16k values: standard errors 0.0024 (mean) and 0.0017 (std); tolerances about 4 of them
        assert abs(x.mean().item() - m) < 0.01, (sampler, sigma, steps, eta)
        assert abs(x.std().item() - sd) < 0.007, (sampler, sigma, steps, eta)
    # the known answer N(MU, SD^2): Algorithm 2 with T = 1000 steps is within 1.5% of it for either
    # variance (beta_t is exact for SD = 1, beta~_t for SD = 0); 50 deterministic DDIM steps shrink
    # the std by 9%
    for sampler, sigma, steps, eta in runs:
        m, sd = predicted_moments(S, sampler, sigma, steps, eta)
        assert abs(m - MU) < 2e-3
        assert abs(sd - SD) < (0.015 * SD if sampler == "ancestral" else 0.1 * SD)


def test_discretized_likelihood_is_a_distribution_over_256_values():
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)[:, None]
    for mean, std in ((0.0, 0.01), (0.9, 0.003), (-0.99, 0.5), (0.3, 2.0)):
        logp = ddpm.discretized_gaussian_log_likelihood(x, torch.tensor(mean), torch.tensor(std))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_bound_decomposition_on_a_tiny_model():
    """Eq. 5 (the KL terms, stratified over t) has the same expectation as Eq. 3 (-log p(x_{0:T}) /
    q(x_{1:T} | x_0) along forward trajectories), for any model; here the optimal predictor for a
    single image x0 plus a fixed random conv, so the terms are of a realistic size."""
    torch.manual_seed(0)
    T, n = 8, 20000
    S = ddpm.make_schedule("cosine", T)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    x0 = (torch.randint(0, 256, (1, 1, 4, 4)) / 127.5 - 1).expand(n, -1, -1, -1)
    ab = S["alpha_bar"]
    model = lambda x, t: ((x - ddpm.at(ab.sqrt(), t, x) * x0) / ddpm.at((1 - ab).sqrt(), t, x)
                          + 0.3 * torch.tanh(conv(x)))
    var = ddpm.p_variance(S, "beta")
    with torch.no_grad():
        # Eq. 3 along trajectories x_1 .. x_T ~ q
        normal_logpdf = lambda x, m, v: (
            -0.5 * (x - m) ** 2 / v - 0.5 * math.log(2 * math.pi * v)).flatten(1).sum(1)
        xs = [x0]
        for t in range(1, T + 1):
            xs.append(S["alpha"][t].sqrt().item() * xs[-1]
                      + S["beta"][t].sqrt().item() * torch.randn_like(x0))
        loss = -normal_logpdf(xs[T], 0.0, 1.0)
        for t in range(T, 0, -1):
            tt = torch.full((n,), t)
            mean = ddpm.p_mean(xs[t], tt, model(xs[t], tt), S)
            loss = loss + normal_logpdf(xs[t], S["alpha"][t].sqrt().item() * xs[t - 1],
                                        S["beta"][t].item())
            if t > 1:
                loss = loss - normal_logpdf(xs[t - 1], mean, var[t].item())
            else:
                decoder = ddpm.discretized_gaussian_log_likelihood(x0, mean, var[1].sqrt())
                loss = loss - decoder.flatten(1).sum(1)
        eq3 = loss.double() / (16 * math.log(2))
        for strata in (2, T - 1):  # T - 1: every term once
            eq5 = ddpm.bound_bpd(model, x0, S, strata)[0]["beta"].double()
            se = math.sqrt(eq3.var() / n + eq5.var() / n)
            assert abs(eq3.mean() - eq5.mean()) < 4 * se, (strata, eq3.mean(), eq5.mean(), se)
        # the KL form has the lower variance (measured: 10.0 vs 11.8)
        assert eq5.var() < 0.95 * eq3.var()


def test_loss_falls_on_tiny_data(tiny_mnist):
    torch.manual_seed(0)
    x = ddpm.load_images("mnist", tiny_mnist, train=True)
    cfg = ddpm.Config(**ddpm.PRESETS["smoke"])
    S, model = ddpm.make_schedule("linear", 1000), ddpm.build_model(cfg)
    t_fix, eps_fix = torch.randint(1, 1001, (64,)), torch.randn_like(x)

    def fixed_loss():  # L_simple on fixed (t, eps), so the comparison is free of sampling noise
        with torch.no_grad():
            eps = model(ddpm.q_sample(x, t_fix, eps_fix, S), t_fix)
            return torch.nn.functional.mse_loss(eps, eps_fix).item()

    before, opt = fixed_loss(), torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(40):
        loss = ddpm.loss_simple(model, x[torch.randint(0, 64, (16,))], S)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # measured: about 1.0 -> 0.25 on these blobs; half is a wide margin
    assert fixed_loss() < 0.5 * before


def test_loads_idx_files_through_torchvision(tiny_mnist):
    raw = np.fromfile(tiny_mnist / "MNIST" / "raw" / "train-images-idx3-ubyte", dtype=np.uint8)[16:]
    for name, n in (("mnist", 64), ("fashion-mnist", 64)):
        x = ddpm.load_images(name, tiny_mnist, train=True)
        assert x.shape == (n, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    x = ddpm.load_images("mnist", tiny_mnist, train=True)
    assert torch.allclose(x.flatten(), torch.from_numpy(raw).float() / 127.5 - 1)
    assert ddpm.load_images("mnist", tiny_mnist, train=False).shape == (16, 1, 28, 28)


CKPT_KEYS = {"model", "ema", "optimizer", "step", "config", "preset", "seed", "losses", "rng_state"}


def test_smoke_run_resume_and_sample_only(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    args = ["--preset", "smoke", "--data-dir", str(tiny_mnist), "--out", str(out)]
    metrics = ddpm.main(args + ["--steps", "4"])
    for name in ("config.json", "ckpt.pt", "samples.png", "samples.pt", "loss.png", "metrics.json",
                 "denoising.png", "reverse.gif", "samplers.png", "bound_terms.png"):
        assert (out / name).stat().st_size > 0, name
    samples = torch.load(out / "samples.pt")
    assert samples.shape == (8, 1, 28, 28) and torch.isfinite(samples).all()
    train = metrics["train"]
    assert train["steps"] == train["steps_this_run"] == 4 and math.isfinite(train["final_loss"])
    assert train["wall_s"] > 0 and train["steps_per_s"] > 0 and metrics["wall_s_total"] > 0
    assert metrics["params"] > 0 and math.isfinite(metrics["bound"]["bpd_sigma_beta"])
    assert metrics["samples"]["n"] == 8 and metrics["samples"]["samples_per_s"] > 0
    assert [row["sampler"] for row in metrics["sampler_table"]] == ["ancestral", "ddim"]
    judge = metrics["judge"]  # 8 samples: too few for FID, the shares are still given
    assert judge["n"] == 8 and judge["fid"] is None and 0 <= judge["confident"] <= 1
    assert len(judge["class_shares"]) == 10 and 0 <= judge["real_confident"] <= 1
    assert CKPT_KEYS <= set(torch.load(out / "ckpt.pt", weights_only=True))

    # --resume --steps 8 extends the run: 4 + 4 steps give the losses of 8 steps in one go
    ddpm.main(args + ["--steps", "8", "--resume"])
    resumed = torch.load(out / "ckpt.pt", weights_only=True)
    ddpm.main(["--preset", "smoke", "--data-dir", str(tiny_mnist), "--out",
               str(tmp_path / "straight"), "--steps", "8"])
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert resumed["step"] == 8
    assert np.allclose(resumed["losses"], straight["losses"], rtol=1e-5)

    # --sample-only: no training, new samples with another sampler
    metrics = ddpm.main(args + ["--sample-only", "--sampler", "ancestral", "--n-samples", "5",
                                "--no-judge"])
    assert "train" not in metrics and metrics["samples"]["sampler"] == "ancestral"
    assert "judge" not in metrics
    assert torch.load(out / "samples.pt").shape == (5, 1, 28, 28)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 8


def test_minutes_fix_the_steps_and_resume_keeps_the_run(tiny_mnist, tmp_path):
    """--minutes: a few timed steps on throwaway copies give the step count, stored with the
    config; the run is the one an exact --steps of that count gives. Then the checkpoint decides
    the run: --resume alone trains no further; what happens after training may change; a flag that
    would change the run is one clear line."""
    run, exact = tmp_path / "run", tmp_path / "exact"
    out = ["--out", str(run), "--data-dir", str(tiny_mnist)]
    quick = ["--n-samples", "2", "--bound-images", "2", "--table", "(('ddim', 2),)", "--no-judge"]
    steps = ddpm.main(["--preset", "smoke", "--minutes", "0.005", *out, *quick])["train"]["steps"]
    config = json.loads((run / "config.json").read_text())
    saved = torch.load(run / "ckpt.pt", weights_only=True)
    assert steps >= 1 and config["steps"] == saved["config"]["steps"] == saved["step"] == steps
    assert config["minutes"] == 0.005
    ddpm.main(["--preset", "smoke", "--steps", str(steps), "--out", str(exact),
               "--data-dir", str(tiny_mnist), *quick])
    assert json.loads((exact / "config.json").read_text())["minutes"] == 0  # --steps is exact
    assert saved["losses"] == torch.load(exact / "ckpt.pt", weights_only=True)["losses"]

    assert "train" not in ddpm.main(["--resume", *out])  # the free flags above were kept
    metrics = ddpm.main(["--resume", *out, "--sampler", "ddim", "--sampling-steps", "3", "--eta",
                         "0.5", "--sample-batch", "1", "--n-samples", "3"])
    shown = {k: metrics["samples"][k] for k in ("sampler", "steps", "eta", "n")}
    assert shown == {"sampler": "ddim", "steps": 3, "eta": 0.5, "n": 3}
    after = torch.load(run / "ckpt.pt", weights_only=True)
    assert after["step"] == steps
    assert all(torch.equal(saved["model"][k], after["model"][k]) for k in saved["model"])
    refused = ((["--lr", "1"], "lr=0.001"), (["--T", "20"], "T=50"),
               (["--batch-size", "4"], "batch_size"), (["--schedule", "cosine"], "schedule"),
               (["--minutes", "1"], "minutes"), (["--preset", "cpu"], "preset"),
               (["--seed", "3"], "seed"), (["--steps", "0"], f"at step {steps}"))
    for flags, words in refused:
        with pytest.raises(ddpm.common.UserError, match=words) as err:
            ddpm.main(["--resume", *out, *flags])
        assert "\n" not in str(err.value)


def test_user_errors(tmp_path):
    with pytest.raises(ddpm.common.UserError, match="no checkpoint"):
        ddpm.main(["--preset", "smoke", "--out", str(tmp_path / "none"), "--sample-only"])
    for eta in ("-1", "nan", "inf"):
        with pytest.raises(SystemExit):
            ddpm.main(["--preset", "smoke", "--out", str(tmp_path), "--eta", eta])
    with pytest.raises(SystemExit):
        ddpm.main(["--preset", "smoke", "--out", str(tmp_path), "--dataset", "cifar10"])
    for flags, words in ((["--sampling-steps", "51"], "sampling-steps must be at most T = 50"),
                         (["--bound-strata", "50"], "bound-strata"),
                         (["--n-samples", "0"], "n-samples"),
                         (["--table", "(('euler', 5),)"], "--table"),
                         (["--table", "()"], "--table"),
                         (["--mults", "2"], "--mults"), (["--mults", "0,1"], "--mults"),
                         (["--base", "7"], "--base"), (["--base", "0"], "--base"),
                         (["--dropout", "2"], "--dropout"),
                         (["--num-res-blocks", "1,2,3"], "--num-res-blocks"),
                         (["--attn-levels", "1"], "--attn-levels"),
                         (["--attn-levels", "5,"], "--attn-levels")):
        with pytest.raises(ddpm.common.UserError, match=words):
            ddpm.main(["--preset", "smoke", "--out", str(tmp_path), *flags])
    # a checkpoint of an older layout (keys opt, rng) is refused in one line, not a KeyError
    config = dataclasses.asdict(ddpm.Config(**ddpm.PRESETS["smoke"]))
    older = dict(config=config, preset="smoke", seed=0, step=1, model={}, ema={}, opt={}, rng={},
                 losses=[1.0])
    ddpm.common.save_checkpoint(tmp_path / "older" / "ckpt.pt", older, ddpm.STEM)
    with pytest.raises(ddpm.common.UserError, match="no optimizer, rng_state .an older version"):
        ddpm.main(["--out", str(tmp_path / "older"), "--resume", "--device", "cpu"])


def test_method_functions_work_copied_out_alone():
    """sample_ddim and loss_simple with the helpers they name, in a namespace holding only math,
    numpy and torch: no common, nothing else from the script; the same numbers as the script's."""
    names = ["make_schedule", "at", "q_sample", "predict_x0", "loss_simple", "sample_ddim"]
    header = "from __future__ import annotations\nimport math\nimport numpy as np\nimport torch\n\n"
    ns = {}
    exec(header + "\n\n".join(inspect.getsource(getattr(ddpm, n)) for n in names), ns)
    S = ns["make_schedule"]("linear", 100)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    model = lambda x, t: net(x) * ns["at"](S["alpha_bar"], t, x)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    torch.manual_seed(0)
    loss = ns["loss_simple"](model, x0, S)
    torch.manual_seed(0)
    assert torch.equal(loss, ddpm.loss_simple(model, x0, S))
    loss.backward()
    assert net.weight.grad.abs().sum() > 0
    x_T, seen, runs = torch.randn(4, 1, 8, 8), [], []
    record = lambda t, x: seen.append(t)
    for sample_ddim, rec in ((ns["sample_ddim"], record), (ddpm.sample_ddim, None)):
        gen = torch.Generator().manual_seed(1)
        runs.append(sample_ddim(model, x_T, S, 10, eta=1.0, clip_x0=True, generator=gen,
                                record=rec))
    assert torch.equal(*runs) and seen == list(range(90, -1, -10))


def test_ancestral_sampler_records_every_step_and_frames_go_through_record(tiny_mnist):
    S, seen = ddpm.make_schedule("linear", 50), []
    x = ddpm.sample_ancestral(gaussian_eps_model(S), torch.randn(3, 1, 2, 2), S,
                              record=lambda t, x: seen.append((t, x.shape)))
    assert seen == [(t, (3, 1, 2, 2)) for t in range(49, -1, -1)] and torch.isfinite(x).all()
    # the caller's frames: x_T, then every T / 100 steps (here every step) of the first batch
    cfg = ddpm.Config(**{**ddpm.PRESETS["smoke"], "sample_batch": 3})
    samples, frames, secs = ddpm.draw_samples(gaussian_eps_model(S), "ancestral", 50, 5, cfg, S,
                                              torch.device("cpu"), seed=0, keep=2)
    assert samples.shape == (5, 1, 28, 28) and secs > 0
    assert [t for t, _ in frames] == list(range(50, -1, -1))
    assert frames[0][1].shape == (2, 1, 28, 28)


def test_lines_and_functions_are_short():
    source = (ROOT / "05_ddpm_mnist.py").read_text()
    assert max(len(line) for line in source.splitlines()) <= 100
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef):
            assert node.end_lineno - node.lineno + 1 <= 60, node.name


def test_discretized_decoder_is_the_normal_mass_of_each_bin():
    """Sec. 3.3: the log N(mean, std^2) mass of [x - 1/255, x + 1/255], the outer bins open to -inf
    and +inf, against torch.distributions.Normal's CDF."""
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, std in ((0.1, 0.05), (-0.6, 0.3), (0.95, 0.02)):
        normal = torch.distributions.Normal(torch.tensor(mean, dtype=torch.float64), std)
        mass = normal.cdf(x + 1 / 255) - normal.cdf(x - 1 / 255)
        mass[0], mass[-1] = normal.cdf(x[0] + 1 / 255), 1 - normal.cdf(x[-1] - 1 / 255)
        logp = ddpm.discretized_gaussian_log_likelihood(x, torch.tensor(mean), torch.tensor(std))
        near = mass > 1e-12  # where the CDF difference itself is accurate
        assert torch.allclose(logp[near], mass[near].log(), rtol=1e-6, atol=1e-9)


def test_normal_kl_and_prior_kl_against_torch_distributions():
    """KL(N(m1, v1) || N(m2, v2)) elementwise, and L_T = KL(q(x_T | x_0) || N(0, I)) summed over
    pixels, for the first 200 steps of the linear schedule (T = 200: alpha_bar_T = 0.66)."""
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(2, 50, generator=g, dtype=torch.float64)
    v1, v2 = torch.rand(2, 50, generator=g, dtype=torch.float64) + 0.1
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, v1.sqrt()),
                                            torch.distributions.Normal(m2, v2.sqrt()))
    assert torch.allclose(ddpm.normal_kl(m1, v1, m2, v2), ref, atol=1e-12)
    S = {"alpha_bar": ddpm.make_schedule("linear", 1000)["alpha_bar"][:201]}
    ab = S["alpha_bar"][-1].item()
    assert ab > 0.5  # q(x_T | x_0) is far from N(0, I): every coefficient of L_T matters
    x0 = torch.rand(3, 1, 2, 2, generator=g, dtype=torch.float64) * 2 - 1
    q_T = torch.distributions.Normal(math.sqrt(ab) * x0, math.sqrt(1 - ab))
    prior = torch.distributions.Normal(0.0, 1.0)
    ref = torch.distributions.kl_divergence(q_T, prior).flatten(1).sum(1)
    assert torch.allclose(ddpm.prior_kl(x0, S).double(), ref, atol=1e-6)


def test_p_variance_is_beta_or_beta_tilde_with_sigma_1_from_beta_tilde_2():
    """Sec. 3.2: sigma_t^2 = beta_t or beta~_t for t >= 2; sigma_1^2 = beta~_2 for both choices."""
    S = ddpm.make_schedule("linear", 100)
    for sigma, ref in (("beta", S["beta"]), ("posterior", S["beta_tilde"])):
        var = ddpm.p_variance(S, sigma)
        assert torch.equal(var[2:], ref[2:]) and var[1] == S["beta_tilde"][2]


def test_ddim_with_intermediate_eta_matches_its_gaussian_moments():
    """DDIM (Song et al. 2021, Eq. 12 with sigma of Eq. 16) at eta = 0.5 on Gaussian data, where
    eta enters squared: mean and std of the samples against the exact recursion."""
    S, shape = ddpm.make_schedule("linear", 1000), (40_000, 1, 2, 2)
    gen = torch.Generator().manual_seed(5)
    x = ddpm.sample_ddim(gaussian_eps_model(S), torch.randn(shape, generator=gen), S, 20, eta=0.5,
                         generator=gen)
    m, sd = predicted_moments(S, "ddim", steps=20, eta=0.5)
    # 160k values: standard errors 0.0006 (mean) and 0.0004 (std)
    assert abs(x.mean().item() - m) < 0.003 and abs(x.std().item() - sd) < 0.0025
    # the check tells sigma^2 = eta^2 (...) apart from sigma^2 = eta (...): 0.233 vs 0.228
    assert abs(sd - predicted_moments(S, "ddim", steps=20, eta=math.sqrt(0.5))[1]) > 0.004
