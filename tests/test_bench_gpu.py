"""bench/bench_gpu.py's CPU mode, tiny, so that the GPU benchmark cannot rot on machines without a GPU. The packing
part is left out here (each trial there is one more Python process importing train.py and Ray: ~10 s of CPU)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_mode_prints_the_tables_and_leaves_the_readme_alone():
    readme = (ROOT / "bench" / "README.md").read_text()
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--device", "cpu", "--no-readme",
                             "--size", "128", "--steps", "1", "--no-packing", "--loader-workers", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tu-mobilenetv3_small_050 |")]
    assert len(rows) == 1, result.stdout
    assert re.search(r"^\| 1 \| [0-9.e+]+ \|$", result.stdout, re.M), result.stdout  # the loader, 1 worker process
    cells = rows[0].strip("|").split("|")
    train_ratio, infer_ratio = (float(cells[i].strip(" *")) for i in (3, 6))
    assert train_ratio > 0 and infer_ratio > 0
    assert (ROOT / "bench" / "README.md").read_text() == readme
