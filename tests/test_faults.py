"""Fault injection: bad fragment folders, doubtful labels, corrupt and truncated stores, stale temp files, two
writers, a full disk, odd sample submissions. Each case checks the exit code, the one-line message (no
traceback) and that the output printed or written before the fault is still there and unchanged."""
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import ensemble
from helpers import in_process
import lib.fragments
import submit
import train
from lib.store import check_store
from test_prepare import SLOW_PREPARE, make_fragment, prepare_here, run_prepare, store_lines

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]


def run_validator(root, *extra):
    """`python -m lib.fragments ROOT` in this process: (exit code, stdout, stderr), a sys.exit message as stderr."""
    return in_process(lib.fragments.main, [root, *extra])


def messages(stderr):
    """stderr without tqdm's progress bars ("prepare train/1: 100%|...")."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("prepare ")]


def assert_one_error(stderr, *named):
    assert "Traceback" not in stderr, stderr
    lines = messages(stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert all(str(n) in lines[0] for n in named), (lines[0], named)
    return lines[0]


def files(folder):
    """Every file under `folder` but the stores' manifest: stores, and any litter (temp or lock files)."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file() and p.name != "prepared.json")


def flip_bit(path, dataset):
    """Flip one bit in the middle of the middle stored chunk of `dataset`."""
    with h5py.File(path, "r") as h5:
        info = h5[dataset].id.get_chunk_info(h5[dataset].id.get_num_chunks() // 2)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        byte = f.read(1)[0]
        f.seek(info.byte_offset + info.size // 2)
        f.write(bytes([byte ^ 8]))


@pytest.fixture
def root(tmp_path):
    """Two train fragments and a test one (tiny, valid)."""
    root = tmp_path / "data"
    make_fragment(root, "train", "1", seed=1)
    make_fragment(root, "train", "2", seed=3)
    make_fragment(root, "test", "a", shape=(45, 38), seed=2)
    return root


# ---------------------------------------------------------------- every fragment folder accounted for


def loop(path):
    path.symlink_to(path.name)  # a link to itself: ELOOP


BAD_FOLDERS = {  # case: (break root/train/2, the path the message names)
    "surface_volume link loop": (lambda f: (shutil.rmtree(f / "surface_volume"), loop(f / "surface_volume")),
                                 "train/2/surface_volume"),
    "surface_volume a file": (lambda f: (shutil.rmtree(f / "surface_volume"), (f / "surface_volume").write_text("")),
                              "train/2/surface_volume"),
    "no surface_volume": (lambda f: shutil.rmtree(f / "surface_volume"), "train/2/surface_volume"),
    "fragment a broken link": (lambda f: (shutil.rmtree(f), f.symlink_to(f.parent / "gone")), "train/2"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_unreadable_fragment_folder_is_an_error_not_a_skip(root, tmp_path, case):
    breaker, named = BAD_FOLDERS[case]
    breaker(root / "train" / "2")
    code, stdout, stderr = run_validator(root)
    assert code == 1 and stdout == ""
    assert_one_error(stderr, root / named)
    out = tmp_path / "out"
    code, stdout, stderr = prepare_here("--data", root, "--out", out)
    assert code == 1 and stdout == ""
    assert_one_error(stderr, root / named)
    assert not out.exists()


def test_listing_says_how_many_fragments_per_split(root, tmp_path):
    code, stdout, stderr = run_validator(root)
    assert code == 0, stderr
    assert stdout.splitlines()[0] == "train: 2 fragments" and "test: 1 fragments" in stdout
    code, stdout, _ = prepare_here("--data", root, "--out", tmp_path / "out", "--ids", "a")
    assert code == 0 and stdout.splitlines()[0] == f"{root}: 2 train and 1 test fragments; preparing 1"


def labels_without_ink_in_mask(folder):
    """Ink only in the corner, far outside the elliptic mask."""
    mask = np.asarray(Image.open(folder / "mask.png")) > 0
    labels = np.zeros(mask.shape, np.uint8)
    labels[:3, :3] = 255
    assert not (labels[mask] > 0).any()
    Image.fromarray(labels).save(folder / "inklabels.png")


def ink_far_outside_mask(folder):
    """Good labels plus ink in a corner, more than LABEL_MARGIN px outside a mask cut down to the centre."""
    mask = np.zeros((40, 52), np.uint8)
    mask[15:25, 20:32] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    labels = np.zeros((40, 52), np.uint8)
    labels[18:22, 22:30] = 255  # inside
    labels[14, 19] = 255  # just outside: within the margin
    labels[0:2, 48:52] = 255  # 8 px, far outside
    Image.fromarray(labels).save(folder / "inklabels.png")


@pytest.mark.parametrize("breaker, warning", [
    (labels_without_ink_in_mask, "no ink inside the mask mask.png"),
    (ink_far_outside_mask, "8 ink pixels (19.5% of the ink) lie more than 16 px outside the mask mask.png"),
])
def test_doubtful_labels_warn_and_fail_with_strict(root, tmp_path, breaker, warning):
    breaker(root / "train" / "2")
    labels = root / "train" / "2" / "inklabels.png"
    code, stdout, stderr = run_validator(root)
    assert code == 0, stderr
    assert messages(stderr) == [f"warning: {labels}: {warning}"]
    assert "train/2: 42 slices of 40 x 52 uint16" in stdout and "labels doubtful" in stdout
    assert stdout.count(": ok") == 2  # train/1 and test/a

    out = tmp_path / "out"
    code, stdout, stderr = prepare_here("--data", root, "--out", out)
    assert code == 0 and messages(stderr) == [f"warning: {labels}: {warning}"]
    assert files(out) == ["test/a.h5", "train/1.h5", "train/2.h5"] and stdout.count(" -> ") == 3

    code, _, stderr = run_validator(root, "--strict")
    assert code == 1
    assert_one_error(stderr, labels, warning, "--strict")
    code, stdout, stderr = prepare_here("--data", root, "--out", tmp_path / "strict", "--strict")
    assert code == 1 and stdout == ""
    assert_one_error(stderr, labels, warning)
    assert not (tmp_path / "strict").exists()


# ---------------------------------------------------------------- stores that detect corruption


@pytest.fixture
def prepared(root, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = prepare_here("--data", root, "--out", out)
    assert code == 0, stderr
    return out


def dataset_values(path):
    with h5py.File(path, "r") as h5:
        return {name: h5[name][()] for name in h5}


@pytest.mark.parametrize("dataset", ["percentiles_all", "tiles", "mask", "labels"])
def test_corrupt_small_dataset_is_rebuilt_not_skipped(root, prepared, dataset):
    store = prepared / "train" / "2.h5"
    good = dataset_values(store)
    flip_bit(store, dataset)
    code, stdout, stderr = prepare_here("--data", root, "--out", prepared)
    assert code == 0, stderr
    lines = store_lines(stdout)
    assert lines[1:3] == ["train/1: up to date, skipped (" + str(prepared / "train" / "1.h5") + ")",
                          f"train/2: {store}: dataset {dataset}: unreadable, truncated or corrupt "
                          "(Can't synchronously read data (filter returned failure during read)): rebuilding"]
    assert lines[3].startswith("train/2: 40 x 52, slices 24:40") and lines[4].startswith("test/a: up to date")
    assert len(lines) == 5
    rebuilt = dataset_values(store)
    assert rebuilt.keys() == good.keys() and all(np.array_equal(rebuilt[k], good[k]) for k in good)


def test_corrupt_volume_chunk_found_by_verify_and_rebuilt(root, prepared):
    store = prepared / "train" / "1.h5"
    good = dataset_values(store)
    flip_bit(store, "volume")
    code, stdout, _ = prepare_here("--data", root, "--out", prepared)  # the cheap check leaves the volume alone
    assert code == 0 and stdout.count("up to date, skipped") == 3
    code, stdout, stderr = prepare_here("--data", root, "--out", prepared, "--verify")
    assert code == 0, stderr
    lines = store_lines(stdout)
    assert lines[1] == (f"train/1: {store}: dataset volume (rows 0:40): unreadable, truncated or corrupt "
                        "(Can't synchronously read data (filter returned failure during read)): rebuilding")
    assert lines[2].startswith("train/1: 40 x 52, slices 24:40")
    assert lines[3:] == [f"{s}: up to date, volume checksums verified, skipped ({prepared / s}.h5)"
                         for s in ("train/2", "test/a")]
    rebuilt = dataset_values(store)
    assert all(np.array_equal(rebuilt[k], good[k]) for k in good)


def test_truncated_store_is_rebuilt_and_says_so(root, prepared):
    store = prepared / "test" / "a.h5"
    store.write_bytes(store.read_bytes()[:5000])
    code, stdout, stderr = prepare_here("--data", root, "--out", prepared)
    assert code == 0, stderr
    assert f"test/a: {store}: unreadable, truncated or corrupt (" in stdout and "truncated file" in stdout
    check_store(store, full=True)


# ---------------------------------------------------------------- no litter, no races


def test_stale_temp_file_is_removed_by_the_next_run(root, prepared):
    stale = prepared / "train" / "1.h5.tmp"
    stale.write_bytes(b"\0" * 4096)  # a killed run's leftover beside an up-to-date store
    orphan = prepared / "test" / "gone.h5.tmp"  # of a fragment no longer in the dataset
    orphan.write_bytes(b"\0" * 10)
    code, stdout, stderr = prepare_here("--data", root, "--out", prepared)
    assert code == 0, stderr
    assert store_lines(stdout)[1:3] == [f"removed {orphan}, left by an interrupted run",
                                        f"removed {stale}, left by an interrupted run"]
    assert stdout.count("up to date, skipped") == 3
    assert files(prepared) == ["test/a.h5", "train/1.h5", "train/2.h5"]


@pytest.mark.slow
@pytest.mark.e2e
def test_second_writer_stops_at_once_naming_the_first(root, tmp_path):
    out = tmp_path / "out"
    tmp_file = out / "train" / "1.h5.tmp"
    # 16 slices x 0.3 s: about 5 s of writing, against the second run's 1-2 s start
    first = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, "--data", str(root), "--out", str(out), "--ids", "1"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "READ_DELAY": "0.3"})
    try:
        deadline = time.time() + 60
        while not tmp_file.exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.01)
        second = run_prepare("--data", root, "--out", out, "--force", "--ids", "1")
        assert first.poll() is None, "the first writer ended before the second one started; slow it down more"
        assert second.returncode == 1
        assert_one_error(second.stderr, out / "train" / "1.h5", f"already being written by prepare (pid {first.pid} ")
        assert tmp_file.exists()
        stdout, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, stderr
    assert stdout.count(" -> ") == 1
    assert files(out) == ["train/1.h5"]
    check_store(out / "train" / "1.h5", full=True)


# ---------------------------------------------------------------- one-line errors


def test_full_disk_during_prepare_keeps_finished_stores_and_removes_the_partial_one(tmp_path):
    """The largest file prepare may write is capped (RLIMIT_FSIZE: a write past it fails like a full disk, with
    EFBIG): the small train store fits, the big test store does not."""
    root = tmp_path / "data"
    make_fragment(root, "train", "1", seed=1)
    make_fragment(root, "test", "a", shape=(300, 300), seed=2)  # about 2.5 MB of random voxels
    out = tmp_path / "out"

    def cap_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))  # Python ignores SIGXFSZ: the write fails instead

    result = subprocess.run([sys.executable, "prepare.py", "--data", str(root), "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, preexec_fn=cap_file_size)
    assert result.returncode == 1
    assert_one_error(result.stderr, f"{out / 'test' / 'a.h5'}: cannot write the store: File too large")
    lines = store_lines(result.stdout)
    assert len(lines) == 2 and lines[1].startswith("train/1: 40 x 52, slices 24:40,") and lines[1].endswith(
        f"-> {out / 'train' / '1.h5'}")
    assert files(out) == ["train/1.h5"]
    check_store(out / "train" / "1.h5", full=True)


@pytest.fixture
def stores(tiny, tmp_path):
    """A private copy of the tiny run's stores, to break."""
    return Path(shutil.copytree(tiny["stores"], tmp_path / "prepared"))


def submit_args(tiny, stores, out, *extra):
    return ["--run", str(tiny["run"]), "--stores", str(stores), "--out", str(out), "--no-tta", "--no-triplets", *extra]


def exit_code_and_message(main, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    return exit_.value.code


def test_submit_truncated_test_store(tiny, stores, tmp_path, capsys):
    store = stores / "test" / "b.h5"
    store.write_bytes(store.read_bytes()[:3000])
    out = tmp_path / "submission.csv"
    message = exit_code_and_message(submit.main, submit_args(tiny, stores, out))
    assert isinstance(message, str) and "\n" not in message  # sys.exit("error: ..."): exit status 1
    assert message.startswith(f"error: {store}: unreadable, truncated or corrupt (") and "truncated file" in message
    assert capsys.readouterr().out == "" and not out.exists()


def test_submit_corrupt_volume_chunk_met_while_predicting(tiny, stores, tmp_path, capsys):
    store = stores / "test" / "b.h5"
    flip_bit(store, "volume")
    out = tmp_path / "submission.csv"
    message = exit_code_and_message(submit.main, submit_args(tiny, stores, out))
    assert message == (f"error: {store}: dataset volume: unreadable, truncated or corrupt "
                       "(Can't synchronously read data (filter returned failure during read))")
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("2 test fragments") and printed[1].startswith("a: ") and len(printed) == 2
    assert not out.exists()


def test_submit_sample_with_bom_accepted_binary_refused(tiny, stores, tmp_path, capsys):
    sample = tmp_path / "sample.csv"
    sample.write_bytes("\ufeffId,Predicted\nb,1 1\na,1 1\n".encode("utf-8"))
    out = tmp_path / "submission.csv"
    submit.main(submit_args(tiny, stores, out, "--sample", str(sample)))
    assert [line.split(",")[0] for line in out.read_text().splitlines()] == ["Id", "b", "a"]
    written = out.read_bytes()

    capsys.readouterr()
    sample.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    message = exit_code_and_message(submit.main, submit_args(tiny, stores, out, "--sample", str(sample)))
    assert message == f"error: {sample}: not a text CSV (not UTF-8); expected the sample submission, Id,Predicted"
    assert capsys.readouterr().out == "" and out.read_bytes() == written


def test_ensemble_and_train_truncated_train_store(tiny, stores, tmp_path):
    store = stores / "train" / "2.h5"
    store.write_bytes(store.read_bytes()[:3000])
    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run)
    before = (run / "ensemble.json").read_bytes()
    message = exit_code_and_message(ensemble.main, ["--run", str(run), "--stores", str(stores)])
    assert message.startswith(f"error: {store}: unreadable, truncated or corrupt (") and "\n" not in message
    assert (run / "ensemble.json").read_bytes() == before

    message = exit_code_and_message(train.main, ["--run", str(tmp_path / "new"), "--stores", str(stores)])
    assert message.startswith(f"error: {store}: unreadable, truncated or corrupt (") and "\n" not in message
    assert not (tmp_path / "new").exists()
