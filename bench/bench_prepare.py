"""Benchmark prepare.py and the tile store on synthetic fragments; writes the "## prepare" section of bench/README.md.

    python bench/bench_prepare.py [--work DIR] [--keep] [--sizes 2048x2048,4096x2048] [--tiles 600] [--no-readme]
    (make bench-prepare)

1. Throughput: prepare.main() (validation, volume copy, maps, tile index, percentiles) in a fresh process, for
   the default 16 slices and all 65, against a fresh process that reads the very same TIFF row bands
   (lib.fragments.Fragment.read_band, band height from lib.store.band_rows) and discards them; warm and cold
   page cache. Also prepare with the volume copy done the plain way (serial_copy_volume below: one thread, HDF5's
   own Blosc filter, numpy histograms), to show what the parallel copy in lib.store gains. Rates are MB/s of
   kept-slice volume (Z x H x W x 2 bytes, 1 MB = 10^6 B).
2. Peak RSS (VmHWM) of each prepare process.
3. Random 16 x 224 x 224 tile reads at tile-index positions, in a fresh process pinned to one core:
   Store.read_tile against slicing an in-memory numpy copy of the same volume.
4. Codecs: the first fragment's 16-slice volume written with each candidate Blosc codec (lib.store.VOLUME_CODEC):
   size ratio, volume copy MB/s, tile reads/s on one core. And what one core does per second for each step of
   the copy (read, reorder + compress, histograms), which bounds prepare on a machine with few cores.
Every measurement runs in its own subprocess (`--child ...` modes of this script).
"""
import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# bench/ is on sys.path when this runs as a script
from bench_common import child_main, is_child, machine, maxrss_mb, run_child  # noqa: E402
from bench_readme import README, write_section  # noqa: E402

NUM_SLICES = 65
Z_RANGES = ((24, 40), (0, 65))
TILE = 224
STRIDE = 56
LZ4_BITSHUFFLE = {"compressor": "lz4", "level": 5, "shuffle": 2}
CODECS = {  # name: (lib.store.VOLUME_CODEC, chunk side; None: lib.store.chunk_side, 56 px for 224 / 56 tiles)
    "LZ4 + bitshuffle": (LZ4_BITSHUFFLE, None),
    "LZ4 + bitshuffle, 64 px chunks (not aligned with the tiles)": (LZ4_BITSHUFFLE, 64),
    "LZ4 + byte shuffle": ({"compressor": "lz4", "level": 5, "shuffle": 1}, None),
    "LZ4, no shuffle": ({"compressor": "lz4", "level": 5, "shuffle": 0}, None),
    "zstd(1) + bitshuffle": ({"compressor": "zstd", "level": 1, "shuffle": 2}, None),
    "zstd(3) + bitshuffle": ({"compressor": "zstd", "level": 3, "shuffle": 2}, None),
}
CHOSEN = "LZ4 + bitshuffle"  # lib.store.VOLUME_CODEC and chunk_side; why: NOTES

