"""Predict the test fragments with a run's fitted ensemble and write the Kaggle submission and/or probability PNGs.

In:  --run runs/NAME holding ensemble.json (from ensemble.py) and the model files it names (relative to the
     run folder and inside it: a copy of just models/ and ensemble.json works anywhere, offline); both are
     checked, every model file loaded, before any prediction;
     --stores with the test stores test/<id>.h5 (prepare.py); default: the stores in the run's run.json. Every
     store must hold the slices the members' triplet modes read, and every output folder must accept files and
     have room for them: both are checked before any prediction.
Out: --out (default runs/NAME/submission.csv): "Id,Predicted", one row per test fragment, its ink mask
     run-length encoded row-major (lib/rle.py); rows in the order of --sample when given, else sorted by id.
     runs/NAME/previews/<id>.png  probability | binary mask
     DIR/<id>_prediction.png      with --png [DIR] (default DIR: runs/NAME/predictions): the ensemble's probability
                                  as 8-bit greyscale (round(255 p)), 0 outside the mask, full size
     runs/NAME/probs/<id>.h5      the ensemble's probability map (with --save-probs)
     with --truth DIR (DIR/<id>_inklabels.png, e.g. data/synth/_truth): F0.5 per fragment and over all of them.
     CSV or not: the CSV is written when --sample or --out is given or any test store comes from the Kaggle layout;
     test stores from scroll segments alone (prepare.py on the segment layout), with neither option, give only
     the PNGs (no CSV: segments have no Kaggle submission), as if --png had been given.

Every fold model of every member predicts each fragment (lib.infer.predict_fragment: rot90 x4 test-time
augmentation and the centre-slice triplets combined as the member's OOF maps were, unless --no-tta /
--triplets MODE); a member is the mean of its folds, the ensemble the members' weighted sum with ensemble.json's
weights. Models sharing a tile size, stride and triplet mode run together: each batch of tiles is read once and
goes through all of them; then its threshold (absolute,
or percentile: the top q % of the fragment's in-mask pixels), the mask, and optionally --min-component.

    python submit.py --run runs/demo --stores data/prepared [--sample data/synth/sample_submission.csv]
"""
import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lib.fragments import FragmentError, read_png_binary
from lib.infer import TRIPLET_MODES, predict_fragment, triplet_inputs
from lib.lock import LockedError, exclusive
from lib.maps import save_preview, save_probability_map, save_probability_png
from lib.metrics import binarise, confusion_counts, fbeta_counts, remove_small_components
from lib.rle import rle_decode, rle_encode
from lib.runs import RunFileError, load_members, read_ensemble, recorded_stores
from lib.outputs import OutputError, check_writable, describe, write_atomically
from lib.store import Store, StoreError, check_store, require_slices


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="run folder with ensemble.json and models/")
    parser.add_argument("--stores", help="folder with the test/<id>.h5 stores (default: the run's, from run.json, "
                        "else data/prepared)")
    parser.add_argument("--out", help="submission CSV (default: RUN/submission.csv)")
    parser.add_argument("--sample", help="sample_submission.csv: its Id order is kept and its ids must be the test ids")
    parser.add_argument("--batch-size", type=int, help="tiles per model call, x12 inputs with TTA and triplets "
                        "(default: 32 on GPU; 4 on CPU, where more tiles a call run slower and take more memory: "
                        "bench/README.md, \"## submit\")")
    parser.add_argument("--no-tta", dest="tta", action="store_false", help="no rot90 test-time augmentation")
    parser.add_argument("--triplets", choices=TRIPLET_MODES, help="how to combine the centre-slice triplets (default: "
                        "each member's mode from ensemble.json, the one its OOF maps and the fitted threshold assumed)")
    parser.add_argument("--no-triplets", dest="triplets", action="store_const", const="middle", help="--triplets middle")
    parser.add_argument("--min-component", type=int, default=0, help="drop ink components smaller than this (pixels)")
    parser.add_argument("--save-probs", action="store_true", help="also write RUN/probs/<id>.h5")
    parser.add_argument("--png", nargs="?", const="", metavar="DIR", help="also write DIR/<id>_prediction.png, "
                        "8-bit probability (default DIR: RUN/predictions); segment stores alone imply it, no CSV")
    parser.add_argument("--truth", help="folder with <id>_inklabels.png of the test fragments: print F0.5")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core); 1 keeps "
                        "threads from spinning against other work on shared cores (bench/README.md, \"## submit\")")
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 4 if args.device == "cpu" else 32
    return args


