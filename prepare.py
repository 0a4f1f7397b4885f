"""Turn Kaggle-layout fragments or scroll segments into HDF5 tile stores, streaming, in bounded memory.

In:  --data ROOT in the Kaggle layout (train/<id>/surface_volume/00.tif.., mask.png, inklabels.png, ir.png;
     test/<id>/...) or the segment layout (<id>/layers/00.tif.. or .jpg / .png, <id>/<id>_mask.png,
     <id>/<id>_inklabels.png), detected from the folder (or --layout); default: the synthetic dataset from
     `python -m lib.synth data/synth`.
Out: --out/<split>/<id>.h5, one store per fragment (format: lib/store.py), and a one-line summary each.
     Segments have no split on disk: --train / --test name them (default: labelled ones train, the others test).

Depth (lib/depth.py): --reverse ID,.. stores those fragments with z flipped (segments with the recto surface at
the high layer numbers); --z-range auto keeps the 16 slices centred on each fragment's own surface (found from
its mean in-mask intensity along z) as slices 24:40, so models see every surface at slice 32.

Every fragment is validated before anything is written; a store whose sources and settings are
unchanged is skipped (--force rebuilds it); a store is written to a temporary name and renamed when
complete, so an interrupted run never leaves one that looks finished.

    python prepare.py --data ROOT [--out data/prepared] [--ids 1,2,a] [--z-range 24:40] [--force]
    python prepare.py --data SEGMENTS [--train ID,ID --test ID] [--reverse ID] [--z-range auto]
"""
import argparse
import sys
import time
from pathlib import Path

from lib.depth import find_surface, intensity_profile, kept_layers
from lib.fragments import LAYOUTS, SPLITS, Fragment, FragmentError, detect_layout, list_fragments, open_segments
from lib.store import DEFAULT_Z_RANGE, fingerprint, store_matches, write_store


def parse_z_range(text):
    if text == "auto":
        return text
    try:
        start, stop = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected START:STOP or auto") from None
    return start, stop


def parse_ids(text):
    return None if text is None else [i for i in text.split(",") if i]


def select_fragments(root, ids):
    """Every fragment of every split present (or only `ids`), opened and validated before any writing."""
    fragments = []
    splits = [s for s in SPLITS if (Path(root) / s).is_dir()]
    if not splits:
        raise FragmentError(f"{root}: no train/ or test/ folder: not a dataset root in the Kaggle layout")
    for split in splits:
        for fragment_id in list_fragments(root, split):
            if ids is None or fragment_id in ids:
                fragments.append(Fragment.open(root, split, fragment_id).validate())
    if ids is not None:
        missing = set(ids) - {f.fragment_id for f in fragments}
        if missing:
            raise FragmentError(f"{root}: no fragment named {', '.join(sorted(missing))}")
    return fragments


def select_segments(root, ids, train_ids, test_ids):
    """Segments (or only `ids`) as train or test fragments, opened and validated before any writing."""
    segments = open_segments(root, train_ids, test_ids)
    if ids is not None:
        missing = set(ids) - {s.fragment_id for s in segments}
        if missing:
            raise FragmentError(f"{root}: no segment named {', '.join(sorted(missing))} among those selected")
        segments = [s for s in segments if s.fragment_id in ids]
    return segments


def depth_window(fragment, z_range, reverse):
    """(slices in the model frame, the source layer of each, the detected surface or None) of one fragment."""
    where = fragment.slice_paths[0].parent
    if z_range != "auto":
        if not 0 <= z_range[0] < z_range[1] <= fragment.num_slices:
            raise FragmentError(f"{fragment.path}: --z-range {z_range[0]}:{z_range[1]} "
                                f"is outside its {fragment.num_slices} slices")
        return z_range, kept_layers(fragment.num_slices, z_range, reverse), None
    surface = find_surface(intensity_profile(fragment, reverse), where)
    return DEFAULT_Z_RANGE, kept_layers(fragment.num_slices, DEFAULT_Z_RANGE, reverse, surface, where), surface


