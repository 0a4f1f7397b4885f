"""Benchmark submit.py's inference; writes the "## submit" section of bench/README.md.

    python bench/bench_submit.py [--backbone tu-mobilenetv3_small_050] [--speed-size 192] [--rss-sizes 512,2048]
                                 [--naive-cap 30] [--work DIR] [--no-readme]      (make bench-submit)

1. Speed: sliding-window prediction of one fragment by one model (random weights, seed 0) with rot90 x4 TTA and
   the three centre-slice triplets, as submit.py does it (lib.infer.predict_fragment: 12 inputs per tile, many
   tiles per model call) against a plain loop written here (one tile, one triplet, one rotation per model call,
   then averaged). Both must give the same map. Megapixels/s = fragment pixels (H x W) / 10^6 / seconds;
   at 1 and 2 torch threads and a few batch sizes. A naive run that passes --naive-cap seconds stops there and
   its rate comes from the tiles it finished (then the maps are not compared).
2. Memory: peak RSS (VmHWM) of submit.main on one test fragment (one model, 64 px tiles) in a fresh process, at
   two fragment sizes, to show what grows with the fragment.
Every measurement runs in its own subprocess (`--child ...` modes of this script); inputs are synthetic
fragments (lib.synth) written to a temp folder first.
"""
import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_common import child_main, is_child, machine, maxrss_mb, run_child  # bench/ is on sys.path as a script
from bench_readme import README, write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TILE, STRIDE = 64, 32  # the demo preset's tiles (train.py PRESETS["demo"]), what CPU runs use
NUM_SLICES = 40  # enough for the stores' default slices 24:40
SPEED_CONFIGS = ((1, (1, 16, 4)), (2, (4,)))  # (torch threads, batch sizes in tiles; the last is submit's on CPU)

NOTES = """\
What the numbers say (this and earlier runs of 2026-11-27 on the same machine; other jobs came and went):

- **batched / naive (target >= 3): 2.8-3.6x at 1 thread over four runs, 5.4x at 2 threads on a quiet machine.**
  With 64 px tiles a single input is already a fair amount of work for one core, so at 1 thread the gain comes
  from running a tile's 12 TTA x triplet inputs together (1 tile per call already gives most of it). More tiles
  per call do not help on CPU: 4 tiles (48 inputs) was fastest in every run, 16 tiles (192 inputs) 15-30 % slower
  (activations fall out of cache) and ~200 MiB bigger, so submit.py's --batch-size defaults to 4 tiles on CPU
  (16 on GPU). The second thread speeds up the batched path (1.3x) but not the naive loop.
- **Threads on a shared CPU: 1, not 2.** While other jobs kept both cores busy (load 3-4), 2 torch threads spun
  against each other: batched prediction ran at 0.0024 Mpx/s with 2 threads against 0.025 with 1 (10x slower), the
  naive loop at 0.0001 (70x slower). `submit.py --threads 1` (or OMP_NUM_THREADS=1) avoids this; on an idle
  machine the default (one thread per core) is faster.
- **channels_last weights** (lib.model.load_model_file, which submit.py uses): 1.5-1.9x for this model at
  1 thread (last column; 2-thread rows compare only when nothing else runs); measured apart (1 thread, batch 8,
  128 px): resnet18 1.2x, resnet34 1.6x, efficientnet-b3 1.2x, mit_b2 1.0x. The maps agree to 1e-6.
- **Peak RSS**: ~775 MiB are torch, smp/timm and one model. It then grows by 13-15 bytes per fragment pixel (the
  running ensemble sum, predict_fragment's sum and weight maps, the mask, the binary mask, RLE and preview), about
  +0.6 GiB for a 48 Mpx fragment, plus a constant ~85 MiB of activations for TTA + triplets at 4 tiles per call
  (~310 MiB at 16 tiles, measured in an earlier run).
"""


# ---------------------------------------------------------------- children (one measurement each, fresh process)


