"""Benchmark the models: the demo recipe at three difficulty levels of the synthetic ink (`make sweep`).

For each level: lib.synth (--size, --seed), prepare.py, train.py --preset demo (all folds), ensemble.py and
submit.py --truth, each as a user runs it (a subprocess); then every fold model predicts its held-out fragment
once more in each triplet mode (lib.infer.TRIPLET_MODES), pooled over the folds at each mode's best threshold.
Writes the "## models" section of bench/README.md: OOF F0.5 per fold, the ensemble's OOF and leave-one-out
F0.5, submission F0.5, training minutes, and the triplet-mode table.

    python bench/bench_models.py [--levels easy,medium,hard] [--seed 1] [--work runs/sweep] [-- TRAIN.PY ARGS]

--tricks runs train.py instead once per trick (off, then each on alone) at each level and writes "## tricks".
Datasets and stores under --work are reused when present; run folders are replaced. Each level's numbers are
kept in WORK/result-<level>-s<seed>.json and the table shows every level measured at that seed, so levels can
also be run by separate invocations side by side (--levels medium, --levels hard, ...).
"""
import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib.infer import TRIPLET_MODES, predict_fragment  # noqa: E402
from lib.model import load_model_file  # noqa: E402
from lib.synth import LEVELS  # noqa: E402
from lib.metrics import DEFAULT_THRESHOLDS, fbeta_from_counts, threshold_counts  # noqa: E402
from lib.store import Store  # noqa: E402
from bench_common import machine, write_section  # noqa: E402

# trick name -> train.py arguments that turn it on (the values the top solutions used, scaled to the demo)
TRICKS = {
    "z-reversal": ["--z-reverse", "0.5"],
    "cutout": ["--cutout", "0.5"],
    "cutmix": ["--cutmix", "0.5"],
    "label smoothing 0.2": ["--label-smoothing", "0.2"],
    "EMA 0.99": ["--ema", "0.99"],
}


def run(command, log):
    """Run a pipeline script with this Python, its output to `log`; stop the benchmark if it fails."""
    with open(log, "w") as out:
        result = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(map(str, command))} failed; see {log}")
    return Path(log).read_text()


def dataset(work, level, size, seed):
    """Synthetic dataset and its stores for one level (kept between runs)."""
    data, stores = work / f"synth-{level}-s{seed}", work / f"stores-{level}-s{seed}"
    run(["-m", "lib.synth", data, "--size", size, "--seed", seed, "--difficulty", level], work / f"synth-{level}.log")
    run([ROOT / "prepare.py", "--data", data, "--out", stores], work / f"prepare-{level}.log")
    return data, stores


def train(stores, run_dir, extra):
    """train.py into a fresh run folder; (per-fold OOF F0.5 {fold: f05}, minutes)."""
    started, load = time.time(), os.getloadavg()[0]
    run([ROOT / "train.py", "--stores", stores, "--run", run_dir, "--preset", "demo", "--force", "--no-dashboard",
         *extra], f"{run_dir}.log")
    with open(run_dir / "summary.csv") as f:
        folds = {r["fold"]: float(r["oof_f05"]) for r in csv.DictReader(f)}
    return folds, (time.time() - started) / 60, (load, os.getloadavg()[0])


def triplet_scores(run_dir, stores):
    """{mode: pooled OOF F0.5 at the mode's best threshold}: every fold model re-predicts its held-out fragment
    (no TTA: the modes are compared with each other, at a quarter of the cost)."""
    counts = {mode: 0 for mode in TRIPLET_MODES}
    torch.set_num_threads(os.cpu_count())
    for model_path in sorted((run_dir / "models").glob("*/fold-*.pt")):
        model, export = load_model_file(model_path)
        store = Store(Path(stores) / "train" / f"{export['fold']}.h5")
        labels, mask = store.read_map("labels"), store.read_map("mask")
        for mode in TRIPLET_MODES:
            prob = predict_fragment(model, store, export["tile_size"], export["stride"], 4, tta=False, triplets=mode)
            tp, predicted, n_ink = threshold_counts(prob, labels, mask, DEFAULT_THRESHOLDS)
            counts[mode] = counts[mode] + np.array([tp, predicted, np.full(len(tp), n_ink)], np.float64)
        store.close()
    return {mode: float(fbeta_from_counts(c[0], c[1] - c[0], c[2] - c[0]).max()) for mode, c in counts.items()}


