"""Every benchmark script once, tiny, so that none of them rots: each writes its table between its markers in a copy
of bench/README.md (the real one is left alone), and every table there has rows of numbers. bench_models.py
(`make sweep`) runs the whole chain at one level and geometry, on 128 px fragments, for one epoch of 16 tiles."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
TINY = {  # script: (its tiny settings, the markers it writes)
    "bench_prepare.py": (["--sizes", "256x256", "--tiles", "20"], ["prepare"]),
    "bench_submit.py": (["--sizes", "96"], ["submit"]),
    "bench_scale.py": (["--parts", "rss,prepare", "--sizes", "640x600", "--prepare-size", "256x256",
                        "--zarr-chunks", "16,128,128"], ["scale-rss", "scale-prepare"]),
    "bench_loader.py": (["--size", "256", "--tiles", "4", "--rounds", "1"], ["loader"]),
    "bench_gpu.py": (["--device", "cpu", "--size", "128", "--steps", "1", "--loader-workers", "1", "--packing", "1",
                      "--infer-batches", "4", "--rounds", "1"], ["gpu (CPU mode)"]),
    "bench_models.py": (["--levels", "easy", "--geometries", "thin", "--size", "128", "--seed", "3", "--work", "work",
                         "--", "--epochs", "1", "--max-tiles", "16"], ["models"]),
}


def table_rows(block):
    """The data rows of every markdown table in `block`, as lists of cells, one list per table."""
    tables = []
    for lines in re.findall(r"((?:^\|.*\|\n)+)", block, re.M):
        rows = [line.strip("|").split("|") for line in lines.splitlines()]
        assert set(lines.splitlines()[1]) <= set("|-"), lines  # a header, then its separator
        tables.append([[cell.strip(" *") for cell in row] for row in rows[2:]])
    return tables


def number(cell):
    """The first number of a cell such as "0.93", "231 / 248" or "nan / nan"; None when it holds none."""
    match = re.match(r"^(nan|[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)\b", cell)
    return None if match is None else float(match.group(1))


@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_writes_its_table_of_numbers(script, tmp_path):
    settings, markers = TINY[script]
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "bench" / "README.md", readme)
    before = (ROOT / "bench" / "README.md").read_text()
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--readme", str(readme), *settings],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = readme.read_text()
    for marker in markers:
        block = re.search(rf"<!-- {re.escape(marker)} -->\n(.*?)<!-- /{re.escape(marker)} -->", text, re.S).group(1)
        tables = table_rows(block)
        assert tables and all(tables), block
        for row in (row for table in tables for row in table):
            assert any(number(cell) is not None for cell in row[1:]), row
    if script == "bench_models.py":  # extra train.py arguments make a row of their own, named by them
        assert "| easy | thin | `--epochs 1 --max-tiles 16` |" in text
    outside = re.compile("|".join(rf"<!-- {re.escape(m)} -->.*?<!-- /{re.escape(m)} -->" for m in markers), re.S)
    assert outside.sub("", text) == outside.sub("", before)  # the prose and the other tables are untouched
    assert (ROOT / "bench" / "README.md").read_text() == before
