"""Turn Kaggle-layout fragments into HDF5 tile stores, streaming, in bounded memory.

In:  --data ROOT in the Kaggle layout (train/<id>/surface_volume/00.tif.., mask.png, inklabels.png, ir.png;
     test/<id>/...); default: the synthetic dataset from `python -m lib.synth data/synth`.
Out: --out/<split>/<id>.h5, one store per fragment (format: lib/store.py), and a one-line summary each;
     --out/prepared.json, the manifest of the stores there (rewritten only when a store changed, so that the
     Makefile reruns the steps after this one only then).

Every fragment is validated before anything is written; a store whose sources and settings are
unchanged is skipped (--force rebuilds it); a store is written to a temporary name and renamed when
complete, so an interrupted run never leaves one that looks finished.

    python prepare.py --data ROOT [--out data/prepared] [--ids 1,2,a] [--z-range 24:40] [--force]
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

from lib.fragments import SPLITS, Fragment, FragmentError, list_fragments
from lib.store import DEFAULT_Z_RANGE, fingerprint, store_matches, write_store


def parse_z_range(text):
    start, stop = (int(v) for v in text.split(":"))
    return start, stop


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


def prepare_fragment(fragment, out, z_range, tile_size, stride, force):
    """Write (or skip) one store; returns its one-line summary."""
    path = Path(out) / fragment.split / f"{fragment.fragment_id}.h5"
    name = f"{fragment.split}/{fragment.fragment_id}"
    if not force and store_matches(path, fingerprint(fragment.source_files()), z_range, tile_size, stride):
        return f"{name}: up to date, skipped ({path})"
    started = time.time()
    summary = write_store(fragment, path, z_range, tile_size, stride)
    ink = "" if summary["ink_fraction"] is None else f", ink {summary['ink_fraction']:.1%} of mask"
    h, w = summary["shape"]
    return (f"{name}: {h} x {w}, slices {z_range[0]}:{z_range[1]}, {summary['tiles']} tiles{ink}, "
            f"{summary['bytes'] / 2**20:.1f} MiB, {time.time() - started:.1f} s -> {path}")


def write_manifest(args):
    """OUT/prepared.json: the dataset and settings of the last run, and every store in OUT with its size and
    mtime; written only when that differs from the file there."""
    out = Path(args.out)
    stores = {str(p.relative_to(out)): [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(out.glob("*/*.h5"))}
    manifest = {"data": os.path.abspath(args.data), "z_range": list(args.z_range), "tile_size": args.tile_size,
                "stride": args.stride, "stores": stores}
    path = out / "prepared.json"
    try:
        if json.loads(path.read_text()) == manifest:
            return
    except (OSError, ValueError):
        pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synth", help="dataset root in the Kaggle layout")
    parser.add_argument("--out", default="data/prepared", help="folder for the stores")
    parser.add_argument("--ids", default=None, help="comma-separated fragment ids (default: all)")
    parser.add_argument("--z-range", type=parse_z_range, default=DEFAULT_Z_RANGE,
                        help="slices to keep, START:STOP (default %(default)s; 0:65 keeps all)")
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--stride", type=int, default=56)
    parser.add_argument("--force", action="store_true", help="rebuild stores even when up to date")
    args = parser.parse_args(argv)
    ids = None if args.ids is None else set(args.ids.split(","))
    try:
        fragments = select_fragments(args.data, ids)
        for fragment in fragments:
            if not 0 <= args.z_range[0] < args.z_range[1] <= fragment.num_slices:
                raise FragmentError(f"{fragment.path}: --z-range {args.z_range[0]}:{args.z_range[1]} "
                                    f"is outside its {fragment.num_slices} slices")
        lines = [prepare_fragment(f, args.out, args.z_range, args.tile_size, args.stride, args.force) for f in fragments]
    except FragmentError as err:
        sys.exit(f"error: {err}")
    print("\n".join(lines))
    write_manifest(args)


if __name__ == "__main__":
    main()