def sweep(args, work):
    rows = []
    for level in args.levels:
        data, stores = dataset(work, level, args.size, args.seed)
        run_dir = work / f"run-{level}-s{args.seed}"
        folds, minutes, load = train(stores, run_dir, args.train_args)
        run([ROOT / "ensemble.py", "--run", run_dir, "--stores", stores], f"{run_dir}-ensemble.log")
        ensemble = json.loads((run_dir / "ensemble.json").read_text())
        submitted = run([ROOT / "submit.py", "--run", run_dir, "--stores", stores, "--truth", data / "_truth",
                         "--sample", data / "sample_submission.csv"], f"{run_dir}-submit.log")
        per_fragment = dict(re.findall(r"^(\w+): .*F0\.5 ([0-9.]+)$", submitted, re.M))
        total = float(re.search(r"F0\.5 over all test pixels: ([0-9.]+)", submitted).group(1))
        modes = triplet_scores(run_dir, stores)
        row = dict(level=level, folds=folds, minutes=minutes, load=load, ensemble=ensemble["scores"],
                   submission=total, per_fragment=per_fragment, modes=modes, train_args=args.train_args)
        (work / f"result-{level}-s{args.seed}.json").write_text(json.dumps(row) + "\n")
        print(f"{level}: OOF {folds}, submission {total:.3f}, {minutes:.1f} min, triplets {modes}", flush=True)
    # every level measured at this seed so far, so that levels run by separate invocations share one table
    rows = [json.loads(p.read_text()) for p in (work / f"result-{level}-s{args.seed}.json" for level in LEVELS)
            if p.is_file()]
    write_section("models", models_section(args, rows))


def models_section(args, rows):
    extra = " ".join(args.train_args)
    lines = [
        f"`make sweep` (`python bench/bench_models.py --seed {args.seed}{' -- ' + extra if extra else ''}`; levels "
        f"may also run side by side, one `--levels` each), run {date.today()} on {machine()}. Each level: a fresh synthetic "
        f"dataset ({args.size} px, seed {args.seed}), `train.py --preset demo` (all folds), `ensemble.py`, "
        "`submit.py --truth`. Minutes: the whole `train.py` process (Ray start included), with the load average "
        "at its start and end (other work shares the cores, so they are upper bounds).",
        "",
        "| level | OOF F0.5 per fold | ensemble OOF / leave-one-out | submission F0.5 (per fragment) | train minutes | load |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        folds = " / ".join(f"{v:.3f}" for _, v in sorted(r["folds"].items()))
        fitted = r["ensemble"]["ensemble"]["fitted"]["f05"]
        lofo = r["ensemble"]["lofo"]["f05"] if r["ensemble"]["lofo"] else float("nan")
        parts = ", ".join(f"{k} {float(v):.3f}" for k, v in sorted(r["per_fragment"].items()))
        lines.append(f"| {r['level']} | {folds} | {fitted:.3f} / {lofo:.3f} | {r['submission']:.3f} ({parts}) "
                     f"| {r['minutes']:.1f} | {r['load'][0]:.1f} / {r['load'][1]:.1f} |")
    lines += ["", "Triplet modes (lib.infer.TRIPLET_MODES) on the same fold models: OOF F0.5 pooled over the folds at "
              "each mode's best absolute threshold, without rot90 TTA (a quarter of the cost).", "",
              "| level | " + " | ".join(TRIPLET_MODES) + " |", "|---|" + "---|" * len(TRIPLET_MODES)]
    lines += [f"| {r['level']} | " + " | ".join(f"{r['modes'][m]:.3f}" for m in TRIPLET_MODES) + " |" for r in rows]
    return "\n".join(lines)


def tricks(args, work):
    rows = []
    for level in args.levels:
        _, stores = dataset(work, level, args.size, args.seed)
        for name, flags in {"none": [], **TRICKS}.items():
            run_dir = work / f"tricks-{level}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}"
            folds, minutes, load = train(stores, run_dir, [*args.train_args, *flags])
            rows.append(dict(level=level, trick=name, folds=folds, minutes=minutes, load=load))
            print(f"{level} {name}: OOF {folds}, {minutes:.1f} min", flush=True)
    extra = " ".join(args.train_args)
    lines = [
        f"`python bench/bench_models.py --tricks --levels {','.join(args.levels)} --seed {args.seed}"
        f"{' -- ' + extra if extra else ''}`, run {date.today()} on {machine()}. `train.py --preset demo` with no "
        "trick, then each trick alone (train.py flags in the second column). OOF F0.5 per fold, their mean.", "",
        "| level | trick (flags) | OOF F0.5 per fold | mean | minutes |", "|---|---|---|---|---|"]
    for r in rows:
        folds = " / ".join(f"{v:.3f}" for _, v in sorted(r["folds"].items()))
        flags = " ".join(TRICKS.get(r["trick"], [])) or "-"
        lines.append(f"| {r['level']} | {r['trick']} (`{flags}`) | {folds} | {np.mean(list(r['folds'].values())):.3f} "
                     f"| {r['minutes']:.1f} |")
    write_section("tricks", "\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="easy,medium,hard", help="lib.synth difficulty levels")
    parser.add_argument("--seed", type=int, default=1, help="dataset seed (the demo preset was tuned on seed 0)")
    parser.add_argument("--size", type=int, default=640, help="typical fragment side, as make demo")
    parser.add_argument("--work", default="runs/sweep", help="folder for datasets, stores, runs and logs")
    parser.add_argument("--tricks", action="store_true", help="measure the training tricks instead")
    parser.add_argument("train_args", nargs="*", help="extra train.py arguments (after --)")
    args = parser.parse_args(argv)
    args.levels = args.levels.split(",")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (tricks if args.tricks else sweep)(args, work)


if __name__ == "__main__":
    main()
