"""Benchmark the models (`make sweep`): the demo recipe at the synthetic difficulty levels; writes its tables into
bench/README.md, "## models" (markers `models` and `triplets`; with --tricks, `tricks`).

For each level: lib.synth (--size, --seed), prepare.py, train.py --preset demo, ensemble.py and submit.py --truth,
each as a user runs it (a subprocess); then every fold model predicts its held-out fragment once more in each
triplet mode (no TTA), pooled over the folds at each mode's best threshold. --tricks instead trains once with no
trick and once with each trick alone, at each level. Datasets and stores under --work are reused, run folders
replaced; each level's result stays in WORK/result-<level>-s<seed>.json, so levels can run side by side (one
--levels each) and the table shows every level measured at that seed.

    python bench/bench_models.py [--levels easy,medium,hard] [--seed 1] [--size 640] [--tricks] [-- TRAIN.PY ARGS]
"""
import csv
import json
import os
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from bench_common import ROOT, machine, parser, write_table
from lib.synth import LEVELS

# trick name -> the train.py arguments that turn it on (the values the top solutions used)
TRICKS = {"z-reversal": ["--z-reverse", "0.5"], "cutout": ["--cutout", "0.5"], "cutmix": ["--cutmix", "0.5"],
          "label smoothing 0.2": ["--label-smoothing", "0.2"], "EMA 0.99": ["--ema", "0.99"]}


def run(command, log):
    """Run a pipeline script with this Python, its output into `log`; stop the benchmark if it fails."""
    with open(log, "w") as out:
        result = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(map(str, command))} failed; see {log}")
    return Path(log).read_text()


def dataset(work, level, size, seed):
    """The synthetic dataset of one level and its stores (kept between runs)."""
    data, stores = work / f"synth-{level}-s{seed}", work / f"stores-{level}-s{seed}"
    run(["-m", "lib.synth", data, "--size", size, "--seed", seed, "--difficulty", level], work / f"synth-{level}.log")
    run([ROOT / "prepare.py", "--data", data, "--out", stores], work / f"prepare-{level}.log")
    return data, stores


def train(stores, run_dir, extra):
    """train.py into a fresh run folder: {folds: {fold: OOF F0.5}, minutes, load: (at start, at end)}."""
    started, load = time.time(), os.getloadavg()[0]
    run([ROOT / "train.py", "--stores", stores, "--run", run_dir, "--preset", "demo", "--force", "--no-dashboard",
         *extra], f"{run_dir}.log")
    with open(run_dir / "summary.csv") as f:
        folds = {r["fold"]: float(r["oof_f05"]) for r in csv.DictReader(f)}
    return dict(folds=folds, minutes=(time.time() - started) / 60, load=(load, os.getloadavg()[0]))


def triplet_scores(run_dir, stores):
    """{mode: pooled OOF F0.5 at the mode's best threshold}: every fold model predicts its held-out fragment again."""
    import numpy as np
    import torch

    from lib.infer import TRIPLET_MODES, predict_fragment
    from lib.metrics import DEFAULT_THRESHOLDS, fbeta_from_counts, threshold_counts
    from lib.model import load_model_file
    from lib.store import Store

    counts = {mode: 0 for mode in TRIPLET_MODES}
    torch.set_num_threads(os.cpu_count())
    for model_path in sorted((run_dir / "models").glob("*/fold-*.pt")):
        model, export = load_model_file(model_path)
        store = Store(Path(stores) / "train" / f"{export['fragment_id']}.h5")
        labels, mask = store.read_map("labels"), store.read_map("mask")
        for mode in TRIPLET_MODES:
            prob = predict_fragment(model, store, export["tile_size"], export["stride"], 4, tta=False, triplets=mode)
            tp, predicted, n_ink = threshold_counts(prob, labels, mask, DEFAULT_THRESHOLDS)
            counts[mode] = counts[mode] + np.array([tp, predicted, np.full(len(tp), n_ink)], np.float64)
    return {mode: float(fbeta_from_counts(c[0], c[1] - c[0], c[2] - c[0]).max()) for mode, c in counts.items()}


