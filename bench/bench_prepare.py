"""Benchmark prepare.py and the tile store (`make bench-prepare`); writes its table into bench/README.md, "## prepare".

For each fragment size (synthetic, bench_common.write_fragment) and kept-slice range: the rate at which the TIFF row
bands can merely be read, prepare.py's rate and peak RSS (a fresh process), the store's size ratio and its random
tile reads on one core; on the first size, each volume codec and chunk side (write_store's codec= and side=).
Rates are MB/s of kept volume (slices x H x W x 2 bytes, 1 MB = 10^6 B).

    python bench/bench_prepare.py [--sizes 2048x2048,4096x2048] [--slices 65] [--tiles 600]
"""
import os
import tempfile
import time
from pathlib import Path

from bench_common import machine, main_or_child, maxrss_mb, parser, run_child, write_fragment, write_table

TILE = 224
LZ4 = {"compressor": "lz4", "level": 5}
CODECS = {  # name: (write_store's codec, chunk side; None: lib.store.chunk_side, one tile stride)
    "LZ4 + bitshuffle (chosen)": ({**LZ4, "shuffle": 2}, None),
    "LZ4 + bitshuffle, 64 px chunks (not aligned with the tiles)": ({**LZ4, "shuffle": 2}, 64),
    "LZ4 + byte shuffle": ({**LZ4, "shuffle": 1}, None),
    "LZ4, no shuffle": ({**LZ4, "shuffle": 0}, None),
    "zstd(1) + bitshuffle": ({"compressor": "zstd", "level": 1, "shuffle": 2}, None),
}


def raw_read(data, z0, z1):
    """Seconds to read the fragment's slices z0:z1 in prepare's row bands, dropping them (the sources' own rate)."""
    from lib.fragments import Fragment
    from lib.store import band_rows, chunk_side

    fragment = Fragment.open(data, "train", "frag")
    height, width = fragment.shape
    rows = band_rows(z1 - z0, width, chunk_side(TILE, TILE // 4))
    started = time.perf_counter()
    for y0, z in ((y0, z) for y0 in range(0, height, rows) for z in range(z0, z1)):
        fragment.read_band(z, y0, min(height, y0 + rows))
    return time.perf_counter() - started


def tile_rate(path, count):
    """(tiles per wall second, per CPU second) of Store.read_tile at `count` random tile-index positions, one core."""
    import numpy as np

    from lib.store import Store

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    store = Store(path)
    tiles = store.tiles()
    picks = tiles[np.random.default_rng(0).integers(0, len(tiles), count)].tolist()
    store.read_tile(*picks[0], TILE, TILE)
    wall, cpu = time.perf_counter(), time.process_time()
    for y, x in picks:
        store.read_tile(y, x, TILE, TILE)
    return count / (time.perf_counter() - wall), count / (time.process_time() - cpu)


def child_prepare(data, out, z0, z1, count):
    """prepare.py's seconds and peak RSS, then tile reads from the store it wrote."""
    import prepare

    started = time.perf_counter()
    prepare.main(["--data", data, "--out", out, "--z-range", f"{z0}:{z1}", "--force"])
    return {"seconds": time.perf_counter() - started, "rss_mb": maxrss_mb(),
            "tiles": tile_rate(Path(out) / "train" / "frag.h5", count)}


def child_codec(data, out, name, count):
    import h5py

    from lib.fragments import Fragment
    from lib.store import write_store

    codec, side = CODECS[name]
    summary = write_store(Fragment.open(data, "train", "frag"), out, progress=False, codec=codec, side=side)
    with h5py.File(out) as h5:
        raw, stored = h5["volume"].size * 2, h5["volume"].id.get_storage_size()
    return {"ratio": raw / stored, "copy": raw / 1e6 / summary["copy_seconds"], "tiles": tile_rate(out, count)}


def main():
    options = parser(__doc__)
    options.add_argument("--sizes", default="2048x2048,4096x2048", help="fragment shapes HxW")
    options.add_argument("--slices", type=int, default=65, help="slices of each fragment (>= 40); prepare keeps "
                         "the default 24:40, then all of them")
    options.add_argument("--tiles", type=int, default=600, help="random tile reads per measurement")
    args = options.parse_args()
    header, started = machine(), time.time()
    rows, codecs = [], []
    with tempfile.TemporaryDirectory() as work:
        for index, size in enumerate(args.sizes.split(",")):
            height, width = map(int, size.split("x"))
            data = Path(work) / size
            write_fragment(data / "train" / "frag", height, width, args.slices, labels=True)
            for z0, z1 in dict.fromkeys([(24, 40), (0, args.slices)]):
                out, mb = Path(work) / f"stores-{size}-{z0}", (z1 - z0) * height * width * 2 / 1e6
                raw, p = raw_read(data, z0, z1), run_child(__file__, "prepare", data, out, z0, z1, args.tiles)
                ratio = mb * 1e6 / (out / "train" / "frag.h5").stat().st_size
                rows.append(f"| {height} x {width} | {z0}:{z1} | {mb:.0f} | {mb / raw:.0f} | {mb / p['seconds']:.0f} "
                            f"| {raw / p['seconds']:.2f} | {p['rss_mb']:.0f} | {ratio:.2f} | {p['tiles'][0]:.0f} / "
                            f"{p['tiles'][1]:.0f} |")
            for name in CODECS if index == 0 else ():
                c = run_child(__file__, "codec", data, Path(work) / "codec.h5", name, args.tiles)
                codecs.append(f"| {name} | {c['ratio']:.2f} | {c['copy']:.0f} | {c['tiles'][0]:.0f} / {c['tiles'][1]:.0f} |")
    write_table(args.readme, "prepare", "\n".join([
        f"`python bench/bench_prepare.py --sizes {args.sizes} --slices {args.slices} --tiles {args.tiles}`, "
        f"{time.strftime('%Y-%m-%d')}, {header}; {time.time() - started:.0f} s in all.", "",
        "| fragment | slices | volume MB | raw read MB/s | prepare MB/s | prepare / raw | peak RSS MiB | store ratio "
        "| tile reads/s on one core, wall / CPU |", "|---|---|---|---|---|---|---|---|---|", *rows, "",
        "| codec (first fragment, slices 24:40) | size ratio | copy MB/s | tile reads/s wall / CPU |", "|---|---|---|---|",
        *codecs]))


if __name__ == "__main__":
    main_or_child(main, {"prepare": child_prepare, "codec": child_codec})
