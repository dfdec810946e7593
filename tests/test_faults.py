"""Faults and bad inputs: --resume continues the checkpoint's run bit for bit after Ctrl-C or
SIGTERM, checkpoints never hold diverged weights, and mistakes end with one clear error."""

import os
import shutil
import signal

import pytest
import torch
from conftest import equal_states, load_script

import common

ddpm = load_script("05_ddpm_mnist")
sde = load_script("06_sde_mnist")
STEMS = ["01_exact_score_langevin", "02_ncsn_toy", "03_ncsn_cifar10", "04_sohl_dickstein_swissroll",
         "05_ddpm_mnist", "06_sde_mnist"]


def ckpt(out):
    return torch.load(out / "ckpt.pt", weights_only=True)


def patch_loss(monkeypatch, module, name, at_call, action):
    """module.name computes the loss; at its call number at_call (0-based), run action(loss)."""
    original, calls = getattr(module, name), []

    def patched(*a, **k):
        loss = original(*a, **k)
        calls.append(1)
        return action(loss) if len(calls) - 1 == at_call else loss

    monkeypatch.setattr(module, name, patched)


def sigterm(loss):
    os.kill(os.getpid(), signal.SIGTERM)
    return loss


def test_05_sigterm_then_resume_is_the_same_run_and_nan_keeps_the_good_checkpoint(
        tiny_mnist, tmp_path, monkeypatch):
    base = ["--preset", "smoke", "--data-dir", str(tiny_mnist), "--steps", "6", "--n-samples", "2",
            "--bound-images", "2", "--no-judge"]
    ddpm.main(base + ["--out", str(tmp_path / "straight")])
    with monkeypatch.context() as mp:
        patch_loss(mp, ddpm, "loss_simple", 3, sigterm)
        with pytest.raises(common.Interrupted, match="SIGTERM.*step 3"):
            ddpm.main(base + ["--out", str(tmp_path / "cut")])
    assert ckpt(tmp_path / "cut")["step"] == 3
    ddpm.main(["--resume", "--out", str(tmp_path / "cut"), "--data-dir", str(tiny_mnist),
               "--no-judge"])
    a, b = ckpt(tmp_path / "straight"), ckpt(tmp_path / "cut")
    for key in ("model", "ema", "optimizer", "losses", "step", "rng_state"):
        assert equal_states(a[key], b[key]), key

    # a NaN loss at step 5 (checkpoints every 4 steps): ckpt.pt keeps the verified step 4
    with monkeypatch.context() as mp:
        patch_loss(mp, ddpm, "loss_simple", 5, lambda loss: loss * float("nan"))
        with pytest.raises(common.UserError, match="loss became nan at step 5"):
            ddpm.main(base + ["--out", str(tmp_path / "nan")])
    bad = ckpt(tmp_path / "nan")
    assert bad["step"] == 4 and len(bad["losses"]) == 4
    assert equal_states(bad["losses"], a["losses"][:4])


def test_06_ctrl_c_then_resume_is_the_same_run_and_resume_keeps_the_run(
        tiny_mnist, tmp_path, monkeypatch):
    base = ["--preset", "smoke", "--data-dir", str(tiny_mnist), "--steps", "6", "--lik-images", "0",
            "--n-samples", "2", "--no-judge"]
    sde.main(base + ["--out", str(tmp_path / "straight")])
    with monkeypatch.context() as mp:
        patch_loss(mp, sde, "dsm_loss", 2, lambda loss: signal.raise_signal(signal.SIGINT) or loss)
        with pytest.raises(common.Interrupted, match="SIGINT.*step 2"):
            sde.main(base + ["--out", str(tmp_path / "cut")])
    metrics = sde.main(["--resume", "--out", str(tmp_path / "cut"), "--data-dir", str(tiny_mnist),
                        "--lik-images", "0", "--no-judge"])
    assert metrics["train"]["steps"] == 6 and metrics["train"]["steps_this_run"] == 4
    a, b = ckpt(tmp_path / "straight"), ckpt(tmp_path / "cut")
    for key in ("model", "ema", "optimizer", "losses", "step", "rng_state"):
        assert equal_states(a[key], b[key]), key

    # the checkpoint decides the run: --resume alone trains nothing more; flags that would change
    # the run are refused; --steps extends it
    out = ["--out", str(tmp_path / "cut"), "--data-dir", str(tiny_mnist), "--lik-images", "0",
           "--no-judge"]
    assert "train" not in sde.main(["--resume", *out])
    refused = ((["--preset", "cpu"], "preset"), (["--lr", "1"], "lr"),
               (["--batch-size", "4"], "batch_size"), (["--sde", "ve"], "sde"),
               (["--seed", "3"], "seed"), (["--steps", "5"], "at step 6"),
               (["--minutes", "3"], "minutes"), (["--base", "4"], "base"))
    for flags, word in refused:
        with pytest.raises(common.UserError, match=word) as err:
            sde.main(["--resume", *out, *flags])
        assert "\n" not in str(err.value)
    # what happens after training may change: another sampler, its steps, no likelihood
    free = sde.main(["--resume", *out, "--sampler", "pc", "--n-steps", "2", "--snr", "0.1"])
    assert "train" not in free and free["samplers"]["pc"]["nfe"] == 5
    assert ckpt(tmp_path / "cut")["config"]["sampler"] == "em"
    assert sde.main(["--resume", "--steps", "7", *out])["train"]["steps"] == 7


