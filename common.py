"""The small shared kit of the numbered scripts: errors and the command line, a run's settings
(Config, presets, flags, resume), devices and seeds, data, a configurable U-Net, EMA,
checkpoints, plotting, 2-D distances, the digit judge and the torchrun setup. Nothing here is
specific to one method.

    python common.py SAMPLES.pt --data-dir data     # judge saved MNIST samples (N, 1, 28, 28)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# -- errors a user can cause, the entry point -------------------------------------------------


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file); shown as one line, no traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: training stopped after saving its last completed step."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank_prefix() -> str:
    return f"[rank {torch.distributed.get_rank()}] " if _distributed() else ""


def cli_entry(main: Callable[[list[str] | None], dict]) -> None:
    """Run a script's `main` from the shell: a UserError becomes one message and exit code 2.
    Under torchrun a failing rank leaves at once (no barrier, no hang); torchrun ends the others."""
    try:
        main(None)
        code = 0
    except UserError as err:
        print(f"error: {_rank_prefix()}{err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt as err:
        print(str(err) if isinstance(err, Interrupted) else "interrupted", file=sys.stderr)
        code = err.code if isinstance(err, Interrupted) else 130
    except Exception as err:
        if not _distributed():
            raise
        if isinstance(err, torch.distributed.DistError):
            print(f"error: {_rank_prefix()}stopped: another process ended", file=sys.stderr)
        else:
            traceback.print_exc()
        code = 1
    if _distributed():  # skip the exit-time teardown, which would wait for the other ranks
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def check_finite(x: torch.Tensor, step: int | None, what: str = "the loss",
                 hint: str = "try a lower --lr") -> None:
    if not torch.isfinite(x).all():
        bad = x[~torch.isfinite(x)].flatten()[0].item()
        at = "" if step is None else f" at step {step}"
        raise UserError(f"{what} became {bad}{at}; {hint}")


# -- a run's settings: Config, presets, flags, the resume rule --------------------------------


def _field_help(cls) -> dict[str, str]:
    """Each Config field's comment in the source: the one on its line, else the lines above."""
    import inspect
    import re

    helps, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text, m = line.strip(), re.match(r"\s*(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        if text.startswith("#"):
            above.append(text.lstrip("# "))
        elif m:
            helps[m[1]], above = m[2] or " ".join(above), []
    return helps


def _flag_type(hint) -> dict:
    """argparse keywords for a Config field of type `hint`; numbers must be finite and >= 0."""
    import ast
    import typing

    if hint is bool:
        return dict(action=argparse.BooleanOptionalAction)
    if typing.get_origin(hint) is typing.Literal:
        return dict(choices=typing.get_args(hint))
    if hint in (int, float):
        def number(text):
            value = hint(text)
            if not (math.isfinite(value) and value >= 0):
                raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
            return value
        return dict(type=number, metavar=hint.__name__.upper())
    return dict(type=str) if hint is str else dict(type=ast.literal_eval, metavar="VALUE")


def seed_value(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2^32 - 1, got {text}")
    return value


def parse_args(argv, doc: str, config_cls, presets: dict, script: str, image: bool = False,
               trains: bool = True):
    """The shared flags (--resume and --sample-only if the script `trains`), then one flag per
    Config field (`--field-name`, default None: the preset's value), its help the field's
    comment with Config's and the presets' values."""
    import typing

    parser = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--preset", choices=list(presets), default=None,
        help="smoke: seconds, for tests; cpu: a convincing result on a laptop CPU in minutes; "
        "gpu: the paper's recipe as far as one GPU allows (default: gpu on CUDA, else cpu)")
    add("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add("--seed", type=seed_value, default=None,
        help="random seed (default: 0; with --resume: the checkpoint's)")
    add("--out", type=Path, default=Path("runs") / script, help=f"output folder (runs/{script})")
    if trains:
        add("--resume", action="store_true",
            help="continue the run in OUT/ckpt.pt; with --steps N: extend it to N steps")
        add("--sample-only", action="store_true", help="load OUT/ckpt.pt, only sample, evaluate")
    parser.set_defaults(resume=False, sample_only=False)
    if image:
        add("--data-dir", type=Path, default=Path("data"), help="datasets' folder (./data)")
    group = parser.add_argument_group("settings (Config; default: the preset's value)")
    hints, helps = typing.get_type_hints(config_cls), _field_help(config_cls)
    for f in fields(config_cls):
        differ = {p: v[f.name] for p, v in presets.items() if v.get(f.name, f.default) != f.default}
        shown = "; ".join(f"{p} {v!r}" if isinstance(v, str) else f"{p} {v}"
                          for p, v in {"Config": f.default, **differ}.items())
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                           help=f"{helps.get(f.name, '')} [{shown}]".replace("%", "%%"),
                           **_flag_type(hints[f.name]))
    return parser.parse_args(argv)


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def make_config(config_cls, values: dict):
    """Config(**values), lists back to tuples; Config.__post_init__ checks the values."""
    names = {f.name for f in fields(config_cls)}
    return config_cls(**{k: _tuples(v) for k, v in values.items() if k in names})


