"""Train U-Nets over backbones x cross-validation folds with Ray Tune; save out-of-fold predictions.

In:  --stores data/prepared (the train/<id>.h5 stores from prepare.py).
Out: --run runs/NAME with
     oof/<backbone>/<fragment>.h5     held-out probability map of each train fragment (float16)
     models/<backbone>/fold-<k>.pt     best weights + model config, torch.load(weights_only=True)
     previews/<backbone>/fold-<k>.png probability | prediction at the best threshold | label
     summary.md, summary.csv          F0.5 per backbone x fold, mean per backbone, epochs, minutes
     tune/                            the Ray Tune experiment: checkpoints, progress.csv, TensorBoard logs

One trial per (backbone, fold); fold k holds out train fragment k (--split FRAG:K cuts fragment FRAG
into K bands of equal mask area, each its own fold). Trials run in parallel as far as the cluster's
CPUs and GPUs allow; --address joins an existing Ray cluster.

    python train.py --stores data/prepared --run runs/demo --preset demo
    python train.py --stores data/prepared --run runs/full --preset full --backbones resnet34,mit_b2
"""
import argparse
import csv
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ray import tune

from lib.data import TileDataset, make_folds
from lib.infer import (DEFAULT_TRIPLETS, TRIPLET_MODES, load_probability_map, predict_fragment, save_preview,
                       save_probability_map)
from lib.losses import LOSS_DEFAULTS, build_loss
from lib.metrics import best_threshold
from lib.model import build_model, model_config
from lib.store import Store

