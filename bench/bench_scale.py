"""Benchmark scroll-scale prediction and zarr input (`make bench-scale`); writes bench/README.md's tables "scale-rss",
"scale-ray" and "scale-prepare", the three parts below (--parts: some of them alone; the others' tables stay).

rss:     peak RSS (VmHWM) of submit.py, run in a fresh process, on synthetic 8-bit segments of each --sizes (H x W)
         whose mask covers the same 512 x 512 px (so the same compute): it must not grow with the segment's area;
         also with --min-component (which once held the whole binary mask).
ray:     submit.py --workers 1 and 2 (a local Ray of that many one-CPU workers, one torch thread each) on one segment
         of --ray-size, in --band-rows bands: wall seconds of the whole call, a band's, the rest (starting Ray,
         each worker's imports and models, the finishing pass: a fixed cost a call) and the speed-up. 12 bands by
         default, where real segments (10 to 80 kpx tall) have tens to hundreds: the fixed cost weighs on a tiny
         segment only.
prepare: prepare.py on the same layers as local TIFF files and as an OME-Zarr served over HTTP by `python -m
         http.server` (another process, on this machine): MB/s of kept volume, each in a fresh process, the best of
         PREPARE_ROUNDS, and the ratio.
"""
import contextlib
import io
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
import zarr

from bench_common import (in_fresh_process, maxrss_mb, parser, run_script, stamp, write_fragment, write_tables,
                          write_tiny_run)
from lib.fragments import Fragment
from lib.model import load_model_file
from lib.store import write_store

SETTINGS = dict(parts="rss,ray,prepare", sizes="20000x10000,40000x20000", ray_size="12288x2048", band_rows=1024,
                prepare_size="4096x4096", zarr_chunks="16,512,512")
PARTS = ("rss", "ray", "prepare")  # each writes its table between its own markers, <!-- scale-PART -->
MIN_COMPONENT = 16  # px: the rss part's second run, with --min-component
RSS_HEAD = ("segment (8-bit, 512 x 512 px mask) | Mpx | peak RSS MiB | before MiB | growth MiB | seconds | "
            f"peak RSS MiB with --min-component {MIN_COMPONENT} | store")
RAY_HEAD = ("segment | Ray workers | seconds | a band, s (mean) | besides the bands, s | speed-up | "
            "output equals the single-process run")
PREPARE_HEAD = "prepare.py source | layers | volume MB | MB/s | vs local TIFF | peak RSS MiB"
PREPARE_ROUNDS = 2  # each source is prepared this often, alternately; its best rate is the one shown
BACKBONE = "tu-mobilenetv3_small_050"
TILE, STRIDE = 64, 32  # the demo preset's tiles, what CPU runs use
MASK_SIDE = 512  # px: the papyrus square of the RSS segments


class SquareSegment:
    """A synthetic 8-bit test segment of any size, made up as it is read: 40 layers of lib.synth texture on a centred
    MASK_SIDE square of papyrus, zero elsewhere (no source files: write_store reads it like a Fragment)."""

    layout, split, has_labels, num_slices, dtype = "segments", "test", False, 40, np.dtype(np.uint8)

    def __init__(self, folder, height, width):
        from lib.synth import FragmentFields

        self.path, self.fragment_id, self.shape = Path(folder), "seg", (height, width)
        self.top, self.left = (height - MASK_SIDE) // 2, (width - MASK_SIDE) // 2
        rng = np.random.default_rng(0)
        fields = FragmentFields(rng, (MASK_SIDE, MASK_SIDE))
        fields.mask[:] = 1
        self.texture = np.stack([fields.slice(rng, z) >> 8 for z in range(self.num_slices)]).astype(np.uint8)

    def source_files(self):
        return []

    def read_mask(self):
        mask = np.zeros(self.shape, np.uint8)
        mask[self.top: self.top + MASK_SIDE, self.left: self.left + MASK_SIDE] = 1
        return mask

    def read_layers(self, layers, y0, y1, out):
        out[...] = 0
        a, b = max(y0, self.top), min(y1, self.top + MASK_SIDE)
        if a < b:
            out[:, a - y0: b - y0, self.left: self.left + MASK_SIDE] = self.texture[layers, a - self.top: b - self.top]
        return out




def child_submit(run, model_file, stores, extra):
    """(peak RSS, RSS before predicting, seconds, [seconds of each band, as submit.py prints them])."""
    torch.set_num_threads(1)  # memory does not depend on it; two threads contend with other work on 2 cores
    load_model_file(model_file)
    before, started, printed = maxrss_mb(), time.perf_counter(), io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_script("submit.py", ["--run", run, "--stores", stores, "--no-tta", "--no-triplets", "--threads", "1",
                                 "--force", *extra])
    bands = [float(s) for s in re.findall(r"band \d+/\d+ .* predicted in (\d+) s", printed.getvalue())]
    return maxrss_mb(), before, time.perf_counter() - started, bands