def predict_naive(model, store, tile_size, stride, cap_s):
    """predict_fragment's map the plain way: for each tile, each triplet, each rotation, one model call on one
    input, rotated back; the 12 averaged, blended into the map with the same weights. Stops after cap_s seconds:
    returns (map or None when stopped, tiles done)."""
    import numpy as np
    import torch

    from lib.data import CENTRE_SLICES, TRIPLETS, normalise
    from lib.infer import blend_weights

    height, width = store.shape
    total = np.zeros(store.shape, np.float32)
    weight_sum = np.zeros(store.shape, np.float32)
    weights = blend_weights(tile_size)
    intensity_range = store.intensity_range()
    positions = store.tiles(tile_size, stride)
    started = time.perf_counter()
    with torch.inference_mode():
        for done, (y, x) in enumerate(positions):
            if time.perf_counter() - started > cap_s:
                return None, done
            tile = torch.from_numpy(normalise(store.read_tile(y, x, tile_size, tile_size, CENTRE_SLICES), intensity_range))
            prob = torch.zeros(tile_size, tile_size)
            for triplet in TRIPLETS:
                for k in range(4):
                    output = torch.sigmoid(model(torch.rot90(tile[list(triplet)], k, (1, 2))[None]))
                    prob += torch.rot90(output[0, 0], -k, (0, 1))
            prob = (prob / (len(TRIPLETS) * 4)).numpy()
            h, w = min(tile_size, height - y), min(tile_size, width - x)
            total[y: y + h, x: x + w] += prob[:h, :w] * weights[:h, :w]
            weight_sum[y: y + h, x: x + w] += weights[:h, :w]
    np.divide(total, weight_sum, out=total, where=weight_sum > 0)
    return total * store.read_map("mask"), len(positions)


def timed(function, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process): CPU time is less disturbed by other work on the cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def child_speed(store_path, model_path, threads, batch_sizes, cap_s):
    """Mpx/s (wall, per CPU-second) of the batched path at each batch size, of the naive loop, and of the batched
    path with the weights in the default layout; the maps compared."""
    import numpy as np
    import torch

    from lib.infer import predict_fragment
    from lib.model import load_model_file
    from lib.store import Store

    torch.set_num_threads(threads)
    store = Store(store_path)
    model, _ = load_model_file(model_path)  # as submit.py loads it
    num_tiles = len(store.tiles(TILE, STRIDE))
    megapixels = store.shape[0] * store.shape[1] / 1e6
    predict_fragment(model, store, TILE, STRIDE, batch_size=4)  # warm-up: first calls allocate and tune
    report = {"threads": threads, "shape": store.shape, "tiles": num_tiles, "batched": {}}
    maps = {}
    for batch_size in batch_sizes:
        maps[batch_size], wall, cpu = timed(predict_fragment, model, store, TILE, STRIDE, batch_size=batch_size)
        report["batched"][batch_size] = (megapixels / wall, megapixels / cpu)
    (naive, done), wall, cpu = timed(predict_naive, model, store, TILE, STRIDE, cap_s)
    report["naive"] = (megapixels * done / num_tiles / wall, megapixels * done / num_tiles / cpu)
    report["naive_complete"] = naive is not None
    if naive is not None:
        report["max_abs_diff"] = max(float(np.abs(m - naive).max()) for m in maps.values())
        for m in maps.values():
            np.testing.assert_allclose(m, naive, atol=1e-4, err_msg="batched and naive maps differ")
    # what channels_last weights (lib.model.load_model_file) gain: the default layout, at the last batch size
    model = model.to(memory_format=torch.contiguous_format)
    _, wall, cpu = timed(predict_fragment, model, store, TILE, STRIDE, batch_size=batch_sizes[-1])
    report["batched_contiguous"] = (megapixels / wall, megapixels / cpu)
    return report


