"""Peak memory of preparing and predicting one scroll-segment-sized fragment (default 20 000 x 10 000 px).

    python bench/bench_segment_memory.py [--height 20000] [--width 10000] [--layers 20] [--work DIR] [--no-readme]

Writes a synthetic segment layer by layer (uint16 TIFF; the texture of a small lib.synth fragment tiled over the
full size, its slices 22.. as layers 0.., so the surface is near layer 10; a mask covering all but a 100 px
border), prepares it with prepare.py's defaults for segments (--z-range auto), and predicts it with submit.py
(segment store, no sample: probability PNG only, no TTA, no triplets, 1 torch thread) with one random-weight tiny
U-Net (tu-mobilenetv3_small_050, slim decoder, 256 px tiles at stride 256). Each step runs in a fresh process;
its peak RSS (VmHWM) goes into the "## segment memory" section of bench/README.md.
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_common import ROOT, child_main, is_child, machine, maxrss_mb, run_child  # bench/ is on sys.path as a script
from bench_readme import README, write_section

sys.path.insert(0, str(ROOT))

BACKBONE, DECODER = "tu-mobilenetv3_small_050", (32, 16, 16, 8, 8)
TILE = STRIDE = 256
FIRST_SLICE = 22  # the synthetic surface wanders around slice 32: layer 10 here
BORDER = 100
TEXTURE = 1024  # side of the lib.synth fragment whose slices are tiled over the segment


def child_write(folder, height, width, layers):
    """The segment folder, one layer in memory at a time."""
    import cv2
    import numpy as np
    import tifffile

    from lib.synth import FragmentFields

    rng = np.random.default_rng(0)
    fields = FragmentFields(rng, (TEXTURE, TEXTURE))
    fields.mask[:] = 1  # texture everywhere; the segment's own mask is set below
    reps = (-(-height // TEXTURE), -(-width // TEXTURE))
    folder = Path(folder)
    (folder / "layers").mkdir(parents=True)
    for z in range(layers):
        layer = np.tile(fields.slice(rng, FIRST_SLICE + z), reps)[:height, :width]
        tifffile.imwrite(folder / "layers" / f"{z:02d}.tif", layer)
        del layer
    mask = np.zeros((height, width), np.uint8)
    mask[BORDER:-BORDER, BORDER:-BORDER] = 255
    cv2.imwrite(str(folder / f"{folder.name}_mask.png"), mask)
    return {}


def child_prepare(data, stores):
    import prepare

    started = time.perf_counter()
    prepare.main(["--data", data, "--out", stores, "--test", "seg"])
    return {"rss_mb": maxrss_mb(), "seconds": time.perf_counter() - started}


def child_predict(run, stores):
    import torch

    import submit
    from lib.infer import load_model_file

    torch.set_num_threads(1)
    load_model_file(next(Path(run).glob("models/*/*.pt")))
    before = maxrss_mb()
    started = time.perf_counter()
    submit.main(["--run", run, "--stores", stores, "--no-tta", "--no-triplets", "--threads", "1"])
    return {"rss_mb": maxrss_mb(), "before_mb": before, "seconds": time.perf_counter() - started}


def make_run(run):
    """A run folder submit.py accepts: one random-weight tiny model (seed 0), absolute threshold 0.5."""
    import torch

    from lib.model import build_model, model_config

    torch.manual_seed(0)
    path = run / "models" / BACKBONE / "fold-1.pt"
    path.parent.mkdir(parents=True)
    torch.save({"config": model_config(BACKBONE, 3, DECODER), "fold": "1", "tile_size": TILE, "stride": STRIDE,
                "state_dict": build_model(BACKBONE, decoder_channels=DECODER).state_dict()}, path)
    members = [{"backbone": BACKBONE, "weight": 1.0, "models": [str(path.relative_to(run))], "tile_size": TILE,
                "stride": STRIDE}]
    (run / "ensemble.json").write_text(json.dumps({"members": members, "threshold": {"mode": "absolute", "value": 0.5}}))
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=20000)
    parser.add_argument("--width", type=int, default=10000)
    parser.add_argument("--layers", type=int, default=20, help="layers written (prepare keeps 16 of them)")
    parser.add_argument("--work", type=Path, help="folder for the segment, store and run (default: a temp dir, removed)")
    parser.add_argument("--no-readme", action="store_true", help="print only; leave bench/README.md alone")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_segment_"))
    started, header = time.time(), machine()
    print(header, flush=True)
    try:
        run_child(__file__, "write", work / "data" / "seg", args.height, args.width, args.layers)
        written = time.time() - started
        print(f"segment written in {written:.0f} s", flush=True)
        prepared = run_child(__file__, "prepare", work / "data", work / "stores")
        print(f"prepare: peak RSS {prepared['rss_mb']:.0f} MiB, {prepared['seconds']:.0f} s", flush=True)
        predicted = run_child(__file__, "predict", make_run(work / "run"), work / "stores")
        print(f"predict: peak RSS {predicted['rss_mb']:.0f} MiB, {predicted['seconds']:.0f} s", flush=True)
        png = work / "run" / "predictions" / "seg_prediction.png"
        png_mb = png.stat().st_size / 1e6
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    body = report(args, header, written, prepared, predicted, png_mb, time.time() - started)
    print(f"\n## segment memory\n\n{body}")
    if not args.no_readme:
        write_section("segment memory", body)
        print(f"wrote the '## segment memory' section of {README.relative_to(ROOT)}")


def report(args, header, written, prepared, predicted, png_mb, elapsed):
    h, w = args.height, args.width
    return f"""`python bench/bench_segment_memory.py` (run under `nice -n 10`), run {time.strftime('%Y-%m-%d')} on {header}; \
the whole run took {elapsed:.0f} s (writing the segment {written:.0f} s).

A synthetic {h} x {w} segment of {args.layers} uint16 TIFF layers ({args.layers * h * w * 2 / 1e9:.1f} GB, written \
layer by layer), prepared with the segment defaults (`--z-range auto`: 16 layers around the detected surface), then \
predicted by submit.py into `<id>_prediction.png` only (segment store, no sample submission) with one random-weight \
{BACKBONE} U-Net (decoder {'/'.join(map(str, DECODER))}), {TILE} px tiles at stride {STRIDE}, no TTA, no triplets, \
1 torch thread. Peak RSS is VmHWM of a fresh process per step.

| step | peak RSS MiB (target < 4 GB) | seconds |
|---|---|---|
| prepare.py (validation, surface profile, volume copy, maps) | {prepared['rss_mb']:.0f} | {prepared['seconds']:.0f} |
| submit.py (imports + model: {predicted['before_mb']:.0f} MiB) | {predicted['rss_mb']:.0f} | {predicted['seconds']:.0f} |

The (H, W) float32 probability map alone is {h * w * 4 / 2**20:.0f} MiB; the PNG written was {png_mb:.0f} MB. \
predict_fragment adds each model's map into the ensemble's running sum in bands of rows \
(lib.infer.BlendBand), so no second full-size map or weight sum is held."""


if __name__ == "__main__":
    if is_child():
        child_main({"write": child_write, "prepare": child_prepare, "predict": child_predict})
    else:
        main()
