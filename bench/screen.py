"""Screen a training recipe cheaply: train.py's own trial function for one fold, in this process, without Ray.

Same data, model, loss, schedule and OOF prediction as a train.py trial (train.train_fold with the config
train.py would build from the same arguments); Tune's report and checkpoint calls are replaced by a JSON
line per epoch on stdout, and nothing is checkpointed. It skips Ray's start-up, which on a loaded 2-core
machine can take minutes or time out, so several recipes can be screened side by side (one thread each).
Writes the OOF map, model and preview into --run as train.py does, and RUN/screen.json (every report).

    python bench/screen.py --fold 1 -- --stores data/prepared --run runs/screen --tile-size 96
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from ray import tune

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from lib.losses import LOSS_DEFAULTS  # noqa: E402


def trial_config(args, fold, train_ids, folds):
    """The config dict run_trials hands one trial (the grid values filled in)."""
    return dict(
        backbone=args.backbones.split(",")[0], fold=fold, folds=folds, train_ids=train_ids,
        stores=str(Path(args.stores).resolve()), run=str(Path(args.run).resolve()), seed=args.seed,
        weights=args.weights, tile_size=args.tile_size, stride=args.stride, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, workers=args.workers, infer_batch=args.infer_batch,
        max_tiles=args.max_tiles, tta=args.tta, triplets=args.triplets, z_reverse=args.z_reverse, cutout=args.cutout,
        cutmix=args.cutmix, ema=args.ema, surface_centred=args.surface_centred,
        decoder_channels=[int(c) for c in args.decoder_channels.split(",")],
        **{k: getattr(args, k) for k in LOSS_DEFAULTS})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fold", required=True, help="the fold to hold out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a train.py trial on 1 CPU gets 1)")
    parser.add_argument("train_args", nargs="*", help="train.py arguments (after --)")
    own = parser.parse_args(argv)
    args = train.parse_args(own.train_args)
    torch.set_num_threads(own.threads)
    train_ids, folds = train.fold_table(args.stores, args.split)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    reports, started = [], time.time()

    def report(metrics, checkpoint=None):
        reports.append({**metrics, "wall_s": round(time.time() - started, 1)})
        print(json.dumps(reports[-1]), flush=True)

    tune.report, tune.get_checkpoint = report, lambda: None
    train.train_fold(trial_config(args, own.fold, train_ids, folds))
    (run / "screen.json").write_text(json.dumps({"argv": own.train_args, "fold": own.fold, "reports": reports}) + "\n")


if __name__ == "__main__":
    main()
