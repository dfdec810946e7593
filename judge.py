"""The sample judge: sample quality of MNIST-style and CIFAR-10 generators without Inception
weights.

A small CNN classifier is trained once (about a minute on a CPU) on the training split of MNIST
or Fashion-MNIST (or, with the JUDGE_RGB recipe, a few minutes on CIFAR-10 images at the
generator's resolution) and cached beside the data. It reports, each beside its floor on real data:
the FID (Heusel et al. 2017) of the samples in the judge's 64 penultimate features, the share of
samples classified with probability > 0.9, the class shares, and for class-conditional samples
the share classified as the class asked for. Copy this one file to judge your own generator:

    python judge.py SAMPLES.pt --data-dir DATA     # a tensor (N, 1, 28, 28) in [-1, 1]

    import judge; judge.judge_samples(x, "mnist", "data")       # the same from Python

    labelled = ((train_x, train_y), (test_x, test_y))            # CIFAR-10, (N, 3, s, s) in [-1, 1]
    judge.judge_with(x, judge.load_judge("cifar10", folder, data=labelled))

It needs torch, torchvision (to read the IDX files), numpy and scipy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# The judge's recipe, fixed before it judged any sample; a change here retrains the cached judge.
JUDGE = dict(steps=1400, batch=128, outliers=32, lr=3e-3, width=16, features=64, shift=2, seed=0)
# The colour judge's recipe (CIFAR-10 at the generator's size, which recipe() adds), fixed the same
# way: random horizontal flips too; 1500 steps take 2-4 minutes on one CPU thread at 16x16 (56 %
# test accuracy); 32 features, so that 03's 100 samples get an FID (n >= 2 x features).
JUDGE_RGB = dict(steps=1500, batch=128, outliers=32, lr=3e-3, width=32, features=32, shift=2,
                 seed=0, flip=True, channels=3)


def recipe(name: str, size: int = 28) -> dict:
    """The recipe that trains (and keys the cache of) the judge of dataset `name`: JUDGE itself
    for the MNIST-style datasets, JUDGE_RGB at the images' size for the others."""
    return JUDGE if name in ("mnist", "fashion-mnist") else {**JUDGE_RGB, "size": size}


class JudgeError(ValueError):
    """Samples the judge cannot read, or data it cannot find: one line, no traceback."""

    user_error = True


