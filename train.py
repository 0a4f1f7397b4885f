"""Train U-Nets over backbones x cross-validation folds with Ray Tune; save out-of-fold predictions.

In:  --stores data/prepared (the train/<id>.h5 stores from prepare.py).
Out: --run runs/NAME with
     run.json                         the run record, written before any trial: resolved options, stores, fold
                                      table, what it is trained on (each train store's fingerprint), creator,
                                      package versions, git commit (lib/runs.py)
     oof/<backbone>/<fragment>.h5     held-out probability map of each train fragment (float16); the maps of
                                      a split fragment's bands are in oof/<backbone>/bands/<fold>.h5
     models/<backbone>/fold-<k>.pt     best weights + model config, torch.load(weights_only=True)
     trials/<backbone>/fold-<k>.json  a finished trial's scores (what the summary is made of) and its model file's
                                      sha256 (checked before the model is used)
     previews/<backbone>/fold-<k>.png probability | prediction at the best threshold | label
     summary.md, summary.csv          F0.5 per backbone x fold, mean per backbone, epochs, minutes, failed trials
     checkpoints/                     an unfinished trial's last epoch (removed when the trial finishes)
     tune/attempt-<n>/                each attempt's Ray Tune experiment: progress.csv, TensorBoard logs

One trial per (backbone, fold); fold k holds out train fragment k (--split FRAG:K cuts fragment FRAG
into K bands of equal mask area, each its own fold; a single train store is cut into 3 by default). Trials run
in parallel as far as the cluster's CPUs and GPUs allow; --address joins an existing Ray cluster; a local Ray
and all it starts end with train.py, even on SIGKILL (lib/watchdog.py). One train.py at a time writes a run folder
(a second one exits naming the first). --resume continues an interrupted run with the options recorded
in run.json, from the trials' own checkpoints; no Ray Tune state is unpickled, so a run folder from
elsewhere is as safe to resume as to read.

    python train.py --stores data/prepared --run runs/demo --preset demo
    python train.py --stores data/prepared --run runs/full --preset full --backbones resnet34,mit_b2
"""
import argparse
import contextlib
import csv
import math
import os
import shutil
import sys
import time
from pathlib import Path

from lib.lock import LockedError, exclusive, held_descriptor, refuse_if_locked
from lib.outputs import OutputError, check_writable, describe, torch_save_atomically

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
import torch  # noqa: E402
from ray import tune  # noqa: E402

from lib.data import TileDataset, loader_worker_init, photometric  # noqa: E402
from lib.folds import Fold, make_folds  # noqa: E402
from lib.infer import predict_fragment  # noqa: E402
from lib.inputs import CENTRE_ON, FAMILIES, TRIPLET_MODES, InputSpec, slices_needed, unsure_share  # noqa: E402
from lib.maps import load_probability_map, save_preview, save_probability_map
from lib.losses import LOSS_DEFAULTS, build_loss
from lib.metrics import best_threshold
from lib.model import build_model, model_config, parse_member, save_model_file
from lib.runs import (RunFileError, check_trained_on, file_sha256, finished_trials, fragment_oof_path, oof_path,
                      planned_trials, read_record, trial_file, write_json, write_record)
from lib.store import Store, StoreError, check_store, require_slices
from lib.watchdog import outlived_by_nothing