NOTES = """\
Why:

- prepare / raw >= 0.7 is out of reach on this machine whatever the store does with the bytes. The raw read is
  one positioned read per slice and band, which runs at memory-copy speed here: 1.5-7 GB/s from the page cache,
  and 1-2 GB/s "cold" because the VM's virtual disk is itself cached by the host. prepare must in addition
  reorder every voxel into chunks, compress it, count it into the per-slice histograms and write it, and the
  per-step list above shows that one core does each of the two big steps at well under 1 GB/s. Two cores
  therefore top out below about 0.5 GB/s of volume: a ratio of at most about 0.2 warm and 0.4 cold, before
  any fixed per-fragment cost. Measured alternatives that do not change this (2026-11-27, this machine,
  2048 x 2048 x 16, copy alone, best of 4): an uncompressed store copies at 390 MB/s with exact histograms and
  710 MB/s with none (LZ4 + bitshuffle: 430 and 700: writing twice the bytes costs what compression saves);
  LZ4 without shuffle 490 / 870; histograms from every 2nd row and column +20 %. So the target needs more
  cores (compression and counting run on all of them; the Cores table shows what the second core adds) or a
  slower disk, not another format; no bigger machine was available to this session to measure that.
- The copy is parallel: a reader thread fills the next band while a pool of one thread per core reorders
  and compresses chunk groups (c-blosc via imagecodecs, GIL released) and counts the histograms; the main
  thread stores the compressed chunks with write_direct_chunk. The plain way (serial copy column: HDF5's filter
  pipeline compresses one chunk at a time on one core) is up to about 2x slower here (copy / serial copy
  column; single runs on this VM vary by 20-30 %), and the gap grows with the number of cores. The stored bytes are the
  frames the declared Blosc filter writes, so h5py and hdf5plugin read the file as usual (tests check it).
- Raw reads got faster too: Fragment.read_band keeps each slice's header facts (where the uncompressed pixels
  start) and reads a band with one os.preadv straight into the band buffer, instead of parsing the TIFF header
  twice and mapping the file for every band.
- Fixed costs per fragment (non-copy column: validation, maps, tile index, percentiles, summary, and replacing
  the previous store, since the benchmark runs with --force) are roughly half what they were: the labels and IR PNGs are checked with PIL's verify instead of a full decode (the
  mask is still decoded, to check it is not empty), the maps are written with Blosc LZ4 instead of gzip (0.13 s
  -> 0.01 s for a 2048^2 IR photo), the tile index uses an integral image on the few hundred rows where tiles
  start or end (0.14-0.25 s -> 0.03 s), and the summary's ink fraction comes from the labels in memory instead
  of reopening the store.
- Peak RSS stays flat because prepare holds two band buffers of at most lib.store.BAND_BYTES (64 MiB) each, the
  compressed chunks of one band, and the 2-D maps, whatever the fragment size.
- Tile reads: a chunk is one tile stride wide (lib.store.chunk_side: 56 px for 224 / 56 tiles), so a tile on the
  grid decodes exactly its 4 x 4 chunks and nothing else; unaligned 64 px chunks make it decode 16-25 chunks,
  about 1.65x the bytes (codec table: the 64 px row reads markedly fewer tiles per second; its copy speed
  differs from the 56 px one by no more than run-to-run noise). Store.read_tile reads
  with one h5py read_direct straight into its output. Tried and dropped: an own chunk reader (chunk index from
  chunk_iter, os.pread, c-blosc decode into a reused buffer) read no faster than h5py in interleaved runs
  (346-513 vs 387-570 tiles/s), so the store keeps h5py's reader.
- Codec: LZ4 + bitshuffle, from the codec table. zstd + bitshuffle stores only about 3 % less but writes and
  reads slower. LZ4 with byte shuffle or without shuffle reads faster but stores about 18 % more here, and on
  real CT the gap should be wider: there the low bits of every voxel are noise, which only bitshuffle separates
  from the compressible high bits (the reference notes measured 1.02 for LZ4 + byte shuffle against 1.27 for
  zstd + bitshuffle on a noisy synthetic volume). LZ4 + bitshuffle reads well above 300 tiles/s on one core.\
"""

# ---------------------------------------------------------------- children (one measurement each, fresh process)


def child_raw(data, z0, z1):
    from lib.fragments import Fragment, list_fragments
    from lib.store import band_rows, chunk_side

    fragment = Fragment.open(data, "train", list_fragments(data, "train")[0])
    height, width = fragment.shape
    rows = band_rows(z1 - z0, width, chunk_side(TILE, STRIDE))
    started, nbytes = time.perf_counter(), 0
    for y0 in range(0, height, rows):
        for z in range(z0, z1):
            nbytes += fragment.read_band(z, y0, min(height, y0 + rows)).nbytes  # decoded, then dropped
    return {"seconds": time.perf_counter() - started, "bytes": nbytes, "rss_mb": maxrss_mb()}


def time_copy_volume(copy_volume):
    """Make lib.store._copy_volume a timed `copy_volume`; returns the list its seconds are appended to."""
    import lib.store

    spent = []

    def timed_copy_volume(*args, **kwargs):
        started = time.perf_counter()
        result = copy_volume(*args, **kwargs)
        spent.append(time.perf_counter() - started)
        return result

    lib.store._copy_volume = timed_copy_volume
    return spent


