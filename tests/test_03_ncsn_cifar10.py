"""03 NCSNv2: Techniques 1, 2 and 4 against hand-checkable cases, the DSM loss, the Langevin step
and the denoising step against Gaussian closed forms, and the script end to end on image folders
the tests write."""

import inspect
import math
import signal

import numpy as np
import pytest
import torch
from conftest import equal_states, load_script

m = load_script("03_ncsn_cifar10")


@pytest.fixture(autouse=True)
def quick_colour_judge(monkeypatch):
    """The colour judge trains for minutes; here a few steps (the recipe keys its cache)."""
    import judge

    monkeypatch.setitem(judge.JUDGE_RGB, "steps", 5)


# -- Technique 1 -------------------------------------------------------------------------------


def test_max_pairwise_distance_hand_case_and_chunks():
    pts = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [-3.0, 0.0]])
    # the farthest pair is (3, 4) and (-3, 0): sqrt(36 + 16)
    assert m.max_pairwise_distance(pts) == pytest.approx(math.sqrt(52), rel=1e-6)
    x = torch.randn(300, 3, 4, 4)
    brute = torch.cdist(x.flatten(1).double(), x.flatten(1).double()).max().item()
    # the chunks cover all pairs
    assert m.max_pairwise_distance(x, chunk=64) == pytest.approx(brute, rel=1e-5)


# -- Technique 2 -------------------------------------------------------------------------------


def test_gamma_and_L_for_the_papers_cifar10_setting():
    D = 3 * 32 * 32
    gamma = m.solve_gamma(D)
    assert m.shell_overlap(gamma, D) == pytest.approx(0.5, abs=1e-9)
    # at gamma = 1 the two shells coincide: Phi(3) - Phi(-3)
    assert m.shell_overlap(1.0, D) == pytest.approx(0.99730, abs=1e-5)
    # hand check: Phi(sqrt(2D)(g-1) + 3g) is ~1 here, so Phi(sqrt(2D)(g-1) - 3g) = 1/2 gives
    # g = 1 + 3g/sqrt(2D)
    assert gamma == pytest.approx(1 / (1 - 3 / math.sqrt(2 * D)), rel=1e-4)
    L = m.num_noise_levels(50.0, 0.01, gamma)
    # the condition gives gamma = 1.0398 and L = 220; the paper used L = 232 (gamma = 1.0376)
    assert L == 220
    sig = m.geometric_sigmas(50.0, 0.01, L).double()
    assert sig[0].item() == pytest.approx(50.0, rel=1e-6)
    assert sig[-1].item() == pytest.approx(0.01, rel=1e-6)
    ratios = sig[:-1] / sig[1:]
    assert torch.allclose(ratios, ratios[0], rtol=1e-5) and ratios[0].item() <= gamma


def test_fewer_levels_for_smaller_images():
    # D enters through sqrt(2D): a 16x16 image tolerates a larger ratio, hence fewer levels
    g16, g32 = m.solve_gamma(3 * 16 * 16), m.solve_gamma(3 * 32 * 32)
    assert g16 > g32
    assert m.num_noise_levels(50, 0.01, g16) < m.num_noise_levels(50, 0.01, g32)


# -- Technique 4 -------------------------------------------------------------------------------


def test_step_size_for_the_papers_cifar10_setting():
    gamma = 5000 ** (1 / 231)  # the paper's sigma_1 = 50, sigma_L = 0.01, L = 232
    eps = m.solve_step_size(gamma, 0.01, 5)
    assert eps == pytest.approx(6.2e-6, rel=0.01)  # the paper's eps for T = 5; we get 6.18e-6
    best = abs(m.langevin_variance_ratio(eps, gamma, 0.01, 5) - 1)
    for e in (0.9 * eps, 1.1 * eps):
        assert abs(m.langevin_variance_ratio(e, gamma, 0.01, 5) - 1) > best
    # with no steps nothing moves: s_T = s_0 = gamma sigma_i
    assert m.langevin_variance_ratio(eps, gamma, 0.01, 0) == pytest.approx(gamma**2)


