"""Run a numbered script under torchrun, recording per rank what the tests compare:
    python -m torch.distributed.run ... tests/ddp_probe.py STEM [script flags]
writes $PROBE_DIR/noise<rank>.pt (a draw from the RNG right after run.restore, taken without
disturbing it) and $PROBE_DIR/model<rank>.pt (the trained weights, at run.finish)."""

import importlib.util
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

stem, probe = sys.argv.pop(1), Path(os.environ["PROBE_DIR"])
spec = importlib.util.spec_from_file_location(stem, ROOT / f"{stem}.py")
script = sys.modules[stem] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)
restore, finish = common.Run.restore, common.Run.finish


def probed_restore(self, **objects):
    restore(self, **objects)
    with torch.random.fork_rng(devices=[]):
        torch.save(torch.randn(4), probe / f"noise{self.rank}.pt")


def probed_finish(self):
    torch.save(self.objects["model"].state_dict(), probe / f"model{self.rank}.pt")
    return finish(self)


common.Run.restore, common.Run.finish = probed_restore, probed_finish
common.cli_entry(script.main)
