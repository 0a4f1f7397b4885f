"""Fault injection, round 3 (issue 23): full and read-only outputs, RGBA and one-channel masks, stores without the
slices the models read, non-UTF-8 folder names, one train store, a killed train.py, leftover checkpoints, and the
messages that misled. Each case checks the exit code, the one-line message, that earlier outputs are unchanged and
that no temp file or process is left. Full and read-only disks are small tmpfs mounts in a private mount namespace
(`unshare -m`, as root), skipped where that is not permitted. Then a fuzz test over the readers."""
import contextlib
import io
import json
import os
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

import prepare
import submit
import train
from lib.fragments import Fragment, FragmentError, Segment, read_png_binary
from lib.inputs import InputSpec
from lib.lock import exclusive
from lib.store import Store, StoreError, require_slices
from helpers import in_process, needs_unshare, on_tmpfs
from test_faults import assert_one_error, messages, run_validator
from test_prepare import make_fragment, prepare_here

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def split_import_times(stderr):
    """(the modules a `python -X importtime` run imported, the rest of its stderr)."""
    lines = stderr.splitlines()
    imported = [line.split("|")[-1].strip() for line in lines if line.startswith("import time:")]
    return imported, "".join(line + "\n" for line in lines if not line.startswith("import time:"))


def prediction_lines(stderr):
    """stderr without tqdm's prediction bars."""
    return [line for line in messages(stderr) if not line.startswith("predict ")]


# ------------------------------------------------------------------------------------------- shared data


@pytest.fixture(scope="module")
def synth160(tmp_path_factory):
    """`lib.synth --size 160` prepared with 64 px tiles: {root, stores (24:40), shallow (stores of slices 0:16)}."""
    from lib.synth import generate

    work = tmp_path_factory.mktemp("round3")
    root = generate(work / "synth", size=160, seed=0, progress=False)
    for out, z_range in ((work / "prepared", "24:40"), (work / "shallow", "0:16")):
        code, _, err = prepare_here("--data", root, "--out", out, "--tile-size", 64, "--stride", 32, "--z-range", z_range)
        assert code == 0, err
    return {"root": Path(root), "stores": work / "prepared", "shallow": work / "shallow"}


@pytest.fixture
def shallow_tiny(tiny, tmp_path):
    """The tiny run's test fragments prepared with --z-range 0:16: stores without the centre slices 28..35."""
    out = tmp_path / "shallow"
    code, _, err = prepare_here("--data", tiny["root"], "--out", out, "--tile-size", 64, "--stride", 32,
                                "--z-range", "0:16", "--ids", "a,b")
    assert code == 0, err
    return out


def submit_argv(tiny, out, *extra):
    return ["--run", tiny["run"], "--stores", tiny["stores"], "--out", out, "--no-tta", *extra]


OLD_CSV = b"Id,Predicted\nold,1 1\n"


# ------------------------------------------------------------------------------------------- 1. outputs


@needs_unshare
@pytest.mark.parametrize("disk", ["full", "read-only"])
def test_submit_refuses_a_full_or_read_only_output_before_predicting(tiny, tmp_path, disk):
    mnt = tmp_path / "mnt"
    code, out, err, left = on_tmpfs(tmp_path, [PYTHON, "submit.py", *submit_argv(tiny, mnt / "sub.csv")],
                                    size="256k", fill=disk == "full", readonly=disk == "read-only",
                                    setup=f"printf 'Id,Predicted\\nold,1 1\\n' > '{mnt}/sub.csv'")
    reason = "No space left on device" if disk == "full" else "Read-only file system"
    assert code == 1
    assert out == ""  # refused before the line that starts the predictions
    assert_one_error(err, f"{mnt / 'sub.csv'}: cannot write the submission CSV: {reason}")
    assert left == {"sub.csv": OLD_CSV}


