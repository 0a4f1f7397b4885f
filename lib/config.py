"""A training run's configuration, in one place.

`TrainConfig` says what a run trains: recorded in run.json, loaded again by `train.py --resume`, given to every trial
as it is. `Placement` says where and how the run runs (run folder, Ray cluster, GPU share): a resumed run may change
it. Both generate train.py's command line (argparse groups data, model, inputs, optimisation, tricks, where to run);
the presets are TrainConfig instances; a recipe is a JSON or YAML file of TrainConfig's fields (`--config FILE`,
any subset), and `--print-config` shows the resolved one. Values resolve in this order: the preset's, the file's, the
command line's; then the values derived from others (`TrainConfig.resolved`).
"""
import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from lib.inputs import CENTRE_ON, FAMILIES, TRIPLET_MODES, InputSpec
from lib.losses import LOSS_DEFAULTS
from lib.model import parse_member

GROUPS = ("data", "model", "inputs", "optimisation", "loss", "tricks", "where to run")
ONE_STORE_BANDS = 3  # folds a single train store is cut into when no --split is given


class ConfigError(ValueError):
    """A configuration that cannot be used: the message is one line and names the file or option."""


def option(default, group, help, flags=None, **argparse_kwargs):
    """A config field with its command-line option: `flags` (default --field-name) and argparse keywords."""
    return field(default=default, metadata=dict(group=group, help=help, flags=flags, argparse=argparse_kwargs))


def loss_option(name):
    return option(LOSS_DEFAULTS[name], "loss", f"weight or parameter {name} of the loss (lib/losses.py)")