# ------------------------------------------------------------------------------------------- inputs


def test_stores(stores):
    """{id: Store} of the test stores, each opened and its maps and statistics checked before any prediction."""
    folder = Path(stores) / "test"
    paths = {p.stem: p for p in sorted(folder.glob("*.h5"))}
    if not paths:
        sys.exit(f"error: {folder}: no test stores (<id>.h5); run prepare.py first")
    try:
        for path in paths.values():
            check_store(path)
        return {fragment_id: Store(path) for fragment_id, path in paths.items()}
    except StoreError as err:
        sys.exit(f"error: {err}")


def submission_ids(test_ids, sample):
    """The row order: the sample submission's (which must list exactly the test ids), else sorted."""
    if sample is None:
        return sorted(test_ids)
    try:
        with open(sample, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark is fine
            ids = [row["Id"] for row in csv.DictReader(f)]
    except (OSError, KeyError, csv.Error) as err:
        sys.exit(f"error: {sample}: not a readable submission CSV with an Id column ({err})")
    except UnicodeDecodeError:
        sys.exit(f"error: {sample}: not a text CSV (not UTF-8); expected the sample submission, Id,Predicted")
    if sorted(ids) != sorted(test_ids):
        sys.exit(f"error: {sample}: {id_difference(ids, test_ids)}")
    return ids


def id_difference(sample_ids, test_ids):
    """What differs between the sample's ids and the test stores', naming the ids: missing, extra or repeated."""
    missing, extra = sorted(set(test_ids) - set(sample_ids)), sorted(set(sample_ids) - set(test_ids))
    parts = ([f"no row for test store id {', '.join(missing)}"] if missing else []) + \
        ([f"id {', '.join(extra)} has no test store"] if extra else [])
    repeated = sorted({i for i in sample_ids if sample_ids.count(i) > 1})
    if repeated:
        parts.append(f"id {', '.join(repeated)} repeated")
    return "; ".join(parts) + f" (test stores: {', '.join(sorted(test_ids))})"


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


def tiling_groups(members, triplets=None):
    """{(tile_size, stride, triplet mode): [(model, weight), ...]}: every fold model of the members
    (lib.runs.load_members), weighted member weight / number of folds, grouped by how they predict: their tiling
    and their triplet mode (the member's own, unless `triplets` overrides it)."""
    groups = {}
    for member in members:
        key = (member["tile_size"], member["stride"], triplets or member["triplets"])
        for model, _ in member["models"]:
            groups.setdefault(key, []).append((model, member["weight"] / len(member["models"])))
    return groups


def ensemble_probability(groups, store, args):
    """(H, W) float32: the ensemble's weighted sum; one pass over the fragment's tiles per group (tiling_groups)."""
    total = np.zeros(store.shape, np.float32)
    for (tile_size, stride, triplets), models in groups.items():
        predict_fragment(models, store, tile_size, stride, args.batch_size, tta=args.tta, triplets=triplets,
                         device=args.device, progress=True, out=total)
    return total


def encode_checked(fragment_id, pred):
    """The row-major RLE of `pred`, decoded again and compared: a wrong submission must never be written."""
    rle = rle_encode(pred)
    if not np.array_equal(rle_decode(rle, pred.shape), pred):
        sys.exit(f"error: RLE of fragment {fragment_id} does not decode to its mask")
    return rle


def write_submission(path, rows):
    """Write `rows` [(id, rle)] as Id,Predicted through a temp file (removed when the write fails: a full disk);
    read it back and compare before returning."""
    def write(f):
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["Id", "Predicted"])
        writer.writerows(rows)

    write_atomically(path, write, newline="")
    with open(path, newline="") as f:
        written = [tuple(row) for row in csv.reader(f)]
    if written != [("Id", "Predicted"), *rows]:
        sys.exit(f"error: {path}: the file read back differs from the rows written")


def outputs(args, run, stores):
    """(CSV path or None, PNG folder or None): the rule in the docstring. A CSV is wanted when --sample or --out is
    given or a test store comes from the Kaggle layout; PNGs with --png, or when no CSV is wanted."""
    want_csv = bool(args.sample or args.out) or any(store.layout == "kaggle" for store in stores.values())
    csv_path = (Path(args.out) if args.out else run / "submission.csv") if want_csv else None
    png_dir = Path(args.png) if args.png else run / "predictions"
    return csv_path, png_dir if args.png is not None or not want_csv else None