FILL_WHILE_PREDICTING = """
import sys
sys.path.insert(0, {root!r})
import submit
predict = submit.predict_group
def fill_then_predict(*args, **kwargs):  # another process fills the disk while the fragments are predicted
    with open({filler!r}, "ab", buffering=0) as f:
        try:
            while True:
                f.write(bytes(4096))
        except OSError:
            pass
    return predict(*args, **kwargs)
submit.predict_group = fill_then_predict
submit.main(sys.argv[1:])
"""


@needs_unshare
def test_submit_disk_filled_while_predicting_removes_its_temp_file(tiny, tmp_path):
    mnt = tmp_path / "mnt"
    harness = FILL_WHILE_PREDICTING.format(root=str(ROOT), filler=str(mnt / "filler"))
    code, out, err, left = on_tmpfs(tmp_path, [PYTHON, "-c", harness, *submit_argv(tiny, mnt / "sub.csv",
                                                                                 "--no-triplets")],
                                    size="256k", setup=f"printf 'Id,Predicted\\nold,1 1\\n' > '{mnt}/sub.csv'")
    assert code == 1
    assert prediction_lines(err) == [f"error: {mnt / 'sub.csv'}: cannot write: No space left on device"], err
    assert left == {"sub.csv": OLD_CSV}  # no sub.csv.tmp, the old submission as it was


@needs_unshare
@pytest.mark.parametrize("disk", ["full", "read-only"])
def test_train_refuses_a_full_or_read_only_run_folder(synth160, tmp_path, disk):
    """At once: before the seconds of importing torch and Ray (and in main(), for callers of main())."""
    mnt = tmp_path / "mnt"
    code, out, err, left = on_tmpfs(tmp_path, [PYTHON, "-X", "importtime", "train.py", "--stores", synth160["stores"],
                                               "--run", mnt / "run", "--no-dashboard"],
                                    size="1m", readonly=disk == "read-only")
    imported, err = split_import_times(err)
    assert "torch" not in imported and "ray" not in imported
    reason = "No space left on device" if disk == "full" else "Read-only file system"
    assert code == 1 and out == ""
    assert_one_error(err, f"{mnt / 'run'}: cannot write the run folder: {reason}")
    assert left == {}  # no run folder, no run.json


SAVE_ON_A_FULL_DISK = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
import torch
from lib.outputs import OutputError, torch_save_atomically
path = Path({path!r})
torch_save_atomically(path, {{"epoch": 1, "weights": torch.ones(1000)}})
try:
    torch_save_atomically(path, {{"epoch": 2, "weights": torch.ones(10**6)}})  # 4 MB: does not fit
except OutputError as err:
    print(err)
print(torch.load(path, weights_only=True)["epoch"])
"""


@needs_unshare
def test_checkpoint_save_on_a_full_disk_keeps_the_last_checkpoint_whole(tmp_path):
    path = tmp_path / "mnt" / "checkpoints" / "fold-1.pt"
    code, out, err, left = on_tmpfs(tmp_path, [PYTHON, "-c", SAVE_ON_A_FULL_DISK.format(root=str(ROOT),
                                                                                       path=str(path))], size="1m")
    assert code == 0, err
    assert out.splitlines() == [f"{path}: cannot write: No space left on device", "1"]
    assert sorted(left) == ["checkpoints/fold-1.pt"]  # no fold-1.pt.tmp


# ------------------------------------------------------------------------------------------- 2. masks and labels


def shape_image(shape=(40, 52)):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return ((yy - 20) ** 2 + (xx - 26) ** 2 < 15 ** 2)


@pytest.mark.parametrize("kind", ["rgba-alpha", "green", "la-alpha"])
def test_mask_and_labels_in_other_image_modes_read_as_drawn(tmp_path, kind):
    """prepare.py end to end: the store's mask and labels are the shapes drawn, whichever way they were saved."""
    root = tmp_path / "data"
    make_fragment(root, "train", "1", seed=1)
    make_fragment(root, "train", "2", seed=2)
    mask, ink = shape_image(), shape_image() & (np.arange(52)[None] < 26)
    folder = root / "train" / "1"
    for image, name in ((mask, "mask.png"), (ink, "inklabels.png")):
        on = image.astype(np.uint8) * 255
        if kind == "rgba-alpha":  # white everywhere, the shape in the alpha channel (an image editor's export)
            pixels = np.dstack([np.full_like(on, 255)] * 3 + [on])
        elif kind == "green":  # drawn in the green channel only
            pixels = np.dstack([np.zeros_like(on), on, np.zeros_like(on)])
        else:  # grey and alpha, the grey black everywhere
            pixels = np.dstack([np.zeros_like(on), on])
        Image.fromarray(pixels).save(folder / name)
    code, out, err = prepare_here("--data", root, "--out", tmp_path / "out", "--tile-size", 16, "--stride", 8)
    assert code == 0, err
    store = Store(tmp_path / "out" / "train" / "1.h5")
    assert np.array_equal(store.read_map("mask"), mask.astype(np.uint8))
    assert np.array_equal(store.read_map("labels"), ink.astype(np.uint8))
    assert "warning" not in err


