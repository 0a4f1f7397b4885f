"""The multi-node recipe of docs/usage.md on one machine: two `ray start` nodes of 1 CPU each, `train.py --address` on them.

The nodes live in a private RAY_TMPDIR with their own token and free ports, so that no other Ray instance on this
machine attaches to them (a plain `ray.init()` reads /tmp/ray/ray_current_cluster) and `ray stop` is never needed:
each node is one `ray start --block` process, ended by its pid.
"""
import csv
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import pytest

import prepare

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
BACKBONE = "stack:tu-mobilenetv3_small_050"  # the default family's member name
DEFAULT_ADDRESS_FILE = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"


def free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def read_if_exists(path):
    return path.read_text() if path.exists() else None


def start_node(command, env, log, started):
    """Start one `ray start --block` and wait until it says its node is up (the raylet registered with the GCS)."""
    process = subprocess.Popen([RAY, "start", "--block", "--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats",
                                "--dashboard-agent-listen-port", str(free_port()), *command],
                               env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    started.append(process)
    deadline = time.time() + 120
    while "Ray runtime started" not in log.read_text():
        assert process.poll() is None and time.time() < deadline, f"ray start {' '.join(command)}:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    return process


@pytest.fixture
def cluster(tmp_path):
    """A head and a worker node, 1 CPU each; yields (address, env for every process that talks to them)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    default_address_before = read_if_exists(DEFAULT_ADDRESS_FILE)
    started = []
    try:
        start_node(["--head", "--port", str(free_port()), "--ray-client-server-port", str(free_port()),
                    "--include-dashboard", "false"], env, tmp_path / "head.log", started)
        address = (ray_tmp / "ray" / "ray_current_cluster").read_text().strip()
        start_node(["--address", address], env, tmp_path / "worker.log", started)
        yield address, env
    finally:
        for process in reversed(started):  # workers first, then the head
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert read_if_exists(DEFAULT_ADDRESS_FILE) == default_address_before, "the test changed /tmp/ray's current cluster"


@pytest.fixture
def stores(synth_root, tmp_path):
    out = tmp_path / "stores"
    prepare.main(["--data", str(synth_root), "--out", str(out), "--ids", "1,2", "--tile-size", "64", "--stride", "32"])
    return out


def test_trials_run_on_both_nodes_of_a_two_node_cluster(cluster, stores, tmp_path):
    address, env = cluster
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--address", address, "--stores", str(stores), "--run", str(run),
         "--workers", "0", "--epochs", "1", "--max-tiles", "16", "--batch-size", "8", "--tile-size", "64", "--stride", "32",
         "--no-tta", "--no-triplets", "--no-dashboard"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "each gets 1 CPUs" in result.stdout  # 2 trials, 2 one-CPU nodes: one trial fits on each node

    node_ids = {}  # each finished trial records the node it ran on
    for result_file in (run / "trials" / BACKBONE).glob("fold-*.json"):
        trial = json.loads(result_file.read_text())
        node_ids[trial["fold"]] = trial["node_id"]
    assert sorted(node_ids) == ["1", "2"]
    assert len(set(node_ids.values())) == 2, f"both trials ran on one node: {node_ids}"

    rows = list(csv.DictReader(open(run / "summary.csv")))
    assert [(r["backbone"], r["fold"]) for r in rows] == [(BACKBONE, "1"), (BACKBONE, "2")]
    for fold in ("1", "2"):
        with h5py.File(run / "oof" / BACKBONE / f"{fold}.h5", "r") as h5:
            assert h5.attrs["fragment_id"] == fold and 0 <= h5["prob"][()].min() <= h5["prob"][()].max() <= 1
        assert (run / "models" / BACKBONE / f"fold-{fold}.pt").stat().st_size > 0
