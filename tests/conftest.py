"""Shared test fixtures. Nothing here touches the network: weights default to None and the HF hub is offline."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """One small synthetic dataset (lib.synth, size 256, seed 0, 65 slices, easy) shared by the session. Read only:
    copy a fragment into tmp_path before changing anything."""
    from lib.synth import generate

    return generate(tmp_path_factory.mktemp("synth") / "synth", size=256, seed=0, progress=False, difficulty="easy")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: tiny models on a 2-core machine shared with other work run many times
    slower when two OpenMP threads spin against each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
