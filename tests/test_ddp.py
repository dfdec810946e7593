"""Data-parallel training under torchrun: two CPU processes (gloo) run the smoke preset."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def torchrun(args, tmp_path, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *args,
    ]
    return subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.distributed
@pytest.mark.slow
def test_ddpm_two_processes_stay_in_sync(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(
        [
            str(ROOT / "05_ddpm_mnist.py"),
            "--preset",
            "smoke",
            "--device",
            "cpu",
            "--data-dir",
            str(tiny_mnist),
            "--out",
            str(out),
            "--no-judge",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 alone writes: one checkpoint, no temporary files left behind
    assert sorted(p.name for p in out.glob("*.pt*")) == ["ckpt.pt", "samples.pt"]
    metrics = json.loads((out / "metrics.json").read_text())
    # evaluation ran once, on rank 0: all the samples asked for, every test image of the bound
    assert metrics["samples"]["n"] == 8 and metrics["bound"]["images"] == 4
    assert proc.stdout.count("samples in") == 1, proc.stdout[-3000:]
    # each rank saw a different shard of the data, yet the all-reduced gradients kept the two
    # replicas' parameters bit-identical after every optimizer step
    assert metrics["ddp"]["world_size"] == 2
    assert metrics["ddp"]["param_max_abs_diff"] == 0.0


@pytest.mark.distributed
@pytest.mark.parametrize("stem", ["05_ddpm_mnist", "06_sde_mnist"])
def test_an_error_on_one_rank_ends_every_rank(stem, tiny_mnist, tmp_path):
    (tmp_path / "f").write_text("x")
    proc = torchrun(
        [
            str(ROOT / f"{stem}.py"),
            "--preset",
            "smoke",
            "--device",
            "cpu",
            "--data-dir",
            str(tiny_mnist),
            "--out",
            str(tmp_path / "f"),
        ],
        tmp_path,
        timeout=120,
    )
    assert proc.returncode != 0
    # each rank says why in one line and shows no traceback of its own (torchrun adds its report)
    for rank in (0, 1):
        assert f"error: [rank {rank}] --out" in proc.stderr, proc.stderr[-3000:]
    assert f'{stem}.py", line' not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.slow
def test_sde_two_processes_train_in_sync_and_rank_0_alone_evaluates(tiny_mnist, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(
        [
            str(ROOT / "06_sde_mnist.py"),
            "--preset",
            "smoke",
            "--device",
            "cpu",
            "--data-dir",
            str(tiny_mnist),
            "--out",
            str(out),
            "--no-judge",
            "--lik-images",
            "0",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ddp"] == {"world_size": 2, "param_max_abs_diff": 0.0}
    # rank 0 sampled the whole n_samples on its own (no share per rank, no gather)
    assert metrics["samplers"]["em"]["n"] == 8 and proc.stdout.count("Euler-Maruyama: 8") == 1


@pytest.mark.distributed
@pytest.mark.slow
def test_ncsn_trains_on_two_processes_and_evaluates_on_rank_0(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(40):
        (tmp_path / "img" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype("uint8")).save(
            tmp_path / "img" / "a" / f"{i}.png"
        )
    out = tmp_path / "run"
    proc = torchrun(
        [
            str(ROOT / "03_ncsn_cifar10.py"),
            "--preset",
            "smoke",
            "--device",
            "cpu",
            "--image-folder",
            str(tmp_path / "img"),
            "--minutes",
            "0.003",
            "--out",
            str(out),
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one budget for both ranks, measured once and stored; one evaluation, on rank 0
    assert proc.stdout.count("--minutes 0.003:") == 1 and proc.stdout.count("held-out DSM") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert metrics["train"]["steps"] == config["steps"] >= 1
    assert metrics["ddp"] == {"world_size": 2, "param_max_abs_diff": 0.0}
    assert sorted(p.name for p in out.glob("*.pt*")) == ["ckpt.pt", "samples.pt"]
