"""A run folder and its files (RunDir): the run record (run.json), its status (status.json), the trials' results,
the fitted ensemble (ensemble.json) and the fold models.

    RUN/run.json        RunRecord, written by train.py before any trial starts: the TrainConfig (lib/config.py), the
                        fold table, what it is trained on (trained_on: each train store's sources fingerprint, size
                        and source folder), who created it where, package versions and the git commit
    RUN/status.json     running, finished or unfinished, with the counts of trials: what the Makefile and train.py
                        read to know whether a run is finished
    RUN/trials/<backbone>/fold-<name>.json   TrialResult: a finished trial's scores and its model file's sha256
    RUN/ensemble.json   written by ensemble.py: members (backbone, weight, model files and their sha256, tile size,
                        stride, inputs), threshold, trained_on
    RUN/models/<backbone>/fold-<name>.pt   one model file per trained fold (lib.model.save_model_file); its sha256
                        is checked (model_header) before the file is used: a changed byte is refused

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

import torch

from lib.config import ConfigError, TrainConfig
from lib.folds import Fold
from lib.inputs import INPUT_VERSION, InputSpec
from lib.metrics import THRESHOLD_MODES
from lib.model import load_model_file
from lib.outputs import write_atomically
from lib.store import Store

SHA256_DIGEST = re.compile(r"[0-9a-f]{64}")
PACKAGES = ("torch", "torchvision", "ray", "segmentation-models-pytorch", "timm", "numpy", "h5py", "hdf5plugin")
# threshold value ranges per mode: a probability strictly inside (0, 1); a share of the mask in (0, 100] %
THRESHOLD_RANGES = {"absolute": (0.0, 1.0, "0 < value < 1"), "percentile": (0.0, 100.0, "0 < value <= 100")}
RECORD_VERSION = 2  # run.json: 2, the TrainConfig as "config" (lib/config.py)
STATES = ("running", "finished", "unfinished")  # status.json: a run's trials are running, all done, or some not


class RunFileError(ValueError):
    """A run file is missing or wrong: the message is one line and names the file (and field)."""


class RunStateError(RuntimeError):
    """A run folder is not in a state for what was asked (holds another run, nothing to resume, trials unfinished)."""


class RunDir:
    """A run folder: the only code that knows the names of its files and folders.

    train.py writes run.json (RunRecord), status.json, summary.md/.csv, and per trial (backbone, fold name)
    models/, trials/ (TrialResult), previews/, checkpoints/ and its OOF maps in oof/; ensemble.py writes
    ensemble.json and plots/; submit.py writes its outputs into a work folder laid out the same way (the run
    itself by default)."""

    RECORD, STATUS, ENSEMBLE = "run.json", "status.json", "ensemble.json"

    def __init__(self, path):
        self.path = Path(path)
        self.record, self.status, self.ensemble = (self.path / name for name in (self.RECORD, self.STATUS, self.ENSEMBLE))
        self.summary_md, self.summary_csv = self.path / "summary.md", self.path / "summary.csv"
        self.tune, self.checkpoints, self.plots = self.path / "tune", self.path / "checkpoints", self.path / "plots"
        # submit.py's outputs, in the run or its --work folder: previews/<id>.png, predictions/, probs/, the band
        # prediction's scratch and the stamps (predicted/<id>.json) that let a second call skip a finished fragment
        self.previews, self.predictions, self.probs = self.path / "previews", self.path / "predictions", self.path / "probs"
        self.scratch, self.predicted = self.path / ".scratch", self.path / "predicted"
        self.submission = self.path / "submission.csv"

    def __str__(self):
        return str(self.path)

    def trial_file(self, folder, backbone, fold_name, suffix):
        """RUN/<folder>/<backbone>/fold-<fold name><suffix>."""
        return self.path / folder / backbone / f"fold-{fold_name}{suffix}"

    def model(self, backbone, fold_name):
        return self.trial_file("models", backbone, fold_name, ".pt")

    def result(self, backbone, fold_name):
        return self.trial_file("trials", backbone, fold_name, ".json")

    def preview(self, backbone, fold_name):
        return self.trial_file("previews", backbone, fold_name, ".png")

    def checkpoint(self, backbone, fold_name):
        return self.trial_file("checkpoints", backbone, fold_name, ".pt")

    def model_files(self):
        return sorted((self.path / "models").rglob("*.pt"))

    def oof(self, backbone, fold):
        """Where a fold's OOF map goes: the fragment's own map, or its band's part beside the merged map."""
        return self.fragment_oof(backbone, fold.fragment_id) if fold.rows is None else \
            self.path / "oof" / backbone / "bands" / f"{fold.name}.h5"

    def fragment_oof(self, backbone, fragment_id):
        return self.path / "oof" / backbone / f"{fragment_id}.h5"

    def read_record(self):
        """The RunRecord of run.json; None when the run has none."""
        return RunRecord.read(self.record) if self.record.exists() else None

    def write_record(self, config, train_ids, folds):
        """Write run.json (atomically) for a new run of `config` over `train_ids` and [Fold]; returns its RunRecord."""
        record = RunRecord(config, tuple(train_ids), tuple(folds), trained_on(config.stores, train_ids),
                           time.strftime("%Y-%m-%d %H:%M:%S"), creator(), **environment())
        write_json(self.record, record.as_dict())
        return record

    def finished_trials(self, trials):
        """{(backbone, fold name): TrialResult} of the trials in [(backbone, Fold)] whose result file is there."""
        results = {}
        for backbone, fold in trials:
            path = self.result(backbone, fold.name)
            if path.is_file():
                results[backbone, fold.name] = TrialResult.read(path)
        return results

    def read_status(self):
        """status.json's {state, trials, finished, failed, updated}; None when there is none (a run train.py has not
        started, or one of another tool)."""
        if not self.status.exists():
            return None
        data = read_json(self.status)
        if data.get("state") not in STATES:
            raise RunFileError(f"{self.status}: state: {data.get('state')!r} is not one of {', '.join(STATES)}")
        return data

    def write_status(self, state, trials, finished, failed=()):
        """status.json: the run's `state` (STATES) with its counts of trials and the failed trials' lines. The
        Makefile and train.py read it to know whether the run is finished."""
        write_json(self.status, {"state": state, "trials": trials, "finished": finished, "failed": list(failed),
                                 "updated": time.strftime("%Y-%m-%d %H:%M:%S")})

    def is_finished(self):
        status = self.read_status()
        return status is not None and status["state"] == "finished"


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """run.json: the run's TrainConfig, train ids, fold table, what it is trained on (trained_on), and when, by whom,
    with which packages and code it was created."""
    config: TrainConfig
    train_ids: tuple
    folds: tuple
    trained_on: dict
    created: str
    creator: dict
    versions: dict
    git_commit: str | None

    def as_dict(self):
        return {"version": RECORD_VERSION, **dataclasses.asdict(self), "config": self.config.as_dict(),
                "train_ids": list(self.train_ids), "folds": [f.as_dict() for f in self.folds]}

    @classmethod
    def read(cls, path):
        data = read_json(path)
        if data.get("version") != RECORD_VERSION:
            raise RunFileError(f"{path}: a run record of version {data.get('version')}, this inkseg reads version "
                               f"{RECORD_VERSION}: train the run again (train.py --force)")
        try:
            check_trained_on_field(data["trained_on"])
            if not (isinstance(data["train_ids"], list) and all(isinstance(i, str) for i in data["train_ids"])):
                raise TypeError("train_ids must be a list of fragment ids")
            return cls(TrainConfig.from_dict(data["config"], f"{path}: config"), tuple(data["train_ids"]),
                       tuple(Fold.from_dict(f) for f in data["folds"]), data["trained_on"], data["created"],
                       data["creator"], data["versions"], data["git_commit"])
        except ConfigError as err:
            raise RunFileError(str(err)) from None
        except (KeyError, TypeError, ValueError) as err:
            raise RunFileError(f"{path}: not a train.py run record ({type(err).__name__}: {err})") from None

    def planned_trials(self):
        """[(backbone, Fold)] the run trains: its backbones x its chosen folds (config.folds, default all)."""
        names = self.config.folds or [f.name for f in self.folds]
        by_name = {f.name: f for f in self.folds}
        unknown = sorted(set(names) - set(by_name))
        if unknown:
            raise RunFileError(f"--folds {','.join(unknown)}: not a fold of {', '.join(by_name)}")
        return [(backbone, by_name[name]) for backbone in self.config.backbones for name in names]


