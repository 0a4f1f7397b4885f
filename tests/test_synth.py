"""lib.synth: layout, determinism, physics (wandering surface), the key property (ink is in the volume but a naive
per-pixel threshold cannot find it), cost (time and memory at 1024 px), and the CLI."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

import lib.synth as synth
from lib.fragments import Fragment, list_fragments

REPO = Path(__file__).resolve().parents[1]
CENTRE = range(28, 36)  # the surface slices a naive model averages
DEPTH_RANGE = range(20, 45)  # deep enough to be papyrus everywhere, high enough to be air everywhere
ABOVE_SURFACE = 1.0  # ink sits just above the papyrus surface; here most of the papyrus texture has faded out


def read_png(path):
    return np.asarray(Image.open(path))


def f05(pred, truth):
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    tp = np.count_nonzero(pred & truth)
    fp = np.count_nonzero(pred & ~truth)
    fn = np.count_nonzero(~pred & truth)
    return 0.0 if tp == 0 else 1.25 * tp / (1.25 * tp + 0.25 * fn + fp)


def all_ink_f05(truth_in_mask):
    """F0.5 of predicting ink everywhere on the papyrus: what a detector with no skill at all gets."""
    return f05(np.ones_like(truth_in_mask, bool), truth_in_mask)


def fit_threshold(features, masks, labels):
    """Threshold and sign (ink brighter or darker) maximising F0.5 over the in-mask pixels of all fragments."""
    values = np.concatenate([f[m] for f, m in zip(features, masks)])
    truth = np.concatenate([label[m] for label, m in zip(labels, masks)])
    best = (-1.0, 0.0, 1)
    for threshold in np.percentile(values, np.linspace(1, 99, 99)):
        for sign in (1, -1):
            score = f05(sign * values > sign * threshold, truth)
            if score > best[0]:
                best = (score, threshold, sign)
    return best


def masked_blur(image, sigma, mask):
    """Gaussian blur that only averages papyrus pixels."""
    maskf = mask.astype(np.float32)
    return cv2.GaussianBlur(image * maskf, (0, 0), sigma) / np.maximum(cv2.GaussianBlur(maskf, (0, 0), sigma), 1e-3)


# ---------------------------------------------------------------- layout and basic properties


def test_layout(synth_root):
    root = Path(synth_root)
    assert list_fragments(root, "train") == ["1", "2", "3"] and list_fragments(root, "test") == ["a", "b"]
    names = [f"{z:02d}.tif" for z in range(65)]
    for fid in ("1", "2", "3"):
        folder = root / "train" / fid
        assert sorted(p.name for p in (folder / "surface_volume").iterdir()) == names
        assert sorted(p.name for p in folder.iterdir()) == ["inklabels.png", "ir.png", "mask.png", "surface_volume"]
    for fid in ("a", "b"):
        folder = root / "test" / fid
        assert sorted(p.name for p in (folder / "surface_volume").iterdir()) == names
        assert sorted(p.name for p in folder.iterdir()) == ["mask.png", "surface_volume"]
        truth = read_png(root / "_truth" / f"{fid}_inklabels.png")
        mask = read_png(folder / "mask.png")
        assert truth.shape == mask.shape and truth.any() and not truth[mask == 0].any()
    assert (root / "sample_submission.csv").read_text() == "Id,Predicted\na,1 1 5 1\nb,10 20\n"
    recipe = json.loads((root / "_truth" / "synth.json").read_text())
    assert {k: v for k, v in recipe.items() if k != "fragments"} == {"size": 256, "seed": 0, "num_slices": 65, "difficulty": 0.0,
                                                                       "layout": "kaggle", "geometry": "thick",
                                                                       "reversed_depth": False}
    assert sorted(recipe["fragments"]) == ["1", "2", "3", "a", "b"]
    assert not (root.parent / (root.name + ".partial")).exists()


def test_slices_are_uint16_papyrus_below_air_above_zero_outside(synth_root):
    shapes = []
    for split, ids in (("train", "123"), ("test", "ab")):
        for fid in ids:
            fragment = Fragment.open(synth_root, split, fid).validate()
            mask = fragment.read_mask().astype(bool)
            shapes.append(fragment.shape)
            assert 0.7 * 256 <= min(fragment.shape) and max(fragment.shape) <= 1.2 * 256
            assert 0.2 < mask.mean() < 0.9
            for z in (0, 20, 32, 45, 64):
                pixels = fragment.read_band(z, 0, fragment.shape[0])
                assert pixels.dtype == np.uint16 and pixels.shape == mask.shape
                assert not pixels[~mask].any(), f"{split}/{fid} slice {z}: nonzero outside the mask"
                assert pixels[mask].min() >= 1
            deep, air = (np.median(fragment.read_band(z, 0, fragment.shape[0])[mask]) for z in (0, 64))
            assert 15000 < deep < 25000 and 500 < air < 3000, (deep, air)
            if split == "train":
                labels, ir = fragment.read_labels(), read_png(fragment.path / "ir.png")
                assert ir.dtype == np.uint8 and ir.shape == mask.shape and not ir[~mask].any()
                assert labels.shape == mask.shape and not labels[~mask].any()
    assert len(set(shapes)) == 5, shapes


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    one = synth.generate(tmp_path / "one", size=96, seed=3, num_slices=8, progress=False)
    two = synth.generate(tmp_path / "two", size=96, seed=3, num_slices=8, progress=False)
    other = synth.generate(tmp_path / "other", size=96, seed=4, num_slices=8, progress=False)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert len(files) == 5 * 9 + 3 * 2 + 2 + 2  # slices + masks, train labels and IR, truth x2, csv + recipe
    assert sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file()) == files
    for rel in files:
        if rel.name != "synth.json":
            assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel
    for rel in ("train/1/surface_volume/05.tif", "train/2/inklabels.png", "test/a/mask.png"):
        assert (one / rel).read_bytes() != (other / rel).read_bytes(), rel
    slice_3 = "test/b/surface_volume/03.tif"
    assert not np.array_equal(tifffile.imread(one / slice_3), tifffile.imread(other / slice_3))


# ---------------------------------------------------------------- the key property: ink is there, but hidden


@pytest.fixture(scope="module")
def root384(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("synth384") / "synth", size=384, seed=0, progress=False,
                          difficulty="easy")


def fragment_features(root, split, fid):
    """Per fragment: mask, ink truth, the naive centre-mean feature, the surface depth and the slice just above it."""
    fragment = Fragment.open(root, split, fid)
    mask = fragment.read_mask().astype(bool)
    truth = fragment.read_labels() if split == "train" else read_png(Path(root) / "_truth" / f"{fid}_inklabels.png")
    centre = np.mean([fragment.read_band(z, 0, fragment.shape[0]).astype(np.float32) for z in CENTRE], axis=0)
    volume = np.stack([fragment.read_band(z, 0, fragment.shape[0]).astype(np.float32) for z in DEPTH_RANGE])
    smooth = np.stack([masked_blur(v, 8, mask) for v in volume])
    papyrus_fraction = np.clip((smooth - smooth[-1]) / (smooth[0] - smooth[-1] + 1e-3), 0, 1)
    depth = DEPTH_RANGE.start + papyrus_fraction.sum(axis=0) - 0.5  # where the (smoothed) papyrus ends
    z = np.clip(depth + ABOVE_SURFACE - DEPTH_RANGE.start, 0, len(DEPTH_RANGE) - 1.001)
    z0 = np.floor(z).astype(int)
    w = (z - z0).astype(np.float32)
    rows, cols = np.indices(mask.shape)
    above = (1 - w) * volume[z0, rows, cols] + w * volume[z0 + 1, rows, cols]
    return {"mask": mask, "truth": truth > 0, "centre": centre, "depth": depth, "above": above,
            "ir": read_png(fragment.path / "ir.png").astype(np.float32) if fragment.split == "train" else None}


@pytest.fixture(scope="module")
def features384(root384):
    return {(split, fid): fragment_features(root384, split, fid)
            for split, ids in (("train", "123"), ("test", "ab")) for fid in ids}


def test_labels_cover_a_plausible_share_of_the_papyrus(features384):
    for key, f in features384.items():
        share = f["truth"][f["mask"]].mean()
        assert 0.05 <= share <= 0.30, (key, share)
        assert not f["truth"][~f["mask"]].any()


def test_surface_depth_wanders_around_slice_32(features384):
    for key, f in features384.items():
        depth = f["depth"][f["mask"]]
        lo, median, hi = np.percentile(depth, [1, 50, 99])
        assert abs(median - synth.SURFACE_SLICE) <= 3, (key, median)
        assert hi - lo >= 2, (key, lo, hi)  # not a flat sheet at one slice


# The smoothed mean of the centre slices, as the issue states the check. (A local high-pass of that mean,
# centre minus its sigma-8 background, does find the strongest letters since the ink was made strong
# enough for the 2-core demo to learn: F0.5 about 0.6 at 384 px.)
NAIVE_FEATURES = {
    "centre_mean_sigma3": lambda f: cv2.GaussianBlur(f["centre"], (0, 0), 3),
}


@pytest.mark.parametrize("feature", list(NAIVE_FEATURES))
def test_naive_centre_slice_threshold_does_not_find_the_ink(features384, feature):
    """A per-pixel threshold on the mean of the centre slices, fitted on train, has no skill on test."""
    naive = NAIVE_FEATURES[feature]
    train = [features384[("train", fid)] for fid in "123"]
    fit, threshold, sign = fit_threshold([naive(f) for f in train], [f["mask"] for f in train], [f["truth"] for f in train])
    for fid in "ab":
        f = features384[("test", fid)]
        prediction = (sign * naive(f) > sign * threshold) & f["mask"]
        score = f05(prediction, f["truth"])
        no_skill = all_ink_f05(f["truth"][f["mask"]])
        print(f"naive {feature} test {fid}: F0.5 {score:.3f} (predict-all {no_skill:.3f}; train fit {fit:.3f})")
        assert score < 0.4, (fid, score)
        assert score < no_skill + 0.05, (fid, score, no_skill)  # no better than calling everything ink


def test_infrared_photo_shows_the_ink(features384):
    """The labeller's view: a global threshold on the IR photo (minus its broad background) finds the labels."""
    train = [features384[("train", fid)] for fid in "123"]
    ir = [f["ir"] - masked_blur(f["ir"], 15, f["mask"]) for f in train]
    fit, threshold, sign = fit_threshold(ir, [f["mask"] for f in train], [f["truth"] for f in train])
    assert sign == -1  # ink is dark in the photo
    for fid, f, feature in zip("123", train, ir):
        m = f["mask"]
        score = f05(sign * feature[m] > sign * threshold, f["truth"][m])
        no_skill = all_ink_f05(f["truth"][m])
        print(f"IR train {fid}: F0.5 {score:.3f} (predict-all {no_skill:.3f})")
        assert score > 0.55 and score > no_skill + 0.25, (fid, score, no_skill)
        raw = f["ir"][m]
        assert raw[~f["truth"][m]].mean() - raw[f["truth"][m]].mean() > 0.5 * raw[~f["truth"][m]].std()  # raw photo too


