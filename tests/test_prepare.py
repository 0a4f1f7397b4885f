"""prepare.py as a command: exact stores, skipping unchanged stores, atomic writes under SIGKILL and
failure, and one-line errors on bad input with nothing written."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from lib.store import Store

ROOT = Path(__file__).resolve().parents[1]
PREPARE = ROOT / "prepare.py"
FRAGMENTS = {"1": "train", "2": "train", "3": "train", "a": "test", "b": "test"}

# prepare.main with a slowed slice reader and 56-row bands, so a run lasts a few seconds and can be
# killed mid-write.
SLOW_PREPARE = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    import lib.store, lib.fragments, prepare
    lib.store.BAND_BYTES = 1
    read_band = lib.fragments.Fragment.read_band
    def slow_read_band(self, z, y0, y1, out=None):
        time.sleep(float(os.environ.get("READ_DELAY", 0.01)))
        return read_band(self, z, y0, y1, out)
    lib.fragments.Fragment.read_band = slow_read_band
    prepare.main(sys.argv[1:] + ["--reverse", "none"])  # no depth profile: its row reads would be slowed too
""").format(root=str(ROOT))


def store_lines(stdout):
    """prepare.py's output without its lines on which way each fragment's depth runs."""
    return [line for line in stdout.splitlines() if ": depth " not in line and "which way its depth runs" not in line]


def prepare_here(*args):
    """prepare.main in this process (saves the ~1 s of imports a subprocess costs): (exit code, stdout, stderr).
    `sys.exit("error: ...")` would print its message as the process's only stderr line; it is returned as stderr."""
    import contextlib
    import io

    import prepare

    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            prepare.main([str(a) for a in args])
        except SystemExit as exit_:
            code = exit_.code
    if isinstance(code, str):
        return 1, stdout.getvalue(), stderr.getvalue() + code + "\n"
    return code or 0, stdout.getvalue(), stderr.getvalue()


def run_prepare(*args):
    return subprocess.run([sys.executable, str(PREPARE)] + [str(a) for a in args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def data_root(synth_root):
    """conftest's shared synthetic dataset (size 256, seed 0): read only."""
    return Path(synth_root)


def copy_fragments(data_root, dest, ids):
    for fid in ids:
        shutil.copytree(data_root / FRAGMENTS[fid] / fid, dest / FRAGMENTS[fid] / fid)
    return dest


def make_fragment(root, split, fid, shape=(40, 52), num_slices=42, seed=0):
    """A tiny valid fragment: random slices, an elliptic mask (and labels, IR for train)."""
    folder = Path(root) / split / fid
    (folder / "surface_volume").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 < 1
    for z in range(num_slices):
        tifffile.imwrite(folder / "surface_volume" / f"{z:02d}.tif",
                         (rng.integers(1, 30000, shape) * mask).astype(np.uint16))
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "mask.png")
    if split == "train":
        Image.fromarray(((rng.random(shape) < 0.2) & mask).astype(np.uint8) * 255).save(folder / "inklabels.png")
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / "ir.png")
    return folder


@pytest.fixture
def tiny_root(tmp_path):
    root = tmp_path / "data"
    make_fragment(root, "train", "1", seed=1)
    make_fragment(root, "test", "a", shape=(45, 38), seed=2)
    return root


def tiff_volume(folder, z_range):
    return np.stack([tifffile.imread(folder / "surface_volume" / f"{z:02d}.tif") for z in range(*z_range)])


def assert_store_exact(store_path, fragment_folder, z_range):
    with h5py.File(store_path, "r") as h5:
        np.testing.assert_array_equal(h5["volume"][()], tiff_volume(fragment_folder, z_range))
        assert (h5.attrs["z_start"], h5.attrs["z_stop"]) == z_range
        mask = np.asarray(Image.open(fragment_folder / "mask.png")) != 0
        np.testing.assert_array_equal(h5["mask"][()], mask.astype(np.uint8))
        if (fragment_folder / "inklabels.png").is_file():
            labels = np.asarray(Image.open(fragment_folder / "inklabels.png")) != 0
            np.testing.assert_array_equal(h5["labels"][()], labels.astype(np.uint8))
        else:
            assert "labels" not in h5
        assert "ir" not in h5