def test_langevin_step_reproduces_eq4_on_a_gaussian():
    # data = one point at 0, level sigma_i: the exact score is -x / sigma_i^2; start from
    # N(0, (gamma sigma_i)^2)
    torch.manual_seed(0)
    sigma_i, sigma_L, gamma, eps, T = 0.5, 0.1, 1.3, 2e-3, 4
    alpha = eps * sigma_i**2 / sigma_L**2
    x = gamma * sigma_i * torch.randn(400_000, dtype=torch.float64)
    for _ in range(T):
        x = m.langevin_step(x, -x / sigma_i**2, alpha, torch.randn_like(x))
    predicted = m.langevin_variance_ratio(eps, gamma, sigma_L, T)
    # the variance estimate's relative standard error is sqrt(2 / n) = 0.2%
    assert (x.var().item() / sigma_i**2) == pytest.approx(predicted, rel=0.01)
    assert abs(predicted - gamma**2) > 0.2  # the check is not trivial: the steps moved the variance


# -- Technique 3, the loss, the denoising step, the sampler -------------------------------------


def test_score_is_network_output_over_sigma():
    model = m.build_model(m.Config(**m.PRESETS["smoke"])).eval()
    x = torch.randn(4, 3, 8, 8)
    a, b = model(x, torch.full((4,), 0.5)), model(x, torch.full((4,), 2.0))
    # sigma only divides: the network never sees it
    assert torch.allclose(0.5 * a, 2.0 * b, atol=1e-5)


def test_dsm_loss_with_the_exact_score_matches_closed_form():
    # x ~ N(0, s^2): the perturbed score is -x / (s^2 + sigma^2) and
    # E[loss] = s^2 / (2 (s^2 + sigma^2))
    torch.manual_seed(0)
    s, sigma = 0.7, 0.5
    x = s * torch.randn(20_000, 1, 2, 2, dtype=torch.float64)
    exact = lambda y, sig: -y / (s**2 + sig.view(-1, 1, 1, 1) ** 2)
    loss = m.dsm_loss(exact, x, torch.full((len(x),), sigma, dtype=torch.float64)).mean().item()
    assert loss == pytest.approx(s**2 / (2 * (s**2 + sigma**2)), rel=0.02)
    zero = lambda y, sig: torch.zeros_like(y)
    # a score of 0 scores 1/2 per dimension at every level
    zero_loss = m.dsm_loss(zero, x, torch.full((len(x),), sigma, dtype=torch.float64)).mean()
    assert zero_loss.item() == pytest.approx(0.5, rel=0.02)


def test_tweedie_denoise_gives_the_posterior_mean():
    mu, s, sigma = 0.3, 0.2, 0.1
    x = torch.linspace(-1, 1, 11)
    score = -(x - mu) / (s**2 + sigma**2)  # grad log N(x; mu, s^2 + sigma^2)
    posterior_mean = mu + s**2 / (s**2 + sigma**2) * (x - mu)
    assert torch.allclose(m.tweedie_denoise(x, score, sigma), posterior_mean, atol=1e-6)


def test_annealed_langevin_matches_the_gaussian_recursion():
    # data N(0, s^2 I), exact scores: at level i with v_i = s^2 + sigma_i^2 one step maps mean m and
    # variance q to (1 - alpha_i / v_i) m and (1 - alpha_i / v_i)^2 q + 2 alpha_i,
    # alpha_i = eps sigma_i^2 / sigma_L^2;
    # the denoising step multiplies by s^2 / v_L. Uniform [0, 1] start: m = 1/2, q = 1/12.
    torch.manual_seed(0)
    s, sigma_L, T = 0.5, 0.05, 30
    sigmas = m.geometric_sigmas(5.0, sigma_L, 12).double()
    eps = m.solve_step_size((5.0 / sigma_L) ** (1 / 11), sigma_L, T)
    exact = lambda y, sig: -y / (s**2 + sig.view(-1, 1, 1, 1) ** 2)
    snaps = []
    record = lambda i, t, y: snaps.append((i, t)) if i in (0, 11) and t == T - 1 else None
    x = m.annealed_langevin(exact, torch.rand(4000, 1, 2, 2, dtype=torch.float64), sigmas, eps, T,
                            record=record)
    mean, q = 0.5, 1 / 12
    for sig in sigmas.tolist():
        v, alpha = s**2 + sig**2, eps * sig**2 / sigma_L**2
        for _ in range(T):
            mean, q = (1 - alpha / v) * mean, (1 - alpha / v) ** 2 * q + 2 * alpha
    shrink = s**2 / (s**2 + sigma_L**2)
    assert snaps == [(0, T - 1), (11, T - 1)]  # record sees every step of every level
    # 16,000 values: relative s.e. 1.1%
    assert x.var().item() == pytest.approx(shrink**2 * q, rel=0.05)
    assert x.mean().item() == pytest.approx(shrink * mean, abs=0.02)
    assert abs(shrink**2 * q - 1 / 12) > 0.05  # far from the starting variance