def prepare_fragment(fragment, out, window, tile_size, stride, force, reverse=False):
    """Write (or skip) one store; returns its one-line summary. `window` is depth_window's answer."""
    z_range, layers, surface = window
    path = Path(out) / fragment.split / f"{fragment.fragment_id}.h5"
    name = f"{fragment.split}/{fragment.fragment_id}"
    if not force and store_matches(path, fingerprint(fragment.source_files()), z_range, tile_size, stride, layers):
        return f"{name}: up to date, skipped ({path})"
    started = time.time()
    attrs = {"reversed": reverse, "surface": float("nan") if surface is None else surface}
    summary = write_store(fragment, path, z_range, tile_size, stride, layers=layers, attrs=attrs)
    ink = "" if summary["ink_fraction"] is None else f", ink {summary['ink_fraction']:.1%} of mask"
    h, w = summary["shape"]
    source = "" if layers == list(range(*z_range)) else f" from layers {layers[0]}..{layers[-1]}"
    source += "" if surface is None else f" (surface at {surface:.1f})"
    return (f"{name}: {h} x {w}, slices {z_range[0]}:{z_range[1]}{source}, {summary['tiles']} tiles{ink}, "
            f"{summary['bytes'] / 2**20:.1f} MiB, {time.time() - started:.1f} s -> {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synth", help="dataset root in the Kaggle or the segment layout")
    parser.add_argument("--out", default="data/prepared", help="folder for the stores")
    parser.add_argument("--layout", choices=("auto",) + LAYOUTS, default="auto",
                        help="dataset layout (default: detected: train/ or test/ folders mean kaggle, "
                             "<id>/layers/ folders segments)")
    parser.add_argument("--ids", default=None, help="comma-separated fragment ids (default: all)")
    parser.add_argument("--train", help="segments: comma-separated ids to prepare as train stores (they need "
                        "<id>_inklabels.png); default: every labelled segment, unless --test is given")
    parser.add_argument("--test", help="segments: comma-separated ids to prepare as test stores (to predict); "
                        "default: every unlabelled segment, unless --train is given")
    parser.add_argument("--reverse", default="", help="comma-separated ids whose depth runs the other way (recto "
                        "surface at the high layer numbers): stored with z flipped")
    parser.add_argument("--z-range", type=parse_z_range, default=None,
                        help="slices to keep, START:STOP (0:65 keeps all), or auto: the 16 centred on each "
                             "fragment's surface, stored as 24:40 (default: 24:40 for the Kaggle layout, "
                             "auto for segments)")
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--stride", type=int, default=56)
    parser.add_argument("--force", action="store_true", help="rebuild stores even when up to date")
    args = parser.parse_args(argv)
    ids, reverse = parse_ids(args.ids), set(parse_ids(args.reverse))
    try:
        layout = detect_layout(args.data) if args.layout == "auto" else args.layout
        if layout == "kaggle":
            if args.train is not None or args.test is not None:
                raise FragmentError(f"{args.data}: --train / --test choose the roles of segments; the Kaggle "
                                    f"layout's roles are its train/ and test/ folders")
            fragments = select_fragments(args.data, None if ids is None else set(ids))
        else:
            fragments = select_segments(args.data, ids, parse_ids(args.train), parse_ids(args.test))
        unknown = reverse - {f.fragment_id for f in fragments}
        if unknown:
            raise FragmentError(f"{args.data}: --reverse names {', '.join(sorted(unknown))}, "
                                f"not among the fragments prepared")
        z_range = args.z_range or (DEFAULT_Z_RANGE if layout == "kaggle" else "auto")
        windows = [depth_window(f, z_range, f.fragment_id in reverse) for f in fragments]
        lines = [prepare_fragment(f, args.out, window, args.tile_size, args.stride, args.force,
                                  f.fragment_id in reverse) for f, window in zip(fragments, windows)]
    except FragmentError as err:
        sys.exit(f"error: {err}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