def ink_contrast(features, block=32):
    """Mean of the slice just above the surface (minus its local background) at ink minus at non-ink papyrus,
    per fragment and pooled, with a block-jackknife standard error (blocks of `block` px: neighbouring pixels
    share texture, so a per-pixel standard error would be far too small)."""
    per_fragment, blocks = [], []
    for f in features:
        inner = cv2.erode(f["mask"].astype(np.uint8), np.ones((31, 31), np.uint8)).astype(bool)
        contrast = f["above"] - masked_blur(f["above"], 8, f["mask"])
        ink, plain = inner & f["truth"], inner & ~f["truth"]
        per_fragment.append(contrast[ink].mean() - contrast[plain].mean())
        h, w = inner.shape
        for y in range(0, h, block):
            for x in range(0, w, block):
                c, i, p = contrast[y:y + block, x:x + block], ink[y:y + block, x:x + block], plain[y:y + block, x:x + block]
                blocks.append((c[i].sum(), i.sum(), c[p].sum(), p.sum()))
    blocks = np.array(blocks, np.float64)
    total = blocks.sum(axis=0)
    pooled = total[0] / total[1] - total[2] / total[3]
    rest = total - blocks
    leave_one_out = rest[:, 0] / rest[:, 1] - rest[:, 2] / rest[:, 3]
    n = len(blocks)
    se = np.sqrt((n - 1) / n * ((leave_one_out - leave_one_out.mean()) ** 2).sum())
    return np.array(per_fragment), pooled, se


