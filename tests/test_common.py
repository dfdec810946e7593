"""The shared kit: every piece of common.py against what it promises."""

import math
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

import common

# -- devices, CLI, errors -------------------------------------------------------------


def test_get_device():
    assert common.get_device("cpu") == torch.device("cpu")
    assert common.get_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(common.UserError):
        common.get_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(common.UserError, match="CUDA is not available"):
            common.get_device("cuda")


def test_bf16_is_fast_follows_the_cpu():
    fast = torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "AVX2")
    assert common.bf16_is_fast(torch.device("cpu")) == fast
    assert common.bf16_is_fast(torch.device("mps")) is False


def test_cli_entry_turns_user_error_into_one_line(capsys):
    def main(argv):
        raise common.UserError("no checkpoint at runs/x/ckpt.pt")

    with pytest.raises(SystemExit) as exit_info:
        common.cli_entry(main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: no checkpoint at runs/x/ckpt.pt"


def test_seed_and_device_flags_are_checked(capsys):
    for bad in (str(2**63), "-1"):
        with pytest.raises(SystemExit):
            common.parse_args(["--seed", bad], "x", Demo, PRESETS, "x")
    assert "2^32" in capsys.readouterr().err
    for name in ("meta", "xpu", "nonsense"):
        with pytest.raises(common.UserError, match="unsupported --device"):
            common.get_device(name)


def test_check_finite_of_many_values():
    with pytest.raises(common.UserError, match="samples became nan; try"):
        common.check_finite(torch.tensor([1.0, float("nan"), 2.0]), None, "the samples", "try")


def test_check_finite():
    common.check_finite(torch.tensor(1.0), 0)
    with pytest.raises(common.UserError, match="step 7"):
        common.check_finite(torch.tensor(float("nan")), 7)


def test_import_is_light():
    """Importing common must not pull in plotting or torchvision (that happens on first use)."""
    code = (
        "import sys, common; "
        "print('matplotlib.pyplot' in sys.modules, 'torchvision' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"]


# -- time embeddings and U-Net ----------------------------------------------------------------


def test_sinusoidal_embedding_values():
    emb = common.SinusoidalEmbedding(8)
    out = emb(torch.tensor([0.0, 3.0]))
    assert out.shape == (2, 8)
    assert torch.allclose(out[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 4)
    assert torch.allclose(out[1, :4], torch.sin(3.0 * freqs))


def test_fourier_embedding_is_fixed_and_bounded():
    emb = common.GaussianFourierEmbedding(16, scale=30.0)
    assert not any(p.requires_grad for p in emb.parameters())
    out = emb(torch.rand(5))
    assert out.shape == (5, 16) and out.abs().max() <= 1.0
    assert torch.allclose(out[:, :8] ** 2 + out[:, 8:] ** 2, torch.ones(5, 8))


@pytest.mark.parametrize("shape", [(8, 1, 28, 28), (8, 3, 32, 32)])
@pytest.mark.parametrize("time_emb", ["sinusoidal", "fourier", None])
def test_unet_shapes(shape, time_emb):
    torch.manual_seed(0)
    net = common.UNet(channels=shape[1], base=16, mults=(1, 2, 2), time_emb=time_emb)
    out = net(torch.randn(shape), torch.rand(shape[0]) * (999 if time_emb == "sinusoidal" else 1))
    assert out.shape == shape


def test_unet_time_conditioning_and_out_scale():
    torch.manual_seed(0)
    net = common.UNet(base=16, dropout=0.0).eval()
    x = torch.randn(2, 1, 28, 28)
    assert not torch.allclose(
        net(x, torch.tensor([1.0, 1.0])), net(x, torch.tensor([500.0, 500.0]))
    )
    scaled = common.UNet(
        base=16, time_emb=None, dropout=0.0, out_scale=lambda h, s: h / s[:, None, None, None]
    )
    scaled.load_state_dict(common.UNet(base=16, time_emb=None, dropout=0.0).state_dict())
    sigma = torch.tensor([2.0, 4.0])
    base_out = scaled(x, torch.ones(2))
    assert torch.allclose(scaled(x, sigma), base_out / sigma[:, None, None, None], atol=1e-6)


@pytest.mark.parametrize("time_emb", ["sinusoidal", "fourier"])
def test_unet_embed_dim_sets_the_number_of_time_features(time_emb):
    narrow = common.UNet(base=16, mults=(1, 2), time_emb=time_emb, embed_dim=64)
    assert narrow.time_mlp[0](torch.rand(3)).shape == (3, 64)
    assert narrow.time_mlp[1].in_features == 64 and narrow.time_mlp[1].out_features == 4 * 16
    assert (
        common.UNet(base=16, mults=(1, 2), time_emb=time_emb).time_mlp[1].in_features == 16
    )  # default: base
    assert narrow(torch.randn(2, 1, 28, 28), torch.rand(2)).shape == (2, 1, 28, 28)


def test_unet_num_res_blocks_per_level():
    def blocks_at(net, width):
        return sum(
            isinstance(m, common.ResBlock) and m.conv2.out_channels == width for m in net.modules()
        )

    uniform = common.UNet(base=8, mults=(1, 2, 4), num_res_blocks=1, attn_levels=())
    deeper = common.UNet(base=8, mults=(1, 2, 4), num_res_blocks=(1, 1, 3), attn_levels=())
    assert (
        [blocks_at(uniform, w) for w in (8, 16)]
        == [blocks_at(deeper, w) for w in (8, 16)]
        == [3, 3]
    )
    # level 2 (width 32): n down + (n + 1) up, plus the two middle blocks
    assert blocks_at(uniform, 32) == 1 + 2 + 2 and blocks_at(deeper, 32) == 3 + 4 + 2
    assert deeper(torch.randn(2, 1, 28, 28), torch.rand(2)).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="one entry per level"):
        common.UNet(base=8, mults=(1, 2), num_res_blocks=(1, 1, 2))


def test_attention_matches_scaled_dot_product_attention():
    torch.manual_seed(0)
    block = common.AttnBlock(8)
    x = torch.randn(3, 8, 5, 4)
    q, k, v = block.qkv(block.norm(x)).reshape(3, 3, 8, 20).transpose(-1, -2).unbind(1)
    ref = x + block.proj(
        F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(3, 8, 5, 4)
    )
    torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels", [30, 32, 48, 240, 256])
def test_group_norm_divides_any_width(channels):
    norm = common.group_norm(channels)
    assert channels % norm.num_groups == 0 and norm.num_groups <= 32
    assert norm.num_groups == min(32, channels // 4) or channels % min(32, channels // 4)


def test_unet_default_sizes():
    """The default U-Net does not change size unnoticed: its parameters for 1 and 3 channels."""
    assert common.count_params(common.UNet(channels=1)) == 1_112_801
    assert common.count_params(common.UNet(channels=3)) == 1_113_955


# -- EMA --------------------------------------------------------------------------------------


def test_ema_matches_closed_form():
    model = torch.nn.Linear(1, 1, bias=False)
    values = [1.0, 2.0, 4.0, 8.0]
    for warmup in (False, True):
        with torch.no_grad():
            model.weight.fill_(values[0])
        ema = common.make_ema(model, decay=0.9, warmup=warmup)
        expected = values[0]
        ema.update_parameters(model)  # the first update copies the weights
        for n, v in enumerate(values[1:], start=1):
            with torch.no_grad():
                model.weight.fill_(v)
            ema.update_parameters(model)
            d = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
            expected = d * expected + (1 - d) * v
        assert ema.module.weight.item() == pytest.approx(expected, rel=1e-6)


# -- checkpoints and RNG state -------------------------------------------------------------------


def _state(model, ema, opt, step):
    return {
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "config": {"lr": 1e-3, "name": "x"},
        "rng": common.rng_state(),
    }


def test_checkpoint_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = common.UNet(base=8, mults=(1, 2), attn_levels=())
    ema = common.make_ema(model, 0.99)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(2):
        loss = model(torch.randn(2, 1, 28, 28), torch.rand(2)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update_parameters(model)
    path = tmp_path / "ckpt.pt"
    common.save_checkpoint(path, _state(model, ema, opt, 2), "xx_test")
    assert not list(tmp_path.glob("*.tmp"))
    expected_draws = (torch.rand(3), np.random.rand(3), __import__("random").random())

    ckpt = common.load_checkpoint(path, "xx_test")
    model2 = common.UNet(base=8, mults=(1, 2), attn_levels=())
    ema2 = common.make_ema(model2, 0.99)
    opt2 = torch.optim.Adam(model2.parameters(), 1e-3)
    model2.load_state_dict(ckpt["model"])
    ema2.load_state_dict(ckpt["ema"])
    opt2.load_state_dict(ckpt["optimizer"])
    common.set_rng_state(ckpt["rng"])
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.state_dict().values(), ema2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert ckpt["step"] == 2 and ckpt["config"] == {"lr": 1e-3, "name": "x"}
    assert torch.equal(torch.rand(3), expected_draws[0])
    assert np.array_equal(np.random.rand(3), expected_draws[1])
    assert __import__("random").random() == expected_draws[2]


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(common.UserError, match="no checkpoint"):
        common.load_checkpoint(tmp_path / "missing.pt", "xx_test")
    path = tmp_path / "ckpt.pt"
    common.save_checkpoint(path, {"w": torch.randn(1000)}, "xx_other")
    with pytest.raises(common.UserError, match="written by xx_other.py, not by xx_test.py"):
        common.load_checkpoint(path, "xx_test")
    torch.save({"w": torch.randn(1000)}, path)
    with pytest.raises(common.UserError, match="another program"):
        common.load_checkpoint(path, "xx_test")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(common.UserError, match="truncated or corrupt"):
        common.load_checkpoint(path, "xx_test")
    model = torch.nn.Linear(2, 3)
    with pytest.raises(common.UserError, match="does not fit the model"):
        common.load_state(model, torch.nn.Linear(2, 4).state_dict(), path)
    with pytest.raises(common.UserError, match="does not fit the model"):
        common.load_state(model, {"weight": model.weight}, path)


def test_checkpoint_writers_never_collide(tmp_path):
    """Two writers of one path (two runs with the same --out) each use their own temporary file:
    every write succeeds and the file is always whole."""
    import threading

    path, errors = tmp_path / "ckpt.pt", []

    def write(k):
        try:
            for _ in range(20):
                common.save_checkpoint(path, {"w": torch.full((20_000,), float(k))}, "xx_test")
                common.load_checkpoint(path, "xx_test")
        except Exception as err:  # noqa: BLE001 -- collected for the assertion below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not list(tmp_path.glob("*.tmp"))


def test_prepare_out_refuses_files(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(common.UserError, match="is a file"):
        common.prepare_out(tmp_path / "f")
    with pytest.raises(common.UserError, match="cannot write"):
        common.prepare_out(tmp_path / "f" / "sub")
    assert common.prepare_out(tmp_path / "a" / "b").is_dir()


# -- a run's settings: Config, presets, flags, the resume rule -------------------------------


@dataclass
class Demo:
    schedule: Literal["linear", "cosine"] = "linear"  # beta schedule; paper: linear
    # the width multipliers,
    # one per level
    mults: tuple = (1, 2)
    steps: int = 100  # training steps; paper: 100
    lr: float = 2e-4  # peak learning rate (100% of it after warm-up)
    bf16: bool = False
    minutes: float = 0.0  # > 0: train about this long
    n_samples: int = 10


PRESETS = {"smoke": dict(steps=3), "cpu": dict(minutes=2.0, bf16=True, lr=1e-3), "gpu": {}}


def test_flags_are_generated_from_config(capsys):
    args = common.parse_args(
        ["--mults", "1,2,4", "--lr", "1e-3", "--no-bf16", "--schedule", "cosine"],
        "demo\n\nmore",
        Demo,
        PRESETS,
        "00_demo",
        image=True,
    )
    got = (args.mults, args.lr, args.bf16, args.schedule, args.steps, str(args.out))
    assert got == ((1, 2, 4), 1e-3, False, "cosine", None, "runs/00_demo")
    with pytest.raises(SystemExit):
        common.parse_args(["--help"], "demo", Demo, PRESETS, "00_demo", image=True)
    text = " ".join(capsys.readouterr().out.split())
    for part in (
        "--schedule {linear,cosine}",
        "beta schedule; paper: linear [Config 'linear']",
        "the width multipliers, one per level",
        "[Config 0.0002; cpu 0.001]",
        "100% of it",
        "--bf16, --no-bf16",
        "--data-dir",
    ):
        assert part in text, part
    for bad in (["--steps", "-3"], ["--lr", "nan"], ["--schedule", "quadratic"], ["--lr", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            common.parse_args(bad, "demo", Demo, PRESETS, "00_demo")
        assert exit_info.value.code == 2


def _run(argv, tmp_path, free=("n_samples",), device="cpu"):
    args = common.parse_args(argv + ["--out", str(tmp_path)], "demo", Demo, PRESETS, "00_demo")
    return common.run_config(args, Demo, PRESETS, "00_demo", free, torch.device(device)), args


def test_a_new_run_takes_the_preset_then_the_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(common, "bf16_is_fast", lambda device: False)
    (preset, cfg, ckpt), args = _run([], tmp_path)
    assert (preset, ckpt, args.seed, cfg.lr, cfg.minutes) == ("cpu", None, 0, 1e-3, 2.0)
    assert cfg.bf16 is False and "fp32 instead" in capsys.readouterr().out  # no fast bf16 here
    (preset, cfg, _), _ = _run(["--steps", "7", "--bf16"], tmp_path)
    assert (cfg.steps, cfg.minutes, cfg.bf16) == (7, 0.0, True)  # --steps is exact; --bf16 wins
    monkeypatch.setattr(common, "bf16_is_fast", lambda device: True)
    assert _run([], tmp_path)[0][1].bf16 is True
    assert _run([], tmp_path, device="cuda")[0][0] == "gpu"
    assert _run(["--preset", "smoke"], tmp_path)[0][1].steps == 3


def test_resume_keeps_the_run_and_may_extend_it(tmp_path):
    saved = dict(config=asdict(Demo(steps=50, lr=1e-3)), preset="cpu", seed=4, step=20)
    common.save_checkpoint(tmp_path / "ckpt.pt", saved, "00_demo")
    (preset, cfg, ckpt), args = _run(["--resume"], tmp_path)
    assert (preset, cfg, args.seed, ckpt["step"]) == ("cpu", Demo(steps=50, lr=1e-3), 4, 20)
    (_, cfg, _), _ = _run(
        ["--resume", "--steps", "80", "--n-samples", "3", "--lr", "1e-3"], tmp_path
    )
    assert (cfg.steps, cfg.n_samples) == (80, 3)  # extended; a free flag; an unchanged one
    for argv, match in (
        (["--resume", "--lr", "0.1"], "lr=0.001, which defines its run"),
        (["--resume", "--steps", "10"], "at step 20"),
        (["--sample-only", "--steps", "80"], "steps=50"),
        (["--resume", "--seed", "5"], "seed=4"),
        (["--resume", "--preset", "smoke"], "preset=cpu"),
    ):
        with pytest.raises(common.UserError, match=match):
            _run(argv, tmp_path)
    common.save_checkpoint(tmp_path / "ckpt.pt", {"config": saved["config"]}, "00_demo")
    with pytest.raises(common.UserError, match="older version of 00_demo.py"):
        _run(["--resume"], tmp_path)
    with pytest.raises(common.UserError, match="was written by 00_demo.py, not by 00_x.py"):
        common.run_config(args, Demo, PRESETS, "00_x", (), torch.device("cpu"))


def test_budget_times_copies_and_leaves_the_run_alone(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.clone() for p in model.parameters()]
    loss_fn = lambda net: net(torch.randn(512, 64)).pow(2).mean()
    counts = []
    for minutes in ("0.01", "1.0"):
        run = common.Run(["--out", str(tmp_path), "--device", "cpu", "--minutes", minutes],
                         "demo", Demo, PRESETS, (), "00_demo")
        rng = torch.get_rng_state()
        run.budget(loss_fn, model, opt)
        assert torch.equal(rng, torch.get_rng_state())
        counts.append(run.cfg.steps)
    short, long = counts
    assert 1 <= short < long and 50 < long / short < 200  # ~100x the minutes, ~100x the steps
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not opt.state
    assert "s per training step here" in capsys.readouterr().out
    run = common.Run(["--out", str(tmp_path), "--device", "cpu", "--steps", "7"], "demo", Demo,
                     PRESETS, (), "00_demo")
    run.budget(loss_fn, model, opt)
    assert run.cfg.steps == 7  # --steps is exact


def test_network_fn_is_the_ema_network_in_eval_mode():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop = torch.nn.Linear(3, 3), torch.nn.Dropout(0.5)

        def forward(self, x, t):
            return self.drop(self.lin(x) * t[:, None])

    model = Net()
    ema = common.make_ema(model, 0.9)
    fn = common.network_fn(ema, torch.device("cpu"), bf16=True)
    x, t = torch.randn(64, 3), torch.rand(64)
    y = fn(x, t)
    assert y.dtype == torch.float32 and torch.equal(y, fn(x, t))  # eval mode: no dropout
    assert torch.allclose(y, ema.module.lin(x) * t[:, None], atol=0.05)  # bf16 autocast


# -- data -----------------------------------------------------------------------------------------


def test_torchvision_dataset_reads_idx_and_fails_clearly(tiny_mnist, tmp_path):
    ds = common.torchvision_dataset("mnist", tiny_mnist, train=True, transform=None)
    image, label = ds[0]
    assert len(ds) == 64 and image.size == (28, 28) and 0 <= label < 10
    assert (
        len(common.torchvision_dataset("fashion-mnist", tiny_mnist, train=False, transform=None))
        == 16
    )
    # an empty folder: torchvision tries to download; either the download fails (offline) and the
    # message says where the files go, or it succeeds (online) and the data is there.
    try:
        assert (
            len(
                common.torchvision_dataset("mnist", tmp_path / "empty", train=False, transform=None)
            )
            > 0
        )
    except common.UserError as err:
        assert "MNIST/raw" in str(err)


# -- plotting --------------------------------------------------------------------------------------


def test_plots_are_written(tmp_path):
    common.save_image_grid(torch.rand(12, 1, 28, 28) * 2 - 1, tmp_path / "grid.png", nrow=4)
    common.plot_loss(list(np.exp(-np.linspace(0, 5, 200))), tmp_path / "loss.png")
    pts = np.random.default_rng(0).normal(size=(100, 2))
    common.scatter_2d({"a": pts, "b": pts + 1}, pts, tmp_path / "scatter.png", lim=4)
    common.gif_points(tmp_path / "pts.gif", [pts, pts * 0.5], ["t=1", "t=0"], truth=pts, lim=4)
    common.gif_images(
        tmp_path / "img.gif", [torch.rand(4, 1, 8, 8)] * 2, ["a", "b"], nrow=2, value_range=(0, 1)
    )
    for name in ("grid.png", "loss.png", "scatter.png", "pts.gif", "img.gif"):
        assert (tmp_path / name).stat().st_size > 500, name
    from PIL import Image

    assert Image.open(tmp_path / "pts.gif").n_frames == 2


# -- 2-D distances ---------------------------------------------------------------------------------


def _ring(n, seed):
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi, n)
    return np.stack([np.cos(angle), np.sin(angle)], 1) * 2 + 0.1 * rng.normal(size=(n, 2))


def test_sliced_wasserstein_closed_form():
    """A pure shift by c: every 1-D projection moves by <theta, c>, so
    SW2^2 = mean(<theta, c>^2) = |c|^2 / 2."""
    x = _ring(2000, 0)
    shifted = common.sliced_wasserstein(x, x + np.array([0.3, -0.4]), n_proj=4000)
    assert shifted == pytest.approx(0.5 / np.sqrt(2), rel=0.05)
    assert common.sliced_wasserstein(x, x) == 0.0


def test_distances_floor_and_shift():
    report_same = common.distance_report(_ring(1000, 1), _ring)
    report_shift = common.distance_report(_ring(1000, 2) + np.array([0.5, 0.0]), _ring)
    # same distribution: SWD within 1.5x of the real-vs-real floor (measured ratios 0.73-1.05 over
    # five seeds) and MMD^2 within noise of zero (measured |MMD^2| <= 0.004)
    assert report_same["swd"] < 1.5 * report_same["swd_floor"]
    assert abs(report_same["mmd"]) < 0.01
    # a shift of a quarter of the radius: clearly above the floor on both distances (measured
    # SWD ratios 2.7-5.1 and MMD^2 0.088-0.095 over five seeds)
    assert report_shift["swd"] > 2 * report_shift["swd_floor"]
    assert report_shift["mmd"] > 0.05 > 10 * abs(report_shift["mmd_floor"])


# -- the run protocol ------------------------------------------------------------------------


def _toy_run(tmp_path, argv=(), nan_at=None, signal_at=None):
    """A training run through the kit: a linear model fitted by Adam, `run.log` each step."""
    import os
    import signal

    run = common.Run(["--out", str(tmp_path), "--device", "cpu", "--preset", "smoke", *argv],
                     "demo", Demo, PRESETS, ("n_samples",), "00_demo")
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    run.restore(model=model, optimizer=opt)
    if run.trains:
        for step in run.steps(every=2):
            loss = (model(torch.randn(8, 3)) - 1).pow(2).mean()
            if step == nan_at:
                loss = loss * float("nan")
            if step == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)
            run.log(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return run, model


def test_run_saves_verified_steps_and_resumes_bit_for_bit(tmp_path):
    import signal

    from conftest import equal_states

    run, _ = _toy_run(tmp_path / "straight", ["--steps", "6"])
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert straight["step"] == 6 and len(straight["losses"]) == 6 and run.trained["steps"] == 6
    # a NaN loss at step 5 (checkpoints every 2 steps): ckpt.pt keeps the verified step 4
    with pytest.raises(common.UserError, match="loss became nan at step 5"):
        _toy_run(tmp_path / "nan", ["--steps", "6"], nan_at=5)
    assert torch.load(tmp_path / "nan" / "ckpt.pt", weights_only=True)["step"] == 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    # SIGTERM within step 3: that step's weights are saved, and --resume continues the same run
    with pytest.raises(common.Interrupted, match="SIGTERM.*step 3") as err:
        _toy_run(tmp_path / "cut", ["--steps", "6"], signal_at=3)
    assert err.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["step"] == 3
    run, _ = _toy_run(tmp_path / "cut", ["--resume"])
    assert run.trained["steps_this_run"] == 3
    resumed = torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)
    for key in ("model", "optimizer", "losses", "step", "rng_state"):
        assert equal_states(straight[key], resumed[key]), key
    run, _ = _toy_run(tmp_path / "cut", ["--resume", "--n-samples", "3"])
    assert run.trained is None and not run.trains and run.cfg.n_samples == 3
    assert run.world_size == 1 and run.finish() is True


def test_run_refuses_weights_that_diverged_at_the_last_step(tmp_path, monkeypatch):
    """The last step's weights have no next loss: they are checked finite before the save."""
    original = torch.optim.Adam.step

    def step(self, *a, **k):
        out = original(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    _toy_run(tmp_path / "ok", ["--steps", "2"])
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    with pytest.raises(common.UserError, match="weights became inf at step 3"):
        _toy_run(tmp_path / "ok", ["--resume", "--steps", "3"])
    assert torch.load(tmp_path / "ok" / "ckpt.pt", weights_only=True)["step"] == 2