PRESETS = {
    # The original solution's recipe, for GPUs.
    "full": dict(backbones="resnet34,efficientnet-b3,mit_b2", tile_size=224, stride=56, epochs=15, batch_size=16,
                 lr=1e-4, workers=4, infer_batch=32, max_tiles=0, decoder_channels="256,128,64,32,16"),
    # Fits `make train` on a 2-core CPU in minutes: tiny encoder and decoder, small tiles, short epochs.
    "demo": dict(backbones="tu-mobilenetv3_small_050", tile_size=64, stride=32, epochs=20, batch_size=16,
                 lr=3e-3, workers=0, infer_batch=16, max_tiles=512, decoder_channels="64,32,16,16,8"),
}
SUMMARY_FIELDS = ["backbone", "fold", "fragment", "rows", "oof_f05", "threshold", "best_val_f05", "epochs", "minutes"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", default="data/prepared", help="folder with train/<id>.h5 stores")
    parser.add_argument("--run", default="runs/demo", help="run folder for everything this run writes")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--backbones", help="comma-separated smp encoder names (default: the preset's)")
    parser.add_argument("--folds", help="comma-separated fold names to run (default: all)")
    parser.add_argument("--split", help="FRAG:K cuts train fragment FRAG into K bands of equal mask area, one fold each")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--tile-size", type=int)
    parser.add_argument("--stride", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--workers", type=int, help="DataLoader workers per trial (each trial asks 1 + workers CPUs)")
    parser.add_argument("--infer-batch", type=int, help="tiles per inference batch")
    parser.add_argument("--max-tiles", type=int, help="training tiles per epoch, drawn at random (0: each tile once)")
    parser.add_argument("--decoder-channels", help="U-Net decoder widths, e.g. 256,128,64,32,16")
    parser.add_argument("--weights", default=None, help="encoder weights: none, imagenet, or a local file")
    parser.add_argument("--no-tta", dest="tta", action="store_false", help="OOF without rot90 test-time augmentation")
    parser.add_argument("--triplets", choices=TRIPLET_MODES, default=DEFAULT_TRIPLETS,
                        help="how the OOF maps combine the centre-slice triplets (lib/infer.py; default %(default)s)")
    parser.add_argument("--no-triplets", dest="triplets", action="store_const", const="middle", help="--triplets middle")
    parser.add_argument("--z-reverse", type=float, default=0.0, help="trick: share of tiles with the slice order reversed")
    parser.add_argument("--cutout", type=float, default=0.0, help="trick: share of tiles with coarse dropout")
    parser.add_argument("--cutmix", type=float, default=0.0, help="trick: share of tiles with a box of another tile pasted in")
    parser.add_argument("--surface-centred", action="store_true", help="trick: training triplets from the centre "
                        "slices moved onto each fragment's surface (as --triplets surface predicts)")
    parser.add_argument("--ema", type=float, default=0.0, help="trick: decay of an EMA of the weights, which is then "
                        "validated and exported (0: off; e.g. 0.99)")
    for name, value in LOSS_DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=value, help=f"loss: {name}")
    parser.add_argument("--gpus-per-trial", type=float, help="GPU share per trial (default: 1 if the cluster has GPUs, else 0)")
    parser.add_argument("--max-concurrent", type=int, default=0, help="most trials at once (0: as many as fit)")
    parser.add_argument("--address", help="join an existing Ray cluster: auto or ray://HOST:PORT")
    parser.add_argument("--num-cpus", type=int, help="CPUs for a local Ray instance (default: all)")
    parser.add_argument("--no-dashboard", dest="dashboard", action="store_false")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument("--force", action="store_true", help="replace a finished run in --run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# ---------------------------------------------------------------------------------------------- trial


def train_fold(config):
    """One Ray Tune trial: train `backbone` on every fold but `fold`, report per epoch, then predict the fold."""
    torch.manual_seed(config["seed"])
    np.random.seed(config["seed"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fold = config["folds"][config["fold"]]
    fragment_id, rows = fold["fragment"], fold["rows"]
    held_out = str(Path(config["stores"]) / "train" / f"{fragment_id}.h5")
    train_paths = [str(Path(config["stores"]) / "train" / f"{i}.h5") for i in config["train_ids"]
                   if i != fragment_id or rows is not None]
    tile_size, stride = config["tile_size"], config["stride"]
    tricks = {k: config[k] for k in ("z_reverse", "cutout", "cutmix", "surface_centred")}
    train_set = TileDataset(train_paths, tile_size, stride, augment=True,
                            skip_rows={held_out: rows} if rows else None, **tricks)
    val_set = TileDataset([held_out], tile_size, tile_size, augment=False, only_rows={held_out: rows} if rows else None)
    per_epoch = config["max_tiles"] or len(train_set)
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=config["batch_size"], drop_last=per_epoch > config["batch_size"],
        sampler=torch.utils.data.RandomSampler(train_set, replacement=per_epoch > len(train_set), num_samples=per_epoch),
        num_workers=config["workers"], persistent_workers=config["workers"] > 0, pin_memory=device == "cuda",
        multiprocessing_context="forkserver" if config["workers"] > 0 else None)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=config["batch_size"])

    model = build_model(config["backbone"], 3, config["weights"], config["decoder_channels"]).to(device)
    loss_fn = build_loss(**{k: config[k] for k in LOSS_DEFAULTS})
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=1e-4)
    steps = config["epochs"] * len(loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config["lr"], total_steps=max(steps, 1), pct_start=0.15)
    ema = weight_average(model, optimizer, config["ema"])
    scored = ema.module if ema else model  # what is validated, kept as the best and exported
    state = {"epoch": 0, "best_f05": -1.0, "best_threshold": 0.5, "best_model": None}
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / "state.pt", weights_only=True)
        if ema:
            ema.load_state_dict(saved.pop("ema"))
        model.load_state_dict(saved.pop("model"))
        optimizer.load_state_dict(saved.pop("optimizer"))
        scheduler.load_state_dict(saved.pop("scheduler"))
        torch.set_rng_state(saved.pop("rng"))
        state = saved

    store = Store(held_out)
    labels, mask = band_maps(store, rows)
    while state["epoch"] < config["epochs"]:
        started = time.time()
        train_loss, tiles = train_epoch(model, loader, loss_fn, optimizer, scheduler, device)
        train_seconds = time.time() - started
        val_loss = evaluate_loss(scored, val_loader, loss_fn, device)
        prob = predict_fragment(scored, store, tile_size, stride, config["infer_batch"], tta=False, triplets="middle",
                                device=device)
        val_f05, threshold = best_threshold(band(prob, rows), labels, mask)
        state["epoch"] += 1
        if val_f05 > state["best_f05"]:
            state.update(best_f05=val_f05, best_threshold=threshold,
                         best_model={k: v.detach().cpu().clone() for k, v in scored.state_dict().items()})
        metrics = dict(epoch=state["epoch"], train_loss=train_loss, val_loss=val_loss, val_f05=val_f05,
                       threshold=threshold, tiles_per_s=tiles / train_seconds, epoch_s=time.time() - started,
                       best_val_f05=state["best_f05"])
        with tempfile.TemporaryDirectory() as folder:
            torch.save({**state, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                        **({"ema": ema.state_dict()} if ema else {})}, Path(folder) / "state.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    scored.load_state_dict(state["best_model"])
    tune.report(finish_fold(scored, store, config, fold, state, device))


def weight_average(model, optimizer, decay):
    """An exponential moving average of the model's weights and BN statistics, updated after every optimizer
    step (a hook, so the training loop is unchanged); None when decay is 0."""
    if not decay:
        return None
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay),
                                               use_buffers=True)
    optimizer.register_step_post_hook(lambda *_: ema.update_parameters(model))
    return ema


