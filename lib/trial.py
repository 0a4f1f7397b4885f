"""One training trial: a backbone trained on every fold but one, validated each epoch, then the held-out fold predicted.

`run_trial(config, job, report)` does it without Ray; train.py runs it as a Ray Tune trial with report=tune.report.
What a trial writes into its run folder (lib.runs.RunDir): an OOF map, a model file, a preview and its result
(TrialResult, last: a trial with a result is finished), and while it runs a checkpoint after every epoch, from which
a retried or resumed trial goes on.
"""
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lib.config import TrainConfig
from lib.data import TileDataset, keep_freed_memory, loader_worker_init, model_batch, photometric
from lib.folds import Fold
from lib.infer import predict_fragment
from lib.losses import build_loss
from lib.maps import save_preview, save_probability_map
from lib.metrics import best_threshold
from lib.model import build_model, channels_last, model_config, parse_member, save_model_file
from lib.outputs import torch_save_atomically
from lib.runs import RunDir, TrialResult, file_sha256
from lib.store import Store


class CheckpointError(RuntimeError):
    """A trial's checkpoint cannot be read: the message names it and the way out."""


@dataclass(frozen=True)
class TrialJob:
    """Which trial: `backbone` (FAMILY:NAME) held out of `fold`, in `run`, over the train stores `train_ids`, with
    `workers` loader workers (the driver's choice for this machine, not part of the config)."""
    run: str
    backbone: str
    fold: Fold
    train_ids: tuple
    workers: int = 0

    @property
    def family(self):
        return parse_member(self.backbone, None)[0]


def run_trial(config: TrainConfig, job: TrialJob, report=lambda metrics: None, node_id=None):
    """Train `job`'s backbone on every fold but its fold, `report(metrics)` after every epoch and with the result
    last; returns the TrialResult. Starts from the trial's checkpoint when there is one."""
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run, fold, spec = RunDir(job.run), job.fold, config.input_spec(job.family)
    held_out = Path(config.stores) / "train" / f"{fold.fragment_id}.h5"
    loader, val_loader = fold_loaders(config, job, held_out, device)
    model = build_model(parse_member(job.backbone, config.family)[1], spec.channels, config.weights,
                        list(config.decoder_channels), spec.family)
    model = channels_last(model.to(device)) if device == "cuda" else model.to(device)
    step = TrainStep(model, config.lr, config.epochs * len(loader), resolve_precision(config.precision, device),
                     compile=config.compile)
    ema = weight_average(model, step.optimizer, config.ema)
    scored = ema.module if ema else model  # what is validated, kept as the best and exported
    loss_fn = build_loss(**config.loss_weights())
    checkpoint = run.checkpoint(job.backbone, fold.name)
    state = restore_checkpoint(checkpoint, model, step, ema)
    store = Store(held_out)
    while state["epoch"] < config.epochs:
        metrics = run_epoch(step, scored, loss_fn, (loader, val_loader), store, fold, config, spec, state, device)
        torch_save_atomically(checkpoint, {**state, "model": model.state_dict(), "step": step.state_dict(),
                                           "rng": torch.get_rng_state(), **({"ema": ema.state_dict()} if ema else {})})
        report(metrics)
    scored.load_state_dict(state["best_model"])
    result = finish_fold(scored, store, config, job, spec, state, device, node_id)
    checkpoint.unlink(missing_ok=True)  # the model file and the trial's result replace it
    report({**vars(result), "done": True})  # last: Tune ends the trial on a result with done=True
    return result


def fold_loaders(config, job, held_out, device):
    """(training loader over every fold but the job's, with augmentation; validation loader over its fold's tiles)."""
    fold, spec, stores = job.fold, config.input_spec(job.family), held_out.parent
    train_paths = [str(stores / f"{i}.h5") for i in job.train_ids if i != fold.fragment_id or fold.rows]
    held_out, on_device = str(held_out), torch.device(device).type != "cpu"  # see lib/data.py: who makes the tiles
    train_set = TileDataset(train_paths, config.tile_size, config.stride, spec, augment=True,
                            skip_rows={held_out: fold.rows} if fold.rows else None, z_reverse=config.z_reverse,
                            cutout=config.cutout, cutmix=config.cutmix, max_depth_shift=config.depth_jitter,
                            on_device=on_device)
    val_set = TileDataset([held_out], config.tile_size, config.tile_size, spec, augment=False,
                          only_rows={held_out: fold.rows} if fold.rows else None, on_device=on_device)
    if job.workers == 0:  # the tiles are read in this process: it gets what loader_worker_init gives a worker
        keep_freed_memory()
    loader = train_loader(train_set, config.batch_size, config.max_tiles or len(train_set), job.workers, device)
    return loader, torch.utils.data.DataLoader(val_set, batch_size=config.batch_size)