PRESETS = {
    # The original solution's recipe (batch 16, lr 1e-4) for GPUs, with 4x the batch to fill a modern GPU and the
    # learning rate scaled by the square root of the batch ratio (scaled_lr); loader workers follow the trial's CPUs.
    "full": dict(backbones="resnet34,efficientnet-b3,mit_b2", tile_size=224, stride=56, epochs=15, batch_size=64,
                 lr=2e-4, workers=None, infer_batch=32, max_tiles=0, decoder_channels="256,128,64,32,16"),
    # Fits `make train` on a 2-core CPU in minutes: tiny encoder and decoder, small tiles, short epochs.
    "demo": dict(backbones="tu-mobilenetv3_small_050", tile_size=64, stride=32, epochs=30, batch_size=16,
                 lr=3e-3, workers=0, infer_batch=16, max_tiles=512, decoder_channels="64,32,16,16,8"),
}
# Options that say where and how to run, not what to train: a resumed run may change them.
ONE_STORE_BANDS = 3  # folds a single train store is cut into when no --split is given
RUNTIME_OPTIONS = ("run", "resume", "force", "address", "num_cpus", "dashboard", "gpus_per_trial", "max_concurrent")
SUMMARY_FIELDS = ["backbone", "fold", "fragment", "rows", "oof_f05", "threshold", "best_val_f05", "epochs", "minutes"]


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stores", default="data/prepared", help="folder with train/<id>.h5 stores")
    parser.add_argument("--run", default="runs/demo", help="run folder for everything this run writes")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--backbones", help="comma-separated smp encoder names, each FAMILY:NAME or NAME (of --family)"
                        " (default: the preset's)")
    parser.add_argument("--family", choices=FAMILIES, default="stack", help="model family of the backbones named "
                        "without one: 3-slice triplets, a stack of --depth slices as channels, or the stack through a "
                        "3-D stem (lib/inputs.py, lib/model.py); default %(default)s")
    parser.add_argument("--depth", type=int, default=12, help="slices a stack or stem3d model reads, centred on the "
                        "surface (default %(default)s)")
    parser.add_argument("--folds", help="comma-separated fold names to run (default: all)")
    parser.add_argument("--split", help="FRAG:K cuts train fragment FRAG into K bands of equal mask area, one fold each "
                        f"(default with a single train store: FRAG:{ONE_STORE_BANDS})")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--tile-size", type=int)
    parser.add_argument("--stride", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the preset's, scaled by "
                        "sqrt(batch size / the preset's batch size) when --batch-size changes it)")
    parser.add_argument("--workers", type=int, help="DataLoader workers per trial (each trial asks 1 + workers CPUs; "
                        "default: the preset's; full: the trial's share of the CPUs minus one)")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                        help="training arithmetic: auto = bf16 autocast on GPUs that support it, fp16 autocast with "
                        "gradient scaling on older GPUs, fp32 on CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for training (start-up cost)")
    parser.add_argument("--infer-batch", type=int, help="tiles per inference batch")
    parser.add_argument("--max-tiles", type=int, help="training tiles per epoch, drawn at random (0: each tile once)")
    parser.add_argument("--decoder-channels", help="U-Net decoder widths, e.g. 256,128,64,32,16")
    parser.add_argument("--weights", default=None, help="encoder weights: none, imagenet, or a local file")
    parser.add_argument("--no-tta", dest="tta", action="store_false", help="OOF without rot90 test-time augmentation")
    parser.add_argument("--triplets", choices=TRIPLET_MODES, help="triplet models: how the OOF maps combine the "
                        "centre-slice triplets (lib/inputs.py; default: tile with --centre-on tile, else surface)")
    parser.add_argument("--no-triplets", dest="triplets", action="store_const", const="middle", help="--triplets middle")
    parser.add_argument("--z-reverse", type=float, default=0.0, help="trick: share of tiles with the slice order reversed")
    parser.add_argument("--cutout", type=float, default=0.0, help="trick: share of tiles with coarse dropout")
    parser.add_argument("--cutmix", type=float, default=0.0, help="trick: share of tiles with a box of another tile pasted in")
    parser.add_argument("--centre-on", choices=CENTRE_ON, default="tile", help="where the slices models read sit: as "
                        "stored around slice 32 (nominal), on each fragment's surface (as --triplets surface predicts) "
                        "or each tile flattened onto its own surface found by prepare.py (as --triplets tile "
                        "predicts); default %(default)s")
    parser.add_argument("--depth-jitter", type=int, help="training inputs move up or down by up to this many slices, "
                        "so that the model learns ink a little off the surface found (default: 0 for triplets with "
                        "--centre-on tile, 1 for stacks, whose prediction shifts by 1 too, else 2)")
    parser.add_argument("--ema", type=float, default=0.0, help="trick: decay of an EMA of the weights, which is then "
                        "validated and exported (0: off; e.g. 0.99)")
    for name, value in LOSS_DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=value, help=f"loss: {name}")
    parser.add_argument("--gpus-per-trial", type=float, help="GPU share per trial (default: 1 if the cluster has GPUs, else 0)")
    parser.add_argument("--max-concurrent", type=int, default=0, help="most trials at once (0: as many as fit)")
    parser.add_argument("--address", help="join an existing Ray cluster: auto or HOST:PORT (default: a local Ray of its own)")
    parser.add_argument("--num-cpus", type=int, help="CPUs for a local Ray instance (default: all)")
    parser.add_argument("--no-dashboard", dest="dashboard", action="store_false")
    parser.add_argument("--resume", action="store_true",
                        help="continue the unfinished run in --run with the options in its run.json")
    parser.add_argument("--force", action="store_true", help="delete the run in --run and start over")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse_args(argv=None):
    """The options, the preset's values filled in where none was given."""
    args = build_parser().parse_args(argv)
    preset = PRESETS[args.preset]
    if args.lr is None and args.batch_size is not None:
        args.lr = scaled_lr(preset["lr"], preset["batch_size"], args.batch_size)
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    flattened = args.centre_on == "tile"
    args.triplets = args.triplets or ("tile" if flattened else "surface")
    if args.depth_jitter is None:
        args.depth_jitter = 1 if args.family != "triplets" else 0 if flattened else 2
    try:  # every backbone named with its family: the run record, trials and files say which is which
        args.backbones = ",".join(":".join(parse_member(name, args.family)) for name in args.backbones.split(","))
        input_spec(vars(args), args.family)
    except ValueError as err:
        build_parser().error(str(err))
    return args