class JudgeNet(nn.Module):
    """A small CNN classifier: strided 3x3 convolutions size -> size/2 -> size/4 (28 -> 14 -> 7)
    with widths w, 2w, 4w, then `features` hidden units (the penultimate features FID is computed
    in) and `classes` logits."""

    def __init__(self, width: int = 16, features: int = 64, channels: int = 1, size: int = 28,
                 classes: int = 10):
        super().__init__()
        w, cells = width, (-(-size // 4)) ** 2
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Dropout(0.25), nn.Linear(4 * w * cells, features))
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.25), nn.Linear(features, classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, features) for images (N, channels, size, size) in [-1, 1]."""
        f = self.body(x)
        return self.head(f), f


def outlier_images(n: int, generator: torch.Generator,
                   shape: tuple = (1, 28, 28)) -> torch.Tensor:
    """n images that are no class: uniform noise, half of it smoothed into blobs (3x3 to 7x7)."""
    x = torch.rand(n, *shape, generator=generator) * 2 - 1
    k = 2 * int(torch.randint(1, 4, (1,), generator=generator)) + 1
    smooth = F.avg_pool2d(x[: n // 2], k, stride=1, padding=k // 2, count_include_pad=False)
    x[: n // 2] = smooth / smooth.abs().amax((1, 2, 3), keepdim=True)
    return x


def make_net(recipe: dict) -> JudgeNet:
    return JudgeNet(recipe["width"], recipe["features"], recipe.get("channels", 1),
                    recipe.get("size", 28), recipe.get("classes", 10))


def train_judge(images: torch.Tensor, labels: torch.Tensor, recipe: dict) -> JudgeNet:
    """Adam with a one-cycle rate on random shifts of up to `shift` pixels (and, with `flip`,
    random horizontal flips), images in [-1, 1]; outlier exposure (Hendrycks et al. 2019):
    `outliers` noise images per batch are trained towards the uniform distribution over classes,
    so noise is not classified confidently."""
    gen = torch.Generator().manual_seed(recipe["seed"])
    torch.manual_seed(recipe["seed"])
    classes, size = recipe.get("classes", 10), images.shape[-1]
    net, s = make_net(recipe), recipe["shift"]
    opt = torch.optim.Adam(net.parameters(), lr=recipe["lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe["lr"], total_steps=recipe["steps"])
    padded = F.pad(images, (s, s, s, s), value=-1.0)
    net.train()
    for _ in range(recipe["steps"]):
        idx = torch.randint(len(images), (recipe["batch"],), generator=gen)
        dy, dx = torch.randint(2 * s + 1, (2, len(idx), 1), generator=gen) + torch.arange(size)
        x = padded[idx[:, None, None], :, dy[:, :, None], dx[:, None, :]]  # (B, size, size, C)
        x = x.permute(0, 3, 1, 2).contiguous()
        if recipe.get("flip"):
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5, x.flip(3), x)
        logits = net(torch.cat([x, outlier_images(recipe["outliers"], gen, images.shape[1:])]))[0]
        loss = F.cross_entropy(logits[: len(idx)], labels[idx])
        loss = loss - logits[len(idx):].log_softmax(-1).mean() - math.log(classes)  # CE to uniform
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def judge_outputs(net: JudgeNet, x: torch.Tensor, batch: int = 1000):
    """Class probabilities and penultimate features (float64) of images in [-1, 1]."""
    out = [net(x[i:i + batch].float().clamp(-1, 1)) for i in range(0, len(x), batch)]
    return (torch.cat([o[0].softmax(-1).double() for o in out]),
            torch.cat([o[1].double() for o in out]))


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) of two feature sets (Heusel et al.
    2017, the FID formula), in float64 with scipy's sqrtm."""
    from scipy import linalg

    f1, f2 = f1.double().numpy(), f2.double().numpy()
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: offset both, as pytorch-fid does
        off = np.eye(len(s1)) * 1e-6
        covmean = linalg.sqrtm((s1 + off) @ (s2 + off))
    mean_gap = ((f1.mean(0) - f2.mean(0)) ** 2).sum()
    return float(mean_gap + np.trace(s1 + s2 - 2 * np.real(covmean)))


def labelled_images(name: str, root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 28, 28) images in [-1, 1] and labels, from torchvision's MNIST-style IDX files."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST}[name]
    try:
        ds = cls(str(root), train=train, download=True)
    except Exception as err:  # offline, or unreadable files
        raise JudgeError(f"cannot load {cls.__name__} for the judge ({type(err).__name__}); put "
                         f"its four IDX files in {Path(root) / cls.__name__ / 'raw'}") from None
    return ds.data[:, None].float().div(127.5).sub(1), ds.targets.long()


