"""Turn Kaggle-layout fragments into HDF5 tile stores, streaming, in bounded memory.

In:  --data ROOT in the Kaggle layout (train/<id>/surface_volume/00.tif.., mask.png, inklabels.png, ir.png;
     test/<id>/...); default: the synthetic dataset from `python -m lib.synth data/synth`.
Out: --out/<split>/<id>.h5, one store per fragment (format: lib/store.py), and a one-line summary each;
     --out/prepared.json, the manifest of the stores there (rewritten only when a store changed, so that the
     Makefile reruns the steps after this one only then).

Every fragment folder is validated before anything is written (one that cannot be read is an error, never
skipped); labels with no ink in the mask or ink far outside it are a warning (an error with --strict). A store
whose sources and settings are unchanged and whose checksums hold is skipped (--force rebuilds it; --verify also
reads its whole volume against the checksums); a corrupt one is rebuilt, and the run says so. A store is written
to a temporary name under a lock (a second run writing the same store stops with an error naming the first) and
renamed when complete; temporary files left by a killed run are removed by the next one.

    python prepare.py --data ROOT [--out data/prepared] [--ids 1,2,a] [--z-range 24:40] [--force] [--verify] [--strict]
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

from lib.fragments import SPLITS, Fragment, FragmentError, check_labels, list_fragments
from lib.lock import LockedError, exclusive
from lib.store import DEFAULT_Z_RANGE, StoreError, check_store, fingerprint, store_matches, write_store


def parse_z_range(text):
    start, stop = (int(v) for v in text.split(":"))
    return start, stop


def select_fragments(root, ids):
    """Every fragment of every split present (or only `ids`), opened and validated before any writing;
    also the line that says how many each split holds."""
    fragments, counts = [], []
    splits = [s for s in SPLITS if (Path(root) / s).is_dir()]
    if not splits:
        raise FragmentError(f"{root}: no train/ or test/ folder: not a dataset root in the Kaggle layout")
    for split in splits:
        found = list_fragments(root, split)
        counts.append(f"{len(found)} {split}")
        for fragment_id in found:
            if ids is None or fragment_id in ids:
                fragments.append(Fragment.open(root, split, fragment_id).validate())
    if ids is not None:
        missing = set(ids) - {f.fragment_id for f in fragments}
        if missing:
            raise FragmentError(f"{root}: no fragment named {', '.join(sorted(missing))}")
    return fragments, f"{root}: {' and '.join(counts)} fragments; preparing {len(fragments)}"


def label_warnings(fragments, strict):
    """The labels' warnings (check_labels) as lines; with `strict` the first one is an error."""
    lines = []
    for fragment in fragments:
        for warning in check_labels(fragment)[1]:
            if strict:
                raise FragmentError(f"{warning} (--strict)")
            lines.append(f"warning: {warning}")
    return lines


def remove_stale_temps(out):
    """Remove the temporary stores (<id>.h5.tmp) that no running prepare is writing: a killed run's. One line each."""
    lines = []
    for tmp in sorted(Path(out).glob("*/*.h5.tmp")):
        try:
            with exclusive(tmp.with_suffix(""), "prepare"):  # a live writer holds its store's lock
                tmp.unlink(missing_ok=True)
        except LockedError:
            continue
        lines.append(f"removed {tmp}, left by an interrupted run")
    return lines


def prepare_fragment(fragment, out, z_range, tile_size, stride, force, verify):
    """Write (or skip) one store, holding its lock; returns its one-line summary (after a line saying why, when
    a corrupt store is rebuilt)."""
    path = Path(out) / fragment.split / f"{fragment.fragment_id}.h5"
    name = f"{fragment.split}/{fragment.fragment_id}"
    sources = fingerprint(fragment.source_files())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(path, "prepare"):
            rebuilt = ""
            if not force:
                try:
                    if store_matches(path, sources, z_range, tile_size, stride):
                        if not verify:
                            return f"{name}: up to date, skipped ({path})"
                        check_store(path, full=True)
                        return f"{name}: up to date, volume checksums verified, skipped ({path})"
                except StoreError as err:
                    rebuilt = f"{name}: {err}: rebuilding\n"
            started = time.time()
            summary = write_store(fragment, path, z_range, tile_size, stride)
    except OSError as err:  # a full disk, no permission: the environment, not a bug (write_store removed its temp file)
        reason = os.strerror(err.errno) if err.errno else " ".join(str(err).split())
        raise StoreError(f"{path}: cannot write the store: {reason}") from None
    ink = "" if summary["ink_fraction"] is None else f", ink {summary['ink_fraction']:.1%} of mask"
    h, w = summary["shape"]
    return (f"{rebuilt}{name}: {h} x {w}, slices {z_range[0]}:{z_range[1]}, {summary['tiles']} tiles{ink}, "
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
    parser.add_argument("--verify", action="store_true",
                        help="also read every up-to-date store's whole volume against its checksums (rebuild bad ones)")
    parser.add_argument("--strict", action="store_true",
                        help="labels with no ink in the mask, or ink far outside it, are an error, not a warning")
    args = parser.parse_args(argv)
    ids = None if args.ids is None else set(args.ids.split(","))
    try:
        fragments, found = select_fragments(args.data, ids)
        for fragment in fragments:
            if not 0 <= args.z_range[0] < args.z_range[1] <= fragment.num_slices:
                raise FragmentError(f"{fragment.path}: --z-range {args.z_range[0]}:{args.z_range[1]} "
                                    f"is outside its {fragment.num_slices} slices")
        warnings = label_warnings(fragments, args.strict)
        print(found, flush=True)
        for line in warnings:
            print(line, file=sys.stderr, flush=True)
        for line in remove_stale_temps(args.out):
            print(line, flush=True)
        for fragment in fragments:  # each line as its store is done: a later failure loses none of them
            print(prepare_fragment(fragment, args.out, args.z_range, args.tile_size, args.stride, args.force,
                                   args.verify), flush=True)
    except (FragmentError, StoreError, LockedError) as err:
        sys.exit(f"error: {err}")
    write_manifest(args)


if __name__ == "__main__":
    main()