def run_config(args, config_cls, presets: dict, script: str, free: Sequence[str],
               device: torch.device, quiet: bool = False):
    """(preset, config, checkpoint or None) of this call. A new run: the preset (default gpu on
    CUDA, else cpu, announced), then the flags given. With --resume or --sample-only the
    checkpoint decides: a flag may differ from it only if listed in `free` (what happens after
    training, how to run), or be --steps extending a --resume to more steps."""
    given = {f.name: getattr(args, f.name) for f in fields(config_cls)
             if getattr(args, f.name) is not None}
    if not (args.resume or args.sample_only):
        preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
        if args.preset is None and not quiet:
            print(f"--preset not given: '{preset}' for device {device}")
        values = {**presets[preset], **given}
        if "steps" in given and "minutes" in values:
            values["minutes"] = 0.0  # an explicit --steps is exact
        args.seed = 0 if args.seed is None else args.seed
        return preset, _precision(make_config(config_cls, values), given, device, quiet), None
    path = args.out / "ckpt.pt"
    ckpt = load_checkpoint(path, script)  # on the CPU: RNG states stay CPU tensors
    if not {"config", "preset", "seed", "step"} <= ckpt.keys():
        raise UserError(f"{path} was written by an older version of {script}.py; pass another "
                        "--out for a new run")
    saved = ckpt["config"]
    for key, value in {**given, "preset": args.preset, "seed": args.seed}.items():
        if value is None or value == saved.get(key, ckpt.get(key)) or key in free:
            continue
        flag = "--" + key.replace("_", "-")
        if key == "steps" and args.resume:
            if value < ckpt["step"]:
                raise UserError(f"{path} is at step {ckpt['step']}; {flag} must be at least that")
            continue
        raise UserError(f"{path} has {key}={saved.get(key, ckpt.get(key))}, which defines its "
                        f"run: drop {flag}, or pass another --out for a new run")
    args.seed = ckpt["seed"]
    cfg = make_config(config_cls, {**saved, **given})
    return ckpt["preset"], _precision(cfg, given, device, quiet), ckpt


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 runs on native kernels: a CPU for which oneDNN has bf16 kernels (AVX-512 or
    AMX) or a CUDA GPU with bf16 units. On an AVX2-only CPU bf16 is emulated: a training step of
    the MNIST U-Nets here is about 10x slower in bf16 than in fp32."""
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return False


def _precision(cfg, given: dict, device: torch.device, quiet: bool):
    """bf16 asked for by a preset or a checkpoint (not by --bf16) runs in fp32 where bf16 has no
    fast kernels: how to run, not what the run is."""
    if getattr(cfg, "bf16", False) and "bf16" not in given and not bf16_is_fast(device):
        cfg.bf16 = False
        if not quiet:
            print(f"no bf16 kernels on this {device.type}: fp32 instead (--bf16 forces bf16)")
    return cfg


def budget_steps(minutes: float, model: nn.Module, opt: torch.optim.Optimizer,
                 loss_fn: Callable[[nn.Module], torch.Tensor], d=None, probe: int = 20) -> int:
    """Training steps that fit in `minutes`: a few steps of loss_fn with the optimiser's type
    and settings on throwaway copies are timed (the run's model, optimiser and RNG untouched;
    clipping, EMA and data add a few percent). All ranks take the smallest count. The count is
    then fixed: stored with the run's config."""
    import copy

    net = copy.deepcopy(model)
    opt2, state, times = type(opt)(net.parameters(), **opt.defaults), rng_state(), []
    for _ in range(probe + 2):
        t0 = time.perf_counter()
        loss = loss_fn(net)
        opt2.zero_grad()
        loss.backward()
        opt2.step()
        if loss.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    set_rng_state(state)
    per_step = float(np.median(times[2:]))
    steps = torch.tensor([max(1, int(minutes * 60 / per_step))])
    if d is not None and d.enabled:
        torch.distributed.all_reduce(steps, torch.distributed.ReduceOp.MIN)
    if d is None or d.is_main:
        print(f"--minutes {minutes:g}: {per_step:.3f} s per training step here, so "
              f"{steps.item()} steps (kept on --resume; --steps N for an exact run)")
    return int(steps.item())


