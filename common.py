"""The small shared kit of the numbered scripts: the run kit (flags from Config, presets, the
resume rule, device and seeds, atomic checkpoints, Ctrl-C, torchrun, the --minutes budget,
one-line errors), U-Net blocks, EMA, plotting and 2-D distances. Nothing method-specific.

A script that trains uses the run kit in a few calls, in this order:

    run = common.Run(argv, __doc__, Config, PRESETS, FREE, STEM)  # flags, --out, config, seeds
    model, ema, opt = ...                         # built from run.cfg on run.device
    run.restore(model=model, ema=ema, optimizer=opt)  # load OUT/ckpt.pt on --resume/--sample-only
    run.budget(loss_fn, model, opt)               # --minutes: fixes run.cfg.steps of a new run
    for step in run.steps():                      # run.step .. cfg.steps - 1, then the last save
        loss = ...                                # the paper's training step ...
        run.log(loss)                             # finite check, progress, checkpoint when due
        ...                                       # ... backward, optimizer step, EMA
    if not run.finish(): return {}                # under torchrun only rank 0 evaluates
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
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, fields
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


def cli_entry(main: Callable) -> None:
    """Run main(None) from the shell: a UserError is one line and exit code 2. Under torchrun a
    failing rank leaves at once (no barrier, no hang) and torchrun ends the others."""
    distributed = lambda: torch.distributed.is_available() and torch.distributed.is_initialized()
    prefix = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
    try:
        main(None)
        code = 0
    except KeyboardInterrupt as err:
        print(str(err) if isinstance(err, Interrupted) else "interrupted", file=sys.stderr)
        code = getattr(err, "code", 130)
    except Exception as err:  # a UserError, or the judge's JudgeError (user_error = True)
        if isinstance(err, UserError) or getattr(err, "user_error", False):
            print(f"error: {prefix}{err}", file=sys.stderr)
            code = 2
        elif not distributed():
            raise
        else:  # under torchrun: say why, then leave without waiting for the others
            import traceback

            if isinstance(err, torch.distributed.DistError):
                print(f"error: {prefix}stopped: another process ended", file=sys.stderr)
            else:
                traceback.print_exc()
            code = 1
    if distributed():  # skip the exit-time teardown, which would wait for the other ranks
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def check_finite(x: torch.Tensor, step: int | None, what: str = "the loss",
                 hint: str = "try a lower --lr") -> None:
    if not torch.isfinite(x).all():
        bad = x[~torch.isfinite(x)].flatten()[0].item()
        raise UserError(f"{what} became {bad}{'' if step is None else f' at step {step}'}; {hint}")


def check(ok: bool, flag: str, allowed: str) -> None:
    """For Config.__post_init__: one UserError naming the flag and what it accepts."""
    if not ok:
        raise UserError(f"--{flag.replace('_', '-')} must be {allowed}")


def check_unet(cfg) -> None:
    """The U-Net fields of a Config (base, mults, num_res_blocks, attn_levels, dropout)."""
    ints = lambda v: isinstance(v, tuple) and all(isinstance(i, int) for i in v)
    check(isinstance(cfg.base, int) and cfg.base >= 2 and cfg.base % 2 == 0, "base",
          "an even width of at least 2")
    check(ints(cfg.mults) and len(cfg.mults) >= 1 and min(cfg.mults) >= 1, "mults",
          "a tuple of multipliers >= 1, e.g. 1,2,2")
    blocks = cfg.num_res_blocks
    check((isinstance(blocks, int) and blocks >= 1) or (ints(blocks) and len(blocks) == len(
        cfg.mults) and min(blocks) >= 1), "num_res_blocks", "a count >= 1 or one per level")
    check(ints(cfg.attn_levels) and all(0 <= i < len(cfg.mults) for i in cfg.attn_levels),
          "attn_levels", f"a tuple of levels in 0..{len(cfg.mults) - 1}, e.g. 1, (or ())")
    check(0 <= cfg.dropout < 1, "dropout", "in [0, 1)")


# -- a run's settings: Config -> flags, presets, the resume rule --------------------------------


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
    if not 0 <= (value := int(text)) < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2^32 - 1, got {text}")
    return value


def parse_args(argv, doc: str, config_cls, presets: dict, script: str, image: bool = False,
               trains: bool = True):
    """The shared flags (--resume and --sample-only if the script `trains`), then one flag per
    Config field, its help the field's comment with Config's and the presets' values."""
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