def train_epoch(model, loader, loss_fn, optimizer, scheduler, device):
    model.train()
    total, tiles = 0.0, 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(images)
        tiles += len(images)
    return total / max(tiles, 1), tiles


@torch.inference_mode()
def evaluate_loss(model, loader, loss_fn, device):
    model.eval()
    total, tiles = 0.0, 0
    for images, labels in loader:
        total += loss_fn(model(images.to(device)), labels.to(device)).item() * len(images)
        tiles += len(images)
    return total / max(tiles, 1)


def band(image, rows):
    """The rows of a fold's band (the whole image when the fold is a whole fragment)."""
    return image if rows is None else image[rows[0]: rows[1]]


def band_maps(store, rows):
    return band(store.read_map("labels"), rows), band(store.read_map("mask"), rows)


def finish_fold(model, store, config, fold, state, device):
    """Predict the held-out fold with the submission's TTA settings; write OOF map, model and preview."""
    run, backbone, fold_name = Path(config["run"]), config["backbone"], config["fold"]
    prob = predict_fragment(model, store, config["tile_size"], config["stride"], config["infer_batch"],
                            tta=config["tta"], triplets=config["triplets"], device=device)
    labels, mask = band_maps(store, fold["rows"])
    oof_f05, threshold = best_threshold(band(prob, fold["rows"]), labels, mask)
    rows = fold["rows"] or (0, store.shape[0])
    save_probability_map(run / "oof" / backbone / f"{fold_name}.h5", prob, fragment_id=fold["fragment"],
                         rows=rows, backbone=backbone, fold=fold_name, tta=config["tta"], triplets=config["triplets"])
    export = {"config": model_config(backbone, 3, config["decoder_channels"]), "state_dict": model.state_dict(), "fold": fold_name,
              "tile_size": config["tile_size"], "stride": config["stride"], "triplets": config["triplets"],
              "val_f05": state["best_f05"],
              "oof_f05": oof_f05, "threshold": threshold}
    model_path = run / "models" / backbone / f"fold-{fold_name}.pt"
    model_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(export, model_path.with_suffix(".tmp"))
    os.replace(model_path.with_suffix(".tmp"), model_path)
    predicted = band(prob, fold["rows"]) >= threshold
    save_preview(run / "previews" / backbone / f"fold-{fold_name}.png", [band(prob, fold["rows"]), predicted, labels])
    return dict(epoch=state["epoch"], done=True, oof_f05=oof_f05, oof_threshold=threshold, best_val_f05=state["best_f05"])


# --------------------------------------------------------------------------------------------- driver


