"""Synthetic fragments in the Kaggle or the segment layout, so the pipeline runs and can be scored without real data.

    python -m lib.synth OUT [--size 640] [--seed 0] [--difficulty easy|medium|hard|0..1] [--layout kaggle|segments]
                            [--geometry thick|thin|neighbours|tilted] [--reversed]

writes OUT/train/{1,2,3}, OUT/test/{a,b} (65 uint16 TIFF slices, mask.png; inklabels.png and ir.png
for train), OUT/sample_submission.csv, and the test labels apart in OUT/_truth/<id>_inklabels.png.
With --layout segments the same pixels go to OUT/<id>/layers/00.tif.., <id>_mask.png, <id>_inklabels.png
(train ids only; no IR, no sample submission), except that segment b is stored with its depth reversed
(layer 64 - z holds slice z: prepare it with --reverse b) and segment a as 8-bit JPEG layers (slice >> 8).

The physics, in brief: a papyrus sheet fills the slices below a surface whose depth wanders smoothly
around slice 32; its top layer has horizontal fibres, the layer below vertical ones; density varies
slowly across the sheet; the scanner adds noise; dense specks (minerals) sit at random depths. Ink is
rows of letters adding a patchy density excess in the few slices at the surface. The wandering
surface and the density variation swamp it in any average over slices (a threshold on the smoothed
centre slices scores no better than calling everything ink); a model must find the thin strokes at
the right depth. ir.png shows the ink plainly, like the real infrared photo; the labels are drawn
from it with a hand's errors (a little wide, shifted a pixel or two, faint letters missed).

--difficulty sets how hidden the ink is, from 0 ("easy": the strongest letters can be made out in one
contrast-stretched slice where the surface crosses it) to 1 ("hard": a full-strength letter's density
excess equals the per-voxel noise, most letters are fainter, so no single raw slice shows them; the
surface sits up to +-4 slices off 32). Between them the ink's excess falls as (noise / easy excess) ** d**2
(at 0.5, "medium", about half the easy strength), and each
fragment draws its own surface offset, letter height and stroke width from ranges that widen with the
difficulty (at 1: letters 20-80 px tall, strokes 2-8 px). Level 0 is the generator as it was before
the knob existed, byte for byte.

--geometry sets the sheet around the inked (recto) surface, since real scans differ exactly there:
"thick" (default, the generator as it was): papyrus fills every slice below the surface, clean air above, as in
the Kaggle fragments; "thin": one sheet 5-9 slices thick with air on both sides, as in a scroll segment;
"neighbours": that sheet with the neighbouring wraps of a scroll 2-5 slices below it everywhere and above it in
places, and air that is not clean (faint debris); "tilted": the thick body whose surface wanders on a short scale,
so that it tilts by slices within a 64 px tile. --reversed stores every fragment with its depth reversed (layer
N-1-z holds slice z: the recto faces the low layer numbers), in either layout.
Fragments are generated slice by slice from 2-D fields, so memory is a few (H, W) float arrays.
"""
import argparse
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile
from tqdm import tqdm

TRAIN_IDS = ("1", "2", "3")
TEST_IDS = ("a", "b")
NUM_SLICES = 65
SURFACE_SLICE = 32
SAMPLE_SUBMISSION = "Id,Predicted\na,1 1 5 1\nb,10 20\n"  # the Kaggle file, verbatim
REVERSED_SEGMENT = "b"  # segment layout: stored with z reversed
EIGHT_BIT_SEGMENT = "a"  # segment layout: 8-bit JPEG layers
JPEG_QUALITY = 95

