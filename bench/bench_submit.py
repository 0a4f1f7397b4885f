"""Benchmark submit.py's memory (`make bench-submit`): submit.main's peak RSS per test fragment size, each in a fresh
process; writes bench/README.md's table "submit". Its speed per batch size is bench_gpu.py's inference table."""
import tempfile
import time
from pathlib import Path

import torch

from bench_common import (in_fresh_process, maxrss_mb, parser, run_script, stamp, write_fragment, write_tables,
                          write_tiny_run)
from lib.fragments import Fragment
from lib.model import load_model_file
from lib.store import write_store

SETTINGS = dict(sizes="512,2048")  # test fragment sides; the first also with TTA and triplets
BACKBONE = "tu-mobilenetv3_small_050"
TILE, STRIDE = 64, 32  # the demo preset's tiles, what CPU runs use


def child_rss(run, model_file, stores, tta):
    torch.set_num_threads(1)  # memory does not depend on it; two threads contend with other work on 2 cores
    load_model_file(model_file)
    before, started = maxrss_mb(), time.perf_counter()
    run_script("submit.py", ["--run", run, "--stores", stores, *([] if tta else ["--no-tta", "--no-triplets"])])
    peak = maxrss_mb()
    return f"{peak:.0f} | {before:.0f} | {peak - before:.0f} | {time.perf_counter() - started:.0f}"


def main():
    args = parser(__doc__, SETTINGS).parse_args()
    line, started, rows = stamp(), time.time(), []
    with tempfile.TemporaryDirectory() as work:
        run = Path(work) / "run"
        model_file = write_tiny_run(run, BACKBONE, TILE, STRIDE)
        for index, size in enumerate(int(s) for s in args.sizes.split(",")):
            data, stores = Path(work) / f"data{size}", Path(work) / f"stores{size}" / "test" / "frag.h5"
            write_fragment(data / "test" / "frag", size, size, 40, labels=False)  # 40 slices: the default 24:40
            write_store(Fragment.open(data, "test", "frag"), stores, tile_size=TILE, stride=STRIDE, progress=False)
            for tta in (False, True) if index == 0 else (False,):
                cells = in_fresh_process(child_rss, run, model_file, stores.parents[1], tta)
                rows.append(f"{size} x {size} | {'yes' if tta else 'no'} | {cells}")
    write_tables(args.readme, "submit", f"{line}; {time.time() - started:.0f} s in all. {BACKBONE}, {TILE} px tiles, "
                 f"stride {STRIDE}.", ("fragment | TTA + triplets | peak RSS MiB | before MiB | growth MiB | seconds",
                                       rows))


if __name__ == "__main__":
    main()