def rss_rows(work, run, model_file, sizes):
    rows = []
    for size in sizes.split(","):
        height, width = map(int, size.split("x"))
        stores = work / f"rss-{size}"
        started = time.perf_counter()
        summary = write_store(SquareSegment(work, height, width), stores / "test" / "seg.h5", tile_size=TILE,
                              stride=STRIDE, progress=False)
        seconds = time.perf_counter() - started
        peak, before, predict, _ = in_fresh_process(child_submit, run, model_file, stores, ["--zarr"])
        filtered = in_fresh_process(child_submit, run, model_file, stores, ["--min-component", MIN_COMPONENT])[0]
        rows.append(f"{height} x {width} | {height * width / 1e6:.0f} | {peak:.0f} | {before:.0f} | {peak - before:.0f} | "
                    f"{predict:.0f} | {filtered:.0f} | {summary['bytes'] / 2**20:.0f} MiB, {seconds:.0f} s")
    return rows


def ray_rows(work, run, model_file, size, band_rows):
    height, width = map(int, size.split("x"))
    data, stores = work / "ray-data", work / "ray-stores"
    write_fragment(data / "test" / "frag", height, width, 40, labels=False)
    write_store(Fragment.open(data, "test", "frag"), stores / "test" / "frag.h5", tile_size=TILE, stride=STRIDE,
                progress=False)
    timings = {workers: in_fresh_process(child_submit, run, model_file, stores,
                                         ["--workers", str(workers), "--band-rows", str(band_rows), "--zarr"])[2:]
               for workers in (1, 2)}
    outputs = [zarr.open_array(run / "predictions" / "frag_prediction.zarr")[...]]  # the last run's, to compare
    in_fresh_process(child_submit, run, model_file, stores, ["--band-rows", str(band_rows), "--zarr"])
    same = np.array_equal(outputs[0], zarr.open_array(run / "predictions" / "frag_prediction.zarr")[...])
    rows = []
    for workers, (seconds, bands) in timings.items():
        rows.append(f"{height} x {width}, {len(bands)} bands | {workers} | {seconds:.1f} | {np.mean(bands):.1f} | "
                    f"{seconds - sum(bands) / workers:.1f} | {timings[1][0] / seconds:.2f} | {'yes' if same else 'NO'}")
    return rows


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_prepare(data, out):
    started = time.perf_counter()
    run_script("prepare.py", ["--data", data, "--out", out, "--z-range", "24:40", "--force", "--tile-size", "224",
                              "--stride", "56"])
    return time.perf_counter() - started, maxrss_mb()


def prepare_rows(work, size, chunks):
    height, width = map(int, size.split("x"))
    tiffs, served = work / "prep-tiff", work / "served"
    write_fragment(tiffs / "test" / "frag", height, width, 40, labels=False)
    served.mkdir()
    slices = sorted((tiffs / "test" / "frag" / "surface_volume").glob("*.tif"))
    group = zarr.open_group(served / "frag.zarr", mode="w", zarr_format=2)  # OME-Zarr 0.4, as segments are served
    group.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}]}]
    volume = group.create_array("0", shape=(len(slices), height, width), dtype=np.uint16,
                                chunks=tuple(int(c) for c in chunks.split(",")))
    for z, path in enumerate(slices):
        volume[z] = tifffile.imread(path)
    shutil.copy(tiffs / "test" / "frag" / "mask.png", served / "frag_mask.png")  # the same file: grey, as read there
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(served)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        mb = 16 * height * width * 2 / 1e6
        rates = {}
        for _ in range(PREPARE_ROUNDS):  # alternating, so that a burst of other work on the machine hits both
            for name, data in (("local TIFF", tiffs), ("OME-Zarr over HTTP", f"http://127.0.0.1:{port}/frag.zarr")):
                seconds, rss = in_fresh_process(child_prepare, data, work / f"prep-out-{name[:5]}")
                rates[name] = max(rates.get(name, (0, 0)), (mb / seconds, rss))
    finally:
        server.terminate()
        server.wait()
    base = rates["local TIFF"][0]
    return [f"{name} | {height} x {width}, 16 of 40 slices | {mb:.0f} | {rate:.0f} | {rate / base:.2f} | {rss:.0f}"
            for name, (rate, rss) in rates.items()]


def main():
    args = parser(__doc__, SETTINGS).parse_args()
    parts = args.parts.split(",")
    if not set(parts) <= set(PARTS):
        sys.exit(f"error: --parts {args.parts}: each part must be one of {', '.join(PARTS)}")
    model = f"{BACKBONE}, {TILE} px tiles, stride {STRIDE}, no TTA, one torch thread a process."
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        run = work / "run"
        model_file = write_tiny_run(run, BACKBONE, TILE, STRIDE) if {"rss", "ray"} & set(parts) else None
        for part in PARTS:
            if part not in parts:
                continue
            line, started = stamp(), time.time()
            if part == "rss":
                head, rows = RSS_HEAD, rss_rows(work, run, model_file, args.sizes)
            elif part == "ray":
                head, rows = RAY_HEAD, ray_rows(work, run, model_file, args.ray_size, args.band_rows)
            else:
                head, rows = PREPARE_HEAD, prepare_rows(work, args.prepare_size, args.zarr_chunks)
            write_tables(args.readme, f"scale-{part}", f"{line}; {time.time() - started:.0f} s."
                         f"{'' if part == 'prepare' else ' ' + model}", (head, rows))


if __name__ == "__main__":
    main()