def input_spec(options, family):
    """The InputSpec of a `family` model trained with these options."""
    return InputSpec(family, options["depth"], options["centre_on"], options["triplets"])


def given_options(argv=None):
    """The names of the options typed on the command line: the same parse against all-suppressed defaults."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def run_options(args):
    """What the run trains, as recorded in run.json: every option but the runtime ones, stores made absolute."""
    options = {k: v for k, v in vars(args).items() if k not in RUNTIME_OPTIONS}
    options["stores"] = str(Path(args.stores).resolve())
    return options


def resume_options(args, given, record, record_path):
    """The recorded options, with this command's runtime options; a conflicting option is an error."""
    recorded = dict(record["options"])
    for key in sorted(given - set(RUNTIME_OPTIONS)):
        value = run_options(args)[key]
        if key in recorded and value != recorded[key]:
            flag = "--" + key.replace("_", "-")
            raise SystemExit(f"error: {flag} {value} conflicts with {recorded[key]} recorded in {record_path}; "
                             f"resume without it, or start a new run")
    return argparse.Namespace(**{**vars(args), **recorded})


def scaled_lr(lr, batch_size, new_batch_size):
    """The square-root rule for Adam-type optimisers: lr grows with sqrt(batch) (the gradient noise falls as 1/batch)."""
    return lr * math.sqrt(new_batch_size / batch_size)


# ---------------------------------------------------------------------------------------------- trial