def child_prepare(data, out, z0, z1, serial, cores):
    if cores:  # pin to the first `cores` CPUs: lib.store sizes its thread pool from the affinity
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    started = time.perf_counter()
    import lib.store
    import prepare

    imported = time.perf_counter()
    spent = time_copy_volume(serial_copy_volume if serial else lib.store._copy_volume)
    prepare.main(["--data", str(data), "--out", str(out), "--z-range", f"{z0}:{z1}", "--force"])
    done = time.perf_counter()
    return {"import_s": imported - started, "main_s": done - imported, "copy_s": sum(spent), "rss_mb": maxrss_mb()}


def serial_copy_volume(fragment, volume, mask, z_start, z_stop, progress):
    """The plain way, for comparison: per band, read the slices, write the band through HDF5's Blosc filter
    (one chunk at a time, one thread), count the histograms with numpy."""
    import numpy as np

    from lib.store import band_rows

    num_kept, height, width = volume.shape
    rows = band_rows(num_kept, width, volume.chunks[1])
    histograms = np.zeros((num_kept, 65536), np.int64)
    inside_all = mask.astype(bool)
    for y0 in range(0, height, rows):
        y1 = min(height, y0 + rows)
        block = np.stack([fragment.read_band(z, y0, y1) for z in range(z_start, z_stop)])
        volume[:, y0:y1, :] = block
        inside = inside_all[y0:y1]
        for i in range(num_kept):
            histograms[i] += np.bincount(block[i][inside], minlength=65536)
    return histograms


def pick_tiles(store, count, seed):
    import numpy as np

    tiles = store.tiles(TILE, store.stride)
    return tiles[np.random.default_rng(seed).integers(0, len(tiles), count)].tolist()


def rate(read, picks):
    """(tiles per wall second, tiles per CPU second) of read(y, x) over picks, after one warm-up read."""
    read(*picks[0])
    started, cpu = time.perf_counter(), time.process_time()
    for y, x in picks:
        read(y, x)
    return len(picks) / (time.perf_counter() - started), len(picks) / (time.process_time() - cpu)


def child_tiles(store_path, count, seed):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from lib.store import Store

    store = Store(store_path)
    picks = pick_tiles(store, count, seed)
    store_rate = rate(lambda y, x: store.read_tile(y, x, TILE, TILE), picks)
    volume = store.h5["volume"][()]
    numpy_rate = rate(lambda y, x: volume[:, y:y + TILE, x:x + TILE].copy(), picks)
    return {"store": store_rate, "numpy": numpy_rate, "slices": int(volume.shape[0]),
            "cpus": sorted(os.sched_getaffinity(0)), "rss_mb": maxrss_mb()}


def child_codec(data, out, name, count):
    """Write the 16-slice store with one codec (volume copy timed), then read tiles on one core."""
    import lib.store
    from lib.fragments import Fragment, list_fragments

    lib.store.VOLUME_CODEC, side = CODECS[name]
    if side is not None:
        lib.store.chunk_side = lambda tile_size, stride: side
    fragment = Fragment.open(data, "train", list_fragments(data, "train")[0]).validate()
    spent = time_copy_volume(lib.store._copy_volume)
    lib.store.write_store(fragment, out, progress=False)
    with lib.store.h5py.File(out, "r") as h5:
        volume_bytes = h5["volume"].id.get_storage_size()
        raw_bytes = h5["volume"].size * 2
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    store = lib.store.Store(out)
    tiles_wall, tiles_cpu = rate(lambda y, x: store.read_tile(y, x, TILE, TILE), pick_tiles(store, count, 1))
    return {"ratio": raw_bytes / volume_bytes, "copy_mb_s": raw_bytes / 1e6 / spent[0], "tiles": tiles_wall,
            "tiles_cpu": tiles_cpu}