# -- the script end to end --------------------------------------------------------------------


def write_folder(root, n_per_class, seed):
    """Class folders of 12x12 PNGs: a flat colour with a darker left half (resized to 8x8 by the
    script)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in ("red", "blue"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            img = np.ones((12, 12, 3)) * rng.uniform(60, 250, 3)
            img[:, :6] *= 0.5
            Image.fromarray(img.astype(np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("img03")
    return write_folder(root / "train", 24, 0), write_folder(root / "test", 4, 1)


def run(out, folders, *extra):
    train, test = folders
    return m.main(["--preset", "smoke", "--device", "cpu", "--out", str(out),
                   "--image-folder", str(train),
                   "--test-folder", str(test), *extra])


def test_smoke_then_resume_learns_then_sample_only(tmp_path, folders):
    out = tmp_path / "run"
    first = run(out, folders)
    for name in ("config.json", "ckpt.pt", "samples.png", "samples.pt", "loss.png", "metrics.json",
                 "ald_strip.png", "sigmas.png", "dsm_per_level.png"):
        assert (out / name).exists(), name
    sched = first["schedule"]
    assert sched["D"] == 3 * 8 * 8 and sched["sigma_1_subset"] == 48
    assert sched["L"] == m.num_noise_levels(sched["sigma_1"], 0.5, m.solve_gamma(192))
    assert torch.load(out / "samples.pt").shape == (8, 3, 8, 8)
    assert first["train"]["steps"] == 6
    # the judge (a classifier of the two class folders, cached beside them) judged the 8 samples
    j = first["judge"]
    assert j["n"] == 8 and 0 <= j["confident"] <= 1 and len(j["class_shares"]) == 2
    assert j["fid"] is None and (folders[0].parent / "judge").is_dir()

    # --resume continues the same run (same sigmas and eps) up to the new --steps. The 8x8 images of
    # two flat halves are easy to denoise: 80 steps take the held-out DSM loss from about 0.50
    # (a score of 0 scores 0.5) to about 0.16 after 100 steps (measured); a network that learns
    # nothing stays near 0.5
    resumed = run(out, folders, "--resume", "--steps", "80")
    assert resumed["train"]["steps"] == 80 and resumed["schedule"] == sched
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 80 and len(ckpt["losses"]) == 80
    assert first["heldout_dsm"]["mean"] > 0.4
    assert resumed["heldout_dsm"]["mean"] < 0.3
    # largest sigma: the score points back at the data
    assert resumed["heldout_dsm"]["loss"][0] < 0.3

    again = run(out, folders, "--sample-only")
    assert again["train"]["steps"] == 80
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 80
    assert again["heldout_dsm"]["mean"] == pytest.approx(resumed["heldout_dsm"]["mean"], rel=1e-4)


def test_ctrl_c_then_resume_alone_is_the_same_run_and_the_checkpoint_decides(
        tmp_path, folders, monkeypatch):
    from common import Interrupted, UserError

    run(tmp_path / "straight", folders, "--steps", "12")
    original, calls = m.batch_loss, []

    def interrupted(*a, **k):  # Ctrl-C while the loss of step 5 is computed
        calls.append(1)
        if len(calls) == 6:
            signal.raise_signal(signal.SIGINT)
        return original(*a, **k)

    monkeypatch.setattr(m, "batch_loss", interrupted)
    with pytest.raises(Interrupted, match="SIGINT.*step 5"):
        run(tmp_path / "cut", folders, "--steps", "12")
    monkeypatch.undo()
    cut = ["--out", str(tmp_path / "cut"), "--device", "cpu"]
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["step"] == 5
    # --resume alone: the checkpoint's config (its image folders too), to its own 12 steps
    metrics = m.main(["--resume", *cut])
    assert metrics["train"]["steps"] == 12 and metrics["train"]["steps_this_run"] == 7
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)
    for key in ("model", "ema", "optimizer", "losses", "step", "rng_state", "schedule", "config"):
        assert equal_states(a[key], b[key]), key

    # what happens after training may change (a FREE field); what defines the run may not
    again = m.main(["--resume", *cut, "--n-samples", "3", "--n-steps-each", "3"])
    assert again["annealed_langevin"]["n"] == 3 and again["schedule"]["T"] == 3
    assert again["train"]["steps_this_run"] == 0
    for flags, word in ((["--lr", "1"], "has lr=0.001, which defines its run: drop --lr"),
                        (["--image-size", "16"], "image_size"), (["--preset", "cpu"], "preset"),
                        (["--seed", "3"], "seed"), (["--steps", "4"], "at step 12")):
        with pytest.raises(UserError, match=word):
            m.main(["--resume", *cut, *flags])


def test_minutes_fix_the_step_count_once(tmp_path, folders):
    out = tmp_path / "budget"
    first = run(out, folders, "--minutes", "0.004")  # about a quarter of a second
    steps = first["train"]["steps"]
    assert steps >= 1
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["steps"] == steps and ckpt["config"]["minutes"] == 0.004
    resumed = m.main(["--resume", "--out", str(out), "--device", "cpu"])  # not measured again
    assert resumed["train"]["steps"] == steps and resumed["train"]["steps_this_run"] == 0


def test_annealed_langevin_works_copied_out_alone():
    # the sampler with the helpers it names, in a namespace holding only math, numpy, scipy and
    # torch: no common, nothing else from the script
    names = ["langevin_step", "tweedie_denoise", "annealed_langevin"]
    header = "from __future__ import annotations\nimport math\nimport numpy as np\nimport torch\n\n"
    ns = {}
    exec(header + "\n\n".join(inspect.getsource(getattr(m, n)) for n in names), ns)
    s, sigmas = 0.5, m.geometric_sigmas(5.0, 0.05, 12)
    eps = m.solve_step_size(100 ** (1 / 11), 0.05, 10)
    exact = lambda y, sig: -y / (s**2 + sig.view(-1, 1, 1, 1) ** 2)  # data N(0, s^2)
    torch.manual_seed(0)
    x = ns["annealed_langevin"](exact, torch.rand(2000, 1, 2, 2), sigmas, eps, 10)
    torch.manual_seed(0)
    assert torch.equal(x, m.annealed_langevin(exact, torch.rand(2000, 1, 2, 2), sigmas, eps, 10))
    # from uniform [0, 1] (mean 0.5, std 0.29) to about N(0, s^2) (measured: std 0.58 for T = 10)
    assert abs(x.mean().item()) < 0.05 and 0.4 < x.std().item() < 0.7
    # the noise follows x's device: on the 'meta' device nothing touches a CPU tensor
    y = ns["annealed_langevin"](exact, torch.empty(3, 1, 2, 2, device="meta"), sigmas, 1e-4, 2)
    assert y.device.type == "meta" and y.shape == (3, 1, 2, 2)


def test_user_errors(tmp_path, folders, monkeypatch):
    from common import UserError

    with pytest.raises(UserError, match="no checkpoint"):
        run(tmp_path / "empty", folders, "--sample-only")
    for flags, word in ((["--lr", "0"], "lr must be above 0"),
                        (["--ema-decay", "1"], "ema-decay must be below 1")):
        with pytest.raises(UserError, match=word):
            run(tmp_path / "v", folders, *flags)
    with pytest.raises(UserError, match="cannot read images"):
        m.main(["--preset", "smoke", "--out", str(tmp_path / "x"),
                "--image-folder", str(tmp_path / "missing")])

    import torchvision.datasets

    class Offline:
        def __init__(self, *a, **k):
            raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(UserError, match="--image-folder"):
        m.main(["--preset", "smoke", "--out", str(tmp_path / "c"),
                "--data-dir", str(tmp_path / "nodata")])


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--n-steps-each", "0"], "--n-steps-each must be at least 1"),
    (["--sigma1-subset", "0"], "--sigma1-subset must be at least 1"),
    (["--n-samples", "0"], "--n-samples must be at least 1"),
    (["--n-test", "0"], "--n-test must be at least 1"),
    (["--eval-levels", "0"], "--eval-levels must be at least 1"),
    (["--image-size", "0"], "--image-size must be at least 1"),
    (["--image-size", "2"], "--image-size 2 is too small for this U-Net .* at least 4"),
    (["--sigma-end", "0"], "--sigma-end must be above 0"),
    (["--lr", "0"], "--lr must be above 0"),
    (["--ema-decay", "1"], "--ema-decay must be below 1"),
    (["--base", "7"], "--base must be an even width"),
    (["--base", "0"], "--base must be an even width"),
    (["--mults", "2"], "--mults must be a tuple"),
    (["--mults", "0,1"], "--mults must be a tuple of multipliers >= 1"),
    (["--mults=-1,2"], "--mults must be a tuple of multipliers >= 1"),
    (["--num-res-blocks", "0"], "--num-res-blocks must be a count >= 1"),
    (["--attn-levels", "1"], "--attn-levels must be a tuple of levels in 0..1"),
    (["--attn-levels", "5,"], "--attn-levels must be a tuple of levels in 0..1"),
    (["--dropout", "2"], "--dropout must be in"),
])
def test_bad_flags_end_in_one_line_naming_the_flag(tmp_path, folders, flags, message):
    from common import UserError

    with pytest.raises(UserError, match=message) as err:
        run(tmp_path / "bad", folders, *flags)
    assert "\n" not in str(err.value)


def test_load_data_keeps_the_classes_and_takes_test_images_of_every_class(tmp_path, folders):
    cfg = m.Config(**{**m.PRESETS["smoke"], "image_folder": str(folders[0]),
                      "test_folder": str(folders[1]), "n_test": 4})
    train, test, (train_y, test_y) = m.load_data(cfg, tmp_path)
    assert len(train) == len(train_y) == 48 and len(test) == len(test_y) == 4
    assert sorted(train_y.unique().tolist()) == [0, 1] and len(test_y.unique()) == 2
    cfg = m.Config(**{**m.PRESETS["smoke"], "image_folder": str(folders[0]), "n_test": 4})
    train, test, (train_y, test_y) = m.load_data(cfg, tmp_path)  # held out of the folder
    assert len(train_y) == 44 and len(test_y) == 4


def test_bad_config_values_and_image_folders(tmp_path):
    from PIL import Image

    from common import UserError

    for values, message in ((dict(warmup=-1), "--warmup must be at least 0"),
                            (dict(minutes=-1.0), "--minutes must be at least 0"),
                            (dict(ema_decay=-0.5), "--ema-decay must be below 1 .and at least 0")):
        with pytest.raises(UserError, match=message):
            m.Config(**{**m.PRESETS["smoke"], **values})
    (tmp_path / "broken" / "a").mkdir(parents=True)
    (tmp_path / "broken" / "a" / "0.png").write_bytes(b"not a png")
    write_folder(tmp_path / "few", 2, 0)
    (tmp_path / "few" / "blue" / "skip.png").write_bytes(b"")
    for folder, message in (("broken", "no readable images found"),
                            ("few", "holds 4 images; need at least 10")):
        cfg = m.Config(**{**m.PRESETS["smoke"], "image_folder": str(tmp_path / folder)})
        with pytest.raises(UserError, match=message):
            m.load_data(cfg, tmp_path)


def test_step_size_is_the_minimum_of_eq4_for_long_chains():
    """Technique 4: Eq. (4) stays above 1 (its limit in T is 1 / (1 - eps / (2 sigma_L^2))), so the
    eps brought closest to 1 is Eq. (4)'s minimum over eps; for T = 1000 that minimum is within
    0.5% of 1, far below gamma = 1.04."""
    gamma, sigma_L, T = 1.04, 0.01, 1000
    eps = m.solve_step_size(gamma, sigma_L, T)
    ratio = m.langevin_variance_ratio(eps, gamma, sigma_L, T)
    assert 1 < ratio < 1.005
    for e in (0.9 * eps, 1.1 * eps):
        assert m.langevin_variance_ratio(e, gamma, sigma_L, T) > ratio