def train_fold(config):
    """One Ray Tune trial: train `backbone` on every fold but `fold`, report per epoch, then predict the fold.

    The trial keeps its own checkpoint (RUN/checkpoints/...) after every epoch and starts from it when there is
    one: a trial retried by Tune after an error, or in a resumed run, goes on from its last epoch."""
    torch.manual_seed(config["seed"])
    np.random.seed(config["seed"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fold = Fold.from_dict(config["fold"])
    held_out = Path(config["stores"]) / "train" / f"{fold.fragment_id}.h5"
    family, backbone = parse_member(config["backbone"], config["family"])
    config = {**config, "spec": input_spec(config, family)}
    loader, val_loader = fold_loaders(config, fold, held_out, device)
    model = build_model(backbone, config["spec"].channels, config["weights"], config["decoder_channels"], family)
    model = model.to(device, memory_format=torch.channels_last if device == "cuda" else torch.contiguous_format)
    step = TrainStep(model, config["lr"], config["epochs"] * len(loader), resolve_precision(config["precision"], device),
                     compile=config["compile"])
    ema = weight_average(model, step.optimizer, config["ema"])
    scored = ema.module if ema else model  # what is validated, kept as the best and exported
    loss_fn = build_loss(**{k: config[k] for k in LOSS_DEFAULTS})
    checkpoint = trial_path(config, "checkpoints", ".pt")
    state = restore_checkpoint(checkpoint, model, step, ema)
    store = Store(held_out)
    while state["epoch"] < config["epochs"]:
        metrics = run_epoch(step, scored, loss_fn, (loader, val_loader), store, fold, config, state, device)
        torch_save_atomically(checkpoint, {**state, "model": model.state_dict(), "step": step.state_dict(),
                                     "rng": torch.get_rng_state(), **({"ema": ema.state_dict()} if ema else {})})
        tune.report(metrics)
    scored.load_state_dict(state["best_model"])
    result = finish_fold(scored, store, config, fold, state, device)
    checkpoint.unlink(missing_ok=True)  # the model file and the trial's result replace it
    tune.report(result)  # last: Tune ends the trial on a result with done=True, running nothing after it


def fold_loaders(config, fold, held_out, device):
    """(training loader over every fold but `fold`, with augmentation; validation loader over `fold`'s tiles)."""
    stores = held_out.parent
    train_paths = [str(stores / f"{i}.h5") for i in config["train_ids"] if i != fold.fragment_id or fold.rows]
    held_out, tile_size = str(held_out), config["tile_size"]
    tricks = {k: config[k] for k in ("z_reverse", "cutout", "cutmix")}
    tricks["max_depth_shift"] = config["depth_jitter"]
    train_set = TileDataset(train_paths, tile_size, config["stride"], config["spec"], augment=True,
                            skip_rows={held_out: fold.rows} if fold.rows else None, **tricks)
    val_set = TileDataset([held_out], tile_size, tile_size, config["spec"], augment=False,
                          only_rows={held_out: fold.rows} if fold.rows else None)
    loader = train_loader(train_set, config["batch_size"], config["max_tiles"] or len(train_set), config["workers"], device)
    return loader, torch.utils.data.DataLoader(val_set, batch_size=config["batch_size"])


def restore_checkpoint(checkpoint, model, step, ema):
    """The trial's state (epoch, best score and weights, seconds), restored with the model, optimizer, EMA and RNG
    from its checkpoint when there is one; a fresh state otherwise."""
    if not checkpoint.exists():
        return {"epoch": 0, "best_f05": -1.0, "best_threshold": 0.5, "best_model": None, "seconds": 0.0}
    try:
        saved = torch.load(checkpoint, weights_only=True)  # tensors and plain data only
    except Exception as err:  # truncated or foreign: name the file, say the way out
        raise RuntimeError(f"{checkpoint}: unreadable trial checkpoint ({type(err).__name__}); "
                           "delete it to train this fold from the start") from None
    if ema:
        ema.load_state_dict(saved.pop("ema"))
    model.load_state_dict(saved.pop("model"))
    step.load_state_dict(saved.pop("step"))
    torch.set_rng_state(saved.pop("rng"))
    return saved


def run_epoch(step, scored, loss_fn, loaders, store, fold, config, state, device):
    """Train one epoch, validate `scored` (loss, and F0.5 of the held-out fold's map: the run's triplet mode, no TTA), keep
    its weights in `state` when it scores best; returns the epoch's metrics for Tune."""
    started = time.time()
    loader, val_loader = loaders
    train_loss, tiles = train_epoch(step, loader, loss_fn, device)
    train_seconds = time.time() - started
    val_loss = evaluate_loss(scored, val_loader, loss_fn, device, step.autocast)
    prob = predict_fragment(scored, store, config["tile_size"], config["stride"], config["infer_batch"], tta=False,
                            spec=config["spec"], device=device)
    labels, mask = band_maps(store, fold.rows)
    val_f05, threshold = best_threshold(band(prob, fold.rows), labels, mask)
    state["epoch"] += 1
    state["seconds"] += time.time() - started
    if val_f05 > state["best_f05"]:
        state.update(best_f05=val_f05, best_threshold=threshold,
                     best_model={k: v.detach().cpu().clone() for k, v in scored.state_dict().items()})
    return dict(epoch=state["epoch"], train_loss=train_loss, val_loss=val_loss, val_f05=val_f05, threshold=threshold,
                tiles_per_s=tiles / train_seconds, epoch_s=time.time() - started, best_val_f05=state["best_f05"])


def weight_average(model, optimizer, decay):
    """An exponential moving average of the model's weights and BN statistics, updated after every optimizer
    step (a hook, so the training loop is unchanged); None when decay is 0."""
    if not decay:
        return None
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay),
                                               use_buffers=True)
    optimizer.register_step_post_hook(lambda *_: ema.update_parameters(model))
    return ema


def trial_path(config, folder, suffix):
    """Where this trial keeps a file of `folder` (lib.runs.trial_file)."""
    return trial_file(config["run"], folder, config["backbone"], config["fold"]["name"], suffix)


