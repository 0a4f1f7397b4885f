"""What the benchmark scripts share: their options, the machine line, peak RSS, one measurement per fresh process
(run_child and main_or_child), synthetic fragments of any size, and writing a script's table into bench/README.md
between its markers, so that the prose around it stays as written."""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
README = ROOT / "bench" / "README.md"


def parser(doc):
    """argparse for a benchmark: its docstring as help, and --readme (the file its table goes into)."""
    result = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    result.add_argument("--readme", type=Path, default=README, help="where the table goes (default: bench/README.md)")
    return result


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))) / 2**20
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}, " \
           f"load average at start {os.getloadavg()[0]:.1f}"


def maxrss_mb():
    """Peak RSS (VmHWM) of this process in MiB; not ru_maxrss, which counts the parent's memory at the fork."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def run_child(script, mode, *args):
    """Run `script --child mode args` in a fresh Python; returns what its child function returned."""
    payload = json.dumps([str(a) if isinstance(a, Path) else a for a in args])
    result = subprocess.run([sys.executable, str(script), "--child", mode, payload], capture_output=True, text=True,
                            cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"error: child {mode} {payload} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main_or_child(main, children):
    """main(), or in a process started by run_child: print children[mode](*args) as the last line of stdout (what
    the code under test prints goes to stderr meanwhile)."""
    if sys.argv[1:2] != ["--child"]:
        return main()
    mode, args = sys.argv[2], json.loads(sys.argv[3])
    sys.stdout = sys.stderr
    result = children[mode](*args)
    sys.stdout = sys.__stdout__
    print(json.dumps(result))


def write_fragment(folder, height, width, slices, labels):
    """A Kaggle-layout fragment folder of exactly height x width: the slices of a 512 px lib.synth fragment tiled
    over it, one slice in memory at a time, so that any size fits; the mask leaves a 16 px border."""
    import cv2
    import numpy as np
    import tifffile

    from lib.synth import FragmentFields

    rng = np.random.default_rng(0)
    fields = FragmentFields(rng, (512, 512))
    fields.mask[:] = 1  # texture everywhere; the fragment's own mask is set below
    reps = (-(-height // 512), -(-width // 512))
    (folder / "surface_volume").mkdir(parents=True)
    for z in range(slices):
        tifffile.imwrite(folder / "surface_volume" / f"{z:02d}.tif", np.tile(fields.slice(rng, z), reps)[:height, :width])
    mask = np.zeros((height, width), np.uint8)
    mask[16:-16, 16:-16] = 255
    cv2.imwrite(str(folder / "mask.png"), mask)
    if labels:
        cv2.imwrite(str(folder / "inklabels.png"), np.tile(fields.labels * 255, reps)[:height, :width])


def write_table(readme, name, text):
    """Put `text` between the <!-- name --> and <!-- /name --> markers of `readme` (appended when they are missing),
    leaving the prose around them alone."""
    block = f"<!-- {name} -->\n{text.strip()}\n<!-- /{name} -->"
    old = readme.read_text()
    pattern = re.compile(rf"<!-- {re.escape(name)} -->\n.*?<!-- /{re.escape(name)} -->", re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else f"{old.rstrip()}\n\n{block}\n"
    readme.write_text(new)
    print(f"{text.strip()}\n\nwrote it into {readme}")

