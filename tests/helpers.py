"""Test helpers shared by several test files (imported as `helpers`: pytest puts tests/ on sys.path)."""
import contextlib
import io

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


def in_process(main, argv):
    """A script's main(argv) in this process (no subprocess's seconds of imports): (exit code, stdout, stderr), a
    sys.exit("error: ...") message as the last stderr line, as the process would print it."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
    if isinstance(code, str):
        return 1, stdout.getvalue(), stderr.getvalue() + code + "\n"
    return code or 0, stdout.getvalue(), stderr.getvalue()
