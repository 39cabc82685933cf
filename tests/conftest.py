import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_CIFAR10 = ROOT.parent / "shared" / "datasets" / "cifar10"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # decoded-dataset caches go to a per-session temp dir unless a test sets its own
    monkeypatch.setenv("MIMBENCH_CACHE", os.environ.get("MIMBENCH_TEST_CACHE",
                                                        str(tmp_path_factory.getbasetemp() / "cache")))
    torch.manual_seed(0)


def micro_overrides(**extra):
    """A micro ViT at 16 px (4x4 patch grid): the smallest real model the methods run."""
    return {"encoder": {"size": "micro", "img_size": 16, "patch_size": 4}, **extra}


def kill_at_step(monkeypatch, source_class, step: int) -> None:
    """Make `source_class.batch_for_step` raise KeyboardInterrupt at `step`, as a kill would stop
    a training there (`monkeypatch.undo()` lets the same command resume)."""
    read = source_class.batch_for_step

    def killed(self, at):
        if at == step:
            raise KeyboardInterrupt("killed")
        return read(self, at)

    monkeypatch.setattr(source_class, "batch_for_step", killed)