# -- devices, seeds, precision, files ----------------------------------------------------------


def get_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """All RNG states as tensors and ints, so a checkpoint loads with weights_only=True."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CPU (fast with AVX-512/AMX) and CUDA; a no-op when disabled or on MPS."""
    if not enabled or device.type not in ("cpu", "cuda"):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextmanager
def one_thread():
    """torch on one thread inside the block: for 2-D work on a few thousand points one thread is
    fastest (and kind to a shared CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def network_fn(ema, device: torch.device, bf16: bool) -> Callable:
    """The EMA network in eval mode as a function net(x, t) -> float32, under bf16 autocast if
    asked: what the samplers and evaluations call."""
    net = ema.module.eval()

    def fn(x, t):
        with autocast(device, bf16):
            return net(x, t).float()

    return fn


def write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, default=float) + "\n"
    _write_atomic(path, lambda f: f.write(text.encode()))


def prepare_out(out: Path) -> Path:
    """Create the output folder and check that it takes files, before any work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; pass a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise UserError(f"cannot write to --out {out}: {err.strerror or err}") from None
    return out


# -- data ---------------------------------------------------------------------------------------


def torchvision_dataset(name: str, root: Path, train: bool, transform):
    """MNIST / FashionMNIST / CIFAR10 from torchvision with download=True; a failed download
    (offline machine) or unreadable files become one sentence saying what to do."""
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST,
           "cifar10": datasets.CIFAR10}[name]
    try:
        return cls(str(root), train=train, download=True, transform=transform)
    except Exception as err:  # RuntimeError, URLError, OSError, ... when offline
        raw = Path(root) / cls.__name__ / ("raw" if name != "cifar10" else "")
        if name != "cifar10" and raw.is_dir() and any(p.name.endswith("ubyte")
                                                      for p in raw.iterdir()):
            raise UserError(f"cannot read {cls.__name__} from the files in {raw} "
                            f"({type(err).__name__}: {str(err)[:120]}); they may be truncated or "
                            "corrupt: replace them, or delete them to download again") from None
        raise UserError(f"could not load or download {cls.__name__} ({type(err).__name__}); put "
                        f"the dataset's files in {raw} (for MNIST-style data: the four IDX files, "
                        "e.g. train-images-idx3-ubyte) or pass --data-dir") from None


def epoch_batches(n: int, batch_size: int, d: Dist, seed: int, step: int):
    """Endless batches of indices into n items: each epoch a new shuffle (fixed by seed and epoch)
    cut in one share per process. Starting at `step` replays the same order, so --resume continues
    the same run."""
    sampler = torch.utils.data.DistributedSampler(range(n), d.world_size, d.rank, shuffle=True,
                                                  seed=seed, drop_last=True)
    per_epoch = len(sampler) // batch_size
    if per_epoch == 0:
        raise UserError(f"{n} training images are fewer than one batch per process; "
                        "lower --batch-size")
    epoch, skip = divmod(step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        idx = torch.tensor(list(sampler))
        for i in range(skip, per_epoch):
            yield idx[i * batch_size:(i + 1) * batch_size]
        epoch, skip = epoch + 1, 0


# -- time embeddings and the U-Net ---------------------------------------------------------------


class SinusoidalEmbedding(nn.Module):
    """Transformer position encoding of a scalar t (DDPM, Ho et al. 2020, Sec. 4)."""

    def __init__(self, dim: int, max_period: float = 10000.0):
        super().__init__()
        half = dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class GaussianFourierEmbedding(nn.Module):
    """Random Fourier features [sin 2 pi W t, cos 2 pi W t], W ~ N(0, scale^2), fixed
    (Tancik et al. 2020; used for continuous t by Song et al. 2021)."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("W", torch.randn(dim // 2) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = 2 * math.pi * t.float()[:, None] * self.W[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels: the largest such count dividing."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between, dropout, skip."""

    def __init__(self, cin: int, cout: int, temb_dim: int | None, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout) if temb_dim else None
        self.norm2, self.drop = group_norm(cout), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.temb is not None:
            h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels, softmax(q^T k / sqrt(c)) v, plus the input. Two
    bmm calls: on a CPU faster than F.scaled_dot_product_attention for a 7x7 map."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm, self.qkv = group_norm(ch), nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, temb=None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c**-0.5, dim=-1)
        return x + self.proj(torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w))