def _cached(path: Path, net: JudgeNet):
    """The judge's record from a cache file, or None (with one warning) if it does not load."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(saved["model"])
        return dict(saved["record"])
    except Exception as err:
        print(f"warning: the judge cache {path} does not load ({type(err).__name__}); "
              "training it again", file=sys.stderr)
        return None


def _save(path: Path, state: dict) -> None:
    """torch.save to a unique temporary file beside path, then an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_judge(name: str, root: Path, quiet: bool = False,
               data: tuple | None = None) -> tuple[JudgeNet, dict, dict]:
    """The judge of dataset `name`, trained once on its training split and cached in root/judge
    (or ~/.cache/diffusion-from-scratch when root is read-only), keyed by the dataset, its size
    and its recipe(). `data`, ((train images, labels), (test images, labels)) in [-1, 1], gives
    the images (else the MNIST-style IDX files in root). Returns the network, its record (test
    accuracy, training seconds) and the data {"train": images, "test": images} it was keyed on."""
    (train_x, train_y), (test_x, test_y) = data if data is not None else (
        labelled_images(name, root, s) for s in (True, False))
    judged = recipe(name, train_x.shape[-1])
    if judged is not JUDGE:  # the MNIST-style judges have 10 classes, the others their own
        judged = {**judged, "classes": int(train_y.max()) + 1}
    key = json.dumps([name, len(train_x), int(train_x.sum()), judged], sort_keys=True)
    fname = f"judge-{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    folders = [Path(root) / "judge", Path.home() / ".cache" / "diffusion-from-scratch"]
    data, net = {"train": train_x, "test": test_x}, make_net(judged)
    for path in (f / fname for f in folders if (f / fname).is_file()):
        if (record := _cached(path, net)) is not None:
            return net.eval(), record, data
    if not quiet:
        print(f"training the {name} judge once ({judged['steps']} steps, a few minutes on a CPU)")
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]), torch.enable_grad():  # also inside no_grad
        net = train_judge(train_x, train_y, judged)
    accuracy = (judge_outputs(net, test_x)[0].argmax(1) == test_y).double().mean()
    record = {"dataset": name, "train_images": len(train_x), "train_s": time.perf_counter() - t0,
              "test_accuracy": float(accuracy), **judged}
    for folder in folders:
        try:
            _save(folder / fname, {"model": net.state_dict(), "record": record})
            break
        except OSError:
            continue
    return net, record, data


def check_samples(samples, shape: tuple = (1, 28, 28)) -> torch.Tensor:
    """Samples as a float tensor (N, *shape) of finite values; else one JudgeError."""
    want = f"(N, {', '.join(map(str, shape))})"
    if not isinstance(samples, torch.Tensor):
        raise JudgeError(f"expected a tensor of images {want}, got {type(samples).__name__}")
    if samples.dim() == 3 and shape[0] == 1:
        samples = samples[:, None]
    if samples.dim() != 4 or tuple(samples.shape[1:]) != tuple(shape) or len(samples) == 0:
        raise JudgeError(f"expected images {want} with N >= 1, got shape "
                         f"{tuple(samples.shape)}")
    if not torch.isfinite(samples.float()).all():
        raise JudgeError("the samples hold NaN or infinite values")
    return samples.float()


def pixel_stats(x: torch.Tensor) -> torch.Tensor:
    """(N, 2) per image in [-1, 1]: mean intensity and share of mid-grey pixels, in [0, 1]."""
    u = ((x.flatten(1) + 1) / 2).clamp(0, 1)
    return torch.stack([u.mean(1), ((u > 0.25) & (u < 0.75)).float().mean(1)], 1)


def pixel_outliers(x: torch.Tensor, real: torch.Tensor, q: float = 0.005) -> float:
    """Share of images x whose pixel_stats leave the central 1 - 2q of the real images': blank,
    saturated or noise squares, which a classifier may still call confident."""
    lo, hi = torch.quantile(pixel_stats(real), torch.tensor([q, 1 - q]), dim=0)
    s = pixel_stats(x)
    return float(((s < lo) | (s > hi)).any(1).double().mean())


def judge_samples(samples: torch.Tensor, name: str, root: Path, seed: int = 0, draws: int = 5,
                  labels: torch.Tensor | None = None, quiet: bool = False) -> dict:
    """Judge n samples (N, 1, 28, 28) in [-1, 1] against the test split of `name` (judge_with)."""
    samples = check_samples(samples)
    return judge_with(samples, load_judge(name, root, quiet), seed, draws, labels)