def measure_level(args, work, level):
    """The whole chain at one level; the result is also kept in WORK/result-<level>-s<seed>.json."""
    data, stores = dataset(work, level, args.size, args.seed)
    run_dir = work / f"run-{level}-s{args.seed}"
    row = dict(level=level, **train(stores, run_dir, args.train_args))
    run([ROOT / "ensemble.py", "--run", run_dir, "--stores", stores], f"{run_dir}-ensemble.log")
    submitted = run([ROOT / "submit.py", "--run", run_dir, "--stores", stores, "--truth", data / "_truth",
                     "--sample", data / "sample_submission.csv"], f"{run_dir}-submit.log")
    row.update(ensemble=json.loads((run_dir / "ensemble.json").read_text())["scores"],
               per_fragment=dict(re.findall(r"^(\w+): .*F0\.5 ([0-9.]+)$", submitted, re.M)),
               submission=float(re.search(r"F0\.5 over all test pixels: ([0-9.]+)", submitted).group(1)),
               modes=triplet_scores(run_dir, stores))
    (work / f"result-{level}-s{args.seed}.json").write_text(json.dumps(row) + "\n")


def folds_cell(folds):
    return " / ".join(f"{v:.3f}" for _, v in sorted(folds.items()))


def sweep(args, work):
    for level in args.levels:
        measure_level(args, work, level)
    # every level measured at this seed so far, so that levels run by separate invocations share one table
    rows = [json.loads(p.read_text()) for p in (work / f"result-{level}-s{args.seed}.json" for level in LEVELS)
            if p.is_file()]
    extra = " ".join(args.train_args)
    lines = [f"`python bench/bench_models.py --seed {args.seed} --size {args.size}{' -- ' + extra if extra else ''}`, "
             f"{date.today()}, {machine()}", "",
             "| level | OOF F0.5 per fold | ensemble OOF / leave-one-out | submission F0.5 (per fragment) | "
             "train minutes | load at start / end |", "|---|---|---|---|---|---|"]
    for r in rows:
        ensemble, parts = r["ensemble"], ", ".join(f"{k} {float(v):.3f}" for k, v in sorted(r["per_fragment"].items()))
        lofo = ensemble["lofo"]["f05"] if ensemble["lofo"] else float("nan")
        lines.append(f"| {r['level']} | {folds_cell(r['folds'])} | {ensemble['ensemble']['fitted']['f05']:.3f} / "
                     f"{lofo:.3f} | {r['submission']:.3f} ({parts}) | {r['minutes']:.1f} | "
                     f"{r['load'][0]:.1f} / {r['load'][1]:.1f} |")
    write_table(args.readme, "models", "\n".join(lines))
    modes = list(rows[0]["modes"])
    lines = ["| level | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    lines += [f"| {r['level']} | " + " | ".join(f"{r['modes'][m]:.3f}" for m in modes) + " |" for r in rows]
    write_table(args.readme, "triplets", "\n".join(lines))


def tricks(args, work):
    extra = " ".join(args.train_args)
    lines = [f"`python bench/bench_models.py --tricks --levels {','.join(args.levels)} --seed {args.seed} "
             f"--size {args.size}{' -- ' + extra if extra else ''}`, {date.today()}, {machine()}", "",
             "| level | trick (flags) | OOF F0.5 per fold | mean | train minutes |", "|---|---|---|---|---|"]
    for level in args.levels:
        _, stores = dataset(work, level, args.size, args.seed)
        for name, flags in {"none": [], **TRICKS}.items():
            run_dir = work / f"tricks-{level}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}"
            r = train(stores, run_dir, [*args.train_args, *flags])
            mean = sum(r["folds"].values()) / len(r["folds"])
            lines.append(f"| {level} | {name} (`{' '.join(flags) or '-'}`) | {folds_cell(r['folds'])} | {mean:.3f} "
                         f"| {r['minutes']:.1f} |")
            print(lines[-1], flush=True)
    write_table(args.readme, "tricks", "\n".join(lines))


def main(argv=None):
    arguments = parser(__doc__)
    arguments.add_argument("--levels", default="easy,medium,hard", help="lib.synth difficulty levels")
    arguments.add_argument("--seed", type=int, default=1, help="dataset seed (the demo preset was tuned on seed 0)")
    arguments.add_argument("--size", type=int, default=640, help="typical fragment side, as make demo")
    arguments.add_argument("--work", default="runs/sweep", help="folder for datasets, stores, runs and logs")
    arguments.add_argument("--tricks", action="store_true", help="measure the training tricks instead")
    arguments.add_argument("train_args", nargs="*", help="extra train.py arguments (after --)")
    args = arguments.parse_args(argv)
    args.levels = args.levels.split(",")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (tricks if args.tricks else sweep)(args, work)


if __name__ == "__main__":
    main()
