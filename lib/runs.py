"""A run folder's own files: the run record (run.json), the fitted ensemble (ensemble.json) and the fold models.

    RUN/run.json        written by train.py before any trial starts: the resolved options, the stores, the fold
                        table, what it is trained on (trained_on: each train store's sources fingerprint, size and
                        source folder), who created it where, package versions and the git commit
    RUN/ensemble.json   written by ensemble.py: members (backbone, weight, model files and their sha256, tile size,
                        stride), threshold, trained_on
    RUN/models/<backbone>/fold-<name>.pt   one model file per trained fold (lib.model.save_model_file); its sha256
                        is recorded in the trial's result (trials/<backbone>/fold-<name>.json, "model_sha256") and
                        copied into ensemble.json, and checked before the file is loaded: a changed byte is refused

Everything read here is checked before use; a bad file is a `RunFileError` whose one-line message names the file
and the field. A run is only ever used with the train stores it was trained on (check_trained_on: a store prepared
again from changed labels, or stores of other data, make it stale). Nothing here unpickles arbitrary objects: JSON,
and torch files loaded with weights_only=True.
"""
import dataclasses
import getpass
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import socket
import subprocess
import time
from pathlib import Path

from lib.folds import Fold
from lib.inputs import INPUT_VERSION, InputSpec
from lib.metrics import THRESHOLD_MODES
from lib.model import load_model_file
from lib.outputs import write_atomically
from lib.store import Store

RECORD_NAME = "run.json"
SHA256_DIGEST = re.compile(r"[0-9a-f]{64}")
ENSEMBLE_NAME = "ensemble.json"
PACKAGES = ("torch", "torchvision", "ray", "segmentation-models-pytorch", "timm", "numpy", "h5py", "hdf5plugin")
# threshold value ranges per mode: a probability strictly inside (0, 1); a share of the mask in (0, 100] %
THRESHOLD_RANGES = {"absolute": (0.0, 1.0, "0 < value < 1"), "percentile": (0.0, 100.0, "0 < value <= 100")}


class RunFileError(ValueError):
    """A run file is missing or wrong: the message is one line and names the file (and field)."""


# ------------------------------------------------------------------------------------------- run.json


def creator():
    return {"user": getpass.getuser(), "uid": os.getuid(), "host": socket.gethostname()}


def environment():
    """Python and package versions, and the git commit of this code (None outside a git checkout)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=40"], capture_output=True,
                                text=True, timeout=10, cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"versions": versions, "git_commit": commit}


def write_record(run, options, train_ids, folds):
    """Write RUN/run.json (atomically): options (JSON-able values, with the "stores" folder), train ids and [Fold] of
    the run, and what it is trained on (trained_on)."""
    record = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "creator": creator(), **environment(),
              "options": options, "train_ids": list(train_ids), "folds": [f.as_dict() for f in folds],
              "trained_on": trained_on(options["stores"], train_ids)}
    write_json(Path(run) / RECORD_NAME, record)
    return record


def read_record(run):
    """RUN/run.json as a dict with "folds" as [Fold]; None when the run has no record."""
    path = Path(run) / RECORD_NAME
    if not path.exists():
        return None
    record = read_json(path)
    try:
        record["folds"] = [Fold.from_dict(f) for f in record["folds"]]
        if not isinstance(record["options"], dict) or not isinstance(record["train_ids"], list):
            raise TypeError("options must be an object and train_ids a list")
        check_trained_on_field(record["trained_on"])
    except (KeyError, TypeError, ValueError) as err:
        raise RunFileError(f"{path}: not a train.py run record ({type(err).__name__}: {err})") from None
    return record


def planned_trials(options, folds):
    """[(backbone, Fold)] a run trains: its backbones x its chosen folds (--folds, default all)."""
    names = options["folds"].split(",") if options["folds"] else [f.name for f in folds]
    by_name = {f.name: f for f in folds}
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise RunFileError(f"--folds {','.join(unknown)}: not a fold of {', '.join(by_name)}")
    return [(backbone, by_name[name]) for backbone in options["backbones"].split(",") for name in names]


def trial_file(run, folder, backbone, fold_name, suffix):
    """RUN/<folder>/<backbone>/fold-<fold name><suffix>: a trial's model (.pt), result (.json), preview (.png)."""
    return Path(run) / folder / backbone / f"fold-{fold_name}{suffix}"