def make_config(config_cls, values: dict):
    """Config(**values), lists back to tuples; Config.__post_init__ checks the values."""
    tuples = lambda v: tuple(map(tuples, v)) if isinstance(v, (list, tuple)) else v
    names = {f.name for f in fields(config_cls)}
    return config_cls(**{k: tuples(v) for k, v in values.items() if k in names})


def run_config(args, config_cls, presets: dict, script: str, free: Sequence[str],
               device: torch.device, quiet: bool = False):
    """(preset, config, checkpoint or None). A new run: the preset (default gpu on CUDA, else
    cpu, announced), then the flags given. With --resume or --sample-only the checkpoint decides:
    a flag may differ only if in `free` (after training, how to run), or be --steps extending a
    --resume."""
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
    """bf16 on native kernels: a CPU with AVX-512 or AMX, or a CUDA GPU with bf16 units. On an
    AVX2-only CPU bf16 is emulated, about 10x slower than fp32."""
    if device.type == "cpu":
        return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "AVX2")
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def _precision(cfg, given: dict, device: torch.device, quiet: bool):
    """bf16 from a preset or a checkpoint (not --bf16) runs in fp32 where bf16 is slow."""
    if getattr(cfg, "bf16", False) and "bf16" not in given and not bf16_is_fast(device):
        cfg.bf16 = False
        if not quiet:
            print(f"no bf16 kernels on this {device.type}: fp32 instead (--bf16 forces bf16)")
    return cfg


# -- devices, seeds, files -------------------------------------------------------------------


