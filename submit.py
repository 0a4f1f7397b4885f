"""Predict the test fragments with a run's fitted ensemble and write the Kaggle submission.

In:  --run runs/NAME holding ensemble.json (from ensemble.py) and the model files it names (relative to the
     run folder: a copy of just models/ and ensemble.json works anywhere, offline);
     --stores data/prepared with the test stores test/<id>.h5 (prepare.py).
Out: --out (default runs/NAME/submission.csv): "Id,Predicted", one row per test fragment, its ink mask
     run-length encoded row-major (lib/rle.py); rows in the order of --sample when given, else sorted by id.
     runs/NAME/previews/<id>.png  probability | binary mask
     runs/NAME/probs/<id>.h5      the ensemble's probability map (with --save-probs)
     with --truth DIR (DIR/<id>_inklabels.png, e.g. data/synth/_truth): F0.5 per fragment and over all of them.

Every fold model of every member predicts each fragment (lib.infer.predict_fragment: rot90 x4 test-time
augmentation and the centre-slice triplets combined as the member's OOF maps were, unless --no-tta /
--triplets MODE); a member is the mean of
its folds, the ensemble the members' weighted sum with ensemble.json's weights; then its threshold (absolute,
or percentile: the top q % of the fragment's in-mask pixels), the mask, and optionally --min-component.

    python submit.py --run runs/demo --stores data/prepared [--sample data/synth/sample_submission.csv]
"""
import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lib.fragments import FragmentError, read_png_binary
from lib.infer import (TRIPLET_MODES, load_model_file, predict_fragment, remove_small_components, save_preview,
                       save_probability_map)
from lib.metrics import THRESHOLD_MODES, binarise, fbeta_counts
from lib.rle import rle_decode, rle_encode
from lib.store import Store


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="run folder with ensemble.json and models/")
    parser.add_argument("--stores", default="data/prepared", help="folder with the test/<id>.h5 stores")
    parser.add_argument("--out", help="submission CSV (default: RUN/submission.csv)")
    parser.add_argument("--sample", help="sample_submission.csv: its Id order is kept and its ids must be the test ids")
    parser.add_argument("--batch-size", type=int, help="tiles per model call, x12 inputs with TTA and triplets "
                        "(default: 16 on GPU; 4 on CPU, fastest there and 1/4 of the activation memory)")
    parser.add_argument("--no-tta", dest="tta", action="store_false", help="no rot90 test-time augmentation")
    parser.add_argument("--triplets", choices=TRIPLET_MODES, help="how to combine the centre-slice triplets (default: "
                        "each member's mode from ensemble.json, the one its OOF maps and the fitted threshold assumed)")
    parser.add_argument("--no-triplets", dest="triplets", action="store_const", const="middle", help="--triplets middle")
    parser.add_argument("--min-component", type=int, default=0, help="drop ink components smaller than this (pixels)")
    parser.add_argument("--save-probs", action="store_true", help="also write RUN/probs/<id>.h5")
    parser.add_argument("--truth", help="folder with <id>_inklabels.png of the test fragments: print F0.5")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core); 1 is "
                        "much faster when other work shares the cores (bench/README.md, \"## submit\")")
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 4 if args.device == "cpu" else 16
    return args


# ------------------------------------------------------------------------------------------- inputs


def read_ensemble(run):
    """ensemble.json, checked: known threshold mode, every model file present."""
    path = run / "ensemble.json"
    if not path.is_file():
        sys.exit(f"error: {path}: not found; run ensemble.py --run {run} first")
    try:
        ensemble = json.loads(path.read_text())
        members, mode = ensemble["members"], ensemble["threshold"]["mode"]
    except (ValueError, KeyError, TypeError) as err:
        sys.exit(f"error: {path}: not an ensemble.py file ({type(err).__name__}: {err})")
    if mode not in THRESHOLD_MODES:
        sys.exit(f"error: {path}: unknown threshold mode {mode!r}")
    for member in members:
        member.setdefault("triplets", "mean")  # ensemble.json from before the triplet modes
        if member["triplets"] not in TRIPLET_MODES:
            sys.exit(f"error: {path}: member {member.get('backbone')}: unknown triplet mode {member['triplets']!r}")
        for model in member["models"]:
            if not (run / model).is_file():
                sys.exit(f"error: {run / model}: model file named in {path} not found")
    return ensemble


def test_stores(stores):
    """{id: store path} of the test stores."""
    folder = Path(stores) / "test"
    paths = {p.stem: p for p in sorted(folder.glob("*.h5"))}
    if not paths:
        sys.exit(f"error: {folder}: no test stores (<id>.h5); run prepare.py first")
    return paths


def submission_ids(test_ids, sample):
    """The row order: the sample submission's (which must list exactly the test ids), else sorted."""
    if sample is None:
        return sorted(test_ids)
    try:
        with open(sample, newline="") as f:
            ids = [row["Id"] for row in csv.DictReader(f)]
    except (OSError, KeyError, csv.Error) as err:
        sys.exit(f"error: {sample}: not a readable submission CSV with an Id column ({err})")
    if sorted(ids) != sorted(test_ids):
        sys.exit(f"error: {sample}: ids {','.join(ids)} differ from the test stores' ids {','.join(sorted(test_ids))}")
    return ids