PAPYRUS_LEVEL = 20000.0  # uint16 grey value of dense papyrus
AIR_LEVEL = 1500.0  # the air above the sheet is not quite black in CT
NOISE_STD = 0.04  # sensor noise, relative to PAPYRUS_LEVEL, per voxel
FIBRE_STD = 0.06  # fibre texture amplitude
DENSITY_STD = 0.12  # slow density variation across the sheet
DEPTH_STD = 1.6  # slices: how far the surface wanders around SURFACE_SLICE
INK_EXCESS = 0.5  # peak ink density excess of a full-strength letter (most are fainter and patchy)
INK_HEIGHT = 0.5  # ink sits on the papyrus surface ...
INK_SPREAD = 2.0  # ... spread over about this many slices (it soaks into the rough surface)
FAINT_LETTER = 0.45  # letters fainter than this are missed by the labeller
MAX_WANDER = 4.0  # slices: the surface never sits further than this from SURFACE_SLICE
LEVELS = {"easy": 0.0, "medium": 0.5, "hard": 1.0}  # named difficulties
DEFAULT_DIFFICULTY = "medium"
HARD_OFFSET = 2.5  # slices: at difficulty 1 a fragment's whole surface sits up to this far off SURFACE_SLICE
HARD_LETTER_HEIGHTS = (20, 80)  # px, the range letter heights are drawn from at difficulty 1 ...
HARD_STROKES = (2, 8)  # ... and stroke widths (px)
GEOMETRIES = ("thick", "thin", "neighbours", "tilted")
DEFAULT_GEOMETRY = "thick"
SHEET_THICKNESS = (5, 9)  # slices: a thin sheet's thickness is drawn from this range per fragment
NEIGHBOUR_GAPS = (2, 5)  # slices of air between the sheet and its neighbouring wraps
NEIGHBOUR_ABOVE_SHARE = 0.4  # about this share of a fragment has a neighbouring wrap above the inked surface
DEBRIS_LEVEL = 0.12  # "unclean air": debris up to this density (relative to papyrus) floats in the air
TILT_STD = 2.5  # slices: how far a tilted surface wanders ...
TILT_PX = 80  # ... on features about this many pixels across (a 64 px tile spans slices)


def parse_difficulty(value):
    """A level name or a number in [0, 1] -> float; ValueError otherwise."""
    difficulty = LEVELS[value] if value in LEVELS else float(value)
    if not 0 <= difficulty <= 1:
        raise ValueError(f"difficulty {value!r} is outside 0..1")
    return difficulty


