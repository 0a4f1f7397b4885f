"""Benchmark prepare.py and the tile store on synthetic fragments; writes the "## prepare" section of bench/README.md.

    python bench/bench_prepare.py [--work DIR] [--keep] [--sizes 2048x2048,4096x2048] [--tiles 600] [--no-readme]
    (make bench-prepare)

1. Throughput: prepare.main() (validation, volume copy, maps, tile index, percentiles) in a fresh process, for
   the default 16 slices and all 65, against a fresh process that reads the very same TIFF row bands
   (lib.fragments.Fragment.read_band, band height from lib.store.band_rows) and discards them. Rates are MB/s
   of kept-slice volume (Z x H x W x 2 bytes, 1 MB = 10^6 B).
2. Peak RSS (VmHWM) of each prepare process.
3. Random 16 x 224 x 224 tile reads at tile-index positions, in a fresh process pinned to one core
   (BLOSC_NTHREADS=1): Store.read_tile against slicing an in-memory numpy copy of the same volume.
Every measurement runs in its own subprocess (`--child ...` modes of this script).
"""
import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_readme import README, write_section  # noqa: E402  (bench/ is on sys.path when this runs as a script)
NUM_SLICES = 65
Z_RANGES = ((24, 40), (0, 65))
TILE = 224

NOTES = """\
Why:

- prepare / raw: prepare is CPU-bound, not I/O-bound: the uncompressed TIFF bands
  arrive at 0.3-3 GB/s here (cold to warm; the virtual disk may itself be cached by the host), while one core
  compresses LZ4 + bitshuffle at roughly 0.6-0.7 GB/s and the exact per-slice histograms (np.bincount of the
  in-mask voxels) cost about as much again (they now run in a thread beside the compression). On top, per
  fragment and independent of the slice count, come validation, three PNG decodes (twice), gzip of the maps,
  the tile index (an int64 integral image) and the summary (the non-copy column, about 1 s per 8 Mpx), which
  weighs most on 16-slice runs. Tried without a clear win: BLOSC_NTHREADS=2 (no gain measured:
  a 128 KiB chunk is little work to split), reading the next band in a second thread (no consistent gain, one
  more band of memory).
- Raw reads of 65 slices run at a fraction of the 16-slice rate: a band is then only 448 rows
  (BAND_BYTES / (65 x W x 2)), so Fragment.read_band makes 5x as many calls per byte, and every call parses the
  TIFF header twice and maps the file. On a real fragment (W about 9500) a band is 64 rows, so this per-call
  cost will matter there.
- Peak RSS stays flat because prepare holds one reused band buffer of at most lib.store.BAND_BYTES (128 MiB)
  plus the 2-D maps and the imports, whatever the fragment size.
- Tile reads: each unaligned 224 px read decompresses 16-25 chunks of (16, 64, 64) on one core, and on
  fragments this large few of them are still in HDF5's 8 MiB chunk cache (the 601/s below was on a 1189 x 916
  volume, where many are). Across five runs on 2026-11-27 one core gave 216-431 tiles/s wall-clock and 310-431
  per CPU-second, depending on the background load; DataLoader workers scale it per core.

Changes to lib/store.py made after the first run of this benchmark (2026-11-27, same machine, interleaved
before/after runs under the same background load):

- _copy_volume reads each band into one reused buffer instead of np.stack of a list (two copies of the band
  at once, three while the previous band was still referenced), and counts histograms in a thread while HDF5
  compresses the band. Peak RSS 336 / 465 / 493 / 469 MiB -> 256 / 253 / 280 / 273 MiB (2048 x 2048 and
  4096 x 2048, slices 24:40 and 0:65; across sizes +47 % -> +9 %); volume-copy rate higher in 7 of 8 pairs,
  e.g. 4096 x 2048 24:40 165-184 -> 216-279 MB/s.
- Store.read_tile reads consecutive slices straight into its output with read_direct (no intermediate block
  and no fancy-index copy): about +10 % tiles per CPU-second (4096 x 2048: 390-446 -> 443-480).\
"""

