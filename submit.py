"""Predict the test fragments with a run's fitted ensemble and write the Kaggle submission and/or probability PNGs.

In:  --run runs/NAME holding ensemble.json (from ensemble.py) and the model files it names (relative to the
     run folder and inside it: a copy of just models/ and ensemble.json works anywhere, offline); both are
     checked, every model file loaded, before any prediction;
     --stores with the test stores test/<id>.h5 (prepare.py); default: the stores in the run's run.json. Every
     store must hold the slices the members' triplet modes read, and every output folder must accept files and
     have room for them: both are checked before any prediction. Train stores there must be those the run was
     trained on (ensemble.json's trained_on), unchanged: else the run is stale for them, and that is one line
     naming the run and what it was trained on (a folder of test stores alone, of any data, is fine).
Out: in WORK (--work; default: the run folder when it accepts files, else RUNNAME-work beside --out or --png, so
     that a read-only run folder, a Kaggle notebook's input, is only read), unless given elsewhere:
     --out (default WORK/submission.csv): "Id,Predicted", one row per test fragment, its ink mask
     run-length encoded row-major (lib/rle.py); rows in the order of --sample when given, else sorted by id.
     WORK/previews/<id>.png       probability | binary mask
     DIR/<id>_prediction.png      with --png [DIR] (default DIR: WORK/predictions): the ensemble's probability
                                  as 8-bit greyscale (round(255 p)), 0 outside the mask, full size
     DIR/<id>_prediction.zarr     with --zarr [DIR]: the same 8-bit values, chunked; .tif with --tif [DIR]: tiled,
                                  compressed BigTIFF
     WORK/probs/<id>.h5           the ensemble's probability map (with --save-probs)
     WORK/predicted/<id>.json     what a fragment's outputs were made from, written last: a later call skips the
                                  fragments whose outputs are complete and up to date (unless a CSV or --truth
                                  needs every one, or --force)
     with --truth DIR (DIR/<id>_inklabels.png, e.g. data/synth/_truth): F0.5 per fragment and over all of them.
     CSV or not: the CSV is written when --sample or --out is given or any test store comes from the Kaggle layout;
     test stores from scroll segments alone (prepare.py on the segment layout), with neither option, give only
     the PNGs (no CSV: segments have no Kaggle submission), as if --png had been given.

Every fold model of every member predicts each fragment (lib.infer.predict_fragment: rot90 x4 test-time
augmentation, and each member's own views: a triplet model's centre-slice triplets combined as its OOF maps were,
unless --triplets MODE; a stack model's window shifted by -1, 0, +1 slices; --no-tta: neither); a member is the
mean of its folds, the ensemble the members' weighted sum with ensemble.json's weights. Models of any family that
share a tile size, stride and way of reading slices run together: each batch of tiles is read once and goes
through all of them; then its threshold (absolute,
or percentile: the top q % of the fragment's in-mask pixels), the mask, and optionally --min-component.

Memory does not grow with a fragment's size: it is predicted in bands of rows (lib/bands.py), each band's
probability sum goes to a scratch zarr (WORK/.scratch), and every output is written from it band by band
(lib/writers.py; --min-component in two passes, holding a label and an area per ink component). The bands run in
this process, or as Ray tasks with --workers N or --gpus N (a local Ray of N one-CPU or one-GPU workers) or --address
auto|HOST:PORT (a cluster; on CUDA each band task takes a GPU): a band whose worker dies is
retried, each band's end is printed, and the result equals this process's exactly when torch has the same number
of CPU threads (--threads) in both (lib/distributed.py). Bands are marked done as they are written: a run that
stops keeps them, and the next one with the same settings predicts only the others.

    python submit.py --run runs/demo --stores data/prepared [--sample data/synth/sample_submission.csv]
    python submit.py --run runs/seg --stores data/prepared-seg --segments '2023*' --zarr --workers 2
"""
import argparse
import csv
import dataclasses
import fnmatch
import functools
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lib.fragments import FragmentError, read_png_binary
from lib.bands import plan_bands, tile_row_counts
from lib.distributed import band_jobs, preload, run_jobs
from lib.infer import predict_fragment
from lib.inputs import TRIPLET_MODES, slices_needed
from lib.lock import LockedError, exclusive
from lib.metrics import fbeta_counts
from lib.outputs import OutputError, check_writable, describe, write_atomically
from lib.runs import RunDir, RunFileError, check_trained_on, load_members, read_ensemble, recorded_stores, write_json
from lib.store import Store, StoreError, check_store, fingerprint, require_slices
from lib.writers import PngWriter, ProbabilityH5Writer, ProbabilityScratch, TiffWriter, ZarrWriter, finish_fragment


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="run folder with ensemble.json and models/")
    parser.add_argument("--stores", help="folder with the test/<id>.h5 stores (default: the run's, from run.json, "
                        "else data/prepared)")
    parser.add_argument("--out", help="submission CSV (default: WORK/submission.csv)")
    parser.add_argument("--work", help="folder for the lock, scratch, previews and predicted/ stamps, and the outputs "
                        "that default into it (default: the run folder when it accepts files, else RUNNAME-work "
                        "beside --out or --png: a read-only run folder, as a Kaggle notebook's input, stays untouched)")
    parser.add_argument("--sample", help="sample_submission.csv: its Id order is kept and its ids must be the test ids")
    parser.add_argument("--batch-size", type=int, help="tiles per model call, x12 inputs with TTA and triplets "
                        "(default: 32 on GPU; 4 on CPU, where more tiles a call run slower and take more memory: "
                        "bench/README.md, \"## submit\")")
    parser.add_argument("--no-tta", dest="tta", action="store_false", help="no rot90 test-time augmentation")
    parser.add_argument("--triplets", choices=TRIPLET_MODES, help="triplet models: how to combine the centre-slice "
                        "triplets (default: each member's mode from ensemble.json, the one its OOF maps and the fitted "
                        "threshold assumed)")
    parser.add_argument("--no-triplets", dest="triplets", action="store_const", const="middle", help="--triplets middle")
    parser.add_argument("--min-component", type=int, default=0, help="drop ink components smaller than this (pixels)")
    parser.add_argument("--save-probs", action="store_true", help="also write WORK/probs/<id>.h5")
    parser.add_argument("--png", nargs="?", const="", metavar="DIR", help="also write DIR/<id>_prediction.png, "
                        "8-bit probability (default DIR: WORK/predictions); segment stores alone imply it, no CSV")
    parser.add_argument("--zarr", dest="zarr_dir", nargs="?", const="", metavar="DIR", help="also write "
                        "DIR/<id>_prediction.zarr: the PNG's 8-bit probability, chunked (default DIR: WORK/predictions)")
    parser.add_argument("--tif", dest="tif_dir", nargs="?", const="", metavar="DIR", help="also write "
                        "DIR/<id>_prediction.tif: the same as a tiled, compressed BigTIFF (default DIR: WORK/predictions)")
    parser.add_argument("--segments", metavar="PATTERN,..", help="predict only the test stores whose id matches one "
                        "of these glob patterns (e.g. '2023*'; default: all)")
    parser.add_argument("--force", action="store_true", help="predict fragments whose outputs are complete and up "
                        "to date too (without it they are skipped, unless a CSV or --truth needs every fragment)")
    parser.add_argument("--address", help="spread the bands over the Ray cluster at auto or HOST:PORT (run folder, "
                        "stores and outputs on a filesystem every node sees)")
    parser.add_argument("--gpus", type=int, default=0, help="spread the bands over a local Ray of this many GPUs, "
                        "one band task on each (--device cuda)")
    parser.add_argument("--workers", type=int, default=0, help="spread the bands over a local Ray of this many "
                        "one-CPU workers (default 0: in this process)")
    parser.add_argument("--band-rows", type=int, help="rows per band, rounded up to whole 512-row chunks (default: "
                        "about 16 Mpx a band, at least 8 tiles tall): thinner bands spread over more workers but "
                        "read the tiles that cross their edges once more")
    parser.add_argument("--truth", help="folder with <id>_inklabels.png of the test fragments: print F0.5")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core); 1 keeps "
                        "threads from spinning against other work on shared cores (bench/README.md, \"## submit\")")
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 4 if args.device == "cpu" else 32
    if args.gpus and not args.device.startswith("cuda"):
        parser.error(f"--gpus {args.gpus} needs --device cuda (device here: {args.device})")
    return args