@dataclass(frozen=True)
class FragmentLevel:
    """What the difficulty sets for one fragment (its own draw within the level's ranges)."""

    ink_excess: float  # density excess of a full-strength letter, relative to PAPYRUS_LEVEL
    depth_offset: float  # slices: where the fragment's surface sits on average, relative to SURFACE_SLICE
    letter_height: int  # px
    stroke_width: int  # px

    @classmethod
    def draw(cls, difficulty, rng, shape):
        """This fragment's level. At difficulty 0 it is the fixed recipe of the original generator (and draws
        nothing from `rng`'s stream that matters: it is a separate generator)."""
        d = difficulty
        base_height = max(8, shape[0] // 16)
        base_stroke = max(2, base_height // 6)
        lerp = lambda a, b: a + (b - a) * d  # noqa: E731
        # the ink fades slowly at first, then fast: half of the easy level's strength at 0.5, the noise at 1
        excess = INK_EXCESS ** (1 - d * d) * NOISE_STD ** (d * d) * rng.uniform(1 - 0.2 * d, 1)
        height = round(rng.uniform(lerp(base_height, HARD_LETTER_HEIGHTS[0]), lerp(base_height, HARD_LETTER_HEIGHTS[1])))
        stroke = round(rng.uniform(lerp(base_stroke, HARD_STROKES[0]), lerp(base_stroke, HARD_STROKES[1])))
        return cls(ink_excess=float(excess), depth_offset=float(rng.uniform(-1, 1) * HARD_OFFSET * d),
                   letter_height=int(height), stroke_width=int(max(2, min(stroke, height // 3))))


def smooth_noise(rng, shape, scale_y, scale_x=None):
    """Zero-mean, unit-std noise whose features are about scale_y x scale_x pixels."""
    scale_x = scale_y if scale_x is None else scale_x
    h, w = shape
    small = rng.standard_normal((max(2, round(h / scale_y)) + 2, max(2, round(w / scale_x)) + 2)).astype(np.float32)
    big = cv2.resize(small, (w + 2 * round(scale_x), h + 2 * round(scale_y)), interpolation=cv2.INTER_CUBIC)
    field = big[round(scale_y): round(scale_y) + h, round(scale_x): round(scale_x) + w]
    return (field - field.mean()) / (field.std() + 1e-6)


def fragment_mask(rng, shape):
    """An irregular papyrus outline with a few holes: the largest blob of a noisy ellipse."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ellipse = ((yy - h / 2) / (0.47 * h)) ** 2 + ((xx - w / 2) / (0.47 * w)) ** 2
    blob = (1 - ellipse) + 0.25 * smooth_noise(rng, shape, h / 5) > 0.2
    holes = smooth_noise(rng, shape, min(h, w) / 25) > 2.3
    mask = (blob & ~holes).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=4)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return (labels == largest).astype(np.uint8)


def letter_strengths(rng, shape, letter_height, thickness):
    """Rows of letters; each pixel holds the strength (0..1) of the letter drawn there."""
    h, w = shape
    canvas = np.zeros(shape, np.uint8)
    font = cv2.FONT_HERSHEY_DUPLEX
    scale = letter_height / cv2.getTextSize("H", font, 1.0, 1)[0][1]
    y = int(letter_height * 1.4)
    while y < h - letter_height * 0.2:
        x = int(rng.uniform(0.02, 0.08) * w)
        while x < w:
            letter = chr(ord("A") + int(rng.integers(26)))
            strength = rng.uniform(0.3, 1.0)
            cv2.putText(canvas, letter, (x, y + int(rng.integers(-2, 3))), font, scale, int(strength * 255), thickness,
                        cv2.LINE_AA)
            step = cv2.getTextSize(letter, font, scale, thickness)[0][0]
            x += int(step * rng.uniform(1.05, 1.3)) + (step if rng.random() < 0.15 else 0)  # word gaps
        y += int(letter_height * rng.uniform(1.6, 1.9))
    return canvas.astype(np.float32) / 255


def hand_labels(rng, strengths, mask):
    """What a labeller draws on the IR photo: strokes a little wide, a pixel or two off, faint letters missed."""
    seen = (strengths >= FAINT_LETTER).astype(np.uint8)
    seen = cv2.dilate(seen, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    dy, dx = (int(v) for v in rng.integers(-2, 3, size=2))
    return np.roll(seen, (dy, dx), axis=(0, 1)) * mask


class SheetGeometry:
    """Where papyrus lies around the inked surface (GEOMETRIES), drawn from its own generator so that "thick" leaves
    the fragment's random stream as it was. `papyrus(height)` is the papyrus share at `height` slices above the
    surface (> 0: towards air), `air(z)` the debris in the air."""

    def __init__(self, name, rng, shape):
        if name not in GEOMETRIES:
            raise ValueError(f"geometry {name!r} is not one of {', '.join(GEOMETRIES)}")
        self.name = name
        h, w = shape
        self.thickness = float(rng.uniform(*SHEET_THICKNESS))
        self.gap_below, self.gap_above = (float(g) for g in rng.uniform(*NEIGHBOUR_GAPS, size=2))
        self.above = (smooth_noise(rng, shape, min(h, w) / 4) > 0.25).astype(np.float32)  # ~40 % of the area
        self.above = cv2.GaussianBlur(self.above, (0, 0), 4)
        self.debris = np.abs(smooth_noise(rng, shape, 6)) * DEBRIS_LEVEL / 3
        self.debris_depth = rng.uniform(0, NUM_SLICES, size=shape).astype(np.float32)
        self.tilt = TILT_STD * smooth_noise(rng, shape, TILT_PX)

    def papyrus(self, height):
        below = edge(-height)  # everything below the surface: the thick body
        if self.name in ("thick", "tilted"):
            return below
        sheet = below * edge(height + self.thickness)
        if self.name == "thin":
            return sheet
        wrap_below = edge(-(height + self.thickness + self.gap_below))
        wrap_above = self.above * edge(height - self.gap_above) * edge(-(height - self.gap_above - self.thickness))
        return sheet + wrap_below * edge(height + 2 * self.thickness + self.gap_below) + wrap_above

    def air(self, z):
        if self.name != "neighbours":
            return 0.0
        return self.debris * np.exp(-(((z - self.debris_depth) / 6.0) ** 2))


def edge(distance):
    """Papyrus share at `distance` slices inside an edge of the sheet (the scan blurs it over about a slice)."""
    return 1 / (1 + np.exp(-distance / 0.7))


class FragmentFields:
    """The 2-D fields one fragment's slices are computed from (`level`: FragmentLevel; default difficulty 0;
    `geometry`: a SheetGeometry, default thick)."""

    def __init__(self, rng, shape, level=None, geometry=None):
        h, w = shape
        level = level or FragmentLevel.draw(0.0, np.random.default_rng(0), shape)
        self.shape = shape
        self.level = level
        self.geometry = geometry or SheetGeometry(DEFAULT_GEOMETRY, np.random.default_rng(0), shape)
        self.mask = fragment_mask(rng, shape)
        wander = level.depth_offset + DEPTH_STD * smooth_noise(rng, shape, min(h, w) / 3)
        if self.geometry.name == "tilted":
            wander = wander + self.geometry.tilt
        self.depth = SURFACE_SLICE + np.clip(wander, -MAX_WANDER, MAX_WANDER)
        self.density = 1 + DENSITY_STD * smooth_noise(rng, shape, min(h, w) / 3)
        self.fibres_top = FIBRE_STD * smooth_noise(rng, shape, 1.5, 40)  # horizontal streaks
        self.fibres_below = FIBRE_STD * smooth_noise(rng, shape, 40, 1.5)  # vertical streaks
        self.strengths = letter_strengths(rng, shape, level.letter_height, level.stroke_width)
        patches = np.clip(0.75 + 0.25 * smooth_noise(rng, shape, h / 40), 0.3, 1.0)
        self.ink = level.ink_excess * cv2.GaussianBlur(self.strengths, (0, 0), 0.8) * patches
        specks = (rng.random(shape) < 3e-4).astype(np.float32)
        self.specks = cv2.dilate(specks, np.ones((3, 3), np.uint8)) * rng.uniform(0.3, 0.8)
        self.speck_depth = SURFACE_SLICE + rng.uniform(-12, 4, size=shape).astype(np.float32)
        self.labels = hand_labels(rng, self.strengths, self.mask)
        self.ir = self._infrared(rng)

    def _infrared(self, rng):
        """Reflectance photo: bright, mildly textured papyrus; every letter dark, faint ones less so; black background."""
        papyrus = 170 + 80 * (self.density - 1) + 60 * self.fibres_top + 4 * rng.standard_normal(self.shape)
        ink = cv2.GaussianBlur(self.strengths, (0, 0), 0.8)
        return (np.clip(papyrus - 120 * ink, 0, 255) * self.mask).astype(np.uint8)

    def slice(self, rng, z):
        """Slice z as uint16: papyrus below the surface, ink at it, noise everywhere, 0 outside the mask."""
        height = z - self.depth  # > 0 above the surface (air), < 0 inside the sheet
        papyrus = self.geometry.papyrus(height)
        top_layer = 1 / (1 + np.exp(-(height + 5)))
        texture = top_layer * self.fibres_top + (1 - top_layer) * self.fibres_below
        ink = self.ink * np.exp(-(((height - INK_HEIGHT) / INK_SPREAD) ** 2))
        specks = self.specks * np.exp(-(((z - self.speck_depth) / 1.5) ** 2))
        relative = papyrus * (self.density + texture) + ink + specks + self.geometry.air(z)
        relative += NOISE_STD * rng.standard_normal(self.shape, dtype=np.float32)
        volume = AIR_LEVEL + (PAPYRUS_LEVEL - AIR_LEVEL) * relative
        return (np.clip(volume, 1, 65535) * self.mask).astype(np.uint16)


def fragment_shape(rng, size):
    """Sizes vary per fragment around `size`, as real fragments do."""
    return int(size * rng.uniform(0.85, 1.2)), int(size * rng.uniform(0.7, 1.05))


def generate_slices(folder, fields, rng, num_slices, progress):
    """(z, file name stem, slice) for z = 0.. in order (the order the random stream is drawn in)."""
    digits = max(2, len(str(num_slices - 1)))
    for z in tqdm(range(num_slices), desc=f"synth {Path(folder).name}", unit="slice", disable=not progress, leave=False):
        yield z, f"{z:0{digits}d}", fields.slice(rng, z)


def layer_name(z, stem, num_slices, reverse):
    """The file name stem of slice z: its own number, or num_slices - 1 - z when the depth is stored `reverse`d."""
    return f"{num_slices - 1 - z:0{len(stem)}d}" if reverse else stem


def write_fragment(folder, fields, rng, num_slices, with_labels, reverse=False, progress=True):
    volume_dir = Path(folder) / "surface_volume"
    volume_dir.mkdir(parents=True)
    for z, stem, pixels in generate_slices(folder, fields, rng, num_slices, progress):
        tifffile.imwrite(volume_dir / f"{layer_name(z, stem, num_slices, reverse)}.tif", pixels)
    cv2.imwrite(str(Path(folder) / "mask.png"), fields.mask * 255)
    if with_labels:
        cv2.imwrite(str(Path(folder) / "inklabels.png"), fields.labels * 255)
        cv2.imwrite(str(Path(folder) / "ir.png"), fields.ir)


def write_segment(folder, fields, rng, num_slices, with_labels, reverse=False, eight_bit=False, progress=True):
    """The same slices as write_fragment, in the segment layout: layer z (or num_slices - 1 - z when `reverse`)
    holds slice z, as uint16 TIFF or (`eight_bit`) as the 8-bit JPEG of slice >> 8."""
    folder = Path(folder)
    layers_dir = folder / "layers"
    layers_dir.mkdir(parents=True)
    for z, stem, pixels in generate_slices(folder, fields, rng, num_slices, progress):
        layer = layer_name(z, stem, num_slices, reverse)
        if eight_bit:
            cv2.imwrite(str(layers_dir / f"{layer}.jpg"), (pixels >> 8).astype(np.uint8),
                        [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        else:
            tifffile.imwrite(layers_dir / f"{layer}.tif", pixels)
    cv2.imwrite(str(folder / f"{folder.name}_mask.png"), fields.mask * 255)
    if with_labels:
        cv2.imwrite(str(folder / f"{folder.name}_inklabels.png"), fields.labels * 255)


# What a dataset made before an entry of the recipe existed had for it.
RECIPE_DEFAULTS = {"layout": "kaggle", "geometry": DEFAULT_GEOMETRY, "reversed_depth": False}


def recipe(size, seed, num_slices, difficulty, layout="kaggle", geometry=DEFAULT_GEOMETRY, reversed_depth=False):
    """What synth.json records and what a rerun must match."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry {geometry!r} is not one of {', '.join(GEOMETRIES)}")
    return {"size": size, "seed": seed, "num_slices": num_slices, "difficulty": parse_difficulty(difficulty),
            "layout": layout, "geometry": geometry, "reversed_depth": bool(reversed_depth)}


def generate(out, size=640, seed=0, num_slices=NUM_SLICES, progress=True, difficulty=DEFAULT_DIFFICULTY,
             layout="kaggle", geometry=DEFAULT_GEOMETRY, reversed_depth=False):
    """Write a whole synthetic dataset to `out` (created atomically: built beside it, then renamed)."""
    out = Path(out)
    settings = recipe(size, seed, num_slices, difficulty, layout, geometry, reversed_depth)
    if out.exists():
        raise FileExistsError(f"{out}: already exists; not overwriting")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # leftovers of an interrupted run, never a finished dataset
    (partial / "_truth").mkdir(parents=True)
    levels = {}
    for index, fragment_id in enumerate(TRAIN_IDS + TEST_IDS):
        rng = np.random.default_rng([seed, index])
        shape = fragment_shape(rng, size)
        # the level's draws come from their own generator, so difficulty 0 leaves `rng`'s stream as it was
        level = FragmentLevel.draw(settings["difficulty"], np.random.default_rng([seed, index, 1]), shape)
        levels[fragment_id] = asdict(level)
        sheet = SheetGeometry(geometry, np.random.default_rng([seed, index, 2]), shape)
        fields = FragmentFields(rng, shape, level, sheet)
        split = "train" if fragment_id in TRAIN_IDS else "test"
        reverse = reversed_depth or (layout == "segments" and fragment_id == REVERSED_SEGMENT)
        if layout == "segments":
            write_segment(partial / fragment_id, fields, rng, num_slices, split == "train",
                          reverse, fragment_id == EIGHT_BIT_SEGMENT, progress)
        else:
            write_fragment(partial / split / fragment_id, fields, rng, num_slices, split == "train", reverse, progress)
        if split == "test":
            cv2.imwrite(str(partial / "_truth" / f"{fragment_id}_inklabels.png"), fields.labels * 255)
    if layout == "segments":
        settings.update(reversed=list(TRAIN_IDS + TEST_IDS) if reversed_depth else [REVERSED_SEGMENT],
                        eight_bit_jpeg=[EIGHT_BIT_SEGMENT])
    else:
        (partial / "sample_submission.csv").write_text(SAMPLE_SUBMISSION)
    (partial / "_truth" / "synth.json").write_text(json.dumps({**settings, "fragments": levels}) + "\n")
    os.replace(partial, out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="dataset root to create")
    parser.add_argument("--size", type=int, default=640, help="typical fragment side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-slices", type=int, default=NUM_SLICES)
    parser.add_argument("--difficulty", default=DEFAULT_DIFFICULTY,
                        help=f"how hidden the ink is: {', '.join(LEVELS)} or a number in 0..1 (default {DEFAULT_DIFFICULTY})")
    parser.add_argument("--layout", choices=("kaggle", "segments"), default="kaggle",
                        help="segments: <id>/layers/.., with segment b reversed in depth and a as 8-bit JPEG")
    parser.add_argument("--geometry", choices=GEOMETRIES, default=DEFAULT_GEOMETRY,
                        help="the sheet around the inked surface (see above; default %(default)s)")
    parser.add_argument("--reversed", action="store_true",
                        help="store every fragment with its depth reversed (the recto faces the low layer numbers)")
    args = parser.parse_args(argv)
    try:
        wanted = recipe(args.size, args.seed, args.num_slices, args.difficulty, args.layout, args.geometry,
                        args.reversed)
    except ValueError as err:
        raise SystemExit(f"error: --difficulty: {err}")
    recipe_path = Path(args.out) / "_truth" / "synth.json"
    if recipe_path.is_file():
        try:
            found = {**RECIPE_DEFAULTS, **{k: v for k, v in json.loads(recipe_path.read_text()).items() if k in wanted}}
        except ValueError:
            found = None
        if found != wanted:
            raise SystemExit(f"error: {recipe_path}: the dataset there was made with {found}, not {wanted}; "
                             f"remove {args.out} (make clean-data) or choose another folder")
        print(f"{args.out}: synthetic dataset already there ({wanted}); leaving it as it is")
        return
    try:
        generate(args.out, args.size, args.seed, args.num_slices, difficulty=args.difficulty, layout=args.layout,
                 geometry=args.geometry, reversed_depth=args.reversed)
    except FileExistsError as err:
        raise SystemExit(f"error: {err}")
    print(f"wrote synthetic dataset to {args.out} (difficulty {wanted['difficulty']:g}, geometry {args.geometry}"
          f"{', depth reversed' if args.reversed else ''})")


if __name__ == "__main__":
    main()
