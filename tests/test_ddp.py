"""Data-parallel training under torchrun: two CPU processes (gloo) run the smoke preset. The
probe (tests/ddp_probe.py) records each rank's weights after training and a draw of its RNG."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT


def torchrun(stem, args, tmp_path, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PROBE_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "ddp_probe.py"), stem, "--preset", "smoke", "--device", "cpu",
           *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def probed(tmp_path):
    """(model_0, model_1, noise_0, noise_1) the two ranks recorded."""
    load = lambda name: torch.load(tmp_path / name, weights_only=True)
    return [load(f"{kind}{r}.pt") for kind in ("model", "noise") for r in (0, 1)]


def in_sync(model_0, model_1) -> bool:
    return all(torch.equal(model_0[k], model_1[k]) for k in model_0)


@pytest.mark.distributed
@pytest.mark.slow
def test_ddpm_two_processes_stay_in_sync(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    proc = torchrun("05_ddpm_mnist", ["--data-dir", str(tiny_mnist), "--out", str(out),
                                      "--no-judge"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone writes: one checkpoint, no temporary files left behind
    assert sorted(p.name for p in out.glob("*.pt*")) == ["ckpt.pt", "samples.pt"]
    metrics = json.loads((out / "metrics.json").read_text())
    # evaluation ran once, on rank 0: all the samples asked for, every test image of the bound
    assert metrics["samples"]["n"] == 8 and metrics["bound"]["images"] == 4
    assert proc.stdout.count("samples in") == 1, proc.stdout[-3000:]
    # each rank saw a different shard of the data and drew its own noise, yet the all-reduced
    # gradients kept the two replicas' parameters bit-identical after every optimizer step
    model_0, model_1, noise_0, noise_1 = probed(tmp_path)
    assert in_sync(model_0, model_1) and not torch.equal(noise_0, noise_1)


@pytest.mark.distributed
@pytest.mark.parametrize("stem", ["05_ddpm_mnist", "06_sde_mnist"])
def test_an_error_on_one_rank_ends_every_rank(stem, tiny_mnist, tmp_path):
    (tmp_path / "f").write_text("x")
    proc = torchrun(stem, ["--data-dir", str(tiny_mnist), "--out", str(tmp_path / "f")],
                    tmp_path, timeout=120)
    assert proc.returncode != 0
    # each rank says why in one line and shows no traceback of its own (torchrun adds its report)
    for rank in (0, 1):
        assert f"error: [rank {rank}] --out" in proc.stderr, proc.stderr[-3000:]
    assert f'{stem}.py", line' not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.slow
def test_sde_two_processes_train_in_sync_and_rank_0_alone_evaluates(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    proc = torchrun("06_sde_mnist", ["--data-dir", str(tiny_mnist), "--out", str(out),
                                     "--no-judge", "--lik-images", "0"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert in_sync(*probed(tmp_path)[:2])
    # rank 0 sampled the whole n_samples on its own (no share per rank, no gather)
    assert metrics["samplers"]["em"]["n"] == 8 and proc.stdout.count("Euler-Maruyama: 8") == 1


@pytest.mark.distributed
@pytest.mark.slow
def test_ncsn_trains_on_two_processes_and_resumes_with_a_stream_per_rank(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(40):
        (tmp_path / "img" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype("uint8")).save(
            tmp_path / "img" / "a" / f"{i}.png")
    out = tmp_path / "run"
    flags = ["--image-folder", str(tmp_path / "img"), "--out", str(out)]
    proc = torchrun("03_ncsn_cifar10", [*flags, "--minutes", "0.003"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one budget for both ranks, measured once and stored; one evaluation, on rank 0
    assert proc.stdout.count("--minutes 0.003:") == 1 and proc.stdout.count("held-out DSM") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert metrics["train"]["steps"] == config["steps"] >= 1
    assert in_sync(*probed(tmp_path)[:2])
    assert sorted(p.name for p in out.glob("*.pt*")) == ["ckpt.pt", "samples.pt"]
    # after --resume every rank draws its own noise (the checkpoint holds rank 0's RNG state)
    steps = str(config["steps"] + 2)
    proc = torchrun("03_ncsn_cifar10", ["--resume", "--steps", steps, "--out", str(out)],
                    tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model_0, model_1, noise_0, noise_1 = probed(tmp_path)
    assert in_sync(model_0, model_1) and not torch.equal(noise_0, noise_1)