def test_colour_picture_as_mask_is_refused_naming_it(tmp_path):
    root = tmp_path / "data"
    make_fragment(root, "train", "1", seed=1)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)).save(root / "train" / "1" / "mask.png")
    code, out, err = prepare_here("--data", root, "--out", tmp_path / "out")
    assert code == 1
    assert_one_error(err, f"{root / 'train' / '1' / 'mask.png'}: a colour image")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- 3. slices


@pytest.mark.parametrize("mode", ["default", "mean"])
def test_submit_refuses_stores_without_the_slices_before_predicting(tiny, shallow_tiny, tmp_path, mode):
    out = tmp_path / "sub.csv"
    extra = [] if mode == "default" else ["--triplets", mode]
    argv = ["--run", tiny["run"], "--stores", shallow_tiny, "--out", out, "--no-tta", *extra]
    code, printed, err = in_process(submit.main, argv)
    assert code == 1 and printed == ""
    line = assert_one_error(err, f"{shallow_tiny / 'test' / 'a.h5'}: holds slices 0:16", "reads slices 26:38",
                            "missing 26:38", "--z-range 24:40")
    assert "the stack member's inputs" in line  # the tiny run's members: a stack and a triplet model
    assert not out.exists()


def test_train_refuses_stores_without_the_slices_before_ray(synth160, tmp_path):
    run = tmp_path / "run"
    code, printed, err = in_process(train.main, ["--stores", synth160["shallow"], "--run", run, "--centre-on",
                                                 "nominal", "--no-dashboard"])
    assert code == 1 and printed == ""
    assert_one_error(err, f"{synth160['shallow'] / 'train' / '1.h5'}: holds slices 0:16", "--centre-on nominal",
                     "--z-range")
    assert not run.exists()  # no run.json: nothing to --resume


def test_require_slices_names_store_held_and_needed(synth160):
    path = synth160["stores"] / "train" / "1.h5"
    require_slices(path, range(28, 36), "x")  # held: no error
    with pytest.raises(StoreError) as err:
        require_slices(Store(path), [20, 21, 30, 45], "the model")
    assert str(err.value) == (f"{path}: holds slices 24:40, but the model reads slices 20:46 (missing 20:22, 45:46); "
                              f"prepare it again with --z-range 20:46 (or auto)")


# ------------------------------------------------------------------------------------------- 4. non-UTF-8 names


@pytest.mark.parametrize("where", ["fragment", "root"])
def test_non_utf8_folder_name_is_refused_before_any_store(tmp_path, where):
    bad = os.fsdecode(b"frag\xff")
    root = tmp_path / (bad if where == "root" else "data")
    make_fragment(root, "train", "1", seed=1)
    make_fragment(root, "train", bad if where == "fragment" else "2", seed=2)
    out = tmp_path / "out"
    code, printed, err = in_process(prepare.main, ["--data", root, "--out", out])
    assert code == 1
    line = assert_one_error(err, "frag\\xff", "is not valid UTF-8")
    assert "Traceback" not in line and not out.exists()


