"""Test helpers shared by several test files (imported as `helpers`: pytest puts tests/ on sys.path)."""
from lib.folds import make_folds
from lib.runs import trial_file, write_json, write_record


def record_run(run, stores, backbones, train_ids, tile_size=64, stride=32):
    """run.json and trials/<backbone>/fold-<k>.json as train.py leaves them, for a run folder whose OOF maps and
    models a test writes itself (one fold per train fragment)."""
    folds = make_folds(train_ids)
    options = {"stores": str(stores), "backbones": ",".join(backbones), "folds": None, "tile_size": tile_size,
               "stride": stride}
    write_record(run, options, train_ids, folds)
    for backbone in backbones:
        for fold in folds:
            write_json(trial_file(run, "trials", backbone, fold.name, ".json"),
                       {"backbone": backbone, "fold": fold.name, "done": True})
    return run