def train_loader(dataset, batch_size, per_epoch, workers, device):
    """Random tiles, `per_epoch` of them an epoch (with replacement when more than the dataset holds)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, drop_last=per_epoch > batch_size,
        sampler=torch.utils.data.RandomSampler(dataset, replacement=per_epoch > len(dataset), num_samples=per_epoch),
        num_workers=workers, persistent_workers=workers > 0, pin_memory=device == "cuda",
        worker_init_fn=loader_worker_init, multiprocessing_context="forkserver" if workers > 0 else None)


def resolve_precision(precision, device):
    """"auto" -> bf16 on a GPU that has it, fp16 on an older GPU, fp32 on CPU; other names pass through."""
    if precision != "auto":
        return precision
    if device != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


class TrainStep:
    """One optimiser step on a batch: autocast at `precision`, gradient scaling for fp16, AdamW + one-cycle
    schedule over `total_steps`. The model may be torch.compile'd for the step (compile=True); `model` stays the
    plain module (its state_dict and inference)."""

    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

    def __init__(self, model, lr, total_steps, precision="fp32", compile=False):
        self.model, self.precision = model, precision
        self.device_type = next(model.parameters()).device.type
        self.forward = torch.compile(model) if compile else model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=lr, total_steps=max(total_steps, 1),
                                                             pct_start=0.15)
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=precision == "fp16")

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.DTYPES[self.precision], enabled=self.precision != "fp32")

    def __call__(self, images, labels, loss_fn):
        """Train on one batch already on the device; returns the loss (a 0-d tensor, not synchronised)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            logits = self.forward(images)
        loss = loss_fn(logits.float(), labels)  # the loss in fp32: Dice and Tversky sum over whole tiles
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def state_dict(self):
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def to_device(images, labels, device):
    """A batch onto the device, images channels_last on GPU (what the convolutions there run fastest on)."""
    memory_format = torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format
    return images.to(device, non_blocking=True, memory_format=memory_format), labels.to(device, non_blocking=True)


def train_epoch(step, loader, loss_fn, device):
    """One pass over `loader`: the photometric augmentation on the device, then a TrainStep per batch.
    Returns (mean loss, tiles); the losses are summed on the device, so the GPU is never waited on mid-epoch."""
    step.model.train()
    total, tiles = torch.zeros((), device=device), 0
    for images, labels in loader:
        images, labels = to_device(images, labels, device)
        total += step(photometric(images), labels, loss_fn) * len(images)
        tiles += len(images)
    return total.item() / max(tiles, 1), tiles


@torch.inference_mode()
def evaluate_loss(model, loader, loss_fn, device, autocast):
    model.eval()
    total, tiles = 0.0, 0
    for images, labels in loader:
        images, labels = to_device(images, labels, device)
        with autocast():
            logits = model(images)
        total += loss_fn(logits.float(), labels).item() * len(images)
        tiles += len(images)
    return total / max(tiles, 1)


def band(image, rows):
    """The rows of a fold's band (the whole image when the fold is a whole fragment)."""
    return image if rows is None else image[rows[0]: rows[1]]


def band_maps(store, rows):
    return band(store.read_map("labels"), rows), band(store.read_map("mask"), rows)


def finish_fold(model, store, config, fold, state, device):
    """Predict the held-out fold with the submission's TTA settings; write OOF map, model, preview and result."""
    run, backbone = Path(config["run"]), config["backbone"]
    spec = config["spec"]
    prob = predict_fragment(model, store, config["tile_size"], config["stride"], config["infer_batch"],
                            tta=config["tta"], spec=spec, device=device)
    labels, mask = band_maps(store, fold.rows)
    oof_f05, threshold = best_threshold(band(prob, fold.rows), labels, mask)
    rows = fold.rows or (0, store.shape[0])
    save_probability_map(oof_path(run, backbone, fold), prob, fragment_id=fold.fragment_id, rows=rows,
                         backbone=backbone, fold=fold.name, tta=config["tta"], **spec.as_dict())
    model_path = trial_path(config, "models", ".pt")
    save_model_file(model_path, model, spec,
                    config=model_config(parse_member(backbone, spec.family)[1], spec, config["decoder_channels"]),
                    fold=fold.name, fragment_id=fold.fragment_id, tile_size=config["tile_size"], stride=config["stride"],
                    val_f05=state["best_f05"], oof_f05=oof_f05, threshold=threshold)
    predicted = band(prob, fold.rows) >= threshold
    save_preview(trial_path(config, "previews", ".png"), [band(prob, fold.rows), predicted, labels])
    result = dict(backbone=backbone, fold=fold.name, epoch=state["epoch"], done=True, oof_f05=oof_f05,
                  oof_threshold=threshold, best_val_f05=state["best_f05"], model_sha256=file_sha256(model_path),
                  minutes=state["seconds"] / 60, node_id=ray.get_runtime_context().get_node_id())
    write_json(trial_path(config, "trials", ".json"), result)
    return result