@dataclasses.dataclass(frozen=True)
class TrialResult:
    """trials/<backbone>/fold-<name>.json: a finished trial's scores and its model file's sha256."""
    backbone: str
    fold: str
    epoch: int
    oof_f05: float
    oof_threshold: float
    best_val_f05: float
    model_sha256: str
    minutes: float
    node_id: str | None = None
    done: bool = True

    def write(self, path):
        write_json(path, dataclasses.asdict(self))

    @classmethod
    def read(cls, path):
        data = read_json(path)
        field = _Fields(path)
        for name in ("backbone", "fold"):
            field.get(data, name, str)
        for name in ("oof_f05", "oof_threshold", "best_val_f05", "minutes"):
            field.number(data, name)
        field.get(data, "epoch", int)
        if not (isinstance(data.get("model_sha256"), str) and SHA256_DIGEST.fullmatch(data["model_sha256"])):
            raise RunFileError(f"{path}: model_sha256: missing or not 64 hex digits (train.py writes it when the trial "
                               "finishes)")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ------------------------------------------------------------------------------------------- run.json


def creator():
    return {"user": getpass.getuser(), "uid": os.getuid(), "host": socket.gethostname()}


def environment():
    """{versions: Python and package versions, git_commit: of this code (None outside a git checkout)}."""
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


