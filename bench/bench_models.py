"""Benchmark the models (`make sweep`): the demo recipe at each synthetic difficulty level and sheet geometry
(lib.synth --geometry; "-reversed" stores the depth the other way), each step run as a user runs it, writing
bench/README.md's table "models". Extra train.py arguments go after -- (a trick, another model family): each level,
geometry and set of arguments is a row of its own. Datasets and stores under --work are kept, runs replaced, and
each row's result too, so that rows measured by separate invocations share the table."""
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from bench_common import ROOT, parser, stamp, write_tables
from lib.synth import GEOMETRIES, LEVELS

# seed 0 tuned the demo; every geometry at the default level (--levels easy,hard for the other levels)
SETTINGS = dict(levels="medium", geometries="thick,thin,neighbours,tilted,thin-reversed", seed=1, size=640,
                work="runs/sweep")


def run(log, *command):
    """A pipeline script with this Python, its output into `log` (returned); the benchmark stops if it fails."""
    with open(log, "w") as out:
        if subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, stdout=out, stderr=out).returncode:
            sys.exit(f"error: {' '.join(map(str, command))} failed; see {log}")
    return Path(log).read_text()


def measure(level, geometry, data, stores, run_dir, train_args):
    """The whole chain as a user runs it: {folds: {fold: OOF F0.5}, minutes, load (start, end), ensemble, ...}."""
    started, load = time.time(), os.getloadavg()[0]
    run(f"{run_dir}.log", ROOT / "train.py", "--stores", stores, "--run", run_dir, "--preset", "demo", "--force",
        "--no-dashboard", *train_args)
    with open(run_dir / "summary.csv") as f:
        folds = {r["fold"]: float(r["oof_f05"]) for r in csv.DictReader(f)}
    result = dict(level=level, geometry=geometry, train_args=" ".join(train_args), folds=folds,
                  minutes=(time.time() - started) / 60, load=(load, os.getloadavg()[0]))
    run(f"{run_dir}-ensemble.log", ROOT / "ensemble.py", "--run", run_dir, "--stores", stores)
    submitted = run(f"{run_dir}-submit.log", ROOT / "submit.py", "--run", run_dir, "--stores", stores,
                    "--truth", data / "_truth", "--sample", data / "sample_submission.csv")
    return dict(**result, ensemble=json.loads((run_dir / "ensemble.json").read_text())["scores"],
                per_fragment=dict(re.findall(r"^(\w+): .*F0\.5 ([0-9.]+)$", submitted, re.M)),
                submission=float(re.search(r"F0\.5 over all test pixels: ([0-9.]+)", submitted).group(1)))


def geometry_order(name):
    """Rows of a level in GEOMETRIES' order, each upright before reversed."""
    sheet, _, reversed_ = name.partition("-")
    return GEOMETRIES.index(sheet), reversed_


def main():
    options = parser(__doc__, SETTINGS)
    options.add_argument("train_args", nargs="*", help="extra train.py arguments (after --)")
    args = options.parse_args()
    work, variant = Path(args.work).resolve(), re.sub(r"[^a-z0-9.]+", "-", " ".join(args.train_args).lower()).strip("-")
    work.mkdir(parents=True, exist_ok=True)
    for level in args.levels.split(","):
        for geometry in args.geometries.split(","):
            name = f"{level}-{geometry}-s{args.seed}"
            data, stores = work / f"synth-{name}", work / f"stores-{name}"  # kept
            sheet, _, reversed_ = geometry.partition("-")
            run(work / f"synth-{name}.log", "-m", "lib.synth", data, "--size", args.size, "--seed", args.seed,
                "--difficulty", level, "--geometry", sheet, *(["--reversed"] if reversed_ else []))
            run(work / f"prepare-{name}.log", ROOT / "prepare.py", "--data", data, "--out", stores)
            name += f"-{variant}" if variant else ""
            result = measure(level, geometry, data, stores, work / f"run-{name}", args.train_args)
            (work / f"result-{name}.json").write_text(json.dumps(dict(seed=args.seed, **result)) + "\n")
    # every row measured at this seed so far, levels in order of difficulty, then geometries
    results = [r for r in (json.loads(p.read_text()) for p in work.glob("result-*.json")) if r.get("seed") == args.seed]
    results.sort(key=lambda r: (list(LEVELS).index(r["level"]), geometry_order(r.get("geometry", "thick")),
                                r["train_args"]))
    rows = []
    for r in results:
        ensemble, parts = r["ensemble"], ", ".join(f"{k} {float(v):.3f}" for k, v in sorted(r["per_fragment"].items()))
        lofo = ensemble["lofo"]["f05"] if ensemble["lofo"] else float("nan")
        rows.append(f"{r['level']} | {r.get('geometry', 'thick')} | `{r['train_args'] or '-'}` | " +
                    " / ".join(f"{v:.3f}" for _, v in sorted(r["folds"].items())) +
                    f" | {ensemble['ensemble']['fitted']['f05']:.3f} / {lofo:.3f} | "
                    f"{r['submission']:.3f} ({parts}) | {r['minutes']:.1f} | {r['load'][0]:.1f} / {r['load'][1]:.1f}")
    write_tables(args.readme, "models", stamp(),
                 ("level | geometry | train.py arguments | OOF F0.5 per fold | ensemble OOF / leave-one-out | submission F0.5 "
                  "(per fragment) | train minutes | load at start / end", rows))


if __name__ == "__main__":
    main()