class UNet(nn.Module):
    """A DDPM-style U-Net (Ho et al. 2020, Appendix B) sized by its arguments.

    channels: image channels; base: width at full resolution; mults: width multipliers, one
    resolution level each (each level after the first halves the resolution: 28 -> 14 -> 7);
    num_res_blocks: ResBlocks per level on the way down (one more on the way up), a number or one
    per level; attn_levels: levels with self-attention (and always the middle); time_emb:
    'sinusoidal', 'fourier' or None (unconditional, as NCSNv2); embed_dim: time features
    (default: base); out_scale(out, t): applied to the output, e.g. dividing by sigma(t)."""

    def __init__(self, channels: int = 1, base: int = 32, mults: Sequence[int] = (1, 2, 2),
                 num_res_blocks: int | Sequence[int] = 1, attn_levels: Sequence[int] = (2,),
                 dropout: float = 0.1, time_emb: str | None = "sinusoidal",
                 fourier_scale: float = 16.0, out_scale: Callable | None = None,
                 embed_dim: int | None = None):
        super().__init__()
        if time_emb not in ("sinusoidal", "fourier", None):
            raise ValueError(f"time_emb must be 'sinusoidal', 'fourier' or None, not {time_emb!r}")
        n_blocks = [num_res_blocks] * len(mults) if isinstance(num_res_blocks, int) \
            else list(num_res_blocks)
        if len(n_blocks) != len(mults):
            raise ValueError("num_res_blocks needs one entry per level of mults")
        self.out_scale, temb, e = out_scale, (4 * base if time_emb else None), embed_dim or base
        self.time_mlp = None if time_emb is None else nn.Sequential(
            SinusoidalEmbedding(e) if time_emb == "sinusoidal"
            else GaussianFourierEmbedding(e, fourier_scale),
            nn.Linear(e, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.stem = nn.Conv2d(channels, base, 3, padding=1)
        widths, ch = [base], base
        self.down, self.up = nn.ModuleList(), nn.ModuleList()

        def level_blocks(cin, level):  # a ResBlock, then attention at the levels that have it
            cout = base * mults[level]
            res = ResBlock(cin, cout, temb, dropout)
            return nn.ModuleList([res, *([AttnBlock(cout)] if level in attn_levels else [])]), cout

        for level in range(len(mults)):
            for _ in range(n_blocks[level]):
                blocks, ch = level_blocks(ch, level)
                self.down.append(blocks)
                widths.append(ch)
            if level < len(mults) - 1:  # downsample: a strided 3x3 conv
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                widths.append(ch)
        self.mid = nn.ModuleList([ResBlock(ch, ch, temb, dropout), AttnBlock(ch),
                                  ResBlock(ch, ch, temb, dropout)])
        for level in reversed(range(len(mults))):
            for _ in range(n_blocks[level] + 1):
                blocks, ch = level_blocks(ch + widths.pop(), level)
                self.up.append(blocks)
            if level > 0:  # upsample: nearest-neighbour resize, then a 3x3 conv (no checkerboard)
                self.up.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.head = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(ch, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.time_mlp(t) if self.time_mlp is not None else None
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, nn.Conv2d) else _blocks(layer, h, temb)
            skips.append(h)
        h = _blocks(self.mid, h, temb)
        for layer in self.up:
            if isinstance(layer, nn.Conv2d):
                h = layer(F.interpolate(h, size=skips[-1].shape[-2:], mode="nearest"))
            else:
                h = _blocks(layer, torch.cat([h, skips.pop()], dim=1), temb)
        out = self.head(h)
        return self.out_scale(out, t) if self.out_scale is not None else out


def _blocks(blocks, h, temb):
    for block in blocks:
        h = block(h, temb)
    return h


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_ema(model: nn.Module, decay: float, warmup: bool = True):
    """EMA of the weights (and buffers) via torch.optim.swa_utils.AveragedModel. With warmup the
    decay at update n is min(decay, (1 + n) / (10 + n)), so that short runs are not dominated by
    the random initialisation (as TensorFlow's ExponentialMovingAverage)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if not warmup:
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @torch.no_grad()
    def ema_update(ema_params, params, num_averaged):
        n = int(num_averaged)
        torch._foreach_lerp_(ema_params, params, 1 - min(decay, (1 + n) / (10 + n)))

    return AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)


# -- checkpoints ---------------------------------------------------------------------------------


def _write_atomic(path: Path, write: Callable) -> None:
    """write(file) into a unique temporary file beside path, then an atomic rename: a crash or a
    second run writing the same path never leaves half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, state: dict, script: str) -> None:
    """torch.save of state, marked as written by `script`, through _write_atomic."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, lambda f: torch.save({**state, "script": script}, f))


def load_checkpoint(path: Path, script: str, map_location="cpu") -> dict:
    """A checkpoint written by `script` (weights_only=True); anything else is one UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}; train first (without --sample-only), "
                        "or pass --out")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read the checkpoint {path} (truncated or corrupt: "
                        f"{type(err).__name__}); delete it and train again") from None
    writer = ckpt.get("script") if isinstance(ckpt, dict) else None
    if writer != script:
        by = f"by {writer}.py" if writer else "by another program or an older version"
        raise UserError(f"the checkpoint {path} was written {by}, not by {script}.py; "
                        "pass another --out")
    return ckpt