def trial_resources(args, cluster, num_trials):
    """CPUs and GPU share per trial; never a GPU the cluster does not have (the trial would wait forever).

    A trial asks for 1 + loader-worker CPUs. On a CPU-only cluster with fewer CPUs than the trials would
    take, the CPUs are shared evenly instead, so that all trials run at once and no core idles while the
    last one finishes alone.
    """
    gpus = cluster.get("GPU", 0)
    gpu_share = args.gpus_per_trial if args.gpus_per_trial is not None else (1 if gpus >= 1 else 0)
    if gpu_share > gpus:
        raise SystemExit(f"error: --gpus-per-trial {gpu_share} but the Ray cluster has {gpus:g} GPUs")
    cpus = 1 + args.workers
    if gpu_share == 0 and not args.max_concurrent and num_trials * cpus > cluster.get("CPU", 1):
        cpus = min(cpus, max(0.25, math.floor(cluster.get("CPU", 1) / num_trials * 100) / 100))
    return {"cpu": cpus, "gpu": gpu_share}


def check_run_folder(run, resume, force):
    """Refuse to overwrite a finished run without --force, or an unfinished one without --resume or --force."""
    if force and run.exists():
        shutil.rmtree(run)
    elif (run / "summary.md").exists() and not resume:
        raise SystemExit(f"error: {run} already holds a finished run; pass --force to replace it or choose another --run")
    elif (run / "tune").exists() and not resume:
        raise SystemExit(f"error: {run} holds an unfinished run; pass --resume to continue it or --force to start over")
    elif resume and not tune.Tuner.can_restore(str((run / "tune").resolve())) and not (run / "summary.md").exists():
        raise SystemExit(f"error: {run} holds no run to resume")


def fold_table(stores, split):
    train_dir = Path(stores) / "train"
    train_ids = sorted(p.stem for p in train_dir.glob("*.h5"))
    if not train_ids:
        raise SystemExit(f"error: {train_dir}: no train stores; run prepare.py first")
    masks = None
    if split:
        fragment_id, count = split.split(":")
        if fragment_id not in train_ids:
            raise SystemExit(f"error: --split {split}: no train store {train_dir / (fragment_id + '.h5')}")
        split = (fragment_id, int(count))
        masks = {fragment_id: Store(train_dir / f"{fragment_id}.h5").read_map("mask")}
    folds = make_folds(train_ids, split, masks)
    return train_ids, {name: {"fragment": f, "rows": list(rows) if rows else None} for name, (f, rows) in folds.items()}


def start_ray(args):
    import ray

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if args.address:
        context = ray.init(address=args.address)
    else:
        context = ray.init(num_cpus=args.num_cpus, include_dashboard=args.dashboard,
                           object_store_memory=256 * 2**20)  # trials read HDF5 from disk; leave RAM to them
    if args.dashboard and context.dashboard_url:
        print(f"Ray dashboard: http://{context.dashboard_url}  (log in with the token that `ray get-auth-token` prints)")
    return ray


