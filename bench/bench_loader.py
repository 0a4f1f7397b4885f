"""Benchmark the training loader's CPU cost (`make bench-loader`); writes bench/README.md's table "loader".

Augmented training tiles per CPU second (time.process_time) of lib.data.TileDataset.__getitem__ over random
indices, in one process set up as a DataLoader worker is (lib.data.loader_worker_init: one torch and one OpenCV
thread), for four model inputs: the default (stack of 12 slices, each tile flattened onto its own surface), the
stack as stored, and triplets flattened and as stored. The stores: synthetic fragments of --size px (`python -m
lib.synth --geometry thick`) made into stores by `prepare.py`, both run as they are, as subprocesses.

Training on a GPU (lib.data.TileDataset's on_device), a loader item is the tile's raw read and its random draws,
and lib.data.model_batch makes the model's inputs of a whole batch on the GPU (flattening, normalising, centring,
the geometry); training on a CPU, the loader makes the tiles itself, as before. The table gives the loader's rate
both ways, and model_batch's rate on the GPU's items measured on this CPU in batches of --batch tiles (one thread;
on a GPU the GPU pays it).

Each round measures, each in a fresh process: this checkout's lib/ ("after"), the lib/ of the commit --previous
(the loader finishing each tile itself) and of the commit --before (the loader before its first speed-up, given the
same malloc settings by glibc's environment variables), extracted with `git archive`. The best of --rounds rounds per
cell. Every version draws the same indices and seeds, so the tiles must be the same: the table says whether they
were (a SHA-256 of every image and label, computed after the timing).
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
# --previous: the last commit before the loader left the finishing to the batch's device
SETTINGS = dict(size=1024, tiles=320, batch=16, rounds=3, seed=0, tile_size=224, stride=56, before="14a5c21",
                previous="6073179")
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


def measure(lib_root, stores, tile_size, stride, tiles, batch, seed):
    """{(input, where the tiles are made): (the loader's tiles per CPU second, model_batch's tiles per CPU second,
    SHA-256 of the tiles)} of the lib/ under `lib_root`, in this process (a fresh one: nothing of another lib/
    imported). Where: "loader" (every lib/), or "device" (a lib/ whose TileDataset has on_device)."""
    sys.path.insert(0, str(lib_root))
    import torch

    import lib.data
    from lib.data import TileDataset, loader_worker_init
    from lib.inputs import InputSpec

    assert Path(sys.modules["lib"].__file__).parent == Path(lib_root, "lib"), "measured the wrong lib/"
    torch.set_num_threads(1)
    loader_worker_init(0)
    batched = hasattr(lib.data, "model_batch")  # items are dicts, made a batch on the device by model_batch
    places = ("loader", "device") if batched else ("loader",)

    def made(items):
        if batched:
            return lib.data.model_batch(torch.utils.data.default_collate(items), "cpu")
        return torch.stack([image for image, _ in items]), torch.stack([label for _, label in items])

    results = {}
    for name, arguments in INPUTS.items():
        for place in places:
            dataset = TileDataset(stores, tile_size, stride, InputSpec(**arguments), augment=True,
                                  **({"on_device": place == "device"} if batched else {}))
            indices = torch.randint(0, len(dataset), (tiles,), generator=torch.Generator().manual_seed(seed)).tolist()
            torch.manual_seed(seed + 1)
            made([dataset[i] for i in indices[:batch]])  # warm up: the files open, caches filled
            torch.manual_seed(seed)
            digest, loading, finishing = hashlib.sha256(), 0.0, 0.0
            for start in range(0, tiles, batch):
                started = time.process_time()
                items = [dataset[i] for i in indices[start: start + batch]]
                loaded = time.process_time()
                images, labels = made(items)
                finished = time.process_time()
                loading, finishing = loading + loaded - started, finishing + finished - loaded
                digest.update(images.numpy().tobytes())
                digest.update(labels.numpy().tobytes())
            results[name, place] = (tiles / loading, tiles / finishing, digest.hexdigest())
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
    commits = {name: subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, check=True, capture_output=True,
                                    text=True).stdout.strip() for name, commit in (("before", args.before),
                                                                                   ("previous", args.previous))}
    from lib.data import KEEP_FREE, MMAP_BELOW  # in this process only: each measurement imports its own lib/

    # lib.data.keep_freed_memory's settings for a lib/ that does not make them (glibc reads these at its start)
    malloc_settings = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_BELOW), "MALLOC_TRIM_THRESHOLD_": str(KEEP_FREE)}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        stores = make_stores(work, args.size)
        versions = {"after": (ROOT, {}), "previous": (extract_lib(args.previous, work / "previous"), {}),
                    "before": (extract_lib(args.before, work / "before"), malloc_settings)}
        best = {}
        for _ in range(args.rounds):  # interleaved, so that a change of load hits every version alike
            for version, (root, environment) in versions.items():
                with environment_set(environment):
                    results = in_fresh_process(measure, root, stores, args.tile_size, args.stride, args.tiles,
                                               args.batch, args.seed)
                for key, (rate, finish_rate, digest) in results.items():
                    old = best.get((version, *key), (0, 0, None))
                    best[version, *key] = (max(rate, old[0]), max(finish_rate, old[1]), digest)
                    print(f"{version:10s} {key[0]:40s} {key[1]:7s} loader {rate:7.1f}, model_batch {finish_rate:7.1f} "
                          "tiles per CPU s", flush=True)
    rows = []
    for name in INPUTS:
        (before, _, old_digest), (previous, _, previous_digest) = (best[v, name, "loader"] for v in ("before", "previous"))
        after, _, digest = best["after", name, "loader"]
        raw, finish_rate, raw_digest = best["after", name, "device"]
        same = "yes" if digest == raw_digest == previous_digest == old_digest else "NO"
        rows.append(f"{name} | {before:.0f} | {previous:.0f} | {after:.0f} | {raw:.0f} | **{raw / previous:.2f}** | "
                    f"{finish_rate:.0f} | {same}")
    write_tables(args.readme, "loader",
                 f"{line}, load average at the end {os.getloadavg()[0]:.1f}; {len(stores)} train stores of --size "
                 f"{args.size} px fragments, {args.tile_size} px tiles at stride {args.stride}, {args.tiles} random "
                 f"tiles a cell in batches of {args.batch}, best of {args.rounds} rounds; before: lib/ of "
                 f"{commits['before']} (with the malloc settings), previous: lib/ of {commits['previous']}; "
                 f"{time.time() - started:.0f} s in all.",
                 ("model input (augmented training tiles per CPU second) | before: the loader | previous: the loader | "
                  "after, training on a CPU: the loader | after, on a GPU: the loader | on a GPU / previous | "
                  "model_batch of the GPU's items, on this CPU | same tiles", rows))


if __name__ == "__main__":
    main()