def load_state(obj, state, path: Path) -> None:
    """obj.load_state_dict(state) for a module or an optimizer; names or shapes that do not fit
    are one UserError."""
    if isinstance(obj, nn.Module):
        own = obj.state_dict()
        bad = sorted(own.keys() ^ state.keys()) + [k for k in own.keys() & state.keys()
                                                   if own[k].shape != state[k].shape]
        if bad:
            raise UserError(f"the checkpoint {path} does not fit the model ({len(bad)} tensors "
                            f"differ, e.g. {bad[0]}); pass another --out")
    try:
        obj.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"the checkpoint {path} does not fit ({type(err).__name__}); "
                        "pass another --out") from None


class Checkpointer:
    """Checkpoints that only ever hold verified state of a completed step. In the loop, begin(step)
    at the start of a step records the RNG state; verified(loss, step) checks the step's loss (the
    loss of the weights after `step` updates) and then, when due -- every `every` steps, every
    `seconds` of training, at the `last` step, or after Ctrl-C or SIGTERM -- calls save(step, rng)
    while weights, optimizer and EMA are still those the step began with. A signal is acted on
    there (within a step); a second one stops at once."""

    def __init__(self, save: Callable[[int, dict], None], every: int, where: Path,
                 seconds: float = 120.0):
        self.save, self.every, self.where, self.seconds = save, every, where, seconds
        self.signum, self.first, self.rng, self.old = None, None, None, {}

    def __enter__(self):
        self.t_saved = time.monotonic()
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, kind, err, tb):
        for s, handler in self.old.items():
            signal.signal(s, handler)
        if kind is None and self.signum is not None:
            raise self._stop(self.signum, f"after the last step; {self.where} holds it")

    def _stop(self, signum: int, what: str) -> Interrupted:
        return Interrupted(f"interrupted ({signal.Signals(signum).name}) {what}", 128 + signum)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise self._stop(signum, f"again: stopped at once; {self.where} holds the last "
                             "saved step")
        self.signum = signum

    def begin(self, step: int) -> None:
        self.first = step if self.first is None else self.first
        self.rng = rng_state()

    def verified(self, loss: torch.Tensor, step: int, last: bool = False) -> None:
        check_finite(loss, step)
        periodic = step > self.first and (step % self.every == 0
                                           or time.monotonic() - self.t_saved > self.seconds)
        if last or periodic or self.signum is not None:
            self.save(step, self.rng)
            self.t_saved = time.monotonic()
        if self.signum is not None:
            raise self._stop(self.signum, f"at step {step}: saved it in {self.where}; continue "
                             "with --resume")


# -- plotting ------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _to_unit(x: torch.Tensor, value_range) -> torch.Tensor:
    lo, hi = value_range
    return ((x.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)


def save_image_grid(x: torch.Tensor, path: Path, nrow: int = 10, value_range=(-1.0, 1.0)) -> None:
    """A grid of images (N, C, H, W) in value_range, written as PNG."""
    from torchvision.utils import save_image

    save_image(_to_unit(x, value_range), str(path), nrow=nrow, padding=2)


def _save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)


def plot_loss(losses: Sequence[float], path: Path, title: str = "training loss",
              smooth: int = 50) -> None:
    losses = np.asarray(losses, dtype=float)
    fig, ax = _plt().subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.3, lw=0.8, label="per step")
    if len(losses) >= smooth > 1:
        ax.plot(np.arange(smooth - 1, len(losses)),
                np.convolve(losses, np.ones(smooth) / smooth, "valid"), lw=1.5,
                label=f"mean of {smooth}")
    ax.set(xlabel="step", ylabel="loss", title=title)
    if losses.size and (losses > 0).all() and losses.max() / losses.min() > 30:
        ax.set_yscale("log")
    ax.legend()
    _save(fig, path)


