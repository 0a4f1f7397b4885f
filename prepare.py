"""Turn Kaggle-layout fragments or scroll segments into HDF5 tile stores, streaming, in bounded memory.

In:  --data ROOT in the Kaggle layout (train/<id>/surface_volume/00.tif.., mask.png, inklabels.png, ir.png;
     test/<id>/...) or the segment layout (<id>/layers/00.tif.. or .jpg / .png, <id>/<id>_mask.png,
     <id>/<id>_inklabels.png), detected from the folder (or --layout); default: the synthetic dataset from
     `python -m lib.synth data/synth`.
Out: --out/<split>/<id>.h5, one store per fragment (format: lib/store.py), and a one-line summary each;
     --out/prepared.json, the manifest of the stores there (rewritten only when a store changed, so that the
     Makefile reruns the steps after this one only then).
     Zarr segments: --data SOURCE.zarr[,SOURCE.zarr..], each a (Z, H, W) zarr array or an OME-Zarr group (its
     full-resolution level), local or http(s)://, with <id>_mask.png and <id>_inklabels.png (or .tif / .zarr)
     beside it (lib/zarr_segment.py); read in bands of rows like TIFF layers.
     Segments have no split on disk: --train / --test name them (default: labelled ones train, the others test).

Depth (lib/depth.py, lib/surface.py): models see the recto surface at slice 32 with papyrus below and air above.
Which way each fragment's depth runs is decided from its own mean in-mask intensity along z (--reverse auto, the
default: flipped where the surface edge nearest the middle of the stack has air below it; kept as it is, with a
line saying so, where the evidence is weak); --reverse ID,.. and --no-reverse ID,.. decide for those fragments.
--z-range auto keeps the 16 slices centred on each fragment's own surface as slices 24:40, so models see every
surface at slice 32. Each store also holds each pixel's surface on a 4 px grid with a confidence; the share of
tiles too unsure to flatten onto it is printed per store.

Every fragment folder is validated before anything is written (one that cannot be read is an error, never
skipped); labels with no ink in the mask or ink far outside it are a warning (an error with --strict). A store
whose sources and settings are unchanged and whose checksums hold is skipped (--force rebuilds it; --verify also
reads its whole volume against the checksums); a corrupt one is rebuilt, and the run says so. A store is written
to a temporary name under a lock (a second run writing the same store stops with an error naming the first) and
renamed when complete; temporary files left by a killed run are removed by the next one.

    python prepare.py --data ROOT [--out data/prepared] [--ids 1,2,a] [--z-range 24:40] [--force] [--verify] [--strict]
    python prepare.py --data SEGMENTS [--train ID,ID --test ID] [--reverse auto|none|ID,..] [--no-reverse ID,..]
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from lib.depth import intensity_profile, kept_layers
from lib.fragments import LAYOUTS, FragmentError, check_labels, detect_layout, open_fragments, require_utf8
from lib.lock import LockedError, exclusive
from lib.outputs import OutputError, check_writable, write_atomically
from lib.store import DEFAULT_Z_RANGE, StoreError, check_store, fingerprint, store_matches, write_store
from lib.surface import fragment_surface, orientation
from lib.zarr_segment import is_zarr_source, open_zarr_segments


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


def decide_orientation(fragment, profile, reverse, keep):
    """(reverse?, how it was decided, the evidence's margin, a line to print) for one fragment: named in `reverse` or
    `keep` (the --reverse / --no-reverse ids; `reverse` None: --reverse none, nothing decided from the data), else
    from its mean intensity profile (lib.surface.orientation)."""
    name = f"{fragment.split}/{fragment.fragment_id}"
    if fragment.fragment_id in keep or (reverse is not None and fragment.fragment_id in reverse):
        flip = fragment.fragment_id not in keep
        return flip, "given", float("nan"), f"{name}: depth {'reversed' if flip else 'kept'} as given"
    if reverse is None:
        return False, "given", float("nan"), None
    found = orientation(profile)
    if not found.clear:
        return False, "kept", found.margin, (f"{name}: which way its depth runs is unclear ({found.describe()}); kept as "
                                             f"it is: give --reverse {fragment.fragment_id} or --no-reverse "
                                             f"{fragment.fragment_id} if you know")
    line = f"{name}: depth {found.describe()}" + ("; stored flipped" if found.reverse else "")
    return found.reverse, "auto", found.margin, line


def depth_window(fragment, z_range, reverse, keep):
    """(slices in the model frame, the source layer of each, the detected surface or None, attributes to record, a
    line to print or None) of one fragment."""
    where = fragment.layers_location
    if z_range != "auto" and not 0 <= z_range[0] < z_range[1] <= fragment.num_slices:
        raise FragmentError(f"{fragment.path}: --z-range {z_range[0]}:{z_range[1]} "
                            f"is outside its {fragment.num_slices} slices")
    needs_profile = z_range == "auto" or reverse is not None
    profile = intensity_profile(fragment) if needs_profile else None
    flip, decided, margin, line = decide_orientation(fragment, profile, reverse, keep)
    attrs = {"reversed": flip, "orientation": decided, "orientation_margin": margin}
    if z_range != "auto":
        return z_range, kept_layers(fragment.num_slices, z_range, flip), None, attrs, line
    stored = profile[::-1] if flip else profile
    surface, _ = fragment_surface(stored, (len(stored) - 1) / 2)
    if np.isnan(surface):
        other = f"--no-reverse {fragment.fragment_id}" if flip else f"--reverse {fragment.fragment_id}"
        raise FragmentError(f"{where}: no papyrus-to-air edge in its mean intensity along depth (papyrus below, air "
                            f"above{', after flipping it' if flip else ''}): if its depth runs the other way give "
                            f"{other}, else --z-range START:STOP")
    try:
        layers = kept_layers(fragment.num_slices, DEFAULT_Z_RANGE, flip, surface, where)
    except FragmentError as err:
        kept = DEFAULT_Z_RANGE[1] - DEFAULT_Z_RANGE[0]
        raise FragmentError(f"{err} (--z-range auto keeps {kept} layers centred on the surface; give --z-range "
                            f"START:STOP inside 0:{fragment.num_slices} to keep the layers there are)") from None
    return DEFAULT_Z_RANGE, layers, surface, attrs, line


def check_out(out, fragments, windows):
    """Before any store is written: --out is valid UTF-8 (HDF5 file names must be), accepts files, and has room
    for the new stores, about half their raw volume each (lossless compression; stores already there count 0)."""
    require_utf8(Path(out).absolute(), "--out")
    need = sum(len(window[1]) * fragment.shape[0] * fragment.shape[1] for fragment, window in zip(fragments, windows)
               if not (Path(out) / fragment.split / f"{fragment.fragment_id}.h5").exists())
    check_writable(out, need, "stores")


def prepare_fragment(fragment, out, window, tile_size, stride, force, verify):
    """Write (or skip) one store, holding its lock; returns its one-line summary (after a line saying why, when
    a corrupt store is rebuilt). `window` is depth_window's answer."""
    z_range, layers, surface, depth_attrs, _ = window
    path = Path(out) / fragment.split / f"{fragment.fragment_id}.h5"
    name = f"{fragment.split}/{fragment.fragment_id}"
    sources = fingerprint(fragment.source_files())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(path, "prepare"):
            rebuilt = ""
            if not force:
                try:
                    if store_matches(path, sources, z_range, tile_size, stride, layers):
                        if not verify:
                            return f"{name}: up to date, skipped ({path})"
                        check_store(path, full=True)
                        return f"{name}: up to date, volume checksums verified, skipped ({path})"
                except StoreError as err:
                    rebuilt = f"{name}: {err}: rebuilding\n"
            started = time.time()
            attrs = {**depth_attrs, "surface": float("nan") if surface is None else surface}
            summary = write_store(fragment, path, z_range, tile_size, stride, layers=layers, attrs=attrs)
    except OSError as err:  # a full disk, no permission: the environment, not a bug (write_store removed its temp file)
        reason = os.strerror(err.errno) if err.errno else " ".join(str(err).split())
        raise StoreError(f"{path}: cannot write the store: {reason}") from None
    ink = "" if summary["ink_fraction"] is None else f", ink {summary['ink_fraction']:.1%} of mask"
    h, w = summary["shape"]
    source = "" if layers == list(range(*z_range)) else f" from layers {layers[0]}..{layers[-1]}"
    source += "" if surface is None else f" (surface at {surface:.1f})"
    unsure = summary["low_confidence_share"]
    flat = (f", surface found on {1 - unsure:.0%} of tiles" if unsure < 0.2 else
            f"; surface not found on {unsure:.0%} of tiles: those are read at the fragment's surface (slice "
            f"{summary['fragment_surface']:.1f}) instead of their own")
    return (f"{rebuilt}{name}: {h} x {w}, slices {z_range[0]}:{z_range[1]}{source}, {summary['tiles']} tiles{ink}"
            f"{flat}, {summary['bytes'] / 2**20:.1f} MiB, {time.time() - started:.1f} s -> {path}")


def write_manifest(args):
    """OUT/prepared.json: the dataset and settings of the last run, and every store in OUT with its size and
    mtime; written only when that differs from the file there."""
    out = Path(args.out)
    stores = {str(p.relative_to(out)): [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(out.glob("*/*.h5"))}
    z_range = list(args.z_range) if isinstance(args.z_range, tuple) else args.z_range  # as JSON reads it back
    data = args.data if "://" in args.data else os.path.abspath(args.data)
    manifest = {"data": data, "z_range": z_range, "tile_size": args.tile_size,
                "stride": args.stride, "stores": stores}
    path = out / "prepared.json"
    try:
        if json.loads(path.read_text()) == manifest:
            return
    except (OSError, ValueError):
        pass
    write_atomically(path, lambda file: file.write(json.dumps(manifest, indent=2) + "\n"))


def open_inputs(args, ids):
    """(layout, fragments, a line saying what was found) of --data: a dataset root, or zarr segments."""
    if is_zarr_source(args.data.split(",")[0]):
        segments = open_zarr_segments([s for s in args.data.split(",") if s], parse_ids(args.train),
                                      parse_ids(args.test))
        fragments = [s for s in segments if ids is None or s.fragment_id in ids]
        return "segments", fragments, f"{len(segments)} zarr segments; preparing {len(fragments)}"
    layout = detect_layout(args.data) if args.layout == "auto" else args.layout
    if layout == "kaggle" and (args.train is not None or args.test is not None):
        raise FragmentError(f"{args.data}: --train / --test choose the roles of segments; the Kaggle "
                            f"layout's roles are its train/ and test/ folders")
    fragments, found = open_fragments(args.data, layout, ids, parse_ids(args.train), parse_ids(args.test))
    return layout, fragments, found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/synth", help="dataset root in the Kaggle or the segment layout, "
                        "or zarr segments: SOURCE.zarr[,SOURCE.zarr..], local or http(s)://")
    parser.add_argument("--out", default="data/prepared", help="folder for the stores")
    parser.add_argument("--layout", choices=("auto",) + LAYOUTS, default="auto",
                        help="dataset layout (default: detected: train/ or test/ folders mean kaggle, "
                             "<id>/layers/ folders segments)")
    parser.add_argument("--ids", default=None, help="comma-separated fragment ids (default: all)")
    parser.add_argument("--train", help="segments: comma-separated ids to prepare as train stores (they need "
                        "<id>_inklabels.png); default: every labelled segment, unless --test is given")
    parser.add_argument("--test", help="segments: comma-separated ids to prepare as test stores (to predict); "
                        "default: every unlabelled segment, unless --train is given")
    parser.add_argument("--reverse", default="auto", help="which fragments' depth runs the other way (recto surface "
                        "facing the high layer numbers), stored with z flipped: auto (decided from each fragment's "
                        "mean intensity along depth), none, or comma-separated ids (the others: auto); default %(default)s")
    parser.add_argument("--no-reverse", default="", help="comma-separated ids never flipped, whatever auto finds")
    parser.add_argument("--z-range", type=parse_z_range, default=None,
                        help="slices to keep, START:STOP (0:65 keeps all), or auto: the 16 centred on each "
                             "fragment's surface, stored as 24:40 (default: 24:40 for the Kaggle layout, "
                             "auto for segments)")
    parser.add_argument("--tile-size", type=int, default=224)
    parser.add_argument("--stride", type=int, default=56)
    parser.add_argument("--force", action="store_true", help="rebuild stores even when up to date")
    parser.add_argument("--verify", action="store_true",
                        help="also read every up-to-date store's whole volume against its checksums (rebuild bad ones)")
    parser.add_argument("--strict", action="store_true",
                        help="labels with no ink in the mask, or ink far outside it, are an error, not a warning")
    args = parser.parse_args(argv)
    ids, keep = parse_ids(args.ids), set(parse_ids(args.no_reverse))
    reverse = None if args.reverse == "none" else set() if args.reverse == "auto" else set(parse_ids(args.reverse))
    try:
        layout, fragments, found = open_inputs(args, ids)
        for flag, named in (("--reverse", reverse or set()), ("--no-reverse", keep)):
            unknown = named - {f.fragment_id for f in fragments}
            if unknown:
                raise FragmentError(f"{args.data}: {flag} names {', '.join(sorted(unknown))}, "
                                    f"not among the fragments prepared")
        both = (reverse or set()) & keep
        if both:
            raise FragmentError(f"{args.data}: --reverse and --no-reverse both name {', '.join(sorted(both))}")
        z_range = args.z_range or (DEFAULT_Z_RANGE if layout == "kaggle" else "auto")
        windows = [depth_window(f, z_range, reverse, keep) for f in fragments]
        check_out(args.out, fragments, windows)
        warnings = [w for fragment in fragments for w in check_labels(fragment, args.strict)[1]]
        print(found, flush=True)
        for window in windows:
            if window[-1]:
                print(window[-1], flush=True)
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        for line in remove_stale_temps(args.out):
            print(line, flush=True)
        for fragment, window in zip(fragments, windows):  # each line as its store is done: a later failure loses none
            print(prepare_fragment(fragment, args.out, window, args.tile_size, args.stride, args.force, args.verify),
                  flush=True)
    except (FragmentError, StoreError, LockedError, OutputError) as err:
        sys.exit(f"error: {err}")
    write_manifest(args)


if __name__ == "__main__":
    main()
