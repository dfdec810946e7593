"""The digit judge (judge.py): the FID formula against its closed form, the judge ranking real,
corrupted and noise images, its cache, and bad input as one clear error."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, write_idx

import judge

# -- the digit judge -----------------------------------------------------------------------------


def _exact_moments(n, mean, cov, seed):
    """n points whose sample mean and covariance (np.cov) are exactly mean and cov."""
    z = np.random.default_rng(seed).normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return torch.from_numpy(z @ np.linalg.cholesky(cov).T + mean)


def _psd_sqrt(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_of_two_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)  # non-commuting covariances
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    r1 = _psd_sqrt(s1)
    exact = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * _psd_sqrt(r1 @ s2 @ r1))
    f1, f2 = _exact_moments(400, mu1, s1, 1), _exact_moments(300, mu2, s2, 2)
    assert judge.frechet_distance(f1, f2) == pytest.approx(exact, rel=1e-6)
    assert judge.frechet_distance(f1, f1) == pytest.approx(0.0, abs=1e-6)


def _shapes(n, seed):
    """n 28x28 images of four classes of simple shapes at random places and sizes: 0 a filled
    square, 1 a horizontal bar, 2 a vertical bar, 3 a ring; uint8 images and labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    images, labels = np.zeros((n, 28, 28), np.uint8), rng.integers(0, 4, n)
    for img, k in zip(images, labels):
        cy, cx, r = rng.uniform(10, 18), rng.uniform(10, 18), rng.uniform(5, 8)
        if k == 0:
            on = (abs(yy - cy) < r * 0.8) & (abs(xx - cx) < r * 0.8)
        elif k == 1:
            on = (abs(yy - cy) < 1.6) & (abs(xx - cx) < r + 3)
        elif k == 2:
            on = (abs(xx - cx) < 1.6) & (abs(yy - cy) < r + 3)
        else:
            on = abs(np.hypot(yy - cy, xx - cx) - r) < 1.2
        img[on] = 255
    return images, labels


def test_judge_ranks_real_blurred_noisy_and_noise_images(tmp_path, monkeypatch):
    """End to end on a synthetic labelled dataset: fresh real images score near the real floor,
    corrupted ones worse, uniform noise far worse, in FID and in the confident share."""
    monkeypatch.setitem(judge.JUDGE, "steps", 150)
    write_idx(tmp_path / "MNIST" / "raw", "train", *_shapes(1200, 0))
    write_idx(tmp_path / "MNIST" / "raw", "t10k", *_shapes(400, 1))
    fresh = torch.from_numpy(_shapes(300, 2)[0]).float()[:, None] / 127.5 - 1
    gen = torch.Generator().manual_seed(0)
    blurred = torch.nn.functional.avg_pool2d(fresh, 5, stride=1, padding=2, count_include_pad=False)
    noisy = (fresh + 0.6 * torch.randn(fresh.shape, generator=gen)).clamp(-1, 1)
    noise = torch.rand(fresh.shape, generator=gen) * 2 - 1
    judged = {
        k: judge.judge_samples(x, "mnist", tmp_path, quiet=True)
        for k, x in dict(real=fresh, blurred=blurred, noisy=noisy, noise=noise).items()
    }
    real = judged["real"]
    assert real["judge_test_accuracy"] > 0.95 and real["n"] == 300
    assert real["fid"] < 2 * real["real_fid"] + 1.0
    assert real["confident"] > real["real_confident"] - 0.1
    for worse in ("blurred", "noisy"):
        assert real["fid"] < judged[worse]["fid"] < judged["noise"]["fid"], worse
    assert real["confident"] > judged["noisy"]["confident"] > judged["noise"]["confident"]
    assert (tmp_path / "judge").is_dir()  # cached beside the data

    few = judge.judge_samples(fresh[:20], "mnist", tmp_path, quiet=True)
    assert few["fid"] is None and "features" in few["fid_note"] and len(few["class_shares"]) == 10


def test_a_cache_that_does_not_load_is_trained_again(tiny_mnist, capsys):
    first = judge.judge_samples(torch.zeros(4, 1, 28, 28), "mnist", tiny_mnist, quiet=True)
    (cache,) = (tiny_mnist / "judge").glob("judge-mnist-*.pt")
    for bad in (b"", b"not a checkpoint", cache.read_bytes()[:100]):
        cache.write_bytes(bad)
        again = judge.judge_samples(torch.zeros(4, 1, 28, 28), "mnist", tiny_mnist, quiet=True)
        assert again["confident"] == first["confident"]
        assert "does not load" in capsys.readouterr().err
    torch.save({"model": {"x": torch.zeros(1)}, "record": {}}, cache)  # a foreign file
    judge.judge_samples(torch.zeros(4, 1, 28, 28), "mnist", tiny_mnist, quiet=True)
    assert "does not load" in capsys.readouterr().err