def check_trained_on_field(value):
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
    record = RunDir(run).read_record()
    return Path(record.config.stores) if record else Path("data/prepared")


# ------------------------------------------------------------------------------------------- ensemble.json


def read_ensemble(run):
    """RUN/ensemble.json, checked field by field; every member's model paths resolved inside the run folder."""
    path = RunDir(run).ensemble
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
    header = model_header(path, sha256, RunDir.ENSEMBLE)
    # how a triplet model's triplets combine is the member's choice (ensemble.json); what it was trained on is not
    if dataclasses.replace(header["spec"], triplets=member["spec"].triplets) != member["spec"]:
        raise RunFileError(f"{path}: inputs {header['inputs']} differ from its member's in {RunDir.ENSEMBLE}")
    for key in ("tile_size", "stride"):
        if header[key] != member[key]:
            raise RunFileError(f"{path}: {key} {header[key]} differs from its member's {key} {member[key]} "
                               f"in {RunDir.ENSEMBLE}")
    try:
        return load_model_file(path, device)[0]
    except Exception as err:  # weights of another architecture: name the file
        raise RunFileError(f"{path}: unreadable model file ({type(err).__name__}: {_first_line(err)})") from None


def model_header(path, sha256, recorded_in):
    """A model file's entries but its weights (tile_size, stride, inputs, and spec: their InputSpec), read without
    loading the weights, after checking the file's bytes against `sha256` recorded in `recorded_in` (when given):
    the one check of a model file before any use; a one-line RunFileError naming it otherwise."""
    if not Path(path).is_file():
        raise RunFileError(f"{path}: model file not found")
    if sha256 is not None:
        check_sha256(path, sha256, recorded_in)
    try:  # mmap: only the small entries are read, not the weights
        export = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        header = {"tile_size": int(export["tile_size"]), "stride": int(export["stride"]), "inputs": export["inputs"]}
    except KeyError as err:
        raise RunFileError(f"{path}: not a train.py model file (no field {err})") from None
    except Exception as err:  # truncated zip, foreign pickle: name the file
        raise RunFileError(f"{path}: unreadable model file ({type(err).__name__}: {_first_line(err)})") from None
    return {**header, "spec": input_spec(path, header["inputs"], "inputs")}


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