def child_rss(run, stores, tta):
    """Peak RSS of submit.main on the one test store in `stores`, and the peak before it (imports + one model).
    One torch thread: memory does not depend on it, and two threads contend with other work on 2 cores."""
    import torch

    import submit
    from lib.model import load_model_file

    torch.set_num_threads(1)
    load_model_file(next(Path(run).glob("models/*/*.pt")))
    before = maxrss_mb()
    started = time.perf_counter()
    submit.main(["--run", run, "--stores", stores, *([] if tta else ["--no-tta", "--no-triplets"])])
    return {"rss_mb": maxrss_mb(), "before_mb": before, "seconds": time.perf_counter() - started}


def child_generate(root, size, seed):
    """One test fragment of exactly size x size (40 slices, mask) and its store (64 px tiles, stride 32)."""
    import numpy as np

    from lib.fragments import Fragment
    from lib.store import write_store
    from lib.synth import FragmentFields, write_fragment

    rng = np.random.default_rng(seed)
    write_fragment(Path(root) / "data" / "test" / "frag", FragmentFields(rng, (size, size)), rng, NUM_SLICES, False,
                   progress=False)
    write_store(Fragment.open(Path(root) / "data", "test", "frag"), Path(root) / "stores" / "test" / "frag.h5",
                tile_size=TILE, stride=STRIDE, progress=False)
    return {}


# ---------------------------------------------------------------- parent


def make_fragment(work, size, seed):
    """Folder whose stores/test/frag.h5 is a size x size synthetic fragment."""
    folder = work / f"frag{size}"
    run_child(__file__, "generate", folder, size, seed)
    return folder