def stamp(path):
    st = os.stat(path)
    return st.st_mtime_ns, st.st_ino


# ---------------------------------------------------------------- round trip


def test_prepare_round_trip_default_and_full_range(data_root, tmp_path):
    out = tmp_path / "out"
    result = run_prepare("--data", data_root, "--out", out)
    assert result.returncode == 0, result.stderr
    found, *lines = result.stdout.strip().splitlines()
    assert found == f"{data_root}: 3 train and 2 test fragments; preparing 5"
    depth, lines = lines[:5], lines[5:]  # which way each fragment's depth runs, then its store
    assert all(": depth papyrus below, air above: upright" in line for line in depth)
    assert len(lines) == 5 and all("slices 24:40" in line for line in lines)
    for fid, split in FRAGMENTS.items():
        assert_store_exact(out / split / f"{fid}.h5", data_root / split / fid, (24, 40))
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == sorted(f"{f}.h5" for f in FRAGMENTS) + ["prepared.json"]
    manifest = json.loads((out / "prepared.json").read_text())
    assert sorted(manifest["stores"]) == sorted(str(p.relative_to(out)) for p in out.rglob("*.h5"))

    full = tmp_path / "full"
    result = run_prepare("--data", data_root, "--out", full, "--ids", "2,b", "--z-range", "0:65")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{data_root}: 3 train and 2 test fragments; preparing 2\n")
    assert sorted(str(p.relative_to(full)) for p in full.rglob("*.h5")) == ["test/b.h5", "train/2.h5"]
    for fid in ("2", "b"):
        assert_store_exact(full / FRAGMENTS[fid] / f"{fid}.h5", data_root / FRAGMENTS[fid] / fid, (0, 65))
    store = Store(full / "test" / "b.h5")
    assert store.slices == range(0, 65) and not store.has_labels


# ---------------------------------------------------------------- skipping and rebuilding


def test_skip_force_touch_and_z_range(tiny_root, tmp_path):
    out = tmp_path / "out"
    train, test = out / "train" / "1.h5", out / "test" / "a.h5"
    first_run = run_prepare("--data", tiny_root, "--out", out)  # one real command line; the rest in-process
    assert first_run.returncode == 0, first_run.stderr
    first = {p: stamp(p) for p in (train, test)}

    code, stdout, _ = prepare_here("--data", tiny_root, "--out", out)
    assert code == 0 and stdout.count("up to date") == 2, stdout
    assert {p: stamp(p) for p in (train, test)} == first

    code, stdout, _ = prepare_here("--data", tiny_root, "--out", out, "--force")
    assert code == 0 and "up to date" not in stdout
    assert all(stamp(p)[0] != first[p][0] and stamp(p)[1] != first[p][1] for p in (train, test))
    assert_store_exact(train, tiny_root / "train" / "1", (24, 40))

    before = {p: stamp(p) for p in (train, test)}
    slice_path = tiny_root / "test" / "a" / "surface_volume" / "30.tif"
    st = os.stat(slice_path)
    os.utime(slice_path, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))
    code, stdout, _ = prepare_here("--data", tiny_root, "--out", out)
    assert code == 0
    assert "train/1: up to date" in stdout and "test/a: up to date" not in stdout
    assert stamp(train) == before[train] and stamp(test) != before[test]

    before = {p: stamp(p) for p in (train, test)}
    code, stdout, _ = prepare_here("--data", tiny_root, "--out", out, "--z-range", "20:41")
    assert code == 0 and "up to date" not in stdout
    assert all(stamp(p) != before[p] for p in (train, test))
    assert_store_exact(test, tiny_root / "test" / "a", (20, 41))
    code, stdout, _ = prepare_here("--data", tiny_root, "--out", out, "--z-range", "20:41")
    assert stdout.count("up to date") == 2

    code, stdout, _ = prepare_here("--data", tiny_root, "--out", out, "--z-range", "20:41", "--tile-size", "32", "--stride", "16")
    assert code == 0 and "up to date" not in stdout
    assert (Store(train).tile_size, Store(train).stride) == (32, 16)