@pytest.mark.parametrize("stem", STEMS[1:])
def test_another_scripts_checkpoint_is_refused_before_anything_is_written(stem, tmp_path):
    other = STEMS[4] if stem == STEMS[3] else STEMS[3]
    state = {"model": {}, "config": {"T": 3}, "step": 1}
    common.save_checkpoint(tmp_path / "ckpt.pt", state, other)
    with pytest.raises(common.UserError, match=f"written by {other}.py, not by {stem}.py"):
        load_script(stem).main(["--out", str(tmp_path), "--resume", "--device", "cpu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


@pytest.mark.parametrize("stem", STEMS)
def test_out_that_is_a_file_or_too_long_is_one_error(stem, tmp_path):
    (tmp_path / "f").write_text("x")
    for out, match in ((tmp_path / "f", "is a file"), (tmp_path / "f" / "sub", "cannot write"),
                       (tmp_path / ("x" * 300), "cannot write")):
        with pytest.raises(common.UserError, match=match):
            load_script(stem).main(["--preset", "smoke", "--device", "cpu", "--out", str(out)])


def test_01_diverging_langevin_is_one_error(tmp_path):
    m = load_script("01_exact_score_langevin")
    with pytest.raises(common.UserError, match="sample of Langevin became nan.*--step"):
        m.main(["--preset", "smoke", "--out", str(tmp_path), "--step", "1e3", "--n-samples", "100"])


def test_02_and_04_resume_alone_continue_the_run(tmp_path):
    m2, m4 = load_script("02_ncsn_toy"), load_script("04_sohl_dickstein_swissroll")
    out2, out4 = str(tmp_path / "02"), str(tmp_path / "04")
    m2.main(["--preset", "smoke", "--out", out2, "--steps", "30", "--T", "2",
             "--n-samples", "100"])
    resumed = m2.main(["--resume", "--out", out2, "--T", "2", "--n-samples", "100"])
    assert resumed["train"]["steps"] == 30 and resumed["train"]["steps_this_run"] == 0
    with pytest.raises(common.UserError, match="lr"):
        m2.main(["--resume", "--out", out2, "--lr", "1"])
    m4.main(["--preset", "smoke", "--out", out4, "--steps", "20"])
    assert m4.main(["--resume", "--out", out4])["train"]["steps"] == 20
    with pytest.raises(common.UserError, match="hidden"):
        m4.main(["--resume", "--out", out4, "--hidden", "3"])


def test_03_skips_a_truncated_jpeg_and_checks_its_flags(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    m = load_script("03_ncsn_cifar10")
    for i in range(12):
        (tmp_path / "img" / "a").mkdir(parents=True, exist_ok=True)
        img = np.random.default_rng(i).integers(0, 255, (16, 16, 3)).astype(np.uint8)
        Image.fromarray(img).save(tmp_path / "img" / "a" / f"{i}.jpg")
    bad = tmp_path / "img" / "a" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    cfg = m.Config(image_folder=str(tmp_path / "img"), image_size=8, n_test=2)
    train, test, _ = m.load_data(cfg, tmp_path)
    assert len(train) + len(test) == 11 and "skipping" in capsys.readouterr().out
    flags = ["--preset", "smoke", "--device", "cpu", "--image-folder", str(tmp_path / "img")]
    with pytest.raises(common.UserError, match="image-size 1 is too small"):
        m.main([*flags, "--out", str(tmp_path / "o1"), "--image-size", "1"])
    with pytest.raises(common.UserError, match="sigma-end 1000.0 is not below sigma_1"):
        m.main([*flags, "--out", str(tmp_path / "o2"), "--sigma-end", "1000"])


def test_corrupt_idx_file_is_called_corrupt(tiny_mnist, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_mnist / "MNIST", root / "MNIST")
    (root / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\0" * 100)
    with pytest.raises(common.UserError, match="corrupt"):
        common.torchvision_dataset("mnist", root, True, None)
