"""Train U-Nets over backbones x cross-validation folds with Ray Tune; save out-of-fold predictions.

In:  --stores data/prepared (the train/<id>.h5 stores from prepare.py), and a recipe: --preset, a --config FILE
     (JSON or YAML of TrainConfig's fields, lib/config.py) and options, in that order of precedence.
Out: --run runs/NAME (lib/runs.py RunDir) with
     run.json                         the run record, written before any trial: the resolved TrainConfig, fold
                                      table, what it is trained on (each train store's fingerprint), creator,
                                      package versions, git commit
     status.json                      running, finished or unfinished, with the trials' counts (what make reads)
     oof/<backbone>/<fragment>.h5     held-out probability map of each train fragment (float16); the maps of
                                      a split fragment's bands are in oof/<backbone>/bands/<fold>.h5
     models/<backbone>/fold-<k>.pt    best weights + model config, torch.load(weights_only=True)
     trials/<backbone>/fold-<k>.json  a finished trial's scores and its model file's sha256 (checked before use)
     previews/<backbone>/fold-<k>.png probability | prediction at the best threshold | label
     summary.md, summary.csv          F0.5 per backbone x fold, mean per backbone, epochs, minutes, failed trials
     checkpoints/                     an unfinished trial's last epoch (removed when the trial finishes)
     tune/attempt-<n>/                each attempt's Ray Tune experiment: progress.csv, TensorBoard logs

One trial per (backbone, fold) (lib/trial.py); fold k holds out train fragment k (--split FRAG:K cuts fragment FRAG
into K bands of equal mask area, each its own fold; a single train store is cut into 3 by default). Trials run
in parallel as far as the cluster's CPUs and GPUs allow; --address joins an existing Ray cluster; a local Ray
and all it starts end with train.py, even on SIGKILL (lib/watchdog.py). One train.py at a time writes a run folder
(a second one exits naming the first). --resume continues an interrupted run with the config recorded in run.json,
from the trials' own checkpoints; no Ray Tune state is unpickled, so a run folder from elsewhere is as safe to
resume as to read.

    python train.py --stores data/prepared --run runs/demo --preset demo
    python train.py --stores data/prepared --run runs/full --preset full --backbones resnet34,mit_b2
    python train.py --preset full --print-config > recipe.json; python train.py --config recipe.json --run runs/mine
"""
import argparse
import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

from lib.lock import LockedError, exclusive, held_descriptor, refuse_if_locked
from lib.outputs import OutputError, check_writable, describe

RUN_FREE_BYTES = 64 * 2**20  # the least free space a run folder needs: about what a demo run writes