def check_outputs(run, out, png_dir, stores, save_probs):
    """Before any prediction: every folder this run writes into accepts files and has room for about what goes
    there (an OutputError naming it). The sizes are rough lower bounds: a PNG of up to a byte a pixel, a CSV of
    run lengths, previews at a few bits a pixel, probability maps at two bytes a pixel."""
    pixels = sum(store.shape[0] * store.shape[1] for store in stores.values())
    wanted = [(run / "previews", pixels // 8, "previews")]
    if out is not None:
        wanted.append((out, pixels // 32, "submission CSV"))
    if png_dir is not None:
        wanted.append((png_dir, pixels, "prediction PNGs"))
    if save_probs:
        wanted.append((run / "probs", 2 * pixels, "probability maps"))
    for path, need, what in wanted:
        check_writable(path, need, what)


def main(argv=None):
    args = parse_args(argv)
    run = Path(args.run)
    if not run.is_dir():
        sys.exit(f"error: {run}: run folder not found")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        with exclusive(run, "submit.py"):
            predict_test_set(run, args)
    except (LockedError, RunFileError, StoreError, OutputError) as err:  # StoreError: a corrupt chunk met while predicting
        sys.exit(f"error: {err}")
    except OSError as err:  # a write that failed mid-run (a preview on a disk that filled up)
        sys.exit(f"error: {err.filename or run}: cannot write: {describe(err)}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted; nothing written after the last line above, earlier outputs untouched")


def predict_test_set(run, args):
    """Check every input, then predict each test fragment and write the submission, previews and scores."""
    ensemble = read_ensemble(run)
    stores = test_stores(recorded_stores(run, args.stores))
    out, png_dir = outputs(args, run, stores)
    ids = submission_ids(stores, args.sample)
    if args.truth:
        check_truth(args.truth, ids)
    check_outputs(run, out, png_dir, stores, args.save_probs)
    members = load_members(run, ensemble, args.device)  # every model file checked before any prediction
    for store in stores.values():  # every store holds the slices every member reads
        for mode in sorted({args.triplets or member["triplets"] for member in members}):
            require_slices(store, triplet_inputs(store, mode)[0], f"--triplets {mode}")
    mode, value = ensemble["threshold"]["mode"], ensemble["threshold"]["value"]
    groups = tiling_groups(members, args.triplets)
    models = sum(len(g) for g in groups.values())
    triplets = ",".join(sorted({mode for _, _, mode in groups}))
    threshold = f"p >= {value:g}" if mode == "absolute" else f"top {value:g} % of each fragment's mask"
    print(f"{len(ids)} test fragments, {models} models, ink where {threshold}, device {args.device}, "
          f"TTA {args.tta}, triplets {triplets}, {args.batch_size} tiles per batch")

    rows, totals = [], np.zeros(3, np.int64)  # pooled (tp, fp, fn) for --truth
    for fragment_id in ids:
        started = time.time()
        store = stores[fragment_id]
        truth = read_truth(args.truth, fragment_id, store.shape) if args.truth else None
        prob = ensemble_probability(groups, store, args)
        mask = store.read_map("mask")
        pred = binarise(prob, mask, mode, value)
        if args.min_component > 0:
            pred = remove_small_components(pred, args.min_component)
        if out is not None:
            rows.append((fragment_id, encode_checked(fragment_id, pred)))
        if png_dir is not None:
            save_probability_png(png_dir / f"{fragment_id}_prediction.png", prob)
        save_preview(run / "previews" / f"{fragment_id}.png", [prob, pred])
        if args.save_probs:
            save_probability_map(run / "probs" / f"{fragment_id}.h5", prob, fragment_id=fragment_id,
                                 tta=args.tta, triplets=triplets)
        line = (f"{fragment_id}: {store.shape[0]} x {store.shape[1]}, ink in {pred.sum() / max(mask.sum(), 1):.1%} "
                f"of the mask, {time.time() - started:.0f} s")
        if truth is not None:
            counts = confusion_counts(pred, truth)
            totals += counts
            line += f", F0.5 {fbeta_counts(*counts):.4f}"
        print(line)
        store.close()

    if out is not None:
        write_submission(out, rows)
    if args.truth:
        print(f"F0.5 over all test pixels: {fbeta_counts(*totals):.4f}")
    wrote = ([f"{out} ({len(rows)} rows)"] if out is not None else []) + \
        ([f"{png_dir}/<id>_prediction.png"] if png_dir is not None else [])
    print(f"wrote {' and '.join(wrote)}, previews in {run / 'previews'}")


if __name__ == "__main__":
    main()