# ------------------------------------------------------------------------------------------- 5. one train store


def test_one_train_store_is_cut_into_bands(synth160, tmp_path, capsys):
    stores = tmp_path / "one"
    (stores / "train").mkdir(parents=True)
    os.link(synth160["stores"] / "train" / "2.h5", stores / "train" / "2.h5")
    train_ids, folds = train.fold_table(stores, None)
    assert capsys.readouterr().out.startswith("one train store (2): 3 bands of equal mask area, one fold each")
    assert train_ids == ["2"] and [f.name for f in folds] == ["2.1", "2.2", "2.3"]
    assert folds[0].rows[0] == 0 and folds[-1].rows[1] == Store(stores / "train" / "2.h5").shape[0]


# ------------------------------------------------------------------------------------------- 7, 8. SIGKILL, checkpoints


def descendants(pid):
    """PIDs of every live process below `pid` (children, their children, ...)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pids):
    running = []
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                running.append(pid)
    return running


def commands(pids):
    """{pid: its command line, and its state}, for the message of a failed assertion."""
    found = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            found[pid] = (Path(f"/proc/{pid}/cmdline").read_text(errors="replace").replace("\0", " ")[:60],
                          Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2],
                          [v for v in Path(f"/proc/{pid}/environ").read_text(errors="replace").split("\0")
                           if v.startswith("INKSEG")])
    return found


def wait_for(condition, seconds, what):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.e2e
def test_sigkill_then_resume_at_once_leaves_no_process_and_no_checkpoints(synth160, tmp_path):
    """One train store (3 band folds, 2 of them trained), killed with SIGKILL mid-trial: every process it started is gone
    by the time an immediate --resume holds the run, the resume finishes the run, and no checkpoints/ remain."""
    stores, run = tmp_path / "one", tmp_path / "run"
    (stores / "train").mkdir(parents=True)
    os.link(synth160["stores"] / "train" / "1.h5", stores / "train" / "1.h5")
    argv = [PYTHON, "train.py", "--stores", stores, "--run", run, "--preset", "demo", "--epochs", "1",
            "--max-tiles", "32", "--no-dashboard", "--num-cpus", "2", "--folds", "1.1,1.2"]  # 2 trials at once
    first = subprocess.Popen(list(map(str, argv)), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started, resume = [], None
    try:
        wait_for(lambda: first.poll() is not None or any("ray::ImplicitFunc" in line for line, *_ in
                                                         commands(descendants(first.pid)).values()), 180, "a trial")
        assert first.poll() is None, "the run ended before it could be killed"
        started = descendants(first.pid)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        resume = subprocess.Popen([PYTHON, "train.py", "--run", str(run), "--resume", "--no-dashboard", "--num-cpus",
                                   "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        first_line = resume.stdout.readline()  # printed once it holds the run's lock
        assert first_line.startswith(f"resuming {run}: 0 of 2 trial(s) finished, 2 to go"), first_line
        assert alive(started) == [], f"still running when the resume took the run: {commands(alive(started))}"
        _, err = resume.communicate(timeout=300)
    finally:  # only if the test failed: end the processes this test started, by their ids
        running = resume is not None and resume.poll() is None
        for pid in alive(started) + ([resume.pid, *descendants(resume.pid)] if running else []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert resume.returncode == 0, err
    assert "Unfinished" not in (run / "summary.md").read_text()
    assert sorted(p.name for p in (run / "models" / "stack:tu-mobilenetv3_small_050").iterdir()) == [
        "fold-1.1.pt", "fold-1.2.pt"]
    assert not (run / "checkpoints").exists()
    assert alive(started) == [] and marked_by(resume.pid) == []  # the resume's Ray went with it too


def marked_by(pid):
    """Live processes whose environment carries train.py `pid`'s watchdog mark (lib.watchdog)."""
    from lib.watchdog import TOKEN_VARIABLE

    needle = f"\0{TOKEN_VARIABLE}={pid}:".encode()
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and needle in b"\0" + (entry / "environ").read_bytes():
                found.append(int(entry.name))
    return alive(found)