def refuse_early():
    """Exit at once when another train.py holds --run, or it cannot be written (read-only, full): before the
    seconds that importing torch and Ray take. main() checks both again (for callers of main())."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--run", default="runs/demo")
    run = early.parse_known_args()[0].run
    try:
        refuse_if_locked(run)
        check_writable(run, RUN_FREE_BYTES, "run folder")
    except (LockedError, OutputError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    refuse_early()

# The slow imports, after the lock check above.
import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray import tune  # noqa: E402

from lib.config import ONE_STORE_BANDS, ConfigError, build_parser, check_resumable, read_recipe, resolve, split_given  # noqa: E402
from lib.folds import make_folds  # noqa: E402
from lib.inputs import slices_needed, unsure_share  # noqa: E402
from lib.maps import load_probability_map, save_probability_map  # noqa: E402
from lib.runs import RunDir, RunFileError, RunStateError, check_trained_on  # noqa: E402
from lib.store import Store, StoreError, check_store, require_slices  # noqa: E402
from lib.summary import write_summary  # noqa: E402
from lib.trial import TrialJob, run_trial  # noqa: E402
from lib.watchdog import outlived_by_nothing  # noqa: E402


def parse_args(argv=None):
    """(the TrainConfig values given on the command line, those of --config's recipe, Placement, --print-config)."""
    args = build_parser(__doc__).parse_args(argv)
    given, placement = split_given(args)
    recipe = read_recipe(args.config) if args.config else {}
    return given, recipe, placement, args.print_config


# ---------------------------------------------------------------------------------------------- the run's plan


def fold_table(stores, split):
    """(train ids, [Fold]) of the train stores in `stores`. A single store with no --split is cut into
    ONE_STORE_BANDS bands (a fold trains on the others: one whole store would leave it nothing), said in one line."""
    train_dir = Path(stores) / "train"
    train_ids = sorted(p.name[: -len(".h5")] for p in train_dir.glob("*.h5"))
    if not train_ids:
        raise StoreError(f"{train_dir}: no train stores; run prepare.py first")
    for train_id in train_ids:  # before Ray starts: a bad store is one line here, not a failed trial
        check_store(train_dir / f"{train_id}.h5")
    if len(train_ids) == 1 and not split:
        split = f"{train_ids[0]}:{ONE_STORE_BANDS}"
        print(f"one train store ({train_ids[0]}): {ONE_STORE_BANDS} bands of equal mask area, one fold each "
              f"(--split {split}; give --split {train_ids[0]}:K for another K)")
    masks = None
    if split:
        fragment_id, _, count = split.rpartition(":")
        if fragment_id not in train_ids or not count.isdigit() or int(count) < 2:
            raise ConfigError(f"--split {split}: expected FRAG:K with a train store FRAG.h5 in {train_dir} and K >= 2")
        split = (fragment_id, int(count))
        masks = {fragment_id: Store(train_dir / f"{fragment_id}.h5").read_map("mask")}
    try:
        return train_ids, make_folds(train_ids, split, masks)
    except ValueError as err:
        raise ConfigError(f"{train_dir}: {err}") from None


def surface_report(config, train_ids):
    """One line: with inputs flattened onto each tile's surface, the share of each train store's tiles whose surface
    was too unsure, and which are read at their fragment's surface instead."""
    shares = [unsure_share(Store(Path(config.stores) / "train" / f"{i}.h5"), config.tile_size, config.stride)
              for i in train_ids]
    parts = ", ".join(f"{i} {share:.0%}" for i, share in zip(train_ids, shares))
    return f"inputs: each tile flattened onto its own surface; too unsure to flatten (read at the fragment's surface): {parts}"


def require_training_slices(config, train_ids):
    """StoreError (lib.store.require_slices) unless every train store holds the slices every member's trials read
    (lib.inputs.slices_needed). Before run.json is written and Ray starts."""
    for train_id in train_ids:
        store = Store(Path(config.stores) / "train" / f"{train_id}.h5")
        for family in config.families():
            spec = config.input_spec(family)
            require_slices(store, slices_needed(spec, store), f"a {family} model of --depth {spec.depth} "
                           f"--centre-on {spec.centre_on}" if family != "triplets" else f"--triplets {spec.triplets}")
        store.close()


def clear_run(run):
    """--force: empty the run folder, keeping the lock file this process holds."""
    for path in run.path.iterdir():
        if path.name != ".lock":
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def prepare_run(given, recipe, placement, run):
    """The RunRecord of the run in `run`: a new one, written to run.json, or the recorded one with --resume (after
    checking that nothing given now conflicts with it). Refuses to overwrite a run without --force."""
    record = run.read_record()
    if placement.force:
        clear_run(run)
        record = None
    elif record is None and any(p.name != ".lock" for p in run.path.iterdir()):
        raise RunStateError(f"{run}: not empty and has no {run.record.name} (not a run of this train.py); "
                            "pass --force to delete it and start over, or choose another --run")
    elif record is not None and not placement.resume:
        state = "a finished run" if run.is_finished() else "an unfinished run"
        hint = "--force to replace it" if run.is_finished() else "--resume to continue it"
        raise RunStateError(f"{run} already holds {state}; pass {hint}, or choose another --run")
    if placement.resume and record is None:
        raise RunStateError(f"{run} holds no run to resume (no {run.record.name})")
    if record is not None:
        check_resumable(record.config, given, recipe, run.record)
        check_trained_on(run, record.trained_on, record.config.stores)  # the trials left train on the same stores
        require_training_slices(record.config, record.train_ids)
        return record
    config = resolve(given, recipe)
    train_ids, folds = fold_table(config.stores, config.split)
    require_training_slices(config, train_ids)
    return run.write_record(config, train_ids, folds)


# ---------------------------------------------------------------------------------------------- Ray


def trial_resources(config, placement, cluster, num_trials):
    """CPUs and GPU share per trial; never a GPU the cluster does not have (the trial would wait forever).

    A trial asks for 1 + loader-worker CPUs. Without workers (the full preset names none) it asks for its share of
    the CPUs among the trials that run at once, and its loader gets all but one of them (run_trials). On a CPU-only
    cluster with fewer CPUs than the trials would take, the CPUs are shared evenly instead, so that all trials run
    at once and no core idles while the last one finishes alone.
    """
    gpus, max_concurrent = cluster.get("GPU", 0), placement.max_concurrent
    gpu_share = placement.gpus_per_trial if placement.gpus_per_trial is not None else (1 if gpus >= 1 else 0)
    if gpu_share > gpus:
        raise ConfigError(f"--gpus-per-trial {gpu_share} but the Ray cluster has {gpus:g} GPUs")
    if config.workers is None:
        at_once = min(num_trials, max_concurrent or num_trials, int(gpus // gpu_share) if gpu_share else num_trials)
        return {"cpu": max(1, int(cluster.get("CPU", 1) // max(at_once, 1))), "gpu": gpu_share}
    cpus = 1 + config.workers
    if gpu_share == 0 and not max_concurrent and num_trials * cpus > cluster.get("CPU", 1):
        cpus = min(cpus, max(0.25, math.floor(cluster.get("CPU", 1) / num_trials * 100) / 100))
    return {"cpu": cpus, "gpu": gpu_share}


def start_ray(placement):
    if placement.address:
        context = ray.init(address=placement.address)
    else:  # "local": always a Ray of its own, never a cluster someone left running on this machine
        context = ray.init(address="local", num_cpus=placement.num_cpus, include_dashboard=placement.dashboard,
                           object_store_memory=256 * 2**20)  # trials read HDF5 from disk; leave RAM to them
    if placement.dashboard and context.dashboard_url:
        print(f"Ray dashboard: http://{context.dashboard_url}  (log in with the token that `ray get-auth-token` prints)")


def tune_trial(params):
    """The Ray Tune trainable: the TrainConfig and the TrialJob of the grid point "<backbone>/<fold>"."""
    run_trial(params["config"], params["jobs"][params["trial"]], report=tune.report,
              node_id=ray.get_runtime_context().get_node_id())


def run_trials(config, placement, record, todo, run):
    """Run the (backbone, Fold) trials in `todo` as one Tune experiment, RUN/tune/attempt-<n>; returns its results."""
    start_ray(placement)
    resources = trial_resources(config, placement, ray.cluster_resources(), len(todo))
    workers = config.workers if config.workers is not None else max(0, int(resources["cpu"]) - 1)
    print(f"{len(todo)} trial(s) to run; each gets {resources['cpu']:g} CPUs ({workers} loader workers) "
          f"and {resources['gpu']:g} GPUs")
    jobs = {f"{b}/{f.name}": TrialJob(str(run.path.resolve()), b, f, record.train_ids, workers) for b, f in todo}
    attempt = f"attempt-{len(list(run.tune.glob('attempt-*'))) + 1}"
    tuner = tune.Tuner(
        tune.with_resources(tune_trial, resources),
        param_space={"trial": tune.grid_search(list(jobs)), "config": config, "jobs": jobs},
        tune_config=tune.TuneConfig(max_concurrent_trials=placement.max_concurrent or None),
        run_config=tune.RunConfig(name=attempt, storage_path=str(run.tune.resolve()), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=2)))
    results = tuner.fit()
    ray.shutdown()
    return results


def report_failures(results):
    """One line per failed trial: its backbone, fold and the last line of its error (which names the file)."""
    lines = []
    for result in results:
        if result.error:
            message = [line for line in str(result.error).strip().splitlines() if line.strip()] or ["(no message)"]
            lines.append(f"trial {result.config['trial']} failed: {message[-1].strip()}")
    return lines


# ---------------------------------------------------------------------------------------------- results


def merge_band_maps(run, trials, results):
    """Assemble oof/<backbone>/<fragment>.h5 of a split fragment once all its bands' maps are there."""
    by_fragment = {}
    for backbone, fold in trials:
        if fold.rows is not None:
            by_fragment.setdefault((backbone, fold.fragment_id), []).append(fold)
    for (backbone, fragment_id), folds in by_fragment.items():
        if not all((backbone, f.name) in results for f in folds):
            continue
        merged = None
        for fold in folds:
            prob, attrs = load_probability_map(run.oof(backbone, fold))
            merged = np.zeros_like(prob) if merged is None else merged
            y0, y1 = attrs["rows"]
            merged[y0:y1] = prob[y0:y1]
        save_probability_map(run.fragment_oof(backbone, fragment_id), merged, fragment_id=fragment_id,
                             rows=(0, merged.shape[0]), backbone=backbone, fold=",".join(f.name for f in folds))


def remove_empty_folders(folder):
    """Remove `folder` and the folders under it that hold no file (the checkpoints/ of finished trials)."""
    for path in sorted(folder.glob("**/"), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: an unfinished trial's checkpoint stays
            path.rmdir()


def train(given, recipe, placement, run):
    record = prepare_run(given, recipe, placement, run)
    config, trials = record.config, record.planned_trials()
    results = run.finished_trials(trials)
    todo = [(b, f) for b, f in trials if (b, f.name) not in results]
    if not todo and run.is_finished():
        print(f"{run}: finished run ({len(trials)} trials), nothing to do; see {run.summary_md}")
        return
    if placement.resume:
        print(f"resuming {run}: {len(results)} of {len(trials)} trial(s) finished, {len(todo)} to go")
    if todo and config.centre_on == "tile":
        print(surface_report(config, record.train_ids))
    started, failures = time.time(), []
    if todo:
        run.write_status("running", len(trials), len(results))
        with contextlib.nullcontext() if placement.address else outlived_by_nothing(held_descriptor(run.path)):
            tune_results = run_trials(config, placement, record, todo, run)  # a local Ray ends with this process
        remove_empty_folders(run.checkpoints)
        failures = report_failures(tune_results)
        interrupted = [r for r in tune_results if not r.error and not r.metrics.get("done")]
        if interrupted and not failures:  # Ctrl-C: Tune returned early
            run.write_status("unfinished", len(trials), len(run.finished_trials(trials)))
            raise RunStateError(f"interrupted with {len(interrupted)} trial(s) unfinished; "
                                f"continue with: python train.py --run {run} --resume")
    results = run.finished_trials(trials)
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    if results:
        merge_band_maps(run, trials, results)
        print(write_summary(run, trials, results, failures, (time.time() - started) / 60))
    run.write_status("finished" if len(results) == len(trials) else "unfinished", len(trials), len(results), failures)
    if len(results) < len(trials):
        raise RunStateError(f"{len(trials) - len(results)} of {len(trials)} trial(s) did not finish (above); "
                            f"fix the cause and rerun with: python train.py --run {run} --resume")
    print(f"wrote {run.summary_md}, OOF maps, models and previews in {run}")


def main(argv=None):
    try:
        given, recipe, placement, print_config = parse_args(argv)
        if print_config:
            print(json.dumps(resolve(given, recipe).as_dict(), indent=2))
            return
    except ConfigError as err:
        sys.exit(f"error: {err}")
    run = RunDir(placement.run)
    created = not run.path.exists()
    try:
        check_writable(run.path, RUN_FREE_BYTES, "run folder")
        run.path.mkdir(parents=True, exist_ok=True)
        with exclusive(run.path, "train.py"):
            train(given, recipe, placement, run)
    except (LockedError, RunFileError, RunStateError, ConfigError, StoreError, OutputError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:  # a write that failed mid-run
        sys.exit(f"error: {err.filename or run}: cannot write: {describe(err)}")
    finally:
        if created and run.path.is_dir() and not any(run.path.iterdir()):
            run.path.rmdir()  # refused before anything was written: leave no empty folder behind


if __name__ == "__main__":
    main()