def oof_path(run, backbone, fold):
    """Where a fold's OOF map goes: the fragment's own map, or its band's part beside the merged map."""
    folder = Path(run) / "oof" / backbone
    return folder / f"{fold.fragment_id}.h5" if fold.rows is None else folder / "bands" / f"{fold.name}.h5"


def fragment_oof_path(run, backbone, fragment_id):
    return Path(run) / "oof" / backbone / f"{fragment_id}.h5"


def finished_trials(run, trials):
    """{(backbone, fold name): result} of the trials whose result file (trials/<backbone>/fold-<name>.json) is there."""
    results = {}
    for backbone, fold in trials:
        path = trial_file(run, "trials", backbone, fold.name, ".json")
        if path.is_file():
            results[backbone, fold.name] = read_json(path)
    return results


# ------------------------------------------------------------------------------------------- trained_on


def store_identity(path):
    """A train store as a run records it: the fingerprint of its sources (names, sizes, mtimes: prepare.py), its size
    in bytes (which the settings it was prepared with change) and the fragment folder it was made from."""
    store = Store(path)
    return {"fingerprint": store.fingerprint, "bytes": Path(path).stat().st_size, "source": store.source}


def prepared_data(stores):
    """The dataset prepare.py made `stores` from (its prepared.json), or None when that is not known."""
    try:
        data = json.loads((Path(stores) / "prepared.json").read_text(encoding="utf-8"))["data"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
    return data if isinstance(data, str) else None


def trained_on(stores, train_ids):
    """{stores, data, train: {id: store_identity}}: the train stores a run is trained on, recorded in run.json and
    copied into ensemble.json, so that no step uses the run with other train stores (check_trained_on)."""
    stores = Path(stores).resolve()
    return {"stores": str(stores), "data": prepared_data(stores),
            "train": {i: store_identity(stores / "train" / f"{i}.h5") for i in train_ids}}


def check_trained_on_field(value, path=RECORD_NAME):
    """TypeError unless `value` has trained_on's shape (run.json, ensemble.json)."""
    if not (isinstance(value, dict) and isinstance(value.get("train"), dict) and value["train"]
            and all(isinstance(v, dict) for v in value["train"].values())):
        raise TypeError(f"trained_on must be an object with the train stores of the run, got {value!r:.60}")


def origin(data, identities):
    """Where train stores come from, for a message: the dataset prepare.py read, else their sources' common folder."""
    return data or os.path.commonpath([str(v.get("source")) for v in identities.values()])


def check_trained_on(run, trained, stores, test_only=False):
    """RunFileError unless the train stores in `stores` are the ones the run was trained on (`trained`, from
    trained_on), unchanged: the one-line message names the run, what it was trained on, what differs and the way
    out. With `test_only` (submit.py), a stores folder with no train stores passes: test stores of any data do."""
    folder = Path(stores) / "train"
    found = {p.name[: -len(".h5")]: store_identity(p) for p in sorted(folder.glob("*.h5"))}
    if test_only and not found:
        return
    recorded = trained["train"]
    was = f"{run} was trained on the train stores {', '.join(sorted(recorded))} of {origin(trained.get('data'), recorded)}"
    missing = sorted(set(recorded) - set(found))
    if missing and not test_only:  # ensemble.py reads their labels
        raise RunFileError(f"{folder / (missing[0] + '.h5')}: train store not found ({was})")
    common = sorted(set(found) & set(recorded))
    if not common or any(found[i].get("source") != recorded[i].get("source") for i in common):
        holds = (f"{folder} holds {', '.join(sorted(found))} of {origin(prepared_data(stores), found)}" if found else
                 f"{folder} holds no train store")
        raise RunFileError(f"{was}; {holds}: other data. Train a run on these stores (another --run or RUN=), or "
                           f"give the stores it was trained on")
    changed = [i for i in common if found[i] != recorded[i]]
    if changed or set(found) != set(recorded):
        what = (f"{folder / (changed[0] + '.h5')} changed since (prepared again: its sources or settings differ)"
                if changed else f"{folder} now holds {', '.join(sorted(found))}")
        raise RunFileError(f"{was}; {what}: the run is stale. Retrain it (train.py --run {run} --force, or another "
                           f"--run or RUN=), or give the stores it was trained on")


def recorded_stores(run, stores=None):
    """The stores folder: `stores` when given, else the one the run was trained on, else data/prepared."""
    if stores:
        return Path(stores)
    record = read_record(run)
    return Path(record["options"]["stores"]) if record else Path("data/prepared")


# ------------------------------------------------------------------------------------------- ensemble.json


def read_ensemble(run):
    """RUN/ensemble.json, checked field by field; every member's model paths resolved inside the run folder."""
    path = Path(run) / ENSEMBLE_NAME
    if not path.is_file():
        raise RunFileError(f"{path}: not found; run ensemble.py --run {run} first")
    data = read_json(path)
    field = _Fields(path)
    members = field.get(data, "members", list)
    if not members:
        raise RunFileError(f"{path}: members: empty, no model to predict with")
    for i, member in enumerate(members):
        where = f"members[{i}]"
        field.get(member, "backbone", str, where)
        weight = field.number(member, "weight", where)
        if weight < 0:
            raise RunFileError(f"{path}: {where}.weight: {weight} is negative")
        for key in ("tile_size", "stride"):
            if field.get(member, key, int, where) <= 0:
                raise RunFileError(f"{path}: {where}.{key}: {member[key]} is not positive")
        models = field.get(member, "models", list, where)
        if not models or not all(isinstance(m, str) for m in models):
            raise RunFileError(f"{path}: {where}.models: must be a non-empty list of file names")
        member["paths"] = [inside_run(run, m, f"{path}: {where}.models") for m in models]
        digests = field.get(member, "sha256", dict, where)
        for name in models:
            if not (isinstance(digests.get(name), str) and SHA256_DIGEST.fullmatch(digests[name])):
                raise RunFileError(f"{path}: {where}.sha256: no sha256 (64 hex digits) of {name!r}")
        member["digests"] = [digests[m] for m in models]
        member["spec"] = input_spec(path, field.get(member, "inputs", dict, where), f"{where}.inputs")
    try:
        check_trained_on_field(data.get("trained_on"))
    except TypeError as err:
        raise RunFileError(f"{path}: {err} (ensemble.py copies it from run.json)") from None
    total = sum(m["weight"] for m in members)
    if not math.isclose(total, 1.0, abs_tol=1e-3):
        raise RunFileError(f"{path}: members[].weight: the weights sum to {total:g}, not 1")
    threshold = field.get(data, "threshold", dict)
    mode = field.get(threshold, "mode", str, "threshold")
    if mode not in THRESHOLD_MODES:
        raise RunFileError(f"{path}: threshold.mode: {mode!r} is not one of {', '.join(THRESHOLD_MODES)}")
    value = field.number(threshold, "value", "threshold")
    low, high, rule = THRESHOLD_RANGES[mode]
    if not (low < value < high or (mode == "percentile" and value == high)):
        raise RunFileError(f"{path}: threshold.value: {value:g} is out of range for mode {mode} ({rule})")
    return data


def input_spec(path, inputs, where):
    """The InputSpec of a model's recorded `inputs`; a RunFileError naming `path` when it is not one this code makes."""
    version = inputs.get("version") if isinstance(inputs, dict) else inputs  # version 2 files recorded a number
    if version != INPUT_VERSION:
        raise RunFileError(f"{path}: {where}: model inputs of version {version}, this inkseg makes "
                           f"version {INPUT_VERSION} (lib/inputs.py): retrain, or predict with the inkseg that trained it")
    try:
        return InputSpec.from_dict(inputs)
    except (KeyError, TypeError, ValueError) as err:
        raise RunFileError(f"{path}: {where}: not a model input ({_first_line(err)})") from None


def inside_run(run, name, where):
    """`run / name`, refused unless it is a relative path that stays inside the run folder."""
    path = Path(run) / name
    if "\0" in name:
        raise RunFileError(f"{where}: {name!r} is not a file name (it holds a NUL byte)")
    if Path(name).is_absolute() or not path.resolve().is_relative_to(Path(run).resolve()):
        raise RunFileError(f"{where}: {name!r} points outside the run folder {run}")
    return path


def load_members(run, ensemble, device="cpu"):
    """Load every model of every member with a weight > 0, checking each file against ensemble.json before any
    prediction. Returns [{backbone, weight, tile_size, stride, models: [(model, path)]}]."""
    loaded = []
    for member in ensemble["members"]:
        if member["weight"] == 0:
            continue  # the fit dropped it: no need to run it
        models = [(check_model_file(path, member, device, digest), path)
                  for path, digest in zip(member["paths"], member["digests"])]
        loaded.append({**member, "models": models})
    return loaded


def check_model_file(path, member, device="cpu", sha256=None):
    """A fold model of `member`, loaded; a one-line RunFileError when it is missing, differs from its recorded
    `sha256` (when given), is unreadable or does not fit."""
    if not Path(path).is_file():
        raise RunFileError(f"{path}: model file not found")
    if sha256 is not None:
        check_sha256(path, sha256, ENSEMBLE_NAME)
    try:
        model, export = load_model_file(path, device)
    except KeyError as err:
        raise RunFileError(f"{path}: not a train.py model file (no field {err})") from None
    except Exception as err:  # truncated zip, foreign pickle, weights of another architecture: name the file
        raise RunFileError(f"{path}: unreadable model file ({type(err).__name__}: {_first_line(err)})") from None
    inputs = export.get("inputs")
    trained = input_spec(path, inputs, "inputs")
    # how a triplet model's triplets combine is the member's choice (ensemble.json); what it was trained on is not
    if dataclasses.replace(trained, triplets=member["spec"].triplets) != member["spec"]:
        raise RunFileError(f"{path}: inputs {inputs} differ from its member's in {ENSEMBLE_NAME}")
    for key in ("tile_size", "stride"):
        if export.get(key) != member[key]:
            raise RunFileError(f"{path}: {key} {export.get(key)} differs from its member's {key} {member[key]} "
                               f"in {ENSEMBLE_NAME}")
    return model


def file_sha256(path):
    """The sha256 of a file's bytes, as 64 hex digits."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def check_sha256(path, expected, recorded_in):
    """RunFileError unless the file's sha256 is `expected` (recorded in `recorded_in` when it was written)."""
    actual = file_sha256(path)
    if actual != expected:
        raise RunFileError(f"{path}: sha256 {actual[:16]}... differs from {expected[:16]}... recorded in {recorded_in} "
                           "when it was trained: the file changed since (a damaged copy?); copy it again or retrain")


# ------------------------------------------------------------------------------------------- JSON files


def read_json(path):
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:  # RecursionError: nested too deep
        raise RunFileError(f"{path}: not readable JSON ({_first_line(err)})") from None
    if not isinstance(data, dict):
        raise RunFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def write_json(path, data):
    """Write `data` as indented JSON through a temp file and a rename: never a half-written file, no temp file left
    when the write fails (an OutputError naming the file)."""
    text = json.dumps(data, indent=2) + "\n"
    write_atomically(path, lambda file: file.write(text))


class _Fields:
    """Typed field access with one-line errors naming the file and the field."""

    def __init__(self, path):
        self.path = path

    def get(self, obj, key, kind, where=""):
        name = f"{where}.{key}" if where else key
        if not isinstance(obj, dict) or key not in obj:
            raise RunFileError(f"{self.path}: {name}: missing")
        value = obj[key]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            expected = getattr(kind, "__name__", "number")
            raise RunFileError(f"{self.path}: {name}: expected {expected}, got {type(value).__name__}")
        return value

    def number(self, obj, key, where=""):
        value = self.get(obj, key, (int, float), where)
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            number = math.inf
        if isinstance(value, bool) or not math.isfinite(number):
            raise RunFileError(f"{self.path}: {where}.{key}: {value!r} is not a finite number")
        return number


def _first_line(err):
    return (str(err).strip().splitlines() or [""])[0]
