"""Benchmark the training loader's CPU cost (`make bench-loader`); writes bench/README.md's table "loader".

Augmented training tiles per CPU second (time.process_time) of lib.data.TileDataset.__getitem__ over random
indices, in one process set up as a DataLoader worker is (lib.data.loader_worker_init: one torch and one OpenCV
thread), for four model inputs: the default (stack of 12 slices, each tile flattened onto its own surface), the
stack as stored, and triplets flattened and as stored. The stores: synthetic fragments of --size px (`python -m
lib.synth --geometry thick`) made into stores by `prepare.py`, both run as they are, as subprocesses.

Each round measures, each in a fresh process: this checkout's lib/ ("after"); the same without the worker set-up's
malloc settings (lib.data.keep_freed_memory; as in a DataLoader with 0 workers, whose main process does not run
the worker set-up); the lib/ of the commit --before ("before", extracted with `git archive`); and that with the
same malloc settings, given by glibc's environment variables (its worker set-up has none). The best of --rounds
rounds per cell. Every version draws the same indices and seeds, so the tiles must be the same: the table says
whether they were (a SHA-256 of every image and label, computed after the timing).
"""
import contextlib
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

from bench_common import ROOT, in_fresh_process, parser, stamp, write_tables

# --before: the last commit on main before the loader's speed-up
SETTINGS = dict(size=1024, tiles=300, rounds=3, seed=0, tile_size=224, stride=56, before="14a5c21")
INPUTS = {  # table row: lib.inputs.InputSpec arguments
    "stack 12, flattened per tile (default)": dict(),
    "stack 12, as stored": dict(centre_on="nominal"),
    "triplets, flattened per tile": dict(family="triplets"),
    "triplets, as stored": dict(family="triplets", centre_on="nominal"),
}


@contextlib.contextmanager
def environment_set(variables):
    """os.environ with `variables` set, for the processes started meanwhile."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def measure(lib_root, stores, tile_size, stride, tiles, seed, worker_setup=True):
    """{input: (tiles per CPU second, SHA-256 of the tiles)} of the lib/ under `lib_root`, in this process (a fresh
    one: nothing of another lib/ imported)."""
    sys.path.insert(0, str(lib_root))
    import cv2
    import torch

    from lib.data import TileDataset, loader_worker_init
    from lib.inputs import InputSpec

    assert Path(sys.modules["lib"].__file__).parent == Path(lib_root, "lib"), "measured the wrong lib/"
    torch.set_num_threads(1)
    if worker_setup:
        loader_worker_init(0)
    else:
        cv2.setNumThreads(1)
    results = {}
    for name, arguments in INPUTS.items():
        dataset = TileDataset(stores, tile_size, stride, InputSpec(**arguments), augment=True)
        indices = torch.randint(0, len(dataset), (tiles,), generator=torch.Generator().manual_seed(seed)).tolist()
        torch.manual_seed(seed + 1)
        for i in indices[:10]:  # warm up: the files open, caches filled
            dataset[i]
        torch.manual_seed(seed)
        started = time.process_time()
        for i in indices:
            dataset[i]
        seconds = time.process_time() - started
        torch.manual_seed(seed)
        digest = hashlib.sha256()
        for i in indices:
            image, label = dataset[i]
            digest.update(image.numpy().tobytes())
            digest.update(label.numpy().tobytes())
        results[name] = (tiles / seconds, digest.hexdigest())
    return results


def make_stores(work, size):
    """Train stores of the synthetic dataset, made by lib.synth and prepare.py as a user runs them."""
    subprocess.run([sys.executable, "-m", "lib.synth", str(work / "synth"), "--size", str(size), "--geometry",
                    "thick"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run([sys.executable, "prepare.py", "--data", str(work / "synth"), "--out", str(work / "stores")],
                   cwd=ROOT, check=True, capture_output=True)
    return sorted((work / "stores" / "train").glob("*.h5"))


def extract_lib(commit, folder):
    """lib/ of `commit` of this repository, under `folder`."""
    archive = subprocess.run(["git", "archive", "--format=tar", commit, "lib"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def main():
    args = parser(__doc__, SETTINGS).parse_args()
    line, started = stamp(), time.time()
    before_commit = subprocess.run(["git", "rev-parse", "--short", args.before], cwd=ROOT, check=True,
                                   capture_output=True, text=True).stdout.strip()
    from lib.data import KEEP_FREE, MMAP_BELOW  # in this process only: each measurement imports its own lib/

    # lib.data.keep_freed_memory's settings for a lib/ that does not make them (glibc reads these at its start)
    malloc_settings = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_BELOW), "MALLOC_TRIM_THRESHOLD_": str(KEEP_FREE)}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        stores = make_stores(work, args.size)
        old_lib = extract_lib(args.before, work / "before")
        versions = {"after": (ROOT, True, {}), "after, malloc default": (ROOT, False, {}), "before": (old_lib, True, {}),
                    "before, malloc settings": (old_lib, True, malloc_settings)}
        best = {}
        for _ in range(args.rounds):  # interleaved, so that a change of load hits every version alike
            for version, (root, setup, environment) in versions.items():
                with environment_set(environment):
                    results = in_fresh_process(measure, root, stores, args.tile_size, args.stride, args.tiles,
                                               args.seed, setup)
                for name, (rate, digest) in results.items():
                    rate = max(rate, best.get((version, name), (0, None))[0])
                    best[version, name] = (rate, digest)
                    print(f"{version:22s} {name:40s} {rate:7.1f} tiles per CPU s", flush=True)
    rows = []
    for name in INPUTS:
        (after, digest), (unset, _), (before, old_digest), (before_set, _) = (best[v, name] for v in versions)
        rows.append(f"{name} | {before:.0f} | {after:.0f} | **{after / before:.2f}** | {before_set:.0f} | "
                    f"{unset:.0f} | {after / before_set:.2f} | {'yes' if digest == old_digest else 'NO'}")
    write_tables(args.readme, "loader",
                 f"{line}, load average at the end {os.getloadavg()[0]:.1f}; {len(stores)} train stores of --size "
                 f"{args.size} px fragments, {args.tile_size} px tiles at stride {args.stride}, {args.tiles} random "
                 f"tiles a cell, best of {args.rounds} rounds; before: lib/ of {before_commit}; "
                 f"{time.time() - started:.0f} s in all.",
                 ("model input (augmented training tiles) | before: tiles per CPU s | after | after / before | "
                  "before, malloc settings | after, malloc default | after / before, both with the malloc settings | "
                  "same tiles", rows))


if __name__ == "__main__":
    main()