# ------------------------------------------------------------------------------------------- inputs


class InputFileError(ValueError):
    """A file given to submit.py (--sample, --truth) that cannot be used: the message is one line naming it."""


def test_stores(stores, segments=None):
    """{id: Store} of the test stores (those whose id matches a --segments pattern, when given), each opened and its
    maps and statistics checked before any prediction."""
    folder = Path(stores) / "test"
    paths = {p.stem: p for p in sorted(folder.glob("*.h5"))}
    if segments:
        patterns = [p for p in segments.split(",") if p]
        paths = {i: p for i, p in paths.items() if any(fnmatch.fnmatchcase(i, pattern) for pattern in patterns)}
        if not paths:
            raise StoreError(f"{folder}: no test store matches --segments {segments}")
    if not paths:
        raise StoreError(f"{folder}: no test stores (<id>.h5); run prepare.py first")
    for path in paths.values():
        check_store(path)
    return {fragment_id: Store(path) for fragment_id, path in paths.items()}


def submission_ids(test_ids, sample):
    """The row order: the sample submission's (which must list exactly the test ids), else sorted."""
    if sample is None:
        return sorted(test_ids)
    try:
        with open(sample, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark is fine
            ids = [row["Id"] for row in csv.DictReader(f)]
    except (OSError, KeyError, csv.Error) as err:
        raise InputFileError(f"{sample}: not a readable submission CSV with an Id column ({err})") from None
    except UnicodeDecodeError:
        raise InputFileError(f"{sample}: not a text CSV (not UTF-8); expected the sample submission, Id,Predicted") from None
    if sorted(ids) != sorted(test_ids):
        raise InputFileError(f"{sample}: {id_difference(ids, test_ids)}")
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
            raise InputFileError(f"{path}: not found (--truth needs the labels of every test fragment)")


def read_truth(truth_dir, fragment_id, shape):
    path = Path(truth_dir) / f"{fragment_id}_inklabels.png"
    labels = read_png_binary(path)  # a FragmentError names the file
    if labels.shape != shape:
        raise InputFileError(f"{path}: labels are {labels.shape}, but the test store is {shape}")
    return labels


# ------------------------------------------------------------------------------------------- prediction


def tiling_groups(members, triplets=None):
    """{(tile_size, stride, how slices are read): [(model, weight, InputSpec), ...]}: every fold model of the members
    (lib.runs.load_members), weighted member weight / number of folds, grouped so that one pass over a fragment's
    tiles serves each group: their tiling and where their slices are read (InputSpec.read_mode). `triplets`
    overrides the triplet mode of triplet models."""
    groups = {}
    for member in members:
        spec = member["spec"]
        if triplets and spec.family == "triplets":
            spec = dataclasses.replace(spec, triplets=triplets)
        key = (member["tile_size"], member["stride"], spec.read_mode())
        for model, _ in member["models"]:
            groups.setdefault(key, []).append((model, member["weight"] / len(member["models"]), spec))
    return groups


def describe_inputs(groups):
    """The members' families and input modes, e.g. "stack (12 slices, tile), triplets (tile)"."""
    specs = {spec for models in groups.values() for _, _, spec in models}
    return ", ".join(sorted(f"{s.family} ({s.triplets})" if s.family == "triplets" else
                            f"{s.family} ({s.depth} slices, {s.centre_on})" for s in specs))


def predict_group(models, store, key, out, batch_size, tta, device):
    """Add one tiling group's (tiling_groups) weighted probability into `out`, a row sink: lib/bands.py calls it
    on each band's window of the store, here or in a Ray task."""
    tile_size, stride, _ = key
    predict_fragment(models, store, tile_size, stride, batch_size, tta=tta, device=device, out=out)


def largest_tile(groups):
    """The largest tile size of the ensemble's tilings: bands are at least a few of them tall."""
    return max(tile_size for tile_size, _, _ in groups)


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
        raise OutputError(f"{path}: the file read back differs from the rows written")


def outputs(args, work, stores):
    """(CSV path or None, PNG folder or None): the rule in the docstring. A CSV is wanted when --sample or --out is
    given or a test store comes from the Kaggle layout; PNGs with --png, or when no CSV is wanted."""
    want_csv = bool(args.sample or args.out) or any(store.layout == "kaggle" for store in stores.values())
    csv_path = (Path(args.out) if args.out else work.submission) if want_csv else None
    png_dir = Path(args.png) if args.png else work.predictions
    return csv_path, png_dir if args.png is not None or not want_csv else None


def check_outputs(work, out, folders, stores, save_probs):
    """Before any prediction: every folder this run writes into accepts files and has room for about what goes
    there (an OutputError naming it). The sizes are rough lower bounds: a PNG, zarr or TIFF of up to a byte a pixel,
    a CSV of run lengths, previews at a few bits a pixel, probability maps at two bytes a pixel, and the scratch
    probability sum of the largest fragment at four."""
    sizes = [store.shape[0] * store.shape[1] for store in stores.values()]
    pixels = sum(sizes)
    wanted = [(work.previews, pixels // 8, "previews"), (work.scratch, 4 * max(sizes), "scratch probabilities")]
    if out is not None:
        wanted.append((out, pixels // 32, "submission CSV"))
    wanted += [(folder, pixels, f"prediction {kind.upper()}s") for kind, folder in folders.items() if folder is not None]
    if save_probs:
        wanted.append((work.probs, 2 * pixels, "probability maps"))
    for path, need, what in wanted:
        check_writable(path, need, what)


def main(argv=None):
    args = parse_args(argv)
    run = Path(args.run)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if not run.is_dir():
            raise RunFileError(f"{run}: run folder not found")
        work = RunDir(work_folder(args, run))
        work.path.mkdir(parents=True, exist_ok=True)
        with exclusive(work.path, "submit.py"):
            predict_test_set(run, work, args)
    except (LockedError, RunFileError, StoreError, OutputError, InputFileError, FragmentError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:  # a write that failed mid-run (a preview on a disk that filled up)
        sys.exit(f"error: {err.filename or run}: cannot write: {describe(err)}")
    except KeyboardInterrupt:
        sys.exit("error: interrupted; nothing written after the last line above, earlier outputs untouched")


def work_folder(args, run):
    """Where this call writes its lock, scratch, previews and stamps (and the outputs that default there): --work,
    else the run folder when it accepts files, else RUNNAME-work beside --out or --png (a read-only run folder: a
    Kaggle notebook's input). An OutputError when the run is read-only and neither says where to write."""
    if args.work:
        return Path(args.work)
    try:
        check_writable(run, 0, "run folder")
        return run
    except OutputError as err:
        beside = args.out or args.png
        if not beside:
            raise OutputError(f"{err}; give --out FILE (the rest goes beside it) or --work DIR") from None
    return Path(beside).parent / f"{run.resolve().name}-work"


def predict_test_set(run, work, args):
    """Check every input, then predict the test fragments band by band (here, or as Ray tasks) and write each one's
    outputs as its last band finishes; then the submission and the scores."""
    ensemble = read_ensemble(run)
    stores_folder = recorded_stores(run, args.stores)
    check_trained_on(run, ensemble["trained_on"], stores_folder, test_only=True)
    stores = test_stores(stores_folder, args.segments)
    out, png_dir = outputs(args, work, stores)
    args.zarr_dir, args.tif_dir = (None if d is None else Path(d or work.predictions) for d in (args.zarr_dir,
                                                                                               args.tif_dir))
    ids = submission_ids(stores, args.sample)
    if args.truth:
        check_truth(args.truth, ids)
    check_outputs(work, out, {"png": png_dir, "zarr": args.zarr_dir, "tif": args.tif_dir}, stores, args.save_probs)
    members = load_members(run, ensemble, args.device)  # every model file checked before any prediction
    groups = tiling_groups(members, args.triplets)
    for store in stores.values():  # every store holds the slices every member reads
        for spec in sorted({spec for models in groups.values() for _, _, spec in models}, key=str):
            require_slices(store, slices_needed(spec, store, args.tta), f"the {spec.family} member's inputs ({spec})")
    mode, value = ensemble["threshold"]["mode"], ensemble["threshold"]["value"]
    models = sum(len(g) for g in groups.values())
    inputs = describe_inputs(groups)
    threshold = f"p >= {value:g}" if mode == "absolute" else f"top {value:g} % of each fragment's mask"
    where = f"Ray at {args.address}" if args.address else f"{args.workers or args.gpus} local Ray workers" \
        if args.workers or args.gpus else \
        "this process"
    print(f"{len(ids)} test fragments, {models} models, ink where {threshold}, device {args.device}, "
          f"TTA {args.tta}, inputs {inputs}, {args.batch_size} tiles per batch, bands in {where}")
    targets = {i: prediction_files(args, work, png_dir, i) for i in ids}
    stamps = {i: prediction_stamp(stores[i], run, args, targets[i]) for i in ids}
    skippable = out is None and not args.truth and not args.force  # a CSV or scores need every fragment
    todo = [i for i in ids if not (skippable and is_up_to_date(work, i, stamps[i], targets[i]))]
    for fragment_id in ids:
        if fragment_id not in todo:
            print(f"{fragment_id}: outputs complete and up to date, skipped (--force redoes it)")

    common = {"run": str(run), "ensemble": ensemble, "triplets": args.triplets, "device": args.device,
              "threads": args.threads, "batch_size": args.batch_size, "group_models": tiling_groups,
              "predict_group": functools.partial(predict_group, batch_size=args.batch_size, tta=args.tta,
                                                 device=args.device)}
    preload(common, groups)  # this process's bands use the models loaded above
    jobs, remaining, total, started = [], {}, {}, {}
    rows, totals = {}, np.zeros(3, np.int64)  # pooled (tp, fp, fn) for --truth

    def complete(fragment_id):
        result = finish(work, args, stores[fragment_id], targets[fragment_id], (mode, value), out is not None,
                        inputs, started.get(fragment_id, time.time()))
        if result["rle"] is not None:
            rows[fragment_id] = result["rle"]
        if result["counts"] is not None:
            totals[:] += result["counts"]
        write_json(stamp_path(work, fragment_id), stamps[fragment_id])

    def on_band(job, seconds):
        fragment_id = job["fragment_id"]
        started.setdefault(fragment_id, time.time() - seconds)
        remaining[fragment_id] -= 1
        if total[fragment_id] > 1:  # with one band, the fragment's own line says it is done
            print(f"{fragment_id}: band {total[fragment_id] - remaining[fragment_id]}/{total[fragment_id]} (rows "
                  f"{job['band'][0]}:{job['band'][1]}) predicted in {seconds:.0f} s", flush=True)
        if remaining[fragment_id] == 0:
            complete(fragment_id)

    for fragment_id in todo:
        store = stores[fragment_id]
        row_counts = {key: tile_row_counts(store, key[0], key[1]) for key in groups}
        bands = plan_bands(*store.shape, largest_tile(groups), args.band_rows)
        stamp = json.dumps([stamps[fragment_id]["sources"], args.tta, args.triplets, args.batch_size, args.threads,
                            bands])  # all that the probability sum depends on
        scratch = ProbabilityScratch(work.scratch / f"{fragment_id}.zarr", store.shape, stamp)
        done = scratch.done_bands()
        left = [band for band in bands if band not in done]
        if done:
            print(f"{fragment_id}: {len(bands) - len(left)} of {len(bands)} bands predicted by an interrupted run, "
                  f"kept", flush=True)
        jobs += band_jobs(store, store.path, scratch.path, left, row_counts, common)
        remaining[fragment_id], total[fragment_id] = len(left), len(bands)
        if not left:
            complete(fragment_id)

    run_jobs(jobs, on_band, args.address, args.workers, args.gpus)
    shutil.rmtree(work.scratch, ignore_errors=True)
    if out is not None:
        write_submission(out, [(i, rows[i]) for i in ids])
    if args.truth:
        print(f"F0.5 over all test pixels: {fbeta_counts(*totals):.4f}")
    wrote = ([f"{out} ({len(rows)} rows)"] if out is not None else []) + \
        [f"{folder}/<id>_prediction.{kind}" for kind, folder in (("png", png_dir), ("zarr", args.zarr_dir),
                                                                 ("tif", args.tif_dir)) if folder is not None]
    print(f"wrote {' and '.join(wrote)}, previews in {work.previews}")


def prediction_files(args, work, png_dir, fragment_id):
    """{kind: path} of one fragment's output files (the CSV row aside)."""
    files = {"preview": work.previews / f"{fragment_id}.png"}
    for kind, folder in (("png", png_dir), ("zarr", args.zarr_dir), ("tif", args.tif_dir)):
        if folder is not None:
            files[kind] = Path(folder) / f"{fragment_id}_prediction.{kind}"
    if args.save_probs:
        files["probs"] = work.probs / f"{fragment_id}.h5"
    return files


def finish(work, args, store, files, threshold, want_rle, inputs, started):
    """Write one fragment's outputs from its scratch (lib.writers.finish_fragment) and print its line."""
    height, width = store.shape
    writers = [{"png": PngWriter, "zarr": ZarrWriter, "tif": TiffWriter}[kind](files[kind], height, width)
               for kind in ("png", "zarr", "tif") if kind in files]
    if "probs" in files:
        writers.append(ProbabilityH5Writer(files["probs"], height, width, fragment_id=store.fragment_id,
                                           tta=args.tta, inputs=inputs))
    truth = read_truth(args.truth, store.fragment_id, store.shape) if args.truth else None
    scratch = ProbabilityScratch(work.scratch / f"{store.fragment_id}.zarr")
    result = finish_fragment(scratch, store, threshold, writers, rle=want_rle, preview=files["preview"],
                             min_component=args.min_component, truth=truth)
    scratch.remove()
    line = (f"{store.fragment_id}: {height} x {width}, ink in {result['ink'] / max(result['mask'], 1):.1%} of the "
            f"mask, {time.time() - started:.0f} s")
    if result["counts"] is not None:
        line += f", F0.5 {fbeta_counts(*result['counts']):.4f}"
    print(line, flush=True)
    return result


def stamp_path(work, fragment_id):
    return work.predicted / f"{fragment_id}.json"


def prediction_stamp(store, run, args, files):
    """What a fragment's outputs were made from: the store (size, mtime), ensemble.json and its model files
    (sizes, mtimes), the settings that change the values, and the files written."""
    sources = [store.path, RunDir(run).ensemble] + RunDir(run).model_files()
    return {"sources": fingerprint(sources), "tta": args.tta, "triplets": args.triplets,
            "min_component": args.min_component, "files": {kind: str(path) for kind, path in files.items()}}


def is_up_to_date(work, fragment_id, stamp, files):
    """True when the fragment's stamp (written after its last output) matches and every output file is there."""
    try:
        recorded = json.loads(stamp_path(work, fragment_id).read_text())
    except (OSError, ValueError):
        return False
    return recorded == stamp and all(Path(path).exists() for path in files.values())


if __name__ == "__main__":
    main()
