"""What the benchmark scripts share: the machine line, peak RSS, and one measurement per fresh subprocess.

A script runs a measurement with run_child(__file__, mode, *args) and ends with
`if is_child(): child_main({mode: function, ...}) else: main()`; args travel as JSON, so numbers and booleans
arrive as themselves and paths as strings.
"""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))) / 2**20
    load = os.getloadavg()
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}, " \
           f"load average at start {load[0]:.1f}"


def maxrss_mb():
    """Peak RSS of this process in MB (2^20). VmHWM, not ru_maxrss: on Linux ru_maxrss also counts the parent's
    memory at the fork before exec, so a child of a big parent would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (the benchmarks need Linux)")


def run_child(script, mode, *args):
    """Run `script --child mode` in a fresh Python with `args` and return the dict its child function returned."""
    payload = json.dumps([str(a) if isinstance(a, Path) else a for a in args])
    result = subprocess.run([sys.executable, str(script), "--child", mode, payload], capture_output=True, text=True,
                            cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"child {mode} {payload} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def is_child():
    return len(sys.argv) > 1 and sys.argv[1] == "--child"


def child_main(modes):
    """In a child process: call modes[mode](*args) and print its result as the last line of stdout. What the code
    under test prints goes to stderr meanwhile, so it never mixes with the report."""
    mode, args = sys.argv[2], json.loads(sys.argv[3])
    sys.stdout = sys.stderr
    result = modes[mode](*args)
    sys.stdout = sys.__stdout__
    print(json.dumps(result))