@dataclass(frozen=True)
class TrainConfig:
    """What a run trains. None in a field marked "derived" means: from the other fields, in `resolved()`."""
    # data
    stores: str = option("data/prepared", "data", "folder with train/<id>.h5 stores")
    split: str | None = option(None, "data", "FRAG:K cuts train fragment FRAG into K bands of equal mask area, one "
                               f"fold each (with a single train store: FRAG:{ONE_STORE_BANDS})")
    folds: tuple[str, ...] | None = option(None, "data", "comma-separated fold names to run (none: all)")
    seed: int = option(0, "data", "seed of the weights, the tiles drawn and the augmentation")
    # model
    preset: str = option("demo", "model", "the recipe the other defaults come from (lib/config.py PRESETS)",
                         choices=("demo", "full"))
    backbones: tuple[str, ...] = option(("tu-mobilenetv3_small_050",), "model", "comma-separated smp encoder names, "
                                        "each FAMILY:NAME or NAME (of --family)")
    family: str = option("stack", "model", "model family of backbones named without one: 3-slice triplets, a stack "
                         "of --depth slices as channels, or the stack through a 3-D stem (lib/inputs.py, lib/model.py)",
                         choices=FAMILIES)
    depth: int = option(12, "model", "slices a stack or stem3d model reads, centred on the surface")
    decoder_channels: tuple[int, ...] = option((64, 32, 16, 16, 8), "model", "U-Net decoder widths")
    weights: str | None = option(None, "model", "encoder weights: none, imagenet, or a local file")
    # inputs
    tile_size: int = option(64, "inputs", "tile side in pixels")
    stride: int = option(32, "inputs", "step between tiles in pixels")
    centre_on: str = option("tile", "inputs", "where the slices models read sit: as stored around slice 32 (nominal), "
                            "on each fragment's surface (fragment) or each tile flattened onto its own surface found "
                            "by prepare.py (tile)", choices=CENTRE_ON)
    triplets: str | None = option(None, "inputs", "triplet models: how the OOF maps combine the centre-slice triplets "
                                  "(lib/inputs.py); derived: tile with --centre-on tile, else surface",
                                  choices=TRIPLET_MODES)
    depth_jitter: int | None = option(None, "inputs", "training inputs move up or down by up to this many slices, so "
                                      "that the model learns ink a little off the surface found; derived: 0 for "
                                      "triplets with --centre-on tile, 1 for stacks (their depth TTA shifts by 1), "
                                      "else 2")
    tta: bool = option(True, "inputs", "OOF maps without rot90 test-time augmentation", flags=("--no-tta",),
                       action="store_false")
    # optimisation
    epochs: int = option(30, "optimisation", "epochs of each trial")
    batch_size: int = option(16, "optimisation", "training tiles a step")
    lr: float | None = option(3e-3, "optimisation", "peak learning rate; derived when only --batch-size is given: the "
                              "preset's, scaled by sqrt(batch size / the preset's batch size)")
    precision: str = option("auto", "optimisation", "training arithmetic: auto = bf16 autocast on GPUs that support "
                            "it, fp16 with gradient scaling on older GPUs, fp32 on CPU",
                            choices=("auto", "bf16", "fp16", "fp32"))
    compile: bool = option(False, "optimisation", "torch.compile the model for training (start-up cost)",
                           action="store_true")
    max_tiles: int = option(512, "optimisation", "training tiles an epoch, drawn at random (0: each tile once)")
    workers: int | None = option(0, "optimisation", "DataLoader workers a trial (each trial asks 1 + workers CPUs); "
                                 "none: the trial's share of the CPUs minus one")
    infer_batch: int = option(16, "optimisation", "tiles an inference batch")
    # loss
    bce: float = loss_option("bce")
    dice: float = loss_option("dice")
    tversky: float = loss_option("tversky")
    tversky_alpha: float = loss_option("tversky_alpha")
    tversky_beta: float = loss_option("tversky_beta")
    label_smoothing: float = loss_option("label_smoothing")
    # tricks
    z_reverse: float = option(0.0, "tricks", "share of training tiles with the slice order reversed")
    cutout: float = option(0.0, "tricks", "share of training tiles with coarse dropout")
    cutmix: float = option(0.0, "tricks", "share of training tiles with a box of another tile pasted in")
    ema: float = option(0.0, "tricks", "decay of an EMA of the weights, which is then validated and exported (0: off; "
                        "e.g. 0.99)")

    def resolved(self):
        """This config with the derived fields filled in, the backbones named FAMILY:NAME and the stores folder
        absolute; a ConfigError when a value is not one this code can train."""
        flattened = self.centre_on == "tile"
        config = replace(
            self, stores=str(Path(self.stores).resolve()),
            triplets=self.triplets or ("tile" if flattened else "surface"),
            depth_jitter=(self.depth_jitter if self.depth_jitter is not None else
                          1 if self.family != "triplets" else 0 if flattened else 2))
        try:
            members = [parse_member(name, self.family) for name in self.backbones]
            for family in {family for family, _ in members}:
                config.input_spec(family)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return replace(config, backbones=tuple(":".join(member) for member in members))

    def input_spec(self, family):
        """The InputSpec of a `family` model trained with this config."""
        return InputSpec(family, self.depth, self.centre_on, self.triplets)

    def families(self):
        return sorted({parse_member(name, self.family)[0] for name in self.backbones})

    def loss_weights(self):
        """The loss's keyword arguments (lib.losses.build_loss)."""
        return {name: getattr(self, name) for name in LOSS_DEFAULTS}

    def as_dict(self):
        """JSON-able: the tuples as lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values, where):
        """A TrainConfig of `values` (a run record's, a recipe file's), each checked against its field's type;
        unknown keys and wrong types are a ConfigError naming `where` and the key."""
        return cls(**typed_values(cls, values, where))


@dataclass(frozen=True)
class Placement:
    """Where and how a run runs: none of it changes what is trained, so a resumed run may change any of it."""
    run: str = option("runs/demo", "where to run", "run folder for everything this run writes")
    resume: bool = option(False, "where to run", "continue the unfinished run in --run with the config in its "
                          "run.json", action="store_true")
    force: bool = option(False, "where to run", "delete the run in --run and start over", action="store_true")
    address: str | None = option(None, "where to run", "join an existing Ray cluster: auto or HOST:PORT (none: a "
                                 "local Ray of its own)")
    num_cpus: int | None = option(None, "where to run", "CPUs of a local Ray (none: all)")
    dashboard: bool = option(True, "where to run", "no Ray dashboard", flags=("--no-dashboard",),
                             action="store_false")
    gpus_per_trial: float | None = option(None, "where to run", "GPU share a trial (none: 1 if the cluster has GPUs, "
                                          "else 0)")
    max_concurrent: int = option(0, "where to run", "most trials at once (0: as many as fit)")


PRESETS = {
    # Fits `make train` on a 2-core CPU in minutes: tiny encoder and decoder, small tiles, short epochs.
    "demo": TrainConfig(),
    # The original solution's recipe (batch 16, lr 1e-4) for GPUs, with 4x the batch to fill a modern GPU and the
    # learning rate scaled by the square root of the batch ratio (scaled_lr); loader workers follow the trial's CPUs.
    "full": TrainConfig(preset="full", backbones=("resnet34", "efficientnet-b3", "mit_b2"), tile_size=224, stride=56,
                        epochs=15, batch_size=64, lr=2e-4, workers=None, infer_batch=32, max_tiles=0,
                        decoder_channels=(256, 128, 64, 32, 16)),
}


def scaled_lr(lr, batch_size, new_batch_size):
    """The square-root rule for Adam-type optimisers: lr grows with sqrt(batch) (the gradient noise falls as 1/batch)."""
    return lr * math.sqrt(new_batch_size / batch_size)


# ------------------------------------------------------------------------------------------- values and types


def kind_of(annotation):
    """(base type, item type or None, optional) of a field's annotation: int | None -> (int, None, True)."""
    optional = False
    if isinstance(annotation, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        optional = True
    if typing.get_origin(annotation) is tuple:
        return tuple, typing.get_args(annotation)[0], optional
    return annotation, None, optional


def typed_value(f, value, where):
    """`value` as field `f`'s type and one of its choices; ConfigError naming `where` and the field otherwise."""
    value = of_type(f.name, f.type, value, where)
    choices = f.metadata.get("argparse", {}).get("choices")
    if choices and value is not None and value not in choices:
        raise ConfigError(f"{where}: {f.name}: {value!r} is not one of {', '.join(choices)}")
    return value


def of_type(name, annotation, value, where):
    """`value` as `annotation` (a JSON list becomes a tuple, an int a float); ConfigError when it is not one."""
    base, item, optional = kind_of(annotation)
    if value is None and optional:
        return None
    if base is tuple and isinstance(value, (list, tuple)) and value:
        return tuple(of_type(name, item, v, where) for v in value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, base) or (base is not bool and isinstance(value, bool)):
        expected = f"a non-empty list of {item.__name__}" if base is tuple else base.__name__
        raise ConfigError(f"{where}: {name}: expected {expected}{' or null' if optional else ''}, got {value!r:.40}")
    return value


def typed_values(cls, values, where):
    """{field: typed value} of a mapping of some of `cls`'s fields; unknown keys are a ConfigError."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__}'s fields, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: not a field of {cls.__name__} (one of {', '.join(known)})")
    return {k: typed_value(known[k], v, where) for k, v in values.items()}


def read_recipe(path):
    """The TrainConfig fields a recipe file sets (JSON, or YAML for .yaml/.yml), checked; ConfigError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise ConfigError(f"{path}: cannot read the recipe ({reason})") from None
    is_yaml = Path(path).suffix in (".yaml", ".yml")
    try:
        values = yaml.safe_load(text) if is_yaml else json.loads(text)
    except (ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not valid {'YAML' if is_yaml else 'JSON'} ({str(err).splitlines()[0]})") from None
    return typed_values(TrainConfig, {} if values is None else values, path)


def resolve(given, recipe=None):
    """The TrainConfig of the `given` command-line values over a recipe file's over the preset's, resolved. When
    --batch-size is set but no --lr, the preset's learning rate is scaled to the batch (scaled_lr)."""
    values = {**(recipe or {}), **given}
    preset = values.get("preset", "demo")
    if preset not in PRESETS:
        raise ConfigError(f"preset {preset!r}: not one of {', '.join(PRESETS)}")
    base = PRESETS[preset]
    if "lr" not in values and "batch_size" in values:
        values["lr"] = scaled_lr(base.lr, base.batch_size, values["batch_size"])
    return replace(base, **values).resolved()


def check_resumable(recorded, given, recipe, record_path):
    """ConfigError when a value given now (command line or recipe) differs from the run's recorded config."""
    fresh = resolve(given, recipe)
    for key in sorted({**(recipe or {}), **given}):
        if getattr(fresh, key) != getattr(recorded, key):
            raise ConfigError(f"--{key.replace('_', '-')} {getattr(fresh, key)} conflicts with {getattr(recorded, key)} "
                              f"recorded in {record_path}; resume without it, or start a new run")


# ------------------------------------------------------------------------------------------- command line


def shown(value):
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "none" if value is None else value


def default_text(f, cls):
    """The default of field `f` as --help shows it: per preset where the presets differ."""
    if cls is TrainConfig and f.name != "preset":
        values = {name: getattr(preset, f.name) for name, preset in PRESETS.items()}
        if len(set(values.values())) > 1:
            return "; ".join(f"{name}: {shown(v)}" for name, v in values.items())
    return shown(f.default)


def command_line_type(f):
    base, item, _ = kind_of(f.type)
    if base is tuple:
        return lambda text: tuple(item(part) for part in text.split(","))
    return base


def add_options(parser, cls, groups):
    """One option per field of `cls`, in its argparse group; defaults are suppressed (so that the parse holds only
    what was typed) and shown in the help."""
    for f in fields(cls):
        meta = f.metadata
        kwargs = dict(meta["argparse"])
        if "action" not in kwargs:
            kwargs["type"] = command_line_type(f)
        flags = meta["flags"] or ("--" + f.name.replace("_", "-"),)
        said = "action" in kwargs or (f.default is None and "derived" in meta["help"])  # a flag, or derived
        text = meta["help"] if said else f"{meta['help']} (default: {default_text(f, cls)})"
        groups[meta["group"]].add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, help=text, **kwargs)


def build_parser(description):
    """train.py's parser: TrainConfig's and Placement's fields in groups, --config and --print-config."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    parser.add_argument("--config", help="a recipe: JSON or YAML file of TrainConfig fields (lib/config.py), e.g. "
                        "as --print-config writes it; options given beside it win")
    parser.add_argument("--print-config", action="store_true", help="print the resolved TrainConfig as JSON and exit")
    add_options(parser, TrainConfig, groups)
    add_options(parser, Placement, groups)
    groups["inputs"].add_argument("--no-triplets", dest="triplets", action="store_const", const="middle",
                                  default=argparse.SUPPRESS, help="--triplets middle")
    return parser


def split_given(namespace):
    """(TrainConfig values, Placement) of a parse: what was typed, the rest Placement's defaults."""
    given = vars(namespace)
    train = {f.name: given[f.name] for f in fields(TrainConfig) if f.name in given}
    placement = Placement(**{f.name: given[f.name] for f in fields(Placement) if f.name in given})
    return train, placement
