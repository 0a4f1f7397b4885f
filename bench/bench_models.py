"""Benchmark the models (`make sweep`): the demo recipe at each synthetic difficulty level, each step run as a user
runs it; writes bench/README.md's tables "models" and "triplets", or with --tricks, "tricks" (the demo recipe with
no trick, then each trick alone). Extra train.py arguments go after --. Datasets and stores under --work are kept,
runs replaced, and each level's result too, so that levels can run side by side (one --levels each)."""
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench_common import ROOT, parser, stamp, write_tables
from lib.infer import TRIPLET_MODES, predict_fragment
from lib.metrics import fbeta_from_counts, threshold_counts
from lib.model import load_model_file
from lib.store import Store
from lib.synth import LEVELS

SETTINGS = dict(levels="easy,medium,hard", seed=1, size=640, work="runs/sweep", tricks=False)  # seed 0 tuned the demo
# trick name -> the train.py arguments that turn it on (the values the top solutions used)
TRICKS = {"z-reversal": ["--z-reverse", "0.5"], "cutout": ["--cutout", "0.5"], "cutmix": ["--cutmix", "0.5"],
          "label smoothing 0.2": ["--label-smoothing", "0.2"], "EMA 0.99": ["--ema", "0.99"]}


def run(log, *command):
    """A pipeline script with this Python, its output into `log` (returned); the benchmark stops if it fails."""
    with open(log, "w") as out:
        if subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, stdout=out, stderr=out).returncode:
            sys.exit(f"error: {' '.join(map(str, command))} failed; see {log}")
    return Path(log).read_text()


def train(stores, run_dir, extra):
    """train.py into a fresh run folder: {folds: {fold: OOF F0.5}, minutes, load: (at start, at end)}."""
    started, load = time.time(), os.getloadavg()[0]
    run(f"{run_dir}.log", ROOT / "train.py", "--stores", stores, "--run", run_dir, "--preset", "demo", "--force",
        "--no-dashboard", *extra)
    with open(run_dir / "summary.csv") as f:
        folds = {r["fold"]: float(r["oof_f05"]) for r in csv.DictReader(f)}
    return dict(folds=folds, minutes=(time.time() - started) / 60, load=(load, os.getloadavg()[0]))


def folds_cell(folds):
    return " / ".join(f"{v:.3f}" for _, v in sorted(folds.items()))


def triplet_scores(run_dir, stores):
    """Per triplet mode, OOF F0.5 pooled over the folds at the mode's best threshold: every fold model predicts its
    held-out fragment again, without TTA."""
    counts = {mode: 0 for mode in TRIPLET_MODES}
    torch.set_num_threads(os.cpu_count())
    for model_path in sorted((run_dir / "models").glob("*/fold-*.pt")):
        model, export = load_model_file(model_path)
        store = Store(Path(stores) / "train" / f"{export['fragment_id']}.h5")
        labels, mask = store.read_map("labels"), store.read_map("mask")
        for mode in TRIPLET_MODES:
            prob = predict_fragment(model, store, export["tile_size"], export["stride"], 4, tta=False, triplets=mode)
            tp, predicted, n_ink = threshold_counts(prob, labels, mask)
            counts[mode] = counts[mode] + np.array([tp, predicted, np.full(len(tp), n_ink)], np.float64)
    return {mode: float(fbeta_from_counts(c[0], c[1] - c[0], c[2] - c[0]).max()) for mode, c in counts.items()}


def main():
    options = parser(__doc__, SETTINGS)
    options.add_argument("train_args", nargs="*", help="extra train.py arguments (after --)")
    args = options.parse_args()
    work, extra = Path(args.work).resolve(), " -- " + " ".join(args.train_args) if args.train_args else ""
    work.mkdir(parents=True, exist_ok=True)
    tricks = []
    for level in args.levels.split(","):
        data, stores = work / f"synth-{level}-s{args.seed}", work / f"stores-{level}-s{args.seed}"  # kept
        run(work / f"synth-{level}.log", "-m", "lib.synth", data, "--size", args.size, "--seed", args.seed,
            "--difficulty", level)
        run(work / f"prepare-{level}.log", ROOT / "prepare.py", "--data", data, "--out", stores)
        for name, flags in {"none": [], **TRICKS}.items() if args.tricks else ():
            run_dir = work / f"tricks-{level}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}"
            r = train(stores, run_dir, [*args.train_args, *flags])
            tricks.append(f"{level} | {name} (`{' '.join(flags) or '-'}`) | {folds_cell(r['folds'])} "
                          f"| {sum(r['folds'].values()) / len(r['folds']):.3f} | {r['minutes']:.1f}")
            print(tricks[-1], flush=True)
        if not args.tricks:  # the whole chain; its result kept in WORK/result-<level>-s<seed>.json
            run_dir = work / f"run-{level}-s{args.seed}"
            result = dict(level=level, **train(stores, run_dir, args.train_args))
            run(f"{run_dir}-ensemble.log", ROOT / "ensemble.py", "--run", run_dir, "--stores", stores)
            submitted = run(f"{run_dir}-submit.log", ROOT / "submit.py", "--run", run_dir, "--stores", stores,
                            "--truth", data / "_truth", "--sample", data / "sample_submission.csv")
            result.update(ensemble=json.loads((run_dir / "ensemble.json").read_text())["scores"],
                          per_fragment=dict(re.findall(r"^(\w+): .*F0\.5 ([0-9.]+)$", submitted, re.M)),
                          submission=float(re.search(r"F0\.5 over all test pixels: ([0-9.]+)", submitted).group(1)),
                          modes=triplet_scores(run_dir, stores))
            (work / f"result-{level}-s{args.seed}.json").write_text(json.dumps(result) + "\n")
    if args.tricks:
        write_tables(args.readme, "tricks", stamp(f"python bench/bench_models.py --tricks --levels {args.levels} "
                     f"--seed {args.seed} --size {args.size}{extra}"),
                     ("level | trick (flags) | OOF F0.5 per fold | mean | train minutes", tricks))
        return
    # every level measured at this seed so far, so that levels run by separate invocations share one table
    results = [json.loads(p.read_text()) for p in (work / f"result-{level}-s{args.seed}.json" for level in LEVELS)
               if p.is_file()]
    rows = []
    for r in results:
        ensemble, parts = r["ensemble"], ", ".join(f"{k} {float(v):.3f}" for k, v in sorted(r["per_fragment"].items()))
        lofo = ensemble["lofo"]["f05"] if ensemble["lofo"] else float("nan")
        rows.append(f"{r['level']} | {folds_cell(r['folds'])} | {ensemble['ensemble']['fitted']['f05']:.3f} / "
                    f"{lofo:.3f} | {r['submission']:.3f} ({parts}) | {r['minutes']:.1f} | "
                    f"{r['load'][0]:.1f} / {r['load'][1]:.1f}")
    write_tables(args.readme, "models", stamp(f"python bench/bench_models.py --seed {args.seed} --size {args.size}"
                 f"{extra}"), ("level | OOF F0.5 per fold | ensemble OOF / leave-one-out | submission F0.5 (per "
                               "fragment) | train minutes | load at start / end", rows))
    modes = list(results[0]["modes"])
    write_tables(args.readme, "triplets", "", ("level | " + " | ".join(modes), [
        f"{r['level']} | " + " | ".join(f"{r['modes'][m]:.3f}" for m in modes) for r in results]))


if __name__ == "__main__":
    main()