def get_device(name: str = "auto") -> torch.device:
    if name == "auto":
        mps = torch.backends.mps.is_available()
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unsupported --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    ok = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not ok[device.type]:
        raise UserError(f"--device {name} was asked for but {device.type.upper()} is not "
                        "available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """All RNG states as tensors and ints, so a checkpoint loads with weights_only=True."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
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
    """bf16 autocast on CPU and CUDA; a no-op when disabled or on MPS."""
    on = enabled and device.type in ("cpu", "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else nullcontext()


@contextmanager
def one_thread():
    """torch on one thread inside the block: fastest for 2-D work on a few thousand points."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def network_fn(ema, device: torch.device, bf16: bool) -> Callable:
    """The EMA network in eval mode as net(x, t, ...) -> float32, under bf16 autocast if asked."""
    net = ema.module.eval()

    def fn(*inputs):
        with autocast(device, bf16):
            return net(*inputs).float()

    return fn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, default=float) + "\n"
    _write_atomic(path, lambda f: f.write(text.encode()))


def prepare_out(out: Path) -> Path:
    """Create the output folder and check that it takes files, before any work is done."""
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a folder; pass a folder")
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise UserError(f"cannot write to --out {out}: {err.strerror or err}") from None
    return out


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
        if raw.is_dir() and any(p.name.endswith("ubyte") for p in raw.iterdir()):
            raise UserError(f"cannot read {cls.__name__} from the files in {raw} "
                            f"({type(err).__name__}: {str(err)[:120]}); they may be truncated or "
                            "corrupt: replace them, or delete them to download again") from None
        raise UserError(f"could not load or download {cls.__name__} ({type(err).__name__}); put "
                        f"the dataset's files in {raw} (for MNIST-style data: the four IDX files, "
                        "e.g. train-images-idx3-ubyte) or pass --data-dir") from None


# -- checkpoints ---------------------------------------------------------------------------------


def _write_atomic(path: Path, write: Callable) -> None:
    """write(file) into a unique temporary file beside path, then an atomic rename."""
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
    """torch.save of state, marked as written by `script`, atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, lambda f: torch.save({**state, "script": script}, f))


def load_checkpoint(path: Path, script: str) -> dict:
    """A checkpoint written by `script` (weights_only=True, on the CPU); else one UserError."""
    try:
        found = Path(path).is_file()
    except OSError:  # e.g. a name longer than the file system allows
        found = False
    if not found:
        raise UserError(f"no checkpoint at {path}; train first (without --sample-only), "
                        "or pass --out")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
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
    """obj.load_state_dict(state), a module's or an optimizer's; a misfit is one UserError."""
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


# -- the run protocol: one training run, new or resumed, on one process or under torchrun --------


class Run:
    """One run of a script that trains: flags, device, torchrun, --out and the config (a new
    run's from preset and flags, a resumed one's from OUT/ckpt.pt, see `run_config`). Checkpoints
    hold what `restore` was given, step, config, preset, seed, losses, rng_state and `extra`;
    rank 0 writes them atomically every `every` steps or 2 minutes, on Ctrl-C or SIGTERM and
    after the last step, never with weights whose loss was not finite."""

    def __init__(self, argv, doc: str, config_cls, presets: dict, free: Sequence[str],
                 script: str, image: bool = False):
        self.args = args = parse_args(argv, doc, config_cls, presets, script, image)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.world_size = int(os.environ.get("RANK", "0")), world
        self.is_main, self.device = self.rank == 0, get_device(args.device)
        if world > 1:  # torchrun: one process per device (NCCL) or per CPU share (gloo)
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.script, self.out, self.path = script, args.out, args.out / "ckpt.pt"
        self.preset, self.cfg, self.ckpt = run_config(args, config_cls, presets, script, free,
                                                      self.device, quiet=not self.is_main)
        prepare_out(args.out)  # after the settings were checked: a bad flag writes nothing
        self.seed, self.step, self.losses, self.extra, self.objects = args.seed, 0, [], {}, {}
        self.trained, self._wrote_config, self.signum = None, False, None
        seed_everything(self.seed + self.rank)

    @property
    def trains(self) -> bool:
        """Whether this call trains: not --sample-only, and steps left to take."""
        return not self.args.sample_only and self.step < self.cfg.steps

    def restore(self, **objects) -> None:
        """What the checkpoints hold (model=, ema=, optimizer=); on --resume or --sample-only
        they, the step, losses and RNG state are loaded from OUT/ckpt.pt, and under torchrun
        every rank then draws its own random stream."""
        self.objects = objects
        if self.ckpt is None:
            return
        if missing := {*objects, "losses", "rng_state"} - self.ckpt.keys():
            raise UserError(f"{self.path} has no {', '.join(sorted(missing))} (an older version "
                            "wrote it); pass another --out")
        for key, obj in objects.items():
            load_state(obj, self.ckpt[key], self.path)
        self.step, self.losses = self.ckpt["step"], list(self.ckpt["losses"])
        set_rng_state(self.ckpt["rng_state"])
        if self.world_size > 1:
            seed_everything(self.seed + 1000 * self.step + self.rank)

    def budget(self, loss_fn: Callable[[nn.Module], torch.Tensor], model, opt,
               probe: int = 20) -> None:
        """--minutes > 0 on a new run: cfg.steps becomes the steps that fit, from `probe` timed
        steps on throwaway copies (model, optimiser and RNG untouched; clipping, EMA and data
        add a few percent). All ranks take the smallest count; a resume keeps it."""
        import copy

        minutes = getattr(self.cfg, "minutes", 0)
        if self.ckpt is not None or not minutes or not self.trains:
            return
        net, state, times = copy.deepcopy(model), rng_state(), []
        opt2 = type(opt)(net.parameters(), **opt.defaults)
        for _ in range(probe + 2):
            t0 = time.perf_counter()
            opt2.zero_grad()
            loss_fn(net).backward()
            opt2.step()
            torch.cuda.synchronize() if self.device.type == "cuda" else None
            times.append(time.perf_counter() - t0)
        set_rng_state(state)
        per_step = float(np.median(times[2:]))
        steps = torch.tensor([max(1, int(minutes * 60 / per_step))], device=self.device)
        if self.world_size > 1:
            torch.distributed.all_reduce(steps, torch.distributed.ReduceOp.MIN)
        self.cfg.steps = int(steps.item())
        self.print(f"--minutes {minutes:g}: {per_step:.3f} s per training step here, so "
                   f"{self.cfg.steps} steps (kept on --resume; --steps N for an exact run)")

    def ddp(self, model: nn.Module) -> nn.Module:
        """The model in DistributedDataParallel under torchrun, else itself."""
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def batches(self, n: int, batch_size: int):
        """Endless batches of indices into n items: each epoch a new shuffle (fixed by seed and
        epoch) cut in one share per process, continuing from this run's step."""
        sampler = torch.utils.data.DistributedSampler(range(n), self.world_size, self.rank,
                                                      shuffle=True, seed=self.seed, drop_last=True)
        if (per_epoch := len(sampler) // batch_size) == 0:
            raise UserError(f"{n} training images are fewer than one batch per process; "
                            "lower --batch-size")
        epoch, skip = divmod(self.step, per_epoch)
        while True:
            sampler.set_epoch(epoch)
            idx = torch.tensor(list(sampler))
            for i in range(skip, per_epoch):
                yield idx[i * batch_size:(i + 1) * batch_size]
            epoch, skip = epoch + 1, 0

    def steps(self, every: int = 1000, seconds: float = 120.0):
        """Steps self.step .. cfg.steps - 1, each of whose bodies calls `log(loss)` once; then
        the final state is saved, its weights checked finite. Sets self.trained (metrics)."""
        from tqdm import tqdm

        self._write_config()
        start, t0, self.every, self.seconds = self.step, time.perf_counter(), every, seconds
        self.bar = tqdm(total=self.cfg.steps, initial=start, disable=not self.is_main,
                        desc="train", mininterval=2)
        self.first, self.t_saved = start, time.monotonic()
        self._signals(True)
        try:
            while self.step < self.cfg.steps:
                self.rng = rng_state()
                yield self.step
                self.step += 1
                self.bar.update(1)
            top = [p.detach().abs().max().float() for p in self.objects["model"].parameters()]
            check_finite(torch.stack(top), self.step, "the weights")
            self.rng = rng_state()
            self.save()
        finally:
            self._signals(False)
            self.bar.close()
        wall, done, last = time.perf_counter() - t0, self.step - start, self.losses[-100:]
        self.trained = {"steps": self.step, "steps_this_run": done, "wall_s": wall,
                        "steps_per_s": done / wall, "final_loss": sum(last) / max(1, len(last))}

    def log(self, loss: torch.Tensor) -> None:
        """The loss of the weights after `step` updates: checked finite, shown, and when due (or
        after Ctrl-C or SIGTERM) those weights are saved, before the step updates them."""
        if not torch.isfinite(loss).all():
            self._signals(False)
            check_finite(loss, self.step)
        self.losses.append(loss.item())
        if self.step % 50 == 0:
            self.bar.set_postfix(loss=f"{np.mean(self.losses[-100:]):.4f}")
        due = self.step > self.first and (self.step % self.every == 0
                                          or time.monotonic() - self.t_saved > self.seconds)
        if due or self.signum is not None:
            self.save()
        if self.signum is not None:
            self._signals(False)
            raise self._stopped(self.signum, f"at step {self.step}: saved it in {self.path}; "
                                "continue with --resume")

    def save(self) -> None:
        """OUT/ckpt.pt of the current step (rank 0), with the RNG state the step began with."""
        self.t_saved = time.monotonic()
        if self.is_main:
            state = {k: obj.state_dict() for k, obj in self.objects.items()}
            save_checkpoint(self.path, dict(
                state, step=self.step, config=asdict(self.cfg), preset=self.preset, seed=self.seed,
                losses=self.losses[:self.step], rng_state=self.rng, **self.extra), self.script)

    def finish(self) -> bool:
        """After training: config.json if not yet written, every rank leaves the process group.
        True on the one rank that goes on to evaluate."""
        self._write_config()
        if self.world_size > 1:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return self.is_main

    def print(self, *text) -> None:
        if self.is_main:
            print(*text)

    def _write_config(self) -> None:
        if self.is_main and not self._wrote_config:
            write_json(self.out / "config.json", asdict(self.cfg))
        self._wrote_config = True

    def _signals(self, on: bool) -> None:
        """Ctrl-C and SIGTERM set a flag acted on in `log`; a second one stops at once."""
        if threading.current_thread() is threading.main_thread():
            for s, handler in getattr(self, "_old", {}).items():
                signal.signal(s, handler)
            self._old = {s: signal.signal(s, self._handle)
                         for s in (signal.SIGINT, signal.SIGTERM)} if on else {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            self._signals(False)
            raise self._stopped(signum, f"again: stopped at once; {self.path} holds the last "
                                "saved step")
        self.signum = signum

    def _stopped(self, signum: int, what: str) -> Interrupted:
        return Interrupted(f"interrupted ({signal.Signals(signum).name}) {what}", 128 + signum)


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
    (default: base); out_scale(out, t): applied to the output, e.g. dividing by sigma(t);
    num_classes: a label embedding added to the time embedding, label num_classes meaning "no
    label" (for classifier-free guidance, Ho & Salimans 2022)."""

    def __init__(self, channels: int = 1, base: int = 32, mults: Sequence[int] = (1, 2, 2),
                 num_res_blocks: int | Sequence[int] = 1, attn_levels: Sequence[int] = (2,),
                 dropout: float = 0.1, time_emb: str | None = "sinusoidal",
                 fourier_scale: float = 16.0, out_scale: Callable | None = None,
                 embed_dim: int | None = None, num_classes: int = 0):
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
        self.num_classes = num_classes
        self.label_emb = nn.Embedding(num_classes + 1, temb) if num_classes and temb else None

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None,
                y: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.time_mlp(t) if self.time_mlp is not None else None
        if self.label_emb is not None:  # y = None: unconditional, the "no label" embedding
            y = torch.full_like(t, self.num_classes, dtype=torch.long) if y is None else y
            temb = temb + self.label_emb(y)
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


def make_ema(model: nn.Module, decay: float, warmup: bool = True):
    """EMA of the weights and buffers (torch.optim.swa_utils.AveragedModel). With warmup the
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


# -- plotting ------------------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no window)."""
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


def save_figure(fig, path) -> None:
    """tight_layout, savefig at 120 dpi, close."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def plot_loss(losses: Sequence[float], path: Path, title: str = "training loss",
              smooth: int = 50) -> None:
    losses = np.asarray(losses, dtype=float)
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.3, lw=0.8, label="per step")
    if len(losses) >= smooth > 1:
        ax.plot(np.arange(smooth - 1, len(losses)),
                np.convolve(losses, np.ones(smooth) / smooth, "valid"), lw=1.5,
                label=f"mean of {smooth}")
    ax.set(xlabel="step", ylabel="loss", title=title)
    if losses.size and (losses > 0).all() and losses.max() / losses.min() > 30:
        ax.set_yscale("log")
    ax.legend()
    save_figure(fig, path)


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
    fig, axes = pyplot().subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    for ax, (title, pts) in zip(axes[0], panels.items()):
        _points(ax, pts, truth, lim, title)
    save_figure(fig, path)


def save_gif(path: Path, n_frames: int, draw: Callable, fps: int = 10, figsize=(4, 4)) -> None:
    """A GIF through matplotlib's PillowWriter; draw(ax, i) paints frame i on a cleared axis."""
    from matplotlib.animation import FuncAnimation, PillowWriter

    fig, ax = pyplot().subplots(figsize=figsize)
    anim = FuncAnimation(fig, lambda i: (ax.clear(), draw(ax, i)), frames=n_frames)
    anim.save(str(path), writer=PillowWriter(fps=fps), dpi=80)
    pyplot().close(fig)


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