# ------------------------------------------------------------------------------------------- 9. messages


def test_zero_byte_jpeg_layer_is_called_jpeg(tmp_path):
    from test_segments import make_segment

    make_segment(tmp_path / "seg", "s1", ext="jpg", num_layers=20, dtype=np.uint8)
    layer = tmp_path / "seg" / "s1" / "layers" / "03.jpg"
    layer.write_bytes(b"")
    code, _, err = in_process(prepare.main, ["--data", tmp_path / "seg", "--out", tmp_path / "out"])
    assert code == 1
    line = assert_one_error(err, f"{layer}: unreadable JPEG")
    assert "PNG" not in line


def stepped_segment(root, segment_id, num_layers, surface):
    """A segment whose papyrus (bright) fills the layers below `surface` and air (dark) those above."""
    folder = Path(root) / segment_id
    (folder / "layers").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for z in range(num_layers):
        level = 20000 if z < surface else 3000
        tifffile.imwrite(folder / "layers" / f"{z:02d}.tif", rng.integers(level, level + 500, (40, 52), dtype=np.uint16))
    cv2.imwrite(str(folder / f"{segment_id}_mask.png"), shape_image().astype(np.uint8) * 255)


def test_reverse_hint_is_not_given_to_a_reversed_segment(tmp_path):
    stepped_segment(tmp_path / "seg", "s1", 20, surface=10)
    code, _, err = in_process(prepare.main, ["--data", tmp_path / "seg", "--out", tmp_path / "out", "--test", "s1",
                                             "--reverse", "s1"])
    assert code == 1
    line = assert_one_error(err, f"{tmp_path / 'seg' / 's1' / 'layers'}: no papyrus-to-air edge",
                            "after flipping it", "give --no-reverse s1")
    assert "give --reverse" not in line


def test_z_range_auto_on_a_shallow_segment_says_what_is_needed(tmp_path):
    stepped_segment(tmp_path / "seg", "s1", 12, surface=6)
    code, _, err = in_process(prepare.main, ["--data", tmp_path / "seg", "--out", tmp_path / "out", "--test", "s1"])
    assert code == 1
    assert_one_error(err, "outside its 12 layers", "keeps 16 layers", "--z-range START:STOP inside 0:12")


def test_sample_with_other_ids_names_them(tiny, tmp_path):
    sample = tmp_path / "sample.csv"
    sample.write_text("Id,Predicted\na,1 1\nc,1 1\n")
    code, _, err = in_process(submit.main, submit_argv(tiny, tmp_path / "sub.csv", "--sample", sample))
    assert code == 1
    assert_one_error(err, f"{sample}: no row for test store id b; id c has no test store (test stores: a, b)")


SLOW_SUBMIT = """
import signal, sys, time
# Ctrl-C as a terminal's foreground process gets it: a shell without job control starts background commands (and
# so this test, when the suite runs in one) with SIGINT ignored, which Python then keeps
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {root!r})
import submit
predict = submit.predict_group
def predict_slowly(*args, **kwargs):
    print("predicting", flush=True)
    time.sleep(60)
    return predict(*args, **kwargs)
submit.predict_group = predict_slowly
submit.main(sys.argv[1:])
"""