CODEC_TABLE = """\
Why Blosc LZ4 + bitshuffle with (Z, 64, 64) chunks (measured 2026-11-27 on this machine, one synthetic
1189 x 916 x 16 volume, 150 random unaligned 224 x 224 reads):

| codec | chunk | ratio | write MB/s | tiles/s |
|---|---|---|---|---|
| Blosc zstd(3) + bitshuffle | (16, 64, 64) | 2.26 | 167 | 334 |
| **Blosc LZ4 + bitshuffle (chosen)** | (16, 64, 64) | 2.12 | 563 | 601 |
| uncompressed | (16, 128, 128) | 0.83 (bigger than the TIFFs: padding of edge chunks) | 216 | 840 |

LZ4 keeps 94 % of zstd's ratio at 3.4x its write rate and 1.8x its read rate; uncompressed reads faster still
but takes 2.5x the disk space on this synthetic data (ratios on real CT will differ).
"""


# ---------------------------------------------------------------- children (one measurement each, fresh process)


def maxrss_mb():
    """Peak RSS of this process in MB (2^20). VmHWM, not ru_maxrss: on Linux ru_maxrss also counts the parent's
    memory at the fork before exec, so a child of a big parent would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_raw(data, z0, z1):
    from lib.fragments import Fragment, list_fragments
    from lib.store import band_rows

    fragment = Fragment.open(data, "train", list_fragments(data, "train")[0])
    height, width = fragment.shape
    rows = band_rows(z1 - z0, width)
    started, nbytes = time.perf_counter(), 0
    for y0 in range(0, height, rows):
        for z in range(z0, z1):
            nbytes += fragment.read_band(z, y0, min(height, y0 + rows)).nbytes  # decoded, then dropped
    return {"seconds": time.perf_counter() - started, "bytes": nbytes, "rss_mb": maxrss_mb()}


def child_prepare(data, out, z0, z1):
    started = time.perf_counter()
    import lib.store
    import prepare

    imported = time.perf_counter()
    copy_volume, spent = lib.store._copy_volume, []

    def timed_copy_volume(*args, **kwargs):
        t = time.perf_counter()
        result = copy_volume(*args, **kwargs)
        spent.append(time.perf_counter() - t)
        return result

    lib.store._copy_volume = timed_copy_volume
    prepare.main(["--data", str(data), "--out", str(out), "--z-range", f"{z0}:{z1}", "--force"])
    done = time.perf_counter()
    return {"import_s": imported - started, "main_s": done - imported, "copy_s": sum(spent), "rss_mb": maxrss_mb()}


def child_tiles(store_path, count, seed):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import numpy as np

    from lib.store import Store

    store = Store(store_path)
    rng = np.random.default_rng(seed)
    tiles = store.tiles(TILE, store.stride)
    picks = tiles[rng.integers(0, len(tiles), count)].tolist()
    store.read_tile(*picks[0], TILE, TILE)  # opens the file
    started, cpu = time.perf_counter(), time.process_time()
    for y, x in picks:
        store.read_tile(y, x, TILE, TILE)
    store_s, store_cpu = time.perf_counter() - started, time.process_time() - cpu
    volume = store.h5["volume"][()]
    started, cpu = time.perf_counter(), time.process_time()
    for y, x in picks:
        volume[:, y:y + TILE, x:x + TILE].copy()
    numpy_s, numpy_cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"store_tps": count / store_s, "store_tps_cpu": count / store_cpu, "numpy_tps": count / numpy_s,
            "numpy_tps_cpu": count / numpy_cpu, "slices": int(volume.shape[0]),
            "cpus": sorted(os.sched_getaffinity(0)), "rss_mb": maxrss_mb()}


def run_child(*args, env=None):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{result.stderr}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["wall_s"] = time.perf_counter() - started
    return report


# ---------------------------------------------------------------- parent


def child_generate(root, height, width, seed):
    """One train fragment of exactly height x width (65 slices, mask, labels, IR) under root/train/frag."""
    import numpy as np

    from lib.synth import FragmentFields, write_fragment

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    write_fragment(root / "train" / "frag", FragmentFields(rng, (height, width)), rng, NUM_SLICES, True, progress=False)
    return {"seconds": time.perf_counter() - started}


def make_dataset(work, shape, seed):
    """The fragment's dataset root, generated in a child process (this process stays small) unless already there."""
    root = work / f"{shape[0]}x{shape[1]}"
    done = root / "complete"
    if done.is_file():
        return root, 0.0
    shutil.rmtree(root, ignore_errors=True)
    seconds = run_child("generate", root, shape[0], shape[1], seed)["seconds"]
    done.touch()
    return root, seconds