# --------------------------------------------------------------------------------------------- driver


def trial_resources(args, cluster, num_trials):
    """CPUs and GPU share per trial; never a GPU the cluster does not have (the trial would wait forever).

    A trial asks for 1 + loader-worker CPUs. Without --workers (and a preset that names none) it asks for its
    share of the CPUs among the trials that run at once, and its loader gets all but one of them (run_trials).
    On a CPU-only cluster with fewer CPUs than the trials would take, the CPUs are shared evenly instead, so
    that all trials run at once and no core idles while the last one finishes alone.
    """
    gpus = cluster.get("GPU", 0)
    gpu_share = args.gpus_per_trial if args.gpus_per_trial is not None else (1 if gpus >= 1 else 0)
    if gpu_share > gpus:
        raise SystemExit(f"error: --gpus-per-trial {gpu_share} but the Ray cluster has {gpus:g} GPUs")
    if args.workers is None:
        at_once = min(num_trials, args.max_concurrent or num_trials, int(gpus // gpu_share) if gpu_share else num_trials)
        return {"cpu": max(1, int(cluster.get("CPU", 1) // max(at_once, 1))), "gpu": gpu_share}
    cpus = 1 + args.workers
    if gpu_share == 0 and not args.max_concurrent and num_trials * cpus > cluster.get("CPU", 1):
        cpus = min(cpus, max(0.25, math.floor(cluster.get("CPU", 1) / num_trials * 100) / 100))
    return {"cpu": cpus, "gpu": gpu_share}


def fold_table(stores, split):
    """(train ids, [Fold]) of the train stores in `stores`. A single store with no --split is cut into
    ONE_STORE_BANDS bands (a fold trains on the others: one whole store would leave it nothing), said in one line."""
    train_dir = Path(stores) / "train"
    train_ids = sorted(p.name[: -len(".h5")] for p in train_dir.glob("*.h5"))
    if not train_ids:
        raise SystemExit(f"error: {train_dir}: no train stores; run prepare.py first")
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
            raise SystemExit(f"error: --split {split}: expected FRAG:K with a train store FRAG.h5 in {train_dir} and K >= 2")
        split = (fragment_id, int(count))
        masks = {fragment_id: Store(train_dir / f"{fragment_id}.h5").read_map("mask")}
    try:
        return train_ids, make_folds(train_ids, split, masks)
    except ValueError as err:
        raise SystemExit(f"error: {train_dir}: {err}")


def surface_report(options, train_ids):
    """One line: with inputs flattened onto each tile's surface, the share of each train store's tiles whose surface
    was too unsure, and which are read at their fragment's surface instead."""
    shares = [unsure_share(Store(Path(options["stores"]) / "train" / f"{i}.h5"), options["tile_size"], options["stride"])
              for i in train_ids]
    parts = ", ".join(f"{i} {share:.0%}" for i, share in zip(train_ids, shares))
    return f"inputs: each tile flattened onto its own surface; too unsure to flatten (read at the fragment's surface): {parts}"


def require_training_slices(stores, train_ids, options):
    """StoreError (lib.store.require_slices) unless every train store holds the slices every member's trials read
    (lib.inputs.slices_needed: its window or triplets, and where they sit). Before run.json is written and Ray
    starts."""
    families = sorted({parse_member(name, options["family"])[0] for name in options["backbones"].split(",")})
    for train_id in train_ids:
        store = Store(Path(stores) / "train" / f"{train_id}.h5")
        for family in families:
            spec = input_spec(options, family)
            require_slices(store, slices_needed(spec, store), f"a {family} model of --depth {spec.depth} "
                           f"--centre-on {spec.centre_on}" if family != "triplets" else f"--triplets {spec.triplets}")
        store.close()


def ray_watchdog(args, run):
    """A local Ray (no --address) and everything it starts end with this process, even when it is killed with
    SIGKILL (lib.watchdog); the run's lock is held until they have, so an immediate --resume waits for them."""
    return contextlib.nullcontext() if args.address else outlived_by_nothing(held_descriptor(run))


def start_ray(args):
    if args.address:
        context = ray.init(address=args.address)
    else:  # "local": always a Ray of its own, never a cluster someone left running on this machine
        context = ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=args.dashboard,
                           object_store_memory=256 * 2**20)  # trials read HDF5 from disk; leave RAM to them
    if args.dashboard and context.dashboard_url:
        print(f"Ray dashboard: http://{context.dashboard_url}  (log in with the token that `ray get-auth-token` prints)")


def run_trials(args, options, train_ids, todo, run):
    """Run the (backbone, Fold) trials in `todo` as one Tune experiment, RUN/tune/attempt-<n>; returns its results."""
    start_ray(args)
    resources = trial_resources(args, ray.cluster_resources(), len(todo))
    workers = args.workers if args.workers is not None else max(0, int(resources["cpu"]) - 1)
    print(f"{len(todo)} trial(s) to run; each gets {resources['cpu']:g} CPUs ({workers} loader workers) "
          f"and {resources['gpu']:g} GPUs")
    attempts = run / "tune"
    attempt = f"attempt-{len(list(attempts.glob('attempt-*'))) + 1}"
    config = {**{k: v for k, v in options.items() if k not in ("backbones", "folds", "split")},
              "trial": tune.grid_search([f"{b}/{f.name}" for b, f in todo]),  # the name Tune's tables show
              "jobs": {f"{b}/{f.name}": {"backbone": b, "fold": f.as_dict()} for b, f in todo},
              "train_ids": train_ids, "run": str(run.resolve()), "workers": workers,
              "decoder_channels": [int(c) for c in options["decoder_channels"].split(",")]}
    tuner = tune.Tuner(
        tune.with_resources(flatten_trial(train_fold), resources), param_space=config,
        tune_config=tune.TuneConfig(max_concurrent_trials=args.max_concurrent or None),
        run_config=tune.RunConfig(name=attempt, storage_path=str(attempts.resolve()), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=2)))
    results = tuner.fit()
    ray.shutdown()
    return results


def flatten_trial(trainable):
    """Tune grid-searches the trial's name "<backbone>/<fold>"; the trial function reads its backbone and fold
    at the top level of its config."""
    def trial(config):
        return trainable({**config, **config["jobs"][config["trial"]]})
    trial.__name__ = trainable.__name__
    return trial


def report_failures(results):
    """One line per failed trial: its backbone, fold and the last line of its error (which names the file)."""
    lines = []
    for result in results:
        if result.error:
            message = [line for line in str(result.error).strip().splitlines() if line.strip()] or ["(no message)"]
            lines.append(f"trial {result.config['trial']} failed: {message[-1].strip()}")
    return lines


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
            prob, attrs = load_probability_map(oof_path(run, backbone, fold))
            merged = np.zeros_like(prob) if merged is None else merged
            y0, y1 = attrs["rows"]
            merged[y0:y1] = prob[y0:y1]
        save_probability_map(fragment_oof_path(run, backbone, fragment_id), merged, fragment_id=fragment_id,
                             rows=(0, merged.shape[0]), backbone=backbone, fold=",".join(f.name for f in folds))


def write_summary(run, trials, results, failures, minutes):
    """summary.csv and summary.md of the finished trials; summary.md lists the trials that did not finish."""
    rows = []
    for backbone, fold in trials:
        m = results.get((backbone, fold.name))
        if m:
            rows.append(dict(backbone=backbone, fold=fold.name, fragment=fold.fragment_id,
                             rows="all" if fold.rows is None else f"{fold.rows[0]}:{fold.rows[1]}",
                             oof_f05=round(m["oof_f05"], 4), threshold=round(m["oof_threshold"], 3),
                             best_val_f05=round(m["best_val_f05"], 4), epochs=m["epoch"], minutes=round(m["minutes"], 2)))
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
    lines += ["", f"Wall time of the last attempt: {minutes:.1f} minutes."]
    missing = [f"{b} fold {f.name}" for b, f in trials if (b, f.name) not in results]
    if missing:  # the Makefile looks for this line: such a run is not finished
        lines += ["", f"Unfinished: {', '.join(missing)} (make train, or train.py --run {run} --resume, retries them)."]
        lines += [f"- {line}" for line in failures]
    text = "\n".join(lines) + "\n"
    os.replace(run / "summary.csv.tmp", run / "summary.csv")
    tmp = run / "summary.md.tmp"
    tmp.write_text(f"# Run {run.name}\n\n{text}")
    os.replace(tmp, run / "summary.md")
    return text


def remove_empty_folders(folder):
    """Remove `folder` and the folders under it that hold no file (the checkpoints/ of finished trials)."""
    for path in sorted(folder.glob("**/"), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: an unfinished trial's checkpoint stays
            path.rmdir()


def clear_run(run):
    """--force: empty the run folder, keeping the lock file this process holds."""
    for path in run.iterdir():
        if path.name != ".lock":
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def prepare_run(args, given, run):
    """(options, train ids, [(backbone, Fold)]) of the run in `run`: a new one, recorded in run.json, or the
    recorded one with --resume. Refuses to overwrite a run without --force."""
    record_path = run / "run.json"
    record = read_record(run)
    if args.force:
        clear_run(run)
        record = None
    elif record is None and any(p.name != ".lock" for p in run.iterdir()):
        raise SystemExit(f"error: {run}: not empty and has no {record_path.name} (not a run of this train.py); "
                         "pass --force to delete it and start over, or choose another --run")
    elif record is not None and not args.resume:
        trials = planned_trials(record["options"], record["folds"])
        done = len(finished_trials(run, trials))
        state = "a finished run" if done == len(trials) else f"an unfinished run ({done} of {len(trials)} trials done)"
        hint = "--resume to continue it" if done < len(trials) else "--force to replace it"
        raise SystemExit(f"error: {run} already holds {state}; pass {hint}, or choose another --run")
    if args.resume and record is None:
        raise SystemExit(f"error: {run} holds no run to resume (no {record_path.name})")
    if record is not None:
        options = vars(resume_options(args, given, record, record_path))
        check_trained_on(run, record["trained_on"], options["stores"])  # the trials left must train on the same stores
        require_training_slices(options["stores"], record["train_ids"], options)
        return run_options(argparse.Namespace(**options)), record["train_ids"], planned_trials(options, record["folds"])
    options = run_options(args)
    train_ids, folds = fold_table(options["stores"], args.split)
    require_training_slices(options["stores"], train_ids, options)
    trials = planned_trials(options, folds)
    write_record(run, options, train_ids, folds)
    return options, train_ids, trials


def train(args, given, run):
    options, train_ids, trials = prepare_run(args, given, run)
    runtime = argparse.Namespace(**{**options, **{k: getattr(args, k) for k in RUNTIME_OPTIONS}})
    results = finished_trials(run, trials)
    todo = [(b, f) for b, f in trials if (b, f.name) not in results]
    if not todo and (run / "summary.md").exists() and "Unfinished:" not in (run / "summary.md").read_text():
        print(f"{run}: finished run ({len(trials)} trials), nothing to do; see {run / 'summary.md'}")
        return
    if args.resume:
        print(f"resuming {run}: {len(results)} of {len(trials)} trial(s) finished, {len(todo)} to go")
    if todo and options["centre_on"] == "tile":
        print(surface_report(options, train_ids))
    started, failures = time.time(), []
    if todo:
        with ray_watchdog(runtime, run):
            tune_results = run_trials(runtime, options, train_ids, todo, run)
        remove_empty_folders(run / "checkpoints")
        failures = report_failures(tune_results)
        interrupted = [r for r in tune_results if not r.error and not r.metrics.get("done")]
        if interrupted and not failures:  # Ctrl-C: Tune returned early
            sys.exit(f"error: interrupted with {len(interrupted)} trial(s) unfinished; "
                     f"continue with: python train.py --run {run} --resume")
    results = finished_trials(run, trials)
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    if results:
        merge_band_maps(run, trials, results)
        print(write_summary(run, trials, results, failures, (time.time() - started) / 60))
    if len(results) < len(trials):
        sys.exit(f"error: {len(trials) - len(results)} of {len(trials)} trial(s) did not finish (above); "
                 f"fix the cause and rerun with: python train.py --run {run} --resume")
    print(f"wrote {run / 'summary.md'}, OOF maps in {run / 'oof'}, models in {run / 'models'}, previews in {run / 'previews'}")


def main(argv=None):
    args, given = parse_args(argv), given_options(argv)
    run = Path(args.run)
    created = not run.exists()
    try:
        check_writable(run, RUN_FREE_BYTES, "run folder")
        run.mkdir(parents=True, exist_ok=True)
        with exclusive(run, "train.py"):
            train(args, given, run)
    except (LockedError, RunFileError, StoreError, OutputError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:  # a write that failed mid-run
        sys.exit(f"error: {err.filename or run}: cannot write: {describe(err)}")
    finally:
        if created and run.is_dir() and not any(run.iterdir()):
            run.rmdir()  # refused before anything was written: leave no empty folder behind


if __name__ == "__main__":
    main()