@pytest.mark.e2e
def test_ctrl_c_in_submit_is_one_line_and_keeps_the_old_output(tiny, tmp_path):
    tiny = {**tiny, "run": Path(shutil.copytree(tiny["run"], tmp_path / "run"))}  # the lock below is this run's
    out = tmp_path / "out" / "sub.csv"
    out.parent.mkdir()
    out.write_bytes(OLD_CSV)
    proc = subprocess.Popen([PYTHON, "-c", SLOW_SUBMIT.format(root=str(ROOT)), *map(str, submit_argv(tiny, out))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while "predicting" not in proc.stdout.readline():
            assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)  # a loaded 2-core machine takes its time to shut down
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert prediction_lines(err) == ["error: interrupted; nothing written after the last line above, earlier outputs "
                                     "untouched"], err
    assert out.read_bytes() == OLD_CSV and sorted(p.name for p in out.parent.iterdir()) == ["sub.csv"]
    assert not (tiny["run"] / ".lock").exists()


@pytest.mark.e2e
def test_locked_run_is_refused_before_torch_and_ray_are_imported(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with exclusive(run, "holder-test"):
        result = subprocess.run([PYTHON, "-X", "importtime", "train.py", "--run", str(run)], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
    imported, stderr = split_import_times(result.stderr)
    said = stderr.splitlines()
    assert result.returncode == 1
    assert len(said) == 1 and said[0].startswith(f"error: {run}: already being written by holder-test (pid {os.getpid()}")
    assert "torch" not in imported and "ray" not in imported


def test_validator_takes_a_root_without_test_folder(tmp_path):
    make_fragment(tmp_path / "data", "train", "1", seed=1)
    code, out, err = run_validator(tmp_path / "data")
    assert code == 0, err
    assert out.splitlines()[0] == "train: 1 fragments" and "test" not in out


# ------------------------------------------------------------------------------------------- fuzz: the readers
# Every reader of a file a user hands over (masks, labels, layers, slices, ensemble.json, run.json, model files)
# meets random bytes, truncations, and valid files with bytes overwritten: each outcome is a correct read or a typed
# one-line error naming the file (FragmentError, RunFileError), never another exception. derandomize: the same
# cases on every run (a failure reproduces); 2 210 cases in all. The libraries' warnings about damaged files are
# not what is tested here: they are silenced.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lib.folds import Fold  # noqa: E402
from lib.runs import RunDir, RunFileError, check_model_file, read_ensemble  # noqa: E402


def fuzz(test):
    """A fuzz test: slow (thousands of cases; make test-fast leaves it out), hypothesis' warnings ignored."""
    return pytest.mark.slow(pytest.mark.filterwarnings("ignore")(test))


SLICE = np.arange(24 * 20, dtype=np.uint16).reshape(24, 20) * 97  # the 16-bit slice the TIFF cases start from
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "TIFF": "tif"}


def fuzz_settings(examples):
    """`examples` cases (times $INKSEG_FUZZ_SCALE, for a deeper search by hand: INKSEG_FUZZ_SCALE=20 pytest -k fuzz)."""
    return settings(max_examples=examples * int(os.environ.get("INKSEG_FUZZ_SCALE", 1)), deadline=None, database=None,
                    derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def image_bytes(kind, fmt):
    """A small valid image file's bytes: a mask (grey, RGBA with the shape in alpha, one-channel colour) as PNG,
    JPEG or TIFF, or a 16-bit slice as TIFF."""
    on = shape_image((24, 20)).astype(np.uint8) * 255
    pixels = {"grey": on, "rgba": np.dstack([np.full_like(on, 255)] * 3 + [on]),
              "green": np.dstack([np.zeros_like(on), on, np.zeros_like(on)]),
              "slice": SLICE}[kind]
    buffer = io.BytesIO()
    if fmt == "TIFF":
        tifffile.imwrite(buffer, pixels)
    else:
        Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def mutated(valid):
    """Bytes near `valid`: itself, a truncation, a few bytes overwritten, its header with a random tail, or noise."""
    length = len(valid)
    flips = st.lists(st.tuples(st.integers(0, length - 1), st.integers(0, 255)), min_size=1, max_size=4)
    return st.one_of(
        st.just(valid),
        st.integers(0, length - 1).map(lambda n: valid[:n]),
        flips.map(lambda changes: _overwrite(valid, changes)),
        st.binary(max_size=200).map(lambda tail: valid[:16] + tail),
        st.binary(max_size=300))


def _overwrite(data, changes):
    data = bytearray(data)
    for position, value in changes:
        data[position] = value
    return bytes(data)


def assert_read_or_one_line(read, path, errors):
    """read() returns, or raises one of `errors` with a one-line message naming `path`."""
    try:
        return read()
    except errors as err:
        message = str(err)
        assert "\n" not in message and str(path) in message, message
        return None


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@fuzz
@pytest.mark.parametrize("kind,fmt", [("grey", "PNG"), ("rgba", "PNG"), ("green", "PNG"), ("grey", "JPEG"),
                                      ("grey", "TIFF")])
def test_fuzz_mask_and_label_reader(fuzz_dir, kind, fmt):
    valid = image_bytes(kind, fmt)
    path = fuzz_dir / f"mask-{kind}.{EXTENSIONS[fmt]}"

    @fuzz_settings(120)
    @given(mutated(valid))
    def read(data):
        path.write_bytes(data)
        mask = assert_read_or_one_line(lambda: read_png_binary(path), path, FragmentError)
        if mask is not None:
            assert mask.dtype == np.uint8 and mask.ndim == 2 and set(np.unique(mask)) <= {0, 1}
        if data == valid and fmt != "JPEG":  # the valid file reads exactly (JPEG is lossy)
            assert np.array_equal(mask, shape_image((24, 20)))

    read()


@fuzz
@pytest.mark.parametrize("layout,fmt,examples", [("segments", "PNG", 160), ("segments", "JPEG", 160),
                                                 ("segments", "TIFF", 160), ("kaggle", "TIFF", 200)])
def test_fuzz_layer_and_slice_readers(fuzz_dir, layout, fmt, examples):
    """A segment or Kaggle fragment of one fuzzed layer or slice: opening it (the header), then reading rows."""
    ext = EXTENSIONS[fmt]
    if layout == "kaggle":
        folder, opened = fuzz_dir / "kaggle" / "train" / "1", Fragment
        path = folder / "surface_volume" / "00.tif"
    else:
        folder, opened = fuzz_dir / f"segment-{ext}" / "s", Segment
        path = folder / "layers" / f"00.{ext}"
    path.parent.mkdir(parents=True)
    valid = image_bytes("slice" if fmt == "TIFF" else "grey", fmt)

    @fuzz_settings(examples)
    @given(mutated(valid))
    def read(data):
        path.write_bytes(data)

        def open_and_read():
            fragment = opened(folder, "train")
            return fragment.read_band(0, 0, min(fragment.shape[0], 4))

        rows = assert_read_or_one_line(open_and_read, path, FragmentError)
        if data == valid:
            assert rows.shape == (4, 20) and (fmt != "TIFF" or np.array_equal(rows, SLICE[:4]))

    read()


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.integers(10**300, 10**320) | st.floats()
                           | st.text(max_size=8) | st.sampled_from(["a\0b", "../x", "/etc/passwd", ""]),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=3), max_leaves=8)


def with_fields_replaced(document, paths):
    """`document` (a JSON object) with the values at some of `paths` replaced by any JSON value."""
    def replace(changes):
        copy = json.loads(json.dumps(document))
        for (path, value) in changes:
            node = copy
            with contextlib.suppress(LookupError, TypeError):  # an earlier change replaced a parent
                for key in path[:-1]:
                    node = node[key]
                node[path[-1]] = value
        return copy
    return st.lists(st.tuples(st.sampled_from(paths), json_values), min_size=1, max_size=3).map(replace)


def json_files(document, paths):
    """Bytes of a JSON run file: its fields replaced, its text mutated, or deep nesting."""
    text = json.dumps(document).encode()
    return st.one_of(with_fields_replaced(document, paths).map(lambda d: json.dumps(d, allow_nan=True).encode()),
                     mutated(text), st.integers(1, 100000).map(lambda depth: b"[" * depth + b"]" * depth),
                     st.just(b'{"members": [], "threshold": 1e999}'), st.just(b"\xff\xfe{}"))


TRAINED_ON = {"stores": "/data/prepared", "data": "/data", "train": {"1": {"fingerprint": "f", "bytes": 9, "source": "/d/1"}}}
ENSEMBLE = {"members": [{"backbone": "b", "weight": 1.0, "tile_size": 64, "stride": 32, "models": ["models/b/fold-1.pt"],
                         "sha256": {"models/b/fold-1.pt": "0" * 64}, "inputs": InputSpec().as_dict()}],
            "threshold": {"mode": "absolute", "value": 0.5}, "trained_on": TRAINED_ON}
ENSEMBLE_FIELDS = [("members",), ("threshold",), ("members", 0), ("members", 0, "backbone"), ("members", 0, "weight"),
                   ("members", 0, "tile_size"), ("members", 0, "stride"), ("members", 0, "models"),
                   ("members", 0, "models", 0), ("members", 0, "inputs"), ("members", 0, "inputs", "family"),
                   ("members", 0, "inputs", "version"), ("threshold", "mode"), ("threshold", "value"), ("trained_on",),
                   ("trained_on", "train"), ("trained_on", "train", "1"), ("members", 0, "sha256"),
                   ("members", 0, "sha256", "models/b/fold-1.pt")]


RECORD = {"version": 2, "config": {"stores": "/data/prepared", "backbones": ["b"], "epochs": 3}, "train_ids": ["1", "2"],
          "folds": [{"name": "1", "fragment_id": "1", "rows": None}, {"name": "2.1", "fragment_id": "2", "rows": [0, 9]}],
          "trained_on": TRAINED_ON, "created": "2026-12-05 18:00:00", "creator": {}, "versions": {}, "git_commit": None}
RECORD_FIELDS = [("version",), ("config",), ("config", "backbones"), ("config", "backbones", 0), ("config", "epochs"),
                 ("train_ids",), ("train_ids", 0), ("folds",), ("folds", 0), ("folds", 1, "name"), ("folds", 1, "rows"),
                 ("folds", 1, "rows", 0), ("folds", 0, "fragment_id"), ("trained_on",), ("trained_on", "train")]


def ensemble_paths_inside(ensemble, run):
    return all(m["paths"][0].resolve().is_relative_to(run.resolve()) for m in ensemble["members"])


def record_typed(record, run):
    return all(isinstance(f, Fold) for f in record.folds) and isinstance(record.config.backbones, tuple)


@fuzz
@pytest.mark.parametrize("name,read_file,document,fields,examples,check", [
    ("ensemble.json", read_ensemble, ENSEMBLE, ENSEMBLE_FIELDS, 450, ensemble_paths_inside),
    ("run.json", lambda run: RunDir(run).read_record(), RECORD, RECORD_FIELDS, 350, record_typed)])
def test_fuzz_run_files(fuzz_dir, name, read_file, document, fields, examples, check):
    """ensemble.json (read_ensemble) and run.json (RunDir.read_record): a correct read passes its own check."""
    run = fuzz_dir / f"run-{name}"
    run.mkdir()
    path = run / name

    @fuzz_settings(examples)
    @given(json_files(document, fields))
    def read(data):
        path.write_bytes(data)
        content = assert_read_or_one_line(lambda: read_file(run), path, RunFileError)
        assert content is None or check(content, run)

    read()


@fuzz
def test_fuzz_model_file(fuzz_dir):
    """A fold model file: truncated, bytes overwritten, or noise."""
    from lib.model import build_model, model_config, save_model_file

    path = fuzz_dir / "models" / "fold-1.pt"
    spec = InputSpec("triplets")
    torch_model = build_model("tu-mobilenetv3_small_050", decoder_channels=(16, 8, 8, 8, 8))
    save_model_file(path, torch_model, spec, config=model_config("tu-mobilenetv3_small_050", spec, (16, 8, 8, 8, 8)),
                    fold="1", tile_size=64, stride=32, val_f05=0.0, oof_f05=0.0, threshold=0.5)
    valid = path.read_bytes()
    member = {"tile_size": 64, "stride": 32, "spec": spec}

    @fuzz_settings(130)
    @given(mutated(valid))
    def read(data):
        path.write_bytes(data)
        model = assert_read_or_one_line(lambda: check_model_file(path, member), path, RunFileError)
        if data == valid:
            assert model is not None

    read()