def check_truth(truth_dir, ids):
    """Fail before any prediction when a test fragment has no label file in --truth."""
    for fragment_id in ids:
        path = Path(truth_dir) / f"{fragment_id}_inklabels.png"
        if not path.is_file():
            sys.exit(f"error: {path}: not found (--truth needs the labels of every test fragment)")


def read_truth(truth_dir, fragment_id, shape):
    path = Path(truth_dir) / f"{fragment_id}_inklabels.png"
    try:
        labels = read_png_binary(path)
    except FragmentError as err:
        sys.exit(f"error: {err}")
    if labels.shape != shape:
        sys.exit(f"error: {path}: labels are {labels.shape}, but the test store is {shape}")
    return labels


# ------------------------------------------------------------------------------------------- prediction


def ensemble_probability(run, ensemble, store, args):
    """(H, W) float32: the members' weighted sum of their fold models' mean, accumulated model by model."""
    total = np.zeros(store.shape, np.float32)
    for member in ensemble["members"]:
        if member["weight"] == 0:
            continue  # the fit dropped it: no need to run it
        for model_file in member["models"]:
            model, _ = load_model_file(run / model_file, args.device)
            prob = predict_fragment(model, store, member["tile_size"], member["stride"], args.batch_size,
                                    tta=args.tta, triplets=args.triplets or member["triplets"], device=args.device,
                                    progress=True)
            total += np.float32(member["weight"] / len(member["models"])) * prob
    return total


def encode_checked(fragment_id, pred):
    """The row-major RLE of `pred`, decoded again and compared: a wrong submission must never be written."""
    rle = rle_encode(pred)
    if not np.array_equal(rle_decode(rle, pred.shape), pred):
        sys.exit(f"error: RLE of fragment {fragment_id} does not decode to its mask")
    return rle


def write_submission(path, rows):
    """Write `rows` [(id, rle)] as Id,Predicted through a temp file; read it back and compare before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["Id", "Predicted"])
        writer.writerows(rows)
    os.replace(tmp, path)
    with open(path, newline="") as f:
        written = [tuple(row) for row in csv.reader(f)]
    if written != [("Id", "Predicted"), *rows]:
        sys.exit(f"error: {path}: the file read back differs from the rows written")


def main(argv=None):
    args = parse_args(argv)
    run = Path(args.run)
    out = Path(args.out) if args.out else run / "submission.csv"
    ensemble = read_ensemble(run)
    if args.threads:
        torch.set_num_threads(args.threads)
    stores = test_stores(args.stores)
    ids = submission_ids(stores, args.sample)
    if args.truth:
        check_truth(args.truth, ids)
    mode, value = ensemble["threshold"]["mode"], ensemble["threshold"]["value"]
    models = sum(len(m["models"]) for m in ensemble["members"] if m["weight"] > 0)
    triplets = args.triplets or ",".join(sorted({m["triplets"] for m in ensemble["members"] if m["weight"] > 0}))
    threshold = f"p >= {value:g}" if mode == "absolute" else f"top {value:g} % of each fragment's mask"
    print(f"{len(ids)} test fragments, {models} models, ink where {threshold}, device {args.device}, "
          f"TTA {args.tta}, triplets {triplets}, {args.batch_size} tiles per batch")

    rows, totals = [], np.zeros(3, np.int64)  # pooled (tp, fp, fn) for --truth
    for fragment_id in ids:
        started = time.time()
        store = Store(stores[fragment_id])
        truth = read_truth(args.truth, fragment_id, store.shape) if args.truth else None
        prob = ensemble_probability(run, ensemble, store, args)
        mask = store.read_map("mask")
        pred = binarise(prob, mask, mode, value)
        if args.min_component > 0:
            pred = remove_small_components(pred, args.min_component)
        rows.append((fragment_id, encode_checked(fragment_id, pred)))
        save_preview(run / "previews" / f"{fragment_id}.png", [prob, pred])
        if args.save_probs:
            save_probability_map(run / "probs" / f"{fragment_id}.h5", prob, fragment_id=fragment_id,
                                 tta=args.tta, triplets=triplets)
        line = (f"{fragment_id}: {store.shape[0]} x {store.shape[1]}, ink in {pred.sum() / max(mask.sum(), 1):.1%} "
                f"of the mask, {time.time() - started:.0f} s")
        if truth is not None:
            tp = int(np.count_nonzero(pred & truth))
            counts = np.array([tp, np.count_nonzero(pred) - tp, np.count_nonzero(truth) - tp])
            totals += counts
            line += f", F0.5 {fbeta_counts(*counts):.4f}"
        print(line)
        store.close()

    write_submission(out, rows)
    if args.truth:
        print(f"F0.5 over all test pixels: {fbeta_counts(*totals):.4f}")
    print(f"wrote {out} ({len(rows)} rows) and previews in {run / 'previews'}")


if __name__ == "__main__":
    main()