def child_steps(data):
    """What one core does per second for each step of the volume copy, on one band of 16 slices."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import numpy as np

    import lib.store
    from lib.fragments import Fragment, list_fragments

    fragment = Fragment.open(data, "train", list_fragments(data, "train")[0]).validate()
    height, width = fragment.shape
    chunk_shape = (16,) + (lib.store.chunk_side(TILE, STRIDE),) * 2
    rows = min(height, lib.store.band_rows(16, width, chunk_shape[1]))
    buffer = np.empty((16, rows, width), np.uint16)
    inside = fragment.read_mask()[:rows].astype(bool)
    group = lib.store.CHUNKS_PER_TASK * chunk_shape[2]
    steps = {
        "read (TIFF rows into the band buffer)": lambda: lib.store._read_band(fragment, 24, (0, rows), buffer),
        "reorder into chunks + compress (LZ4 + bitshuffle)": lambda: [
            lib.store._encode_chunks(buffer, cy, cx, group, chunk_shape)
            for cy in range(0, rows, chunk_shape[1]) for cx in range(0, width, group)],
        "in-mask histograms (numpy bincount)": lambda: [lib.store._count_in_mask(buffer[i], inside) for i in range(16)],
    }
    result = {}
    for name, step in steps.items():
        step()  # warm-up (page faults, caches)
        started = time.process_time()
        step()
        result[name] = buffer.nbytes / 1e6 / (time.process_time() - started)
    return result


def child_generate(root, height, width, seed):
    """One train fragment of exactly height x width (65 slices, mask, labels, IR) under root/train/frag."""
    import numpy as np

    from lib.synth import FragmentFields, write_fragment

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    write_fragment(Path(root) / "train" / "frag", FragmentFields(rng, (height, width)), rng, NUM_SLICES, True, progress=False)
    return {"seconds": time.perf_counter() - started}


# ---------------------------------------------------------------- parent


def make_dataset(work, shape, seed):
    """The fragment's dataset root, generated in a child process (this process stays small) unless already there."""
    root = work / f"{shape[0]}x{shape[1]}"
    done = root / "complete"
    if done.is_file():
        return root, 0.0
    shutil.rmtree(root, ignore_errors=True)
    seconds = run_child(__file__, "generate", root, shape[0], shape[1], seed)["seconds"]
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
    rows, tiles, codecs = [], [], {}
    try:
        for index, shape in enumerate(shapes):
            data, gen_s = make_dataset(work, shape, seed=index)
            print(f"{shape[0]}x{shape[1]}: data ready ({gen_s:.0f} s to generate)", flush=True)
            for z0, z1 in Z_RANGES:
                out = work / f"stores_{shape[0]}x{shape[1]}_{z0}_{z1}"
                rows.append(measure_throughput(data, out, shape, z0, z1))
                if (z0, z1) == (24, 40):
                    os.sync()  # the store was just written: no writeback of it while the tiles are timed
                    t = run_child(__file__, "tiles", out / "train" / "frag.h5", args.tiles, 0)
                    tiles.append((shape, t))
                    print(f"  tiles/s on one core: store {t['store'][0]:.0f}, numpy {t['numpy'][0]:.0f} "
                          f"(cpu {t['cpus']})", flush=True)
            if index == 0:
                for name in CODECS:
                    codecs[name] = run_child(__file__, "codec", data, work / "codec.h5", name, args.tiles // 2)
                    print(f"  codec {name}: {codecs[name]}", flush=True)
                steps = run_child(__file__, "steps", data)
                print(f"  one core, MB/s: {steps}", flush=True)
                steps_shape = shape
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.time() - started
    section = report(rows, tiles, codecs, (steps_shape, steps), header, elapsed, args)
    print()
    print(section)
    if not args.no_readme:
        write_section("prepare", section)
        print(f"wrote the '## prepare' section of {README.relative_to(ROOT)}")


def measure_throughput(data, out, shape, z0, z1):
    """Raw read, prepare and prepare with the serial copy, each on a warm and on a cold page cache."""
    mb = (z1 - z0) * shape[0] * shape[1] * 2 / 1e6
    row = {"shape": shape, "z": (z0, z1), "mb": mb}
    for cache in ("warm", "cold"):
        kinds = [("raw", ("raw", data, z0, z1)), ("serial", ("prepare", data, out, z0, z1, True, 0))]
        kinds += [("one_core", ("prepare", data, out, z0, z1, False, 1))] if cache == "warm" else []
        kinds += [("prep", ("prepare", data, out, z0, z1, False, 0))]  # last: the tile reads use this store
        for kind, args in kinds:
            if cache == "cold":
                evict(data)
            row[kind, cache] = run_child(__file__, *args)
        print(f"  slices {z0}:{z1} ({mb:.0f} MB), {cache} cache: raw read {mb / row['raw', cache]['seconds']:.0f} MB/s, "
              f"prepare {mb / row['prep', cache]['main_s']:.0f} MB/s (volume copy {mb / row['prep', cache]['copy_s']:.0f}"
              f" MB/s, serial copy {mb / row['serial', cache]['copy_s']:.0f} MB/s), "
              f"peak RSS {row['prep', cache]['rss_mb']:.0f} MiB", flush=True)
    row["ratio_store"] = mb / (out / "train" / "frag.h5").stat().st_size * 1e6
    return row


def verdicts(rows, tiles, by_range):
    ratios = {c: [r["mb"] / r["prep", c]["main_s"] / (r["mb"] / r["raw", c]["seconds"]) for r in rows]
              for c in ("warm", "cold")}
    peaks = [r["prep", "warm"]["rss_mb"] for r in rows]
    spread = max(max(v) / min(v) - 1 for v in by_range.values())
    walls = [t["store"][0] for _, t in tiles]
    cpus = [t["store"][1] for _, t in tiles]

    def met(ok):
        return "**met**" if ok else "**missed**"

    return [
        f"- prepare / raw >= 0.7: {met(min(ratios['warm'] + ratios['cold']) >= 0.7)} "
        f"(warm {min(ratios['warm']):.2f}-{max(ratios['warm']):.2f}, cold {min(ratios['cold']):.2f}-{max(ratios['cold']):.2f}).",
        f"- peak RSS <= 1 GB: {met(max(peaks) <= 1024)} (at most {max(peaks):.0f} MiB); flat within 20 % across "
        f"sizes: {met(spread <= 0.2)} ({spread:+.0%}).",
        f"- store tile reads >= 300/s on one core: {met(min(walls) >= 300)} ({min(walls):.0f}-{max(walls):.0f}/s wall, "
        f"{min(cpus):.0f}-{max(cpus):.0f} per CPU-second).",
    ]


def report(rows, tiles, codecs, steps, header, elapsed, args):
    date = datetime.date.today().isoformat()
    load = os.getloadavg()[0]
    lines = [
        f"`make bench-prepare` (`python bench/bench_prepare.py`), run {date} on {header}, {load:.1f} at the end; "
        f"the whole run took {elapsed:.0f} s. Synthetic train fragments of exact shapes (lib.synth.FragmentFields + "
        "write_fragment: 65 uncompressed uint16 TIFF slices, mask, labels, IR) generated into a temp folder just "
        "before. Each number is one fresh subprocess, one run.",
        "",
        "- MB = 10^6 bytes of kept-slice volume (slices x H x W x 2).",
        "- *raw read*: the same row bands (lib.store.band_rows) read with Fragment.read_band and dropped: the rate at "
        "which the sources can be decoded (one positioned read per slice and band). *prepare*: prepare.main() with "
        "--force (validation of all 65 slice headers and the PNGs, the volume copy, the maps, tile index, "
        "percentiles, the summary line; Python start-up and imports, about 1 s, excluded). *copy*: "
        "lib.store._copy_volume alone (read, compress, write, histograms: a reader thread and a pool of one thread "
        "per core that compresses and counts); *serial copy*: the same job done the plain way (one thread, HDF5's own Blosc filter, numpy "
        "histograms: serial_copy_volume in bench/bench_prepare.py); *non-copy s*: the rest of prepare.main.",
        "- *warm*: the sources are in the page cache (they were just written), so raw read is a memory copy. *cold*: "
        "the dataset's files were dropped from the page cache first (sync + posix_fadvise DONTNEED), so reads come "
        "from the (virtual) disk.",
        "- Peak RSS: VmHWM of the prepare process (imports included, about 70 MiB), warm run.",
        "",
        "| fragment | slices | volume MB | raw read MB/s warm / cold | prepare MB/s warm / cold "
        "| prepare / raw warm / cold (target >= 0.7) | copy MB/s warm / cold | serial copy MB/s warm / cold "
        "| copy / serial copy warm / cold | non-copy s warm | peak RSS MiB (target <= 1 GB) | store ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mbps = {(kind, c): r["mb"] / r[kind, c]["main_s" if kind == "prep" else "seconds"] for kind in ("raw", "prep")
                for c in ("warm", "cold")}
        copy = {(kind, c): r["mb"] / r[kind, c]["copy_s"] for kind in ("prep", "serial") for c in ("warm", "cold")}

        def pair(table, kind):
            return " / ".join(f"{table[kind, c]:.0f}" for c in ("warm", "cold"))

        lines.append(
            f"| {r['shape'][0]} x {r['shape'][1]} | {r['z'][0]}:{r['z'][1]} | {r['mb']:.0f} | {pair(mbps, 'raw')} "
            f"| {pair(mbps, 'prep')} | {mbps['prep', 'warm'] / mbps['raw', 'warm']:.2f} / "
            f"{mbps['prep', 'cold'] / mbps['raw', 'cold']:.2f} | {pair(copy, 'prep')} | {pair(copy, 'serial')} "
            f"| {copy['prep', 'warm'] / copy['serial', 'warm']:.1f}x / {copy['prep', 'cold'] / copy['serial', 'cold']:.1f}x "
            f"| {r['prep', 'warm']['main_s'] - r['prep', 'warm']['copy_s']:.2f} "
            f"| {r['prep', 'warm']['rss_mb']:.0f} | {r['ratio_store']:.2f} |")
    by_range = {}
    for r in rows:
        by_range.setdefault(r["z"], []).append(r["prep", "warm"]["rss_mb"])
    spread = ", ".join(f"slices {z[0]}:{z[1]} {max(v) / min(v) - 1:+.0%}" for z, v in by_range.items())
    lines += ["", f"Peak RSS, largest over smallest across fragment sizes (target within 20 %): {spread}.", ""]
    lines += [
        "Cores: the volume copy (warm cache) with the prepare process pinned to one core (one compression thread) "
        "and on both.",
        "",
        "| fragment | slices | copy MB/s, 1 core | copy MB/s, 2 cores | 2 cores / 1 core |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        one, two = (r["mb"] / r[kind, "warm"]["copy_s"] for kind in ("one_core", "prep"))
        lines.append(f"| {r['shape'][0]} x {r['shape'][1]} | {r['z'][0]}:{r['z'][1]} | {one:.0f} | {two:.0f} "
                     f"| {two / one:.2f}x |")
    lines.append("")
    lines += [
        f"Random tile reads: {args.tiles} reads of 16 x {TILE} x {TILE} at positions drawn from the store's tile index "
        "(224/56 grid), fresh process pinned to one core, store file in the page cache. *store*: Store.read_tile; "
        "*numpy*: the same windows sliced and copied from the whole volume loaded into memory. Tiles per wall-clock "
        "second / per CPU-second.",
        "",
        "| fragment | store (target >= 300) | in-memory numpy |",
        "|---|---|---|",
    ]
    for shape, t in tiles:
        lines.append(f"| {shape[0]} x {shape[1]} | {t['store'][0]:.0f} / {t['store'][1]:.0f} "
                     f"| {t['numpy'][0]:.0f} / {t['numpy'][1]:.0f} |")
    lines += ["", "Targets, this run:", ""] + verdicts(rows, tiles, by_range)
    shape, step_rates = steps
    lines += [
        "",
        f"Codecs and chunks: the {shape[0]} x {shape[1]} fragment's slices 24:40 written with each Blosc codec "
        f"(lib.store.VOLUME_CODEC; chunks (16, 56, 56) unless named), then {args.tiles // 2} tile reads on one core.",
        "",
        "| codec | size ratio | copy MB/s | tiles/s wall / CPU-s |",
        "|---|---|---|---|",
    ]
    for name, c in codecs.items():
        bold = "**" if name == CHOSEN else ""
        lines.append(f"| {bold}{name}{' (chosen)' if bold else ''}{bold} | {c['ratio']:.2f} | {c['copy_mb_s']:.0f} "
                     f"| {c['tiles']:.0f} / {c['tiles_cpu']:.0f} |")
    lines += ["", f"One core, each step of the volume copy on one band of 16 slices ({shape[0]} x {shape[1]}), MB of "
              "volume per CPU-second:", ""]
    lines += [f"- {name}: {value:.0f}" for name, value in step_rates.items()]
    lines += ["", NOTES]
    return "\n".join(lines)


if __name__ == "__main__":
    if is_child():
        child_main({"raw": child_raw, "prepare": child_prepare, "generate": child_generate, "codec": child_codec,
                    "steps": child_steps, "tiles": child_tiles})
    else:
        main()