def test_volume_carries_the_ink_just_above_the_surface(features384):
    per_fragment, pooled, se = ink_contrast(features384.values())
    print(f"ink contrast per fragment {np.round(per_fragment, 1)}, pooled {pooled:.1f} +- {se:.1f} (z {pooled / se:.1f})")
    assert pooled > 6 * se, (pooled, se)
    assert (per_fragment > 0).all(), per_fragment
    # the excess is of the size the generator puts there (INK_EXCESS of the papyrus level at full strength)
    full_strength = synth.INK_EXCESS * (synth.PAPYRUS_LEVEL - synth.AIR_LEVEL)
    assert 0.02 * full_strength < pooled < full_strength


def test_ink_contrast_vanishes_without_ink(tmp_path):
    """Control: the same statistic on an ink-free twin (same seed, INK_EXCESS = 0) finds nothing."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synth, "INK_EXCESS", 0.0)
        root = synth.generate(tmp_path / "no_ink", size=384, seed=0, progress=False, difficulty="easy")
    features = [fragment_features(root, split, fid) for split, ids in (("train", "123"), ("test", "ab")) for fid in ids]
    _, pooled, se = ink_contrast(features)
    print(f"ink-free twin: pooled {pooled:.1f} +- {se:.1f}")
    assert abs(pooled) < 3.5 * se, (pooled, se)


# ---------------------------------------------------------------- cost


def test_one_1024_fragment_is_fast_and_small(tmp_path):
    script = textwrap.dedent("""
        import json, resource, sys, time
        from pathlib import Path
        import numpy as np
        from lib.synth import FragmentFields, fragment_shape, write_fragment, NUM_SLICES

        def peak_kb():  # VmHWM: this process image's peak; ru_maxrss on Linux keeps the parent's peak across exec
            try:
                return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
            except (OSError, IndexError):
                return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        before = peak_kb()
        start = time.perf_counter()
        rng = np.random.default_rng([0, 0])
        fields = FragmentFields(rng, fragment_shape(rng, 1024))
        write_fragment(Path(sys.argv[1]), fields, rng, NUM_SLICES, True, progress=False)
        seconds = time.perf_counter() - start
        after = peak_kb()
        print(json.dumps({"seconds": seconds, "rss_growth_mb": (after - before) / 1024, "shape": fields.shape}))
    """)
    out = tmp_path / "train" / "1"
    result = subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"1024 fragment: {report}")
    assert report["seconds"] < 30
    assert report["rss_growth_mb"] < 1024
    fragment = Fragment(out).validate()
    assert fragment.num_slices == 65 and fragment.shape == tuple(report["shape"]) and min(fragment.shape) >= 0.7 * 1024


# ---------------------------------------------------------------- CLI


def run_synth(*args):
    return subprocess.run([sys.executable, "-m", "lib.synth", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cli_writes_once_then_leaves_the_dataset_alone(tmp_path):
    out = tmp_path / "data"
    result = run_synth(out, "--size", 96, "--seed", 1, "--num-slices", 8, "--difficulty", "hard")
    assert result.returncode == 0, result.stderr
    assert list_fragments(out, "train") == ["1", "2", "3"] and list_fragments(out, "test") == ["a", "b"]
    fragment = Fragment.open(out, "test", "b").validate()
    assert fragment.num_slices == 8
    recipe = json.loads((out / "_truth" / "synth.json").read_text())
    assert {k: v for k, v in recipe.items() if k != "fragments"} == {"size": 96, "seed": 1, "num_slices": 8, "difficulty": 1.0,
                                                                        "layout": "kaggle", "geometry": "thick",
                                                                        "reversed_depth": False}
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    again = run_synth(out, "--size", 96, "--seed", 1, "--num-slices", 8, "--difficulty", "1")
    assert again.returncode == 0, again.stderr
    assert "already there" in again.stdout
    # another recipe asked of the same folder: refused, naming the recipe file, the dataset left alone
    other = run_synth(out, "--size", 96, "--seed", 1, "--num-slices", 8)
    assert other.returncode != 0 and str(out / "_truth" / "synth.json") in other.stderr and "make clean-data" in other.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


@pytest.mark.parametrize("value", ["impossible", "1.5", "-0.1"])
def test_cli_rejects_a_bad_difficulty(tmp_path, value):
    result = run_synth(tmp_path / "data", "--size", 96, "--num-slices", 8, "--difficulty", value)
    assert result.returncode != 0 and "error: --difficulty" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_cli_refuses_a_folder_that_is_not_a_dataset(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    result = run_synth(out, "--size", 96, "--num-slices", 8)
    assert result.returncode != 0
    assert str(out) in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------- the difficulty knob


def test_levels_by_name_and_number():
    assert [synth.parse_difficulty(v) for v in ("easy", "medium", "hard", "0.25", 1)] == [0.0, 0.5, 1.0, 0.25, 1.0]
    assert synth.DEFAULT_DIFFICULTY == "medium"


def test_level_zero_is_the_original_recipe():
    """Difficulty 0 draws exactly the constants of the generator before the knob (the byte-for-byte promise)."""
    for side in (96, 256, 640):
        level = synth.FragmentLevel.draw(0.0, np.random.default_rng(7), (side, side))
        height = max(8, side // 16)
        assert level == synth.FragmentLevel(synth.INK_EXCESS, 0.0, height, max(2, height // 6))


def test_levels_draw_per_fragment_within_their_ranges():
    shape = (640, 560)
    draws = {d: [synth.FragmentLevel.draw(d, np.random.default_rng([s, 1]), shape) for s in range(40)] for d in (0.5, 1.0)}
    hard, medium = draws[1.0], draws[0.5]
    assert all(lv.ink_excess <= synth.NOISE_STD for lv in hard)  # at or below the per-voxel noise
    assert all(synth.NOISE_STD < lv.ink_excess < synth.INK_EXCESS for lv in medium)
    for levels in draws.values():  # randomised per fragment
        assert len({lv.letter_height for lv in levels}) > 5 and len({lv.stroke_width for lv in levels}) > 2
        assert len({lv.depth_offset for lv in levels}) == len(levels)
    assert min(lv.letter_height for lv in hard) < 30 and max(lv.letter_height for lv in hard) > 70
    assert all(20 <= lv.letter_height <= 80 and 2 <= lv.stroke_width <= 8 for lv in hard)
    assert all(abs(lv.depth_offset) <= synth.MAX_WANDER for lv in hard)
    assert max(abs(lv.depth_offset) for lv in hard) > max(abs(lv.depth_offset) for lv in medium) > 0.5


@pytest.fixture(scope="module")
def hard384(tmp_path_factory):
    root = synth.generate(tmp_path_factory.mktemp("hard384") / "synth", size=384, seed=0, progress=False, difficulty="hard")
    return root, {(split, fid): fragment_features(root, split, fid)
                  for split, ids in (("train", "123"), ("test", "ab")) for fid in ids}


def test_hard_surface_wanders_up_to_four_slices(hard384):
    root, features = hard384
    recipe = json.loads((root / "_truth" / "synth.json").read_text())
    assert recipe["difficulty"] == 1.0
    offsets = [recipe["fragments"][fid]["depth_offset"] for fid in "123ab"]
    assert max(offsets) - min(offsets) > 1.5, offsets  # fragments sit at different depths
    for key, f in features.items():
        depth = f["depth"][cv2.erode(f["mask"].astype(np.uint8), np.ones((31, 31), np.uint8)).astype(bool)]
        assert np.abs(depth - synth.SURFACE_SLICE).max() <= synth.MAX_WANDER + 1, key  # +1: the estimate's own error


def test_hard_ink_is_not_separable_by_the_classical_baseline(hard384):
    """The issue's check: the smoothed centre-slice mean, threshold fitted on train, F0.5 < 0.35 on every test fragment."""
    _, features = hard384
    naive = NAIVE_FEATURES["centre_mean_sigma3"]
    train = [features[("train", fid)] for fid in "123"]
    _, threshold, sign = fit_threshold([naive(f) for f in train], [f["mask"] for f in train], [f["truth"] for f in train])
    for fid in "ab":
        f = features[("test", fid)]
        score = f05((sign * naive(f) > sign * threshold) & f["mask"], f["truth"])
        print(f"hard: naive test {fid}: F0.5 {score:.3f}")
        assert score < 0.35, (fid, score)