def _points(ax, pts, truth, lim, title, size=2):
    if truth is not None:
        ax.scatter(truth[:, 0], truth[:, 1], s=size, c="0.75")
    ax.scatter(pts[:, 0], pts[:, 1], s=2, c="C0", alpha=0.6)
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
    if lim is not None:
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim))


def scatter_2d(panels: dict[str, np.ndarray], truth: np.ndarray | None, path: Path,
               lim: float | None = None) -> None:
    """One panel per sample set, each drawn over the ground truth in grey."""
    fig, axes = _plt().subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels.items()):
        _points(ax, pts, truth, lim, title)
    _save(fig, path)


def save_gif(path: Path, n_frames: int, draw: Callable, fps: int = 10, figsize=(4, 4)) -> None:
    """A GIF through matplotlib's PillowWriter; draw(ax, i) paints frame i on a cleared axis."""
    from matplotlib.animation import FuncAnimation, PillowWriter

    fig, ax = _plt().subplots(figsize=figsize)
    anim = FuncAnimation(fig, lambda i: (ax.clear(), draw(ax, i)), frames=n_frames)
    anim.save(str(path), writer=PillowWriter(fps=fps), dpi=80)
    _plt().close(fig)


def gif_points(path: Path, frames: Sequence[np.ndarray], titles: Sequence[str], truth=None,
               lim=None, fps=10):
    save_gif(path, len(frames), lambda ax, i: _points(ax, frames[i], truth, lim, titles[i], 1), fps)


def gif_images(path: Path, frames: Sequence[torch.Tensor], titles: Sequence[str], nrow=8,
               value_range=(-1, 1), fps=10):
    """frames: batches (N, C, H, W) of the same images at successive steps."""
    from torchvision.utils import make_grid

    grids = [make_grid(_to_unit(f, value_range), nrow=nrow).permute(1, 2, 0).numpy()
             for f in frames]

    def draw(ax, i):
        ax.imshow(grids[i], interpolation="nearest")
        ax.set_title(titles[i], fontsize=9)
        ax.axis("off")

    save_gif(path, len(frames), draw, fps)


# -- 2-D distribution distances ------------------------------------------------------------------


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, n_proj: int = 512, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point clouds: the root mean of the
    1-D W2^2 along random directions (1-D optimal transport sorts both sides)."""
    n = min(len(x), len(y))
    x, y = np.asarray(x[:n], float), np.asarray(y[:n], float)
    theta = np.random.default_rng(seed).normal(size=(x.shape[1], n_proj))
    theta /= np.linalg.norm(theta, axis=0, keepdims=True)
    px, py = np.sort(x @ theta, axis=0), np.sort(y @ theta, axis=0)
    return float(np.sqrt(np.mean((px - py) ** 2)))


def mmd_rbf(x: np.ndarray, y: np.ndarray, bandwidths: Sequence[float] = (0.1, 0.3, 1.0, 3.0),
            max_n: int = 2000) -> float:
    """Unbiased squared MMD with a sum of RBF kernels (Gretton et al. 2012); bandwidths are
    relative to the pooled data's std. Near 0 (either sign) for equal distributions."""
    x = torch.as_tensor(np.asarray(x[:max_n]), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y[:max_n]), dtype=torch.float64)
    scale = torch.cat([x, y]).std(0).mean()
    k = lambda a, b: sum(torch.exp(-torch.cdist(a, b).pow(2) / (2 * (h * scale) ** 2))
                         for h in bandwidths)

    def within(a):  # the mean of k over pairs of different points
        kaa = k(a, a)
        return (kaa.sum() - kaa.diagonal().sum()) / (len(a) * (len(a) - 1))

    return float(within(x) + within(y) - 2 * k(x, y).mean())


def distance_report(samples: np.ndarray, sample_truth: Callable[[int, int], np.ndarray],
                    repeats: int = 3, seed: int = 0) -> dict:
    """Distances of `samples` to fresh ground truth, beside the real-vs-real floor: the same
    distances between two independent truth samples of the same size. Means over repeats.
    sample_truth(n, seed) must return n fresh points."""
    n, found = len(samples), {"swd": [], "swd_floor": [], "mmd": [], "mmd_floor": []}
    for r in range(repeats):
        a, b = sample_truth(n, seed + 1000 + 2 * r), sample_truth(n, seed + 1001 + 2 * r)
        for key, x in (("", samples), ("_floor", b)):
            found["swd" + key].append(sliced_wasserstein(x, a, seed=r))
            found["mmd" + key].append(mmd_rbf(x, a))
    return {**{k: float(np.mean(v)) for k, v in found.items()}, "n": n}