# ---------------------------------------------------------------- atomic writes


def kill_when_writing(args, tmp_file):
    """Start a slowed prepare run, wait until its temporary store exists (plus a little), SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE] + [str(a) for a in args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not tmp_file.exists():
        assert proc.poll() is None, f"prepare ended before writing: {proc.communicate()}"
        assert time.time() < deadline, "no temporary store appeared"
        time.sleep(0.01)
    time.sleep(1.5)  # a band or two written
    assert proc.poll() is None, "prepare finished before it could be killed; slow it down more"
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.e2e
def test_sigkill_mid_write_leaves_no_final_store_and_rerun_completes(data_root, tmp_path):
    root = copy_fragments(data_root, tmp_path / "data", ["2"])
    out = tmp_path / "out"
    final, tmp_file = out / "train" / "2.h5", out / "train" / "2.h5.tmp"
    args = ["--data", root, "--out", out, "--z-range", "0:65"]  # 5 bands x 65 slices x 10 ms: over 3 s unkilled

    kill_when_writing(args, tmp_file)
    assert not final.exists(), "a killed run left a store under the final name"
    assert {p.name for p in out.rglob("*") if p.is_file()} <= {"2.h5.tmp", "2.h5.lock"}  # the lock: no longer held

    done = run_prepare(*args)
    assert done.returncode == 0, done.stderr
    assert "up to date" not in done.stdout
    assert f"removed {tmp_file}, left by an interrupted run" in done.stdout.splitlines()
    assert sorted(p.name for p in out.rglob("*.h5*") if p.is_file()) == ["2.h5"]
    assert_store_exact(final, root / "train" / "2", (0, 65))
    good = final.read_bytes()

    # Killing a --force rebuild must not touch the finished store.
    kill_when_writing(args + ["--force"], tmp_file)
    assert final.read_bytes() == good
    again = run_prepare(*args)
    assert again.returncode == 0 and "up to date" in again.stdout
    # The rerun skips the up-to-date store, and still removes the killed rebuild's temp file.
    assert f"removed {tmp_file}, left by an interrupted run" in again.stdout.splitlines()
    assert sorted(p.name for p in out.rglob("*.h5*") if p.is_file()) == ["2.h5"]


def test_failed_rebuild_keeps_existing_store(data_root, tmp_path, monkeypatch):
    import lib.fragments
    import lib.store

    root = copy_fragments(data_root, tmp_path / "data", ["3"])
    out = tmp_path / "out"
    final = out / "train" / "3.h5"
    assert prepare_here("--data", root, "--out", out)[0] == 0
    good = final.read_bytes()

    # A failure while writing (after validation): the temporary file goes, the old store stays.
    read_band, calls = lib.fragments.Fragment.read_band, []

    def failing_read_band(self, z, y0, y1, out=None):
        calls.append(z)
        if len(calls) == 40:  # third of five 56-row bands
            raise lib.fragments.FragmentError(f"{self.slice_paths[z]}: injected read failure")
        return read_band(self, z, y0, y1, out)

    with monkeypatch.context() as patch:
        patch.setattr(lib.store, "BAND_BYTES", 1)
        patch.setattr(lib.fragments.Fragment, "read_band", failing_read_band)
        code, _, stderr = prepare_here("--data", root, "--out", out, "--force")
    assert code != 0 and "injected read failure" in stderr
    assert len(calls) == 40
    assert final.read_bytes() == good
    assert sorted(p.name for p in out.rglob("*.h5*") if p.is_file()) == ["3.h5"]

    # A source broken after the store was built: validation fails before anything is written.
    broken = root / "train" / "3" / "surface_volume" / "30.tif"
    broken.write_bytes(broken.read_bytes()[: os.path.getsize(broken) // 2])
    failed = run_prepare("--data", root, "--out", out, "--force")
    assert failed.returncode != 0 and "30.tif" in failed.stderr
    assert final.read_bytes() == good
    assert sorted(p.name for p in out.rglob("*.h5*") if p.is_file()) == ["3.h5"]
    assert Store(final).read_tile(0, 0, 8, 8).shape == (16, 8, 8)


# ---------------------------------------------------------------- bad input


def remove(path):
    Path(path).unlink()


def truncate(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def save_png(path, array):
    Image.fromarray(array.astype(np.uint8)).save(path)


# Each case breaks the *test* fragment (validated after the good train fragment) or the whole root,
# and names the text the one-line message must contain. Extra arguments follow.
BAD_INPUTS = {
    "missing slice": (lambda r: remove(r / "test/a/surface_volume/07.tif"), "test/a/surface_volume", []),
    "missing last slices": (lambda r: [remove(r / f"test/a/surface_volume/{z}.tif") for z in (40, 41)],
                            "test/a", ["--z-range", "0:42"]),  # 40 slices left in test/a only
    "truncated tiff": (lambda r: truncate(r / "test/a/surface_volume/33.tif"), "test/a/surface_volume/33.tif", []),
    "garbage tiff": (lambda r: (r / "test/a/surface_volume/12.tif").write_bytes(b"junk" * 50),
                     "test/a/surface_volume/12.tif", []),
    "slice shape mismatch": (lambda r: tifffile.imwrite(r / "test/a/surface_volume/05.tif", np.zeros((45, 39), np.uint16)),
                             "test/a/surface_volume/05.tif", []),
    "mask shape mismatch": (lambda r: save_png(r / "test/a/mask.png", np.full((44, 38), 255)), "test/a/mask.png", []),
    "empty mask": (lambda r: save_png(r / "test/a/mask.png", np.zeros((45, 38))), "test/a/mask.png", []),
    "missing mask": (lambda r: remove(r / "test/a/mask.png"), "test/a/mask.png", []),
    "truncated mask": (lambda r: truncate(r / "test/a/mask.png"), "test/a/mask.png", []),
    "missing train labels": (lambda r: remove(r / "train/1/inklabels.png"), "train/1/inklabels.png", []),
    "labels shape mismatch": (lambda r: save_png(r / "train/1/inklabels.png", np.zeros((40, 51))), "train/1/inklabels.png", []),
    "no fragments in split": (lambda r: shutil.rmtree(r / "test/a"), "data/test", []),
    "not a dataset root": (lambda r: [shutil.rmtree(r / s) for s in ("train", "test")], "data", []),
    "missing data root": (lambda r: shutil.rmtree(r), "data", []),
    "ids name a missing fragment": (lambda r: None, "zz", ["--ids", "1,zz"]),
    "z-range beyond the slices": (lambda r: None, "--z-range 30:43", ["--z-range", "30:43"]),
    "z-range empty": (lambda r: None, "--z-range 10:10", ["--z-range", "10:10"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_with_one_line_and_writes_nothing(tiny_root, tmp_path, case):
    breaker, named, extra = BAD_INPUTS[case]
    breaker(tiny_root)
    out = tmp_path / "out"
    code, stdout, stderr = prepare_here("--data", tiny_root, "--out", out, *extra)
    assert code != 0
    message = stderr.strip()
    assert "\n" not in message, f"not one line:\n{message}"
    assert message.startswith("error: ") and named in message, message
    assert stdout == ""
    assert not out.exists(), f"{case}: something was written: {list(out.rglob('*'))}"


@pytest.mark.parametrize("case", ["truncated tiff", "ids name a missing fragment"])
def test_bad_input_command_line(tiny_root, tmp_path, case):
    """The same through a real process: exit status 1, exactly one stderr line, no traceback."""
    breaker, named, extra = BAD_INPUTS[case]
    breaker(tiny_root)
    result = run_prepare("--data", tiny_root, "--out", tmp_path / "out", *extra)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_malformed_z_range_is_a_usage_error(tiny_root, tmp_path):
    result = run_prepare("--data", tiny_root, "--out", tmp_path / "out", "--z-range", "abc")
    assert result.returncode == 2 and "--z-range" in result.stderr
    assert not (tmp_path / "out").exists()