def test_hard_ink_is_invisible_in_every_single_raw_slice(hard384):
    """No slice alone shows it: a threshold on one raw slice minus its local background, fitted on train for each
    slice 24..39, stays far from finding the ink on the test fragments."""
    root, features = hard384
    slices = {(split, fid): Fragment.open(root, split, fid) for split, fid in features}
    best = 0.0
    for z in range(24, 40):
        highpass = {}
        for key, f in features.items():
            image = slices[key].read_band(z, 0, slices[key].shape[0]).astype(np.float32)
            highpass[key] = image - masked_blur(image, 8, f["mask"])
        train = [("train", fid) for fid in "123"]
        _, threshold, sign = fit_threshold([highpass[k] for k in train], [features[k]["mask"] for k in train],
                                           [features[k]["truth"] for k in train])
        for fid in "ab":
            f = features[("test", fid)]
            best = max(best, f05((sign * highpass[("test", fid)] > sign * threshold) & f["mask"], f["truth"]))
    print(f"hard: best single-slice threshold F0.5 on test {best:.3f}")
    assert best < 0.35


def test_hard_ink_is_still_in_the_volume(hard384):
    """Faint is not absent: pooled over the fragments the slice just above the surface is denser under the ink."""
    _, features = hard384
    per_fragment, pooled, se = ink_contrast(features.values())
    print(f"hard: ink contrast per fragment {np.round(per_fragment, 1)}, pooled {pooled:.1f} +- {se:.1f}")
    assert pooled > 4 * se, (pooled, se)
    assert pooled < synth.NOISE_STD * (synth.PAPYRUS_LEVEL - synth.AIR_LEVEL)  # below the per-voxel noise