def judge_with(samples: torch.Tensor, judged: tuple, seed: int = 0, draws: int = 5,
               labels: torch.Tensor | None = None) -> dict:
    """Judge n samples in [-1, 1] with judged = load_judge(...) against its test images:
    confident: share classified with probability > 0.9 (real_confident: of the test images);
    class_shares of the classes; on_target (with `labels`, the classes asked for): share
    classified as its label with probability > 0.9; pixel_outliers: share of samples whose
    mean intensity or mid-grey share is outside the central 99 % of the test images' (real:
    of training images, about 2 %); fid: Frechet distance to all test images in
    the judge's features, with real_fid the mean (and std) over `draws` sets of n training images
    -- FID depends on n: compare only at equal n; None when n < 2 x features."""
    net, record, data = judged
    samples = check_samples(samples, tuple(data["test"].shape[1:]))
    n, (probs, feats) = len(samples), judge_outputs(net, samples)
    real_probs, real_feats = judge_outputs(net, data["test"])
    classes = probs.shape[1]
    shares = torch.bincount(probs.argmax(1), minlength=classes).double() / n
    out = {"n": n, "confident": float((probs.max(1).values > 0.9).double().mean()),
           "real_confident": float((real_probs.max(1).values > 0.9).double().mean()),
           "class_shares": [round(float(s), 4) for s in shares],
           "class_share_max_dev": float((shares - 1 / classes).abs().max()),
           "fid": None, "real_fid": None, "judge_test_accuracy": record["test_accuracy"],
           "pixel_outliers": pixel_outliers(samples, data["test"]),
           "real_pixel_outliers": pixel_outliers(data["train"][:max(n, 1000)], data["test"])}
    if labels is not None:
        hit = probs.gather(1, labels.long().view(-1, 1).cpu()).squeeze(1) > 0.9
        out["on_target"] = float(hit.double().mean())
    if n < 2 * feats.shape[1]:
        out["fid_note"] = f"n = {n} is below 2 x {feats.shape[1]} features: no FID"
        return out
    gen, train_x = torch.Generator().manual_seed(seed), data["train"]
    floors = [frechet_distance(judge_outputs(net, train_x[torch.randperm(
        len(train_x), generator=gen)[:n]])[1], real_feats) for _ in range(draws)]
    out["fid"] = frechet_distance(feats, real_feats)
    out["real_fid"], out["real_fid_std"] = float(np.mean(floors)), float(np.std(floors))
    return out


def judge_line(j: dict) -> str:
    fid = "FID n/a" if j["fid"] is None else (
        f"FID {j['fid']:.1f} (real {j['real_fid']:.1f} +- {j['real_fid_std']:.1f})")
    target = f", on target {j['on_target']:.1%}" if "on_target" in j else ""
    return (f"judge on {j['n']} samples: {fid}, confident {j['confident']:.1%} (real "
            f"{j['real_confident']:.1%}){target}, class shares within "
            f"{j['class_share_max_dev']:.3f} of {1 / len(j['class_shares']):.2g}, pixel "
            f"outliers {j['pixel_outliers']:.1%} (real {j['real_pixel_outliers']:.1%})")


def main(argv: list[str] | None = None) -> dict:
    """`python judge.py SAMPLES.pt [--dataset mnist] [--data-dir data]`: judge saved samples."""
    parser = argparse.ArgumentParser(description="judge saved samples (N, 1, 28, 28) in [-1, 1]")
    parser.add_argument("samples", type=Path)
    parser.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    args = parser.parse_args(argv)
    if not args.samples.is_file():
        raise JudgeError(f"no samples at {args.samples}")
    try:
        samples = torch.load(args.samples, map_location="cpu", weights_only=True)
    except Exception as err:
        raise JudgeError(f"cannot read {args.samples} as a saved tensor "
                         f"({type(err).__name__})") from None
    result = judge_samples(samples, args.dataset, args.data_dir)
    print(judge_line(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except JudgeError as err:
        sys.exit(f"error: {err}")