def test_bad_samples_are_one_line(tiny_mnist, tmp_path):
    cases = {"rgb": torch.zeros(4, 3, 28, 28), "flat": torch.zeros(4, 784),
             "nan": torch.full((4, 1, 28, 28), float("nan")), "empty": torch.zeros(0, 1, 28, 28),
             "dict": {"x": torch.zeros(1)}}
    for name, value in cases.items():
        torch.save(value, tmp_path / f"{name}.pt")
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    for name in [*cases, "garbage", "missing"]:
        proc = subprocess.run([sys.executable, str(ROOT / "judge.py"), str(tmp_path / f"{name}.pt"),
                               "--data-dir", str(tiny_mnist)], capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stderr.startswith("error: "), (name, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, (name, proc.stderr)
    # a tensor without the channel axis (N, 28, 28) is read as (N, 1, 28, 28)
    assert judge.check_samples(torch.zeros(2, 28, 28)).shape == (2, 1, 28, 28)


# -- the colour judge (CIFAR-10 style, any size) --------------------------------------------------


def test_the_mnist_cache_key_and_network_are_the_original_ones(tiny_mnist):
    """The MNIST judge's recipe is JUDGE itself and its cache file keeps its name (dataset, size,
    pixel sum, JUDGE), so judges cached before the colour judge existed are still found."""
    import hashlib
    import json

    judge.judge_samples(torch.zeros(4, 1, 28, 28), "mnist", tiny_mnist, quiet=True)
    train_x, _ = judge.labelled_images("mnist", tiny_mnist, True)
    key = json.dumps(["mnist", len(train_x), int(train_x.sum()), judge.JUDGE], sort_keys=True)
    name = f"judge-mnist-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    assert (tiny_mnist / "judge" / name).is_file() and judge.recipe("mnist") is judge.JUDGE
    assert judge.JudgeNet().body[-1].in_features == 64 * 49  # 28 -> 14 -> 7, unchanged


def _colour_shapes(n, seed):
    """n 16x16 colour images (in [-1, 1]) of three classes on a random dark background: 0 a red
    square, 1 a green ring, 2 a blue horizontal bar, at random places and sizes; labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:16, :16]
    labels = rng.integers(0, 3, n)
    images = rng.uniform(-1, -0.4, (n, 3, 1, 1)) * np.ones((n, 3, 16, 16))
    for img, k in zip(images, labels):
        cy, cx, r = rng.uniform(6, 10), rng.uniform(6, 10), rng.uniform(3, 5)
        on = [(abs(yy - cy) < r) & (abs(xx - cx) < r), abs(np.hypot(yy - cy, xx - cx) - r) < 1,
              (abs(yy - cy) < 1.5) & (abs(xx - cx) < r + 2)][k]
        img[k][on] = 1.0
    return torch.from_numpy(images).float(), torch.from_numpy(labels)


def test_colour_judge_ranks_real_blurred_blobs_and_noise(tmp_path, monkeypatch):
    """A judge of 16x16 colour images, trained on data handed to it: real images score near the
    floor, blurred ones worse, colour blobs (low-passed to 2x2) worse still, noise worst."""
    monkeypatch.setitem(judge.JUDGE_RGB, "steps", 120)
    monkeypatch.setitem(judge.JUDGE_RGB, "width", 8)
    data = (_colour_shapes(1500, 0), _colour_shapes(400, 1))
    judged = judge.load_judge("shapes", tmp_path, quiet=True, data=data)
    assert judged[0].body[0].in_channels == 3 and judged[1]["size"] == 16
    assert judged[1]["test_accuracy"] > 0.9 and len(list((tmp_path / "judge").iterdir())) == 1
    fresh = _colour_shapes(200, 2)[0]
    low = lambda x, k: torch.nn.functional.interpolate(
        torch.nn.functional.adaptive_avg_pool2d(x, k), size=16, mode="bilinear")
    gen = torch.Generator().manual_seed(0)
    sets = dict(real=fresh, blurred=low(fresh, 8), blobs=low(fresh, 2),
                noise=torch.rand(fresh.shape, generator=gen) * 2 - 1)
    fid = {k: judge.judge_with(x, judged)["fid"] for k, x in sets.items()}
    real = judge.judge_with(fresh, judged)
    assert fid["real"] < 2 * real["real_fid"] + 1.0
    assert fid["real"] < fid["blurred"] < fid["blobs"] and fid["real"] < fid["noise"], fid
    assert real["confident"] > 0.5 and len(real["class_shares"]) == 3
    with pytest.raises(judge.JudgeError, match=r"\(N, 3, 16, 16\)"):
        judge.judge_with(torch.zeros(4, 1, 28, 28), judged)


def _soft_shapes(n, seed):
    """_shapes in [-1, 1] with anti-aliased (grey) edges, as real digits have."""
    x = torch.from_numpy(_shapes(n, seed)[0]).float()[:, None] / 127.5 - 1
    return torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def test_pixel_outliers_count_blank_saturated_and_noise_squares():
    real, held_out = _soft_shapes(400, 0), _soft_shapes(200, 1)
    assert judge.pixel_outliers(held_out, real) < 0.05
    bad = held_out.clone()
    bad[:20] = -1.0  # blank
    bad[20:40] = 1.0  # saturated
    bad[40:60] = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert 0.30 <= judge.pixel_outliers(bad, real) < 0.35
