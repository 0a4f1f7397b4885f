"""What the benchmarks share: options, the line above the tables, peak RSS, fresh processes, synthetic fragments of
any size, and the tables, written between their markers in bench/README.md (the prose around them stays)."""
import argparse
import multiprocessing
import os
import platform
import re
import runpy
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parser(doc, settings):
    """argparse: the docstring as help, --NAME for each setting (its value the default; False: a flag), --readme."""
    result = argparse.ArgumentParser(description=doc)
    for name, value in settings.items():
        kind = dict(action="store_true") if value is False else dict(type=type(value), default=value)
        result.add_argument(f"--{name.replace('_', '-')}", help=f"default: {value}", **kind)
    result.add_argument("--readme", type=Path, default=ROOT / "bench" / "README.md", help="the file the tables go into")
    return result


def stamp(*facts):
    """The start of the line above a script's tables: this run's command line, the date, `facts`, the machine (load
    now). The scripts' settings are at their tops, so the command line with them says what ran."""
    command = " ".join([f"python bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    cpu = re.search(r"model name\s*: (.*\S)", Path("/proc/cpuinfo").read_text())
    mem = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())[1]) / 2**20
    return ", ".join([f"`{command}`", time.strftime("%Y-%m-%d"), *facts,
                      f"{os.cpu_count()} cores ({cpu[1] if cpu else platform.processor()})", f"{mem:.0f} GiB RAM",
                      f"Python {platform.python_version()}", f"load average at start {os.getloadavg()[0]:.1f}"])


def run_script(name, argv):
    """Run the repository's script `name` (e.g. "submit.py") with `argv` in this process, as `python name ARGV` would
    (benchmarks run the scripts, they never import them); a non-zero exit is a RuntimeError."""
    saved, sys.argv = sys.argv, [str(ROOT / name), *map(str, argv)]
    try:
        runpy.run_path(str(ROOT / name), run_name="__main__")
    except SystemExit as exit:
        if exit.code not in (None, 0):
            raise RuntimeError(f"{name} {' '.join(map(str, argv))}: {exit.code}") from None
    finally:
        sys.argv = saved


def maxrss_mb():
    """Peak RSS (VmHWM) of this process in MiB; not ru_maxrss, which counts the parent's memory at the fork."""
    return int(re.search(r"VmHWM:\s*(\d+)", Path("/proc/self/status").read_text())[1]) / 1024


def in_fresh_process(function, *args):
    """function(*args) in a new Python process: its own peak RSS, nothing left over from earlier measurements."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def write_fragment(folder, height, width, slices, labels):
    """A Kaggle-layout fragment of exactly height x width: a 512 px lib.synth fragment's slices tiled over it, one
    slice in memory at a time; papyrus everywhere but a 16 px border."""
    from lib.synth import FragmentFields

    rng = np.random.default_rng(0)
    fields = FragmentFields(rng, (512, 512))
    fields.mask[:] = 1  # texture everywhere; the fragment's own mask is set below

    def tile(image):
        return np.tile(image, (-(-height // 512), -(-width // 512)))[:height, :width]

    (folder / "surface_volume").mkdir(parents=True)
    for z in range(slices):
        tifffile.imwrite(folder / "surface_volume" / f"{z:02d}.tif", tile(fields.slice(rng, z)))
    mask = np.zeros((height, width), np.uint8)
    mask[16:-16, 16:-16] = 255
    cv2.imwrite(str(folder / "mask.png"), mask)
    if labels:
        cv2.imwrite(str(folder / "inklabels.png"), tile(fields.labels * 255))


def write_tables(readme, name, line, *tables):
    """Write `line` and the tables, each (header "a | b", rows "1 | 2"), between the <!-- name --> and <!-- /name -->
    markers of `readme` (appended when they are missing)."""
    tables = ["\n".join([f"| {head} |", "|" + "---|" * (head.count("|") + 1), *(f"| {row} |" for row in rows)])
              for head, rows in tables]
    text = "\n\n".join([line, *tables] if line else tables)
    block, old = f"<!-- {name} -->\n{text}\n<!-- /{name} -->", readme.read_text()
    pattern = re.compile(rf"<!-- {re.escape(name)} -->\n.*?<!-- /{re.escape(name)} -->", re.S)
    readme.write_text(pattern.sub(lambda _: block, old) if pattern.search(old) else f"{old.rstrip()}\n\n{block}\n")
    print(f"{text}\n\nwrote it into {readme}")


def write_tiny_run(run, backbone, tile_size, stride):
    """A run folder submit.py accepts: one random-weight model (seed 0) of the default model input
    (lib.inputs.InputSpec()), absolute threshold 0.5; returns its model file."""
    import torch

    from lib.inputs import InputSpec
    from lib.model import build_model, model_config, save_model_file
    from lib.runs import file_sha256, write_json

    spec, model_file = InputSpec(), Path(run) / "models" / backbone / "fold-1.pt"
    torch.manual_seed(0)
    save_model_file(model_file, build_model(backbone, spec.channels, family=spec.family), spec,
                    config=model_config(backbone, spec), fold="1", tile_size=tile_size, stride=stride)
    name = str(model_file.relative_to(run))
    member = dict(backbone=backbone, weight=1.0, models=[name], sha256={name: file_sha256(model_file)},
                  tile_size=tile_size, stride=stride, inputs=spec.as_dict())
    # random weights, trained on no store: the benchmarks predict test stores only, which any run may predict
    untrained = {"stores": None, "data": None, "train": {"none": {"source": "random weights"}}}
    write_json(Path(run) / "ensemble.json", {"members": [member], "threshold": {"mode": "absolute", "value": 0.5},
                                             "trained_on": untrained})
    return model_file