# -- the digit judge: sample quality of the MNIST scripts ----------------------------------------

# The judge's recipe, fixed before it judged any sample; a change here retrains the cached judge.
JUDGE = dict(steps=1400, batch=128, outliers=32, lr=3e-3, width=16, features=64, shift=2, seed=0)


class JudgeNet(nn.Module):
    """A small CNN classifier: strided 3x3 convolutions 28 -> 14 -> 7 with widths w, 2w, 4w, then
    `features` hidden units (the penultimate features FID is computed in) and 10 logits."""

    def __init__(self, width: int = 16, features: int = 64):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Dropout(0.25), nn.Linear(4 * w * 49, features))
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.25), nn.Linear(features, 10))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, features) for images (N, 1, 28, 28) in [-1, 1]."""
        f = self.body(x)
        return self.head(f), f


def outlier_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """n images that are no class: uniform noise, half of it smoothed into blobs (3x3 to 7x7)."""
    x = torch.rand(n, 1, 28, 28, generator=generator) * 2 - 1
    k = 2 * int(torch.randint(1, 4, (1,), generator=generator)) + 1
    smooth = F.avg_pool2d(x[: n // 2], k, stride=1, padding=k // 2, count_include_pad=False)
    x[: n // 2] = smooth / smooth.abs().amax((1, 2, 3), keepdim=True)
    return x


def train_judge(images: torch.Tensor, labels: torch.Tensor, recipe: dict) -> JudgeNet:
    """Adam with a one-cycle rate on random shifts of up to `shift` pixels, images in [-1, 1];
    outlier exposure (Hendrycks et al. 2019): `outliers` noise images per batch are trained
    towards the uniform distribution over classes, so noise is not classified confidently."""
    gen = torch.Generator().manual_seed(recipe["seed"])
    torch.manual_seed(recipe["seed"])
    net, s = JudgeNet(recipe["width"], recipe["features"]), recipe["shift"]
    opt = torch.optim.Adam(net.parameters(), lr=recipe["lr"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe["lr"], total_steps=recipe["steps"])
    padded = F.pad(images, (s, s, s, s), value=-1.0)
    net.train()
    for _ in range(recipe["steps"]):
        idx = torch.randint(len(images), (recipe["batch"],), generator=gen)
        dy, dx = torch.randint(2 * s + 1, (2, len(idx), 1), generator=gen) + torch.arange(28)
        x = padded[idx[:, None, None], 0, dy[:, :, None], dx[:, None, :]].unsqueeze(1)
        logits = net(torch.cat([x, outlier_images(recipe["outliers"], gen)]))[0]
        loss = F.cross_entropy(logits[: len(idx)], labels[idx])
        loss = loss - logits[len(idx):].log_softmax(-1).mean() - math.log(10)  # CE to uniform
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
    """(N, 1, 28, 28) images in [-1, 1] and their labels, from torchvision's MNIST-style files."""
    ds = torchvision_dataset(name, root, train, transform=None)
    return ds.data[:, None].float().div(127.5).sub(1), ds.targets.long()


def load_judge(name: str, root: Path, quiet: bool = False) -> tuple[JudgeNet, dict, dict]:
    """The judge of dataset `name`, trained once on its training split and cached in root/judge
    (or ~/.cache/diffusion-from-scratch when root is read-only), keyed by the dataset, its size
    and JUDGE. Returns the network, its record (test accuracy, training seconds) and the data
    {"train": images, "test": images} it was keyed on."""
    import hashlib

    (train_x, train_y), (test_x, test_y) = (labelled_images(name, root, s) for s in (True, False))
    key = json.dumps([name, len(train_x), int(train_x.sum()), JUDGE], sort_keys=True)
    fname = f"judge-{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
    folders = [Path(root) / "judge", Path.home() / ".cache" / "diffusion-from-scratch"]
    data, net = {"train": train_x, "test": test_x}, JudgeNet(JUDGE["width"], JUDGE["features"])
    for path in (f / fname for f in folders if (f / fname).exists()):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(saved["model"])
        return net.eval(), saved["record"], data
    if not quiet:
        print(f"training the {name} judge once ({JUDGE['steps']} steps, about a minute on a CPU)")
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        net = train_judge(train_x, train_y, JUDGE)
    accuracy = (judge_outputs(net, test_x)[0].argmax(1) == test_y).double().mean()
    record = {"dataset": name, "train_images": len(train_x), "train_s": time.perf_counter() - t0,
              "test_accuracy": float(accuracy), **JUDGE}
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            save_checkpoint(folder / fname, {"model": net.state_dict(), "record": record}, "judge")
            break
        except OSError:
            continue
    return net, record, data