def run_trials(args, train_ids, folds, run):
    backbones = args.backbones.split(",")
    fold_names = args.folds.split(",") if args.folds else list(folds)
    unknown = set(fold_names) - set(folds)
    if unknown:
        raise SystemExit(f"error: --folds {','.join(sorted(unknown))}: not a fold of {', '.join(folds)}")
    ray = start_ray(args)
    resources = trial_resources(args, ray.cluster_resources(), len(backbones) * len(fold_names))
    print(f"each trial gets {resources['cpu']:g} CPUs and {resources['gpu']:g} GPUs")
    trainable = tune.with_resources(train_fold, resources)
    experiment = (run / "tune").resolve()
    config = dict(
        backbone=tune.grid_search(backbones), fold=tune.grid_search(fold_names), folds=folds, train_ids=train_ids,
        stores=str(Path(args.stores).resolve()), run=str(run.resolve()), seed=args.seed, weights=args.weights,
        tile_size=args.tile_size, stride=args.stride, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        workers=args.workers, infer_batch=args.infer_batch, max_tiles=args.max_tiles, tta=args.tta,
        triplets=args.triplets, z_reverse=args.z_reverse, cutout=args.cutout, cutmix=args.cutmix, ema=args.ema,
        surface_centred=args.surface_centred,
        decoder_channels=[int(c) for c in args.decoder_channels.split(",")],
        **{k: getattr(args, k) for k in LOSS_DEFAULTS})
    if args.resume and tune.Tuner.can_restore(str(experiment)):
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=config,
            tune_config=tune.TuneConfig(metric="best_val_f05", mode="max", max_concurrent_trials=args.max_concurrent or None),
            run_config=tune.RunConfig(
                name=experiment.name, storage_path=str(experiment.parent), verbose=1,
                failure_config=tune.FailureConfig(max_failures=2),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    started = time.time()
    results = tuner.fit()
    ray.shutdown()
    return results, time.time() - started


def merge_band_maps(run, folds):
    """Assemble oof/<backbone>/<fragment>.h5 from the band folds' maps of a split fragment."""
    for backbone_dir in sorted((run / "oof").glob("*")):
        by_fragment = {}
        for name, fold in folds.items():
            if fold["rows"] is not None and (backbone_dir / f"{name}.h5").exists():
                by_fragment.setdefault(fold["fragment"], []).append(name)
        for fragment_id, names in by_fragment.items():
            merged = None
            for name in names:
                prob, attrs = load_probability_map(backbone_dir / f"{name}.h5")
                merged = np.zeros_like(prob) if merged is None else merged
                y0, y1 = attrs["rows"]
                merged[y0:y1] = prob[y0:y1]
            save_probability_map(backbone_dir / f"{fragment_id}.h5", merged, fragment_id=fragment_id,
                                 rows=(0, merged.shape[0]), backbone=backbone_dir.name, fold=",".join(names))


def write_summary(run, results, folds, minutes):
    rows = []
    for result in results:
        if result.error or not result.metrics.get("done"):
            continue
        m, c = result.metrics, result.config
        fold = folds[c["fold"]]
        rows.append(dict(backbone=c["backbone"], fold=c["fold"], fragment=fold["fragment"],
                         rows="all" if fold["rows"] is None else f"{fold['rows'][0]}:{fold['rows'][1]}",
                         oof_f05=round(m["oof_f05"], 4), threshold=round(m["oof_threshold"], 3),
                         best_val_f05=round(m["best_val_f05"], 4), epochs=m["epoch"],
                         minutes=round(m.get("time_total_s", 0) / 60, 2)))
    rows.sort(key=lambda r: (r["backbone"], r["fold"]))
    with open(run / "summary.csv.tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(SUMMARY_FIELDS) + " |", "|" + "---|" * len(SUMMARY_FIELDS)]
    lines += ["| " + " | ".join(str(r[k]) for k in SUMMARY_FIELDS) + " |" for r in rows]
    lines += ["", "| backbone | mean OOF F0.5 | folds |", "|---|---|---|"]
    for backbone in sorted({r["backbone"] for r in rows}):
        scores = [r["oof_f05"] for r in rows if r["backbone"] == backbone]
        lines.append(f"| {backbone} | {np.mean(scores):.4f} | {len(scores)} |")
    lines += ["", f"Wall time: {minutes:.1f} minutes."]
    text = "\n".join(lines) + "\n"
    os.replace(run / "summary.csv.tmp", run / "summary.csv")
    (run / "summary.md").write_text(f"# Run {run.name}\n\n{text}")
    return text


def main(argv=None):
    args = parse_args(argv)
    run = Path(args.run)
    check_run_folder(run, args.resume, args.force)
    train_ids, folds = fold_table(args.stores, args.split)
    run.mkdir(parents=True, exist_ok=True)
    results, seconds = run_trials(args, train_ids, folds, run)
    unfinished = [r for r in results if not r.error and not r.metrics.get("done")]
    if unfinished:  # Ctrl-C: Tune saved the experiment and returned early
        sys.exit(f"error: interrupted with {len(unfinished)} trial(s) unfinished; "
                 f"continue with: python train.py --run {run} --resume (and the same options)")
    merge_band_maps(run, folds)
    print(write_summary(run, results, folds, seconds / 60))
    failed = [r for r in results if r.error]
    if failed:
        sys.exit(f"error: {len(failed)} trial(s) failed; see {run / 'tune'}; rerun with --resume to retry them")
    print(f"wrote {run / 'summary.md'}, OOF maps in {run / 'oof'}, models in {run / 'models'}, previews in {run / 'previews'}")


if __name__ == "__main__":
    main()