def make_run(folder, backbone):
    """A run folder submit.py accepts: one member with one random-weight model (seed 0), absolute threshold 0.5."""
    import torch

    from lib.model import build_model, model_config

    torch.manual_seed(0)
    path = folder / "run" / "models" / backbone / "fold-1.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": model_config(backbone, 3), "state_dict": build_model(backbone).state_dict(), "fold": "1",
                "tile_size": TILE, "stride": STRIDE}, path)
    ensemble = {"members": [{"backbone": backbone, "weight": 1.0, "models": [str(path.relative_to(folder / "run"))],
                             "tile_size": TILE, "stride": STRIDE}],
                "threshold": {"mode": "absolute", "value": 0.5}}
    (folder / "run" / "ensemble.json").write_text(json.dumps(ensemble))
    return folder / "run"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="tu-mobilenetv3_small_050")
    parser.add_argument("--speed-size", type=int, default=192, help="fragment side for the speed comparison")
    parser.add_argument("--rss-sizes", default="512,2048", help="two fragment sides for peak RSS (TTA also at the first)")
    parser.add_argument("--naive-cap", type=float, default=30, help="seconds after which the naive loop stops")
    parser.add_argument("--work", type=Path, help="folder for fragments and runs (default: a temp dir, removed)")
    parser.add_argument("--no-readme", action="store_true", help="print only; leave bench/README.md alone")
    args = parser.parse_args()
    rss_sizes = [int(s) for s in args.rss_sizes.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_submit_"))
    started, header = time.time(), machine()
    print(header, flush=True)
    try:
        folder = make_fragment(work, args.speed_size, seed=0)
        model_path = next(make_run(folder, args.backbone).glob("models/*/*.pt"))
        speeds = []
        for threads, batch_sizes in SPEED_CONFIGS:
            speeds.append(run_child(__file__, "speed", folder / "stores" / "test" / "frag.h5", model_path, threads,
                                    batch_sizes, args.naive_cap))
            s = speeds[-1]
            print(f"{threads} thread(s): batched {', '.join(f'{v[0]:.4f}' for v in s['batched'].values())} Mpx/s, "
                  f"naive {s['naive'][0]:.4f} Mpx/s", flush=True)
        rss = []
        for index, size in enumerate(rss_sizes):
            folder = make_fragment(work, size, seed=1 + index)
            print(f"{size} x {size} fragment ready after {time.time() - started:.0f} s", flush=True)
            run = make_run(folder, args.backbone)
            for tta in (False, True) if index == 0 else (False,):
                rss.append({"size": size, "tta": tta, **run_child(__file__, "rss", run, folder / "stores", tta)})
                print(f"{size} x {size}, TTA+triplets {tta}: peak RSS {rss[-1]['rss_mb']:.0f} MiB", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    body = report(speeds, rss, args, time.time() - started, header)
    print(f"\n## submit\n\n{body}")
    if not args.no_readme:
        write_section("submit", body)
        print(f"wrote the '## submit' section of {README.relative_to(ROOT)}")


def report(speeds, rss, args, elapsed, header):
    """The body of the "## submit" section."""
    lines = [
        f"`make bench-submit` (`python bench/bench_submit.py`), run {datetime.date.today().isoformat()} on {header}, "
        f"{os.getloadavg()[0]:.1f} at the end (other work shares the 2 cores; no GPU); the whole run took {elapsed:.0f} s.",
        "",
        f"Speed: one {speeds[0]['shape'][0]} x {speeds[0]['shape'][1]} synthetic fragment ({speeds[0]['tiles']} tiles "
        f"of {TILE} px, stride {STRIDE}), one {args.backbone} U-Net (random weights), rot90 x4 TTA and 3 triplets "
        "(12 model inputs per tile). *batched*: lib.infer.predict_fragment as submit.py calls it, batch = tiles per "
        "model call (x12 inputs); *naive*: one input per model call. Each cell: megapixels of fragment per wall-clock "
        "second / per CPU-second of the process (CPU time is less disturbed by the other work); one run each, "
        "fresh process per row; best batch size for the ratio.",
        "",
        "| torch threads | batched Mpx/s (batch, tiles) | naive Mpx/s | batched / naive (target >= 3) | same map "
        "| batched, weights not channels_last |",
        "|---|---|---|---|---|---|",
    ]
    for s in speeds:
        last = list(s["batched"])[-1]
        best = max(s["batched"].values())
        batched = ", ".join(f"{wall:.4f} / {cpu:.4f} ({b})" for b, (wall, cpu) in s["batched"].items())
        same = f"yes (max diff {s['max_abs_diff']:.1e})" if s["naive_complete"] else \
            f"not compared (naive stopped after {args.naive_cap:.0f} s)"
        lines.append(f"| {s['threads']} | {batched} | {s['naive'][0]:.4f} / {s['naive'][1]:.4f} "
                     f"| {best[0] / s['naive'][0]:.1f} / {best[1] / s['naive'][1]:.1f} | {same} "
                     f"| {s['batched_contiguous'][0]:.4f} / {s['batched_contiguous'][1]:.4f} ({last}) |")
    lines += [
        "",
        f"Peak RSS (VmHWM) of submit.main in a fresh process: one test fragment, one {args.backbone} model, "
        f"{TILE} px tiles, stride {STRIDE}, submit's CPU batch size (4 tiles), 1 torch thread, previews and CSV "
        "included; *before*: the same process after imports and loading one model.",
        "",
        "| fragment | TTA + triplets | peak RSS MiB | before MiB | growth MiB | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rss:
        lines.append(f"| {r['size']} x {r['size']} | {'yes' if r['tta'] else 'no'} | {r['rss_mb']:.0f} "
                     f"| {r['before_mb']:.0f} | {r['rss_mb'] - r['before_mb']:.0f} | {r['seconds']:.0f} |")
    plain = [r for r in rss if not r["tta"]]
    if len(plain) == 2:
        per_pixel = (plain[1]["rss_mb"] - plain[0]["rss_mb"]) * 2**20 / (plain[1]["size"] ** 2 - plain[0]["size"] ** 2)
        lines += ["", f"Growth with the fragment: {per_pixel:.0f} bytes of peak RSS per extra fragment pixel."]
    lines += ["", NOTES]
    return "\n".join(lines)


if __name__ == "__main__":
    if is_child():
        child_main({"speed": child_speed, "rss": child_rss, "generate": child_generate})
    else:
        main()