def judge_samples(samples: torch.Tensor, name: str, root: Path, seed: int = 0, draws: int = 5,
                  min_ratio: float = 2.0, quiet: bool = False) -> dict:
    """Judge n samples (N, 1, 28, 28) in [-1, 1] against the held-out test split of `name`:
    confident: share classified with probability > 0.9; class_shares of the 10 classes;
    fid: Frechet distance to all test images in the judge's features (depends on n: compare
    only at equal n). Floors beside them: real_confident of the test images, and real_fid, the
    mean (and std) over `draws` sets of n training images of their FID to the same test images.
    fid is None when n < min_ratio x features."""
    net, record, data = load_judge(name, root, quiet)
    n, (probs, feats) = len(samples), judge_outputs(net, samples)
    real_probs, real_feats = judge_outputs(net, data["test"])
    shares = torch.bincount(probs.argmax(1), minlength=10).double() / max(n, 1)
    out = {"n": n, "confident": float((probs.max(1).values > 0.9).double().mean()),
           "real_confident": float((real_probs.max(1).values > 0.9).double().mean()),
           "class_shares": [round(float(s), 4) for s in shares],
           "class_share_max_dev": float((shares - 0.1).abs().max()),
           "fid": None, "real_fid": None, "judge_test_accuracy": record["test_accuracy"]}
    if n < min_ratio * feats.shape[1]:
        out["fid_note"] = f"n = {n} is below {min_ratio:g} x {feats.shape[1]} features: no FID"
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
    return (f"judge on {j['n']} samples: {fid}, confident {j['confident']:.1%} (real "
            f"{j['real_confident']:.1%}), class shares within "
            f"{j['class_share_max_dev']:.3f} of 0.1")


def judge_file(argv: list[str] | None = None) -> dict:
    """`python common.py SAMPLES.pt [--dataset mnist] [--data-dir data]`: judge saved samples."""
    parser = argparse.ArgumentParser(description="judge saved samples (N, 1, 28, 28) in [-1, 1]")
    parser.add_argument("samples", type=Path)
    parser.add_argument("--dataset", choices=["mnist", "fashion-mnist"], default="mnist")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    args = parser.parse_args(argv)
    if not args.samples.is_file():
        raise UserError(f"no samples at {args.samples}")
    samples = torch.load(args.samples, map_location="cpu", weights_only=True)
    result = judge_samples(samples.float(), args.dataset, args.data_dir)
    print(judge_line(result))
    return result


# -- distributed data parallel (torchrun) --------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ddp_setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Read torchrun's environment and start the process group (NCCL on CUDA, gloo on CPU).
    A plain `python script.py` returns Dist() and the device unchanged."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local), device


@contextmanager
def all_ranks_agree(d: Dist, device: torch.device):
    """A UserError in the block on any rank becomes one on every rank (one all-reduce at its end),
    so that a bad flag or file seen by one process stops them all before training starts."""
    failed = None
    try:
        yield
    except UserError as err:
        failed = err
    if d.enabled:
        flag = torch.tensor([float(failed is not None)], device=device)
        torch.distributed.all_reduce(flag)
        if failed is None and flag.item() > 0:
            failed = UserError("stopped: another process failed (its message is above)")
    if failed is not None:
        raise failed


def ddp_param_divergence(model: nn.Module, d: Dist, device: torch.device) -> float:
    """Largest absolute difference of any parameter between rank 0 and the other ranks:
    0.0 when DistributedDataParallel kept the replicas in sync (0.0 without DDP)."""
    if not d.enabled:
        return 0.0
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()]).to(device)
    parts = [torch.empty_like(flat) for _ in range(d.world_size)]
    torch.distributed.all_gather(parts, flat)
    return float(max((p - parts[0]).abs().max().item() for p in parts))


def ddp_cleanup(d: Dist) -> None:
    """After training: every rank leaves the process group (the caller then lets only rank 0
    sample, evaluate and plot)."""
    if d.enabled:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    cli_entry(judge_file)
