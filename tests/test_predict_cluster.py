"""submit.py's bands as Ray tasks on the two-node local cluster of tests/test_cluster.py (a head and a worker node,
1 CPU each): the outputs equal the single-process run's exactly, and a band whose worker is killed is retried."""
import shutil
import subprocess
import sys
import time

import cv2
import numpy as np
import psutil
import pytest
import tifffile
import zarr

import submit
from lib.fragments import Fragment
from lib.store import write_store
from test_cluster import ROOT, cluster  # noqa: F401 - the fixture

pytestmark = [pytest.mark.slow, pytest.mark.ray]

HEIGHT, WIDTH = 1100, 96  # three bands of 512 rows (lib.bands): tiles cross two band edges


def tall_fragment(root):
    """A 1100 x 96 test fragment of random 8-bit slices, papyrus all over but a notch."""
    folder = root / "test" / "tall"
    (folder / "surface_volume").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for z in range(40):
        tifffile.imwrite(folder / "surface_volume" / f"{z:02d}.tif",
                         rng.integers(60 + 3 * z, 120 + 3 * z, (HEIGHT, WIDTH), dtype=np.uint8))
    mask = np.full((HEIGHT, WIDTH), 255, np.uint8)
    mask[300:700, :40] = 0
    cv2.imwrite(str(folder / "mask.png"), mask)
    return Fragment.open(root, "test", "tall")


def submit_args(run, stores, out):
    return ["--run", str(run), "--stores", str(stores), "--out", str(out), "--zarr", str(out.parent / "pred"),
            "--no-tta", "--threads", "1", "--batch-size", "3", "--band-rows", "512"]


def kill_first_band_task(ray_tmp, process, deadline=120):
    """SIGKILL the first Ray worker of this cluster (its RAY_TMPDIR) seen running a band; its pid, or None."""
    end = time.time() + deadline
    while process.poll() is None and time.time() < end:
        for worker in psutil.process_iter(["cmdline"]):
            try:
                if "ray::run_job" in " ".join(worker.info["cmdline"] or []) and \
                        worker.environ().get("RAY_TMPDIR") == ray_tmp:
                    worker.kill()
                    return worker.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.05)
    return None


def test_bands_on_two_nodes_equal_one_process_and_survive_a_killed_worker(cluster, tiny, tmp_path, capsys,  # noqa: F811
                                                                          one_thread):
    address, env = cluster
    run, stores = tmp_path / "run", tmp_path / "stores"
    shutil.copytree(tiny["run"] / "models", run / "models")
    shutil.copy(tiny["run"] / "ensemble.json", run / "ensemble.json")
    write_store(tall_fragment(tmp_path / "data"), stores / "test" / "tall.h5", tile_size=64, stride=32, progress=False)

    submit.main(submit_args(run, stores, tmp_path / "alone" / "sub.csv"))  # here, one torch thread (one_thread)
    assert "tall: band 3/3" in capsys.readouterr().out

    spread = subprocess.Popen([sys.executable, str(ROOT / "submit.py"), *submit_args(run, stores, tmp_path / "spread" /
                              "sub.csv"), "--address", address], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    killed = kill_first_band_task(env["RAY_TMPDIR"], spread)
    printed = spread.communicate(timeout=600)[0]
    assert spread.returncode == 0, printed[-3000:]
    assert killed is not None, "no band task was seen running"
    assert "bands in Ray at" in printed and "tall: band 3/3" in printed

    assert (tmp_path / "spread" / "sub.csv").read_text() == (tmp_path / "alone" / "sub.csv").read_text()
    alone_map, spread_map = (zarr.open_array(tmp_path / d / "pred" / "tall_prediction.zarr")[...]
                             for d in ("alone", "spread"))
    assert alone_map.shape == (HEIGHT, WIDTH) and alone_map.any() and not alone_map[300:700, :40].any()
    np.testing.assert_array_equal(spread_map, alone_map)