def evict(data):
    """Drop a dataset's files from the page cache (sync, then POSIX_FADV_DONTNEED; no root needed)."""
    os.sync()
    for path in Path(data).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))) / 2**20
    load = os.getloadavg()
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}, " \
           f"load average at start {load[0]:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="folder for data and stores (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep --work (reuse its data next time)")
    parser.add_argument("--sizes", default="2048x2048,4096x2048", help="fragment shapes HxW")
    parser.add_argument("--tiles", type=int, default=600, help="random tile reads per measurement")
    parser.add_argument("--no-readme", action="store_true", help="print only; leave bench/README.md alone")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    work.mkdir(parents=True, exist_ok=True)
    started, header = time.time(), machine()
    print(header, flush=True)
    rows, tiles = [], []
    try:
        for index, shape in enumerate(shapes):
            data, gen_s = make_dataset(work, shape, seed=index)
            print(f"{shape[0]}x{shape[1]}: data ready ({gen_s:.0f} s to generate)", flush=True)
            for z0, z1 in Z_RANGES:
                out = work / f"stores_{shape[0]}x{shape[1]}_{z0}_{z1}"
                mb = (z1 - z0) * shape[0] * shape[1] * 2 / 1e6
                row = {"shape": shape, "z": (z0, z1), "mb": mb}
                for cache in ("warm", "cold"):
                    if cache == "cold":
                        evict(data)
                    row["raw", cache] = run_child("raw", data, z0, z1)
                    if cache == "cold":
                        evict(data)
                    row["prep", cache] = run_child("prepare", data, out, z0, z1)
                    print(f"  slices {z0}:{z1} ({mb:.0f} MB), {cache} cache: raw read "
                          f"{mb / row['raw', cache]['seconds']:.0f} MB/s, prepare {mb / row['prep', cache]['main_s']:.0f} "
                          f"MB/s (volume copy {mb / row['prep', cache]['copy_s']:.0f} MB/s), "
                          f"peak RSS {row['prep', cache]['rss_mb']:.0f} MiB", flush=True)
                store = out / "train" / "frag.h5"
                row["ratio_store"] = mb / store.stat().st_size * 1e6
                rows.append(row)
                if (z0, z1) == (24, 40):
                    t = run_child("tiles", store, args.tiles, 0, env={"BLOSC_NTHREADS": "1"})
                    tiles.append((shape, t))
                    print(f"  tiles: store {t['store_tps']:.0f}/s, numpy {t['numpy_tps']:.0f}/s (cpu {t['cpus']})",
                          flush=True)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.time() - started
    section = report(rows, tiles, header, elapsed, args)
    print()
    print(section)
    if not args.no_readme:
        write_section("prepare", section)
        print(f"wrote the '## prepare' section of {README.relative_to(ROOT)}")


def verdicts(rows, tiles, by_range):
    ratios = [r["mb"] / r["prep", c]["main_s"] / (r["mb"] / r["raw", c]["seconds"]) for r in rows for c in ("warm", "cold")]
    peaks = [r["prep", "warm"]["rss_mb"] for r in rows]
    spread = max(max(v) / min(v) - 1 for v in by_range.values())
    walls = [t["store_tps"] for _, t in tiles]
    cpus = [t["store_tps_cpu"] for _, t in tiles]

    def met(ok):
        return "**met**" if ok else "**missed**"

    return [
        f"- prepare / raw >= 0.7: {met(min(ratios) >= 0.7)} ({min(ratios):.2f}-{max(ratios):.2f}).",
        f"- peak RSS <= 1 GB: {met(max(peaks) <= 1024)} (at most {max(peaks):.0f} MiB); flat within 20 % across "
        f"sizes: {met(spread <= 0.2)} ({spread:+.0%}).",
        f"- store tile reads >= 300/s on one core: {met(min(walls) >= 300)} ({min(walls):.0f}-{max(walls):.0f}/s wall, "
        f"{min(cpus):.0f}-{max(cpus):.0f} per CPU-second).",
    ]