def restore_checkpoint(checkpoint, model, step, ema):
    """The trial's state (epoch, best score and weights, seconds), restored with the model, optimizer, EMA and RNG
    from its checkpoint when there is one; a fresh state otherwise."""
    if not checkpoint.exists():
        return {"epoch": 0, "best_f05": -1.0, "best_threshold": 0.5, "best_model": None, "seconds": 0.0}
    try:
        saved = torch.load(checkpoint, weights_only=True)  # tensors and plain data only
    except Exception as err:  # truncated or foreign: name the file, say the way out
        raise CheckpointError(f"{checkpoint}: unreadable trial checkpoint ({type(err).__name__}); "
                              "delete it to train this fold from the start") from None
    if ema:
        ema.load_state_dict(saved.pop("ema"))
    model.load_state_dict(saved.pop("model"))
    step.load_state_dict(saved.pop("step"))
    torch.set_rng_state(saved.pop("rng"))
    return saved


def run_epoch(step, scored, loss_fn, loaders, store, fold, config, spec, state, device):
    """Train one epoch, validate `scored` (loss, and F0.5 of the held-out fold's map without TTA), keep its weights in
    `state` when it scores best; returns the epoch's metrics."""
    started = time.time()
    loader, val_loader = loaders
    train_loss, tiles = train_epoch(step, loader, loss_fn, device)
    train_seconds = time.time() - started
    val_loss = evaluate_loss(scored, val_loader, loss_fn, device, step.autocast)
    prob = predict_fragment(scored, store, config.tile_size, config.stride, config.infer_batch, tta=False, spec=spec,
                            device=device)
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


def train_epoch(step, loader, loss_fn, device):
    """One pass over `loader`: each batch made the model's inputs on the device (model_batch), the photometric
    augmentation there, then a TrainStep.
    Returns (mean loss, tiles); the losses are summed on the device, so the GPU is never waited on mid-epoch."""
    step.model.train()
    total, tiles = torch.zeros((), device=device), 0
    for batch in loader:
        images, labels = model_batch(batch, device)
        total += step(photometric(images), labels, loss_fn) * len(images)
        tiles += len(images)
    return total.item() / max(tiles, 1), tiles


@torch.inference_mode()
def evaluate_loss(model, loader, loss_fn, device, autocast):
    model.eval()
    total, tiles = 0.0, 0
    for batch in loader:
        images, labels = model_batch(batch, device)
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


def finish_fold(model, store, config, job, spec, state, device, node_id):
    """Predict the held-out fold with the submission's TTA settings; write the OOF map, model file, preview and, last,
    the trial's result."""
    run, backbone, fold = RunDir(job.run), job.backbone, job.fold
    prob = predict_fragment(model, store, config.tile_size, config.stride, config.infer_batch, tta=config.tta,
                            spec=spec, device=device)
    labels, mask = band_maps(store, fold.rows)
    oof_f05, threshold = best_threshold(band(prob, fold.rows), labels, mask)
    rows = fold.rows or (0, store.shape[0])
    save_probability_map(run.oof(backbone, fold), prob, fragment_id=fold.fragment_id, rows=rows,
                         backbone=backbone, fold=fold.name, tta=config.tta, **spec.as_dict())
    model_path = run.model(backbone, fold.name)
    decoder = list(config.decoder_channels)
    save_model_file(model_path, model, spec, config=model_config(parse_member(backbone, spec.family)[1], spec, decoder),
                    fold=fold.name, fragment_id=fold.fragment_id, tile_size=config.tile_size, stride=config.stride,
                    val_f05=state["best_f05"], oof_f05=oof_f05, threshold=threshold)
    save_preview(run.preview(backbone, fold.name), [band(prob, fold.rows), band(prob, fold.rows) >= threshold, labels])
    result = TrialResult(backbone=backbone, fold=fold.name, epoch=state["epoch"], oof_f05=oof_f05,
                         oof_threshold=threshold, best_val_f05=state["best_f05"], model_sha256=file_sha256(model_path),
                         minutes=state["seconds"] / 60, node_id=node_id)
    result.write(run.result(backbone, fold.name))
    return result
