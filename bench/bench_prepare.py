"""Benchmark prepare.py and the tile store (`make bench-prepare`); writes bench/README.md's table "prepare". Rates
are MB/s of kept volume (slices x H x W x 2 bytes, 1 MB = 10^6 B); prepare and each codec run in a fresh process."""
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from bench_common import in_fresh_process, maxrss_mb, parser, run_script, stamp, write_fragment, write_tables
from lib.fragments import Fragment
from lib.store import VOLUME_CODEC, Store, band_rows, chunk_side, write_store

SETTINGS = dict(sizes="2048x2048,4096x2048", slices=65, tiles=600)  # fragment shapes, slices (>= 40), tile reads
TILE = 224
CODECS = {  # name: (write_store's codec, chunk side; None: lib.store.chunk_side, one tile stride)
    "LZ4 + bitshuffle (chosen)": (VOLUME_CODEC, None),
    "LZ4 + bitshuffle, 64 px chunks (not aligned with the tiles)": (VOLUME_CODEC, 64),
    "LZ4 + byte shuffle": ({**VOLUME_CODEC, "shuffle": 1}, None),
    "LZ4, no shuffle": ({**VOLUME_CODEC, "shuffle": 0}, None),
    "zstd(1) + bitshuffle": ({"compressor": "zstd", "level": 1, "shuffle": 2}, None),
}


def raw_read(fragment, z0, z1):
    """Seconds to read slices z0:z1 in prepare's row bands, dropping them: the sources' own rate."""
    height, width = fragment.shape
    rows, started = band_rows(z1 - z0, width, chunk_side(TILE, TILE // 4)), time.perf_counter()
    for y0, z in ((y0, z) for y0 in range(0, height, rows) for z in range(z0, z1)):
        fragment.read_band(z, y0, min(height, y0 + rows))
    return time.perf_counter() - started


def tile_rate(path, count):
    """Store.read_tile at `count` random tile-index positions on one core: "reads per wall second / per CPU s"."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    store = Store(path)
    tiles = store.tiles()
    picks = tiles[np.random.default_rng(0).integers(0, len(tiles), count)].tolist()
    store.read_tile(*picks[0], TILE, TILE)
    wall, cpu = time.perf_counter(), time.process_time()
    for y, x in picks:
        store.read_tile(y, x, TILE, TILE)
    return f"{count / (time.perf_counter() - wall):.0f} / {count / (time.process_time() - cpu):.0f}"


def child_prepare(data, out, z0, z1, count):
    started = time.perf_counter()
    run_script("prepare.py", ["--data", data, "--out", out, "--z-range", f"{z0}:{z1}", "--force"])
    return time.perf_counter() - started, maxrss_mb(), tile_rate(out / "train" / "frag.h5", count)


def child_codec(data, out, name, count):
    codec, side = CODECS[name]
    summary = write_store(Fragment.open(data, "train", "frag"), out, progress=False, codec=codec, side=side)
    with h5py.File(out) as h5:
        raw, stored = h5["volume"].size * 2, h5["volume"].id.get_storage_size()
    return f"{name} | {raw / stored:.2f} | {raw / 1e6 / summary['copy_seconds']:.0f} | {tile_rate(out, count)}"


def main():
    args = parser(__doc__, SETTINGS).parse_args()
    line, started, rows, codecs = stamp(), time.time(), [], []
    with tempfile.TemporaryDirectory() as work:
        for size in args.sizes.split(","):
            height, width = map(int, size.split("x"))
            data = Path(work) / size
            write_fragment(data / "train" / "frag", height, width, args.slices, labels=True)
            for z0, z1 in dict.fromkeys([(24, 40), (0, args.slices)]):  # prepare's default slices, then all
                out, mb = Path(work) / f"stores-{size}-{z0}", (z1 - z0) * height * width * 2 / 1e6
                raw = raw_read(Fragment.open(data, "train", "frag"), z0, z1)
                seconds, rss, tiles = in_fresh_process(child_prepare, data, out, z0, z1, args.tiles)
                ratio = mb * 1e6 / (out / "train" / "frag.h5").stat().st_size
                rows.append(f"{height} x {width} | {z0}:{z1} | {mb:.0f} | {mb / raw:.0f} | {mb / seconds:.0f} | "
                            f"{raw / seconds:.2f} | {rss:.0f} | {ratio:.2f} | {tiles}")
            codecs = codecs or [in_fresh_process(child_codec, data, Path(work) / "codec.h5", name, args.tiles)
                                for name in CODECS]  # the first fragment's
    write_tables(args.readme, "prepare", f"{line}; {time.time() - started:.0f} s in all.",
                 ("fragment | slices | volume MB | raw read MB/s | prepare MB/s | prepare / raw | peak RSS MiB | "
                  "store ratio | tile reads/s on one core, wall / CPU", rows),
                 ("codec (first fragment, slices 24:40) | size ratio | copy MB/s | tile reads/s wall / CPU", codecs))


if __name__ == "__main__":
    main()