def report(rows, tiles, header, elapsed, args):
    date = datetime.date.today().isoformat()
    load = os.getloadavg()[0]
    lines = [
        f"`make bench-prepare` (`python bench/bench_prepare.py`), run {date} on {header}, {load:.1f} at the end "
        f"(other work shares the 2 cores, so rates vary by 20-30 % between runs); the whole run took {elapsed:.0f} s. "
        "Synthetic train fragments of exact shapes (lib.synth.FragmentFields + write_fragment: 65 uncompressed "
        "uint16 TIFF slices, mask, labels, IR) generated into a temp folder just before. Each number is one fresh "
        "subprocess.",
        "",
        "- MB = 10^6 bytes of kept-slice volume (slices x H x W x 2).",
        "- *raw read*: the same row bands (lib.store.band_rows) read with Fragment.read_band and dropped: the rate at "
        "which the sources can be decoded. *prepare*: prepare.main() with --force (validation of all 65 slice headers "
        "and the PNGs, the volume copy, the maps, tile index, percentiles, the summary line; Python start-up and "
        "imports, about 1 s, excluded). *copy*: lib.store._copy_volume alone (read, compress, write, histograms); "
        "*non-copy s*: the rest of prepare.main (validation, maps, tile index, percentiles, summary).",
        "- *warm*: the sources are in the page cache (they were just written), so raw read is a memory copy. *cold*: "
        "the dataset's files were dropped from the page cache first (sync + posix_fadvise DONTNEED), so reads come "
        "from the (virtual) disk. Real 18 GB fragments behave like *cold*.",
        "- Peak RSS: VmHWM of the prepare process (imports included, about 70 MiB), warm run.",
        "",
        "| fragment | slices | volume MB | raw read MB/s warm / cold | prepare MB/s warm / cold | copy MB/s warm / cold "
        "| prepare / raw warm / cold (target >= 0.7) | non-copy s warm | peak RSS MiB (target <= 1 GB) | store ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        raw = {c: r["mb"] / r["raw", c]["seconds"] for c in ("warm", "cold")}
        prep = {c: r["mb"] / r["prep", c]["main_s"] for c in ("warm", "cold")}
        copy = {c: r["mb"] / r["prep", c]["copy_s"] for c in ("warm", "cold")}
        lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {r['z'][0]}:{r['z'][1]} | {r['mb']:.0f} "
                     f"| {raw['warm']:.0f} / {raw['cold']:.0f} | {prep['warm']:.0f} / {prep['cold']:.0f} "
                     f"| {copy['warm']:.0f} / {copy['cold']:.0f} "
                     f"| {prep['warm'] / raw['warm']:.2f} / {prep['cold'] / raw['cold']:.2f} "
                     f"| {r['prep', 'warm']['main_s'] - r['prep', 'warm']['copy_s']:.1f} "
                     f"| {r['prep', 'warm']['rss_mb']:.0f} | {r['ratio_store']:.2f} |")
    by_range = {}
    for r in rows:
        by_range.setdefault(r["z"], []).append(r["prep", "warm"]["rss_mb"])
    spread = ", ".join(f"slices {z[0]}:{z[1]} {max(v) / min(v) - 1:+.0%}" for z, v in by_range.items())
    lines += ["", f"Peak RSS, largest over smallest across fragment sizes (target within 20 %): {spread}.", ""]
    lines += [
        f"Random tile reads: {args.tiles} reads of 16 x {TILE} x {TILE} (Store.read_tile) at positions drawn from the "
        "store's tile index (224/56 grid), fresh process pinned to one core with BLOSC_NTHREADS=1, store file in the "
        "page cache; *numpy*: the same windows sliced and copied from the whole volume loaded into memory. "
        "Rates per wall-clock second, and per CPU-second of the process (less disturbed by other work on the core).",
        "",
        "| fragment | store tiles/s wall (target >= 300) | store tiles per CPU-s | in-memory numpy tiles/s wall "
        "| numpy tiles per CPU-s |",
        "|---|---|---|---|---|",
    ]
    for shape, t in tiles:
        lines.append(f"| {shape[0]} x {shape[1]} | {t['store_tps']:.0f} | {t['store_tps_cpu']:.0f} "
                     f"| {t['numpy_tps']:.0f} | {t['numpy_tps_cpu']:.0f} |")
    lines += ["", "Targets, this run:", ""] + verdicts(rows, tiles, by_range) + ["", NOTES, "", CODEC_TABLE]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, rest = sys.argv[2], sys.argv[3:]
        if mode == "raw":
            result = child_raw(Path(rest[0]), int(rest[1]), int(rest[2]))
        elif mode == "prepare":
            sys.stdout = sys.stderr  # prepare's summary line must not mix with the JSON report
            result = child_prepare(Path(rest[0]), Path(rest[1]), int(rest[2]), int(rest[3]))
            sys.stdout = sys.__stdout__
        elif mode == "generate":
            result = child_generate(Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]))
        else:
            result = child_tiles(Path(rest[0]), int(rest[1]), int(rest[2]))
        print(json.dumps(result))
    else:
        main()
