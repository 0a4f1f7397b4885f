"""Fit ensemble weights and the binarisation threshold on a run's out-of-fold maps.

In:  --run runs/NAME from train.py: run.json (which backbones and folds the run trained, and on which stores),
     oof/<backbone>/<fragment>.h5 (each train fragment predicted by the fold model that did not see it) and
     models/<backbone>/fold-*.pt; the train stores' labels and masks (train/<fragment>.h5) from the stores the
     run was trained on (--stores overrides; they must be the train stores run.json records, unchanged: stores
     prepared again since, or of other data, stop it naming the run and what it was trained on). A fold the
     record names whose model, result or OOF map is missing is an error, unless --allow-missing, which fits on
     what is there and prints what is not.
Out: runs/NAME/ensemble.json        members (backbone: FAMILY:ENCODER, weight, model files relative to the run
                                    folder and their sha256, tile size, stride, inputs: lib.inputs.InputSpec of the OOF maps),
                                    threshold (mode, value), trained_on (from run.json) and the scores below
     runs/NAME/plots/threshold.png  F0.5 against the threshold, per member and for the ensemble
     and a table on stdout: F0.5 of each member, the equal-weight average and the fitted ensemble.

Every score is micro F0.5 over all pixels of all train fragments. The weights (non-negative, summing to 1) and
the threshold are fitted together, in two threshold modes, keeping the better: "absolute" (ink where p >= t)
and "percentile" (the top q % of each fragment's in-mask pixels are ink, as the 2nd-place team did).
Fitting uses a deterministic subsample of in-mask pixels (--fit-pixels, --seed); reported scores are at full
resolution. The leave-one-fragment-out (LOFO) score refits on all fragments but one, applies the fit to that
one, and pools the held-out pixels: what to expect on unseen fragments, free of the fit's own optimism.

    python ensemble.py --run runs/demo [--fit-pixels 2000000] [--seed 0] [--allow-missing]
    python ensemble.py --run runs/demo --check    # is this (maybe read-only) run usable as it is?
"""
import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # a bare Figure renders with Agg: no display, no pyplot state

from lib.maps import load_probability_map
from lib.metrics import (DEFAULT_PERCENTS, THRESHOLD_MODES, binarise, confusion_counts, fbeta_counts,
                         fbeta_from_counts, percentile_counts, threshold_counts)
from lib.lock import LockedError, exclusive
from lib.outputs import OutputError, atomic_path
from lib.runs import (RunDir, RunFileError, check_trained_on, load_members, model_header, read_ensemble, recorded_stores,
                      write_json)
from lib.store import Store, StoreError

# what each mode sweeps: absolute probabilities, percentile the share (%) of in-mask pixels called ink
SWEEPS = {"absolute": np.round(np.arange(0.01, 1.0, 0.01), 2), "percentile": DEFAULT_PERCENTS.astype(float)}
GRID_STEP = 0.1  # weights are searched on this grid of the simplex ...
GRID_MAX_MEMBERS = 3  # ... up to this many members (66 points for 3); beyond it by hill-climbing
PLOT_STYLES = {"fitted ensemble": dict(color="black", lw=2.2), "equal average": dict(ls="--", lw=1.5)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="run folder written by train.py")
    parser.add_argument("--stores", help="folder with train/<id>.h5 stores (default: the run's, from run.json)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="fit on the folds that finished when some are missing (printed), instead of stopping")
    parser.add_argument("--fit-pixels", type=int, default=2_000_000,
                        help="in-mask pixels (all fragments together) sampled for fitting; reported scores use all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pixel sample")
    parser.add_argument("--check", action="store_true", help="check the run's ensemble.json, its model files (sha256, "
                        "inputs) and the stores against what it was trained on, print it, and fit nothing: reads "
                        "only, so it works on a read-only run folder")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------- inputs


def find_members(run, record, allow_missing):
    """(members [{backbone, models, tile_size, stride}], fragment ids): every backbone of the run record with the
    model files of its folds, and the fragments whose OOF maps every member has. What the record names but the
    folder lacks stops the fit, or with `allow_missing` is left out and printed."""
    trials = record.planned_trials()
    results = run.finished_trials(trials)
    ok, missing = set(), []
    for backbone, fold in trials:
        model, oof = run.model(backbone, fold.name), run.fragment_oof(backbone, fold.fragment_id)
        problem = ("the trial did not finish (train.py --resume retries it)" if (backbone, fold.name) not in results
                   else f"{model} not found" if not model.is_file() else f"{oof} not found" if not oof.is_file() else None)
        if problem:
            missing.append(f"{backbone} fold {fold.name}: {problem}")
        else:
            ok.add((backbone, fold.name))
    if missing and not allow_missing:
        raise RunFileError(f"{run}: {len(missing)} of the {len(trials)} trained folds in {run.record.name} are "
                           f"missing, first {missing[0]}; finish them, or fit without them with --allow-missing")
    for line in missing:
        print(f"missing, left out: {line}")
    backbones = sorted({b for b, _ in trials})
    # a fragment is fitted on when every member has all of its folds (a split fragment: all its bands)
    ids = sorted(i for i in {f.fragment_id for _, f in trials}
                 if all((b, f.name) in ok for b, f in trials if f.fragment_id == i))
    if not ids:
        raise RunFileError(f"{run}: no train fragment has OOF maps and models from every backbone; nothing to fit on")
    members = [member_models(run, b, record.config, results,
                             [f.name for b2, f in trials if b2 == b and f.fragment_id in ids]) for b in backbones]
    return members, ids


def member_models(run, backbone, config, results, fold_names):
    """A member's fold model files, each checked (lib.runs.model_header) to be the file its trial wrote (the sha256 in
    its TrialResult, from `results`), to have the tile size and stride the run trained with and the same inputs as
    the member's other folds (lib.inputs.InputSpec: the ones its OOF maps were made with, so that submit.py predicts
    the test fragments the same way)."""
    expected, inputs, digests = (config.tile_size, config.stride), None, {}
    for fold_name in fold_names:
        path = run.model(backbone, fold_name)
        digest = results[backbone, fold_name].model_sha256
        header = model_header(path, digest, run.result(backbone, fold_name))
        digests[str(path.relative_to(run.path))] = digest
        found = (header["tile_size"], header["stride"])
        if found != expected:
            raise RunFileError(f"{path}: tile size and stride {found} differ from the run's {expected} ({run.record})")
        if inputs not in (None, header["inputs"]):
            raise RunFileError(f"{path}: inputs {header['inputs']} differ from those of its member's other folds "
                               f"{inputs}")
        inputs = header["inputs"]
    return {"backbone": backbone, "models": sorted(digests), "sha256": digests,
            "tile_size": expected[0], "stride": expected[1], "inputs": inputs}


def train_store(stores, fragment_id):
    path = Path(stores) / "train" / f"{fragment_id}.h5"
    if not path.is_file():
        raise StoreError(f"{path}: train store not found (needed for the labels of OOF fragment {fragment_id})")
    store = Store(path)  # its maps are checked against their checksums as they are read (StoreError)
    if not store.has_labels:
        raise StoreError(f"{path}: store has no labels")
    return store


def load_fragment(run, stores, members, fragment_id):
    """(maps (members, H, W) float32, labels uint8, mask uint8) of one train fragment."""
    store = train_store(stores, fragment_id)
    labels, mask = store.read_map("labels"), store.read_map("mask")
    store.close()
    maps = np.empty((len(members), *store.shape), np.float32)
    for i, member in enumerate(members):
        oof_path = run.fragment_oof(member["backbone"], fragment_id)
        prob, _ = load_probability_map(oof_path)
        if prob.shape != store.shape:
            raise RunFileError(f"{oof_path}: map is {prob.shape}, but the store {store.path} is {store.shape}")
        maps[i] = prob
    return maps, labels, mask


def sample_pixels(run, stores, members, ids, fit_pixels, seed):
    """Per fragment {id, probs (members, k), truth (k,), n_ink}: each in-mask pixel drawn with the same probability
    in all fragments (so each weighs in by its size, as in the micro score). n_ink also counts, at that rate,
    labelled pixels outside the mask: those are false negatives whatever the threshold."""
    inside_counts = []
    for fragment_id in ids:
        store = train_store(stores, fragment_id)
        inside_counts.append(int(np.count_nonzero(store.read_map("mask"))))
        store.close()
    rate = min(1.0, fit_pixels / max(sum(inside_counts), 1))
    samples = []
    for index, fragment_id in enumerate(ids):
        maps, labels, mask = load_fragment(run, stores, members, fragment_id)
        keep = mask != 0
        if rate < 1:  # a coin per pixel: no index arrays the size of the fragment
            keep &= np.random.default_rng([seed, index]).random(mask.shape, dtype=np.float32) < rate
        truth = labels[keep] != 0
        samples.append({"id": fragment_id, "probs": maps[:, keep], "truth": truth,
                        "n_ink": int(np.count_nonzero(truth)) + rate * np.count_nonzero(labels[mask == 0])})
    return samples


# ------------------------------------------------------------------------------------------- fitting


def combine(weights, maps):
    """Weighted average over the first axis (members) of maps (members, ...), float32."""
    return np.tensordot(np.asarray(weights, np.float32), maps, 1)


def mode_counts(mode, prob, target, mask=None):
    """(3, sweep) array: true positives, predicted pixels and inked pixels at every threshold of `mode`."""
    count = threshold_counts if mode == "absolute" else percentile_counts
    tp, predicted, n_ink = count(prob, target, mask, SWEEPS[mode])
    return np.array([tp, predicted, np.full(len(tp), n_ink)], np.float64)


def curve(counts):
    """F0.5 at every threshold from mode_counts (summed over fragments: the micro score)."""
    tp, predicted, n_ink = counts
    return fbeta_from_counts(tp, predicted - tp, n_ink - tp)


def sample_curve(samples, weights, mode):
    """F0.5 over the pooled samples of the weighted average, at every threshold of `mode`."""
    total = 0
    for s in samples:
        counts = mode_counts(mode, combine(weights, s["probs"]), s["truth"])
        counts[2] = s["n_ink"]
        total = total + counts
    return curve(total)


def simplex_grid(num_members, step=GRID_STEP):
    """All weight vectors on the simplex with entries that are multiples of `step`."""
    units = round(1 / step)
    for head in itertools.product(range(units + 1), repeat=num_members - 1):
        if sum(head) <= units:
            yield np.array([*head, units - sum(head)]) / units


def hill_climb(score, num_members, step=GRID_STEP, min_step=GRID_STEP / 8):
    """From equal weights, move `step` of weight between two members while that raises the score; then halve the
    step. Every move stays on the simplex, so no projection is needed."""
    weights = np.full(num_members, 1 / num_members)
    best = score(weights)
    while step >= min_step:
        improved = False
        for to, fro in itertools.permutations(range(num_members), 2):
            moved = min(step, weights[fro])
            if moved <= 0:
                continue
            trial = weights.copy()
            trial[to] += moved
            trial[fro] -= moved
            trial_score = score(trial)
            if trial_score > best:
                weights, best, improved = trial, trial_score, True
        if not improved:
            step /= 2
    return weights


def search_weights(score, num_members):
    if num_members == 1:
        return np.ones(1)
    if num_members <= GRID_MAX_MEMBERS:
        return max(simplex_grid(num_members), key=score)  # ties: the first on the grid
    return hill_climb(score, num_members)


def fit(samples, num_members):
    """{weights, mode, value, index (into SWEEPS[mode]), fit_f05}: the best weights and threshold in each mode;
    the better mode wins (absolute on a tie: it needs no per-fragment ranking)."""
    best = None
    for mode in THRESHOLD_MODES:
        weights = search_weights(lambda w: sample_curve(samples, w, mode).max(), num_members)
        scores = sample_curve(samples, weights, mode)
        k = int(np.argmax(scores))
        if best is None or scores[k] > best["fit_f05"]:
            best = {"weights": weights, "mode": mode, "value": float(SWEEPS[mode][k]), "index": k,
                    "fit_f05": float(scores[k])}
    return best


# ------------------------------------------------------------------------------------------- scoring


def score_full_resolution(run, stores, members, ids, scorers, lofo_fits):
    """One pass over the fragments, one fragment's maps in memory at a time. Returns
    ({scorer: {mode: summed mode_counts}}, pooled (tp, fp, fn) of each fragment under the fit that excluded it)."""
    counts = {name: {mode: 0 for mode in THRESHOLD_MODES} for name in scorers}
    held_out = np.zeros(3, np.int64)
    for fragment_id in ids:
        maps, labels, mask = load_fragment(run, stores, members, fragment_id)
        for name, weights in scorers.items():
            prob = combine(weights, maps)
            for mode in THRESHOLD_MODES:
                counts[name][mode] = counts[name][mode] + mode_counts(mode, prob, labels, mask)
        if lofo_fits:
            f = lofo_fits[fragment_id]
            held_out += confusion_counts(binarise(combine(f["weights"], maps), mask, f["mode"], f["value"]), labels)
    return counts, held_out


def best_of(counts):
    """{mode: {f05, threshold}}: the best point of each mode's full-resolution curve."""
    result = {}
    for mode, c in counts.items():
        scores = curve(c)
        k = int(np.argmax(scores))
        result[mode] = {"f05": float(scores[k]), "threshold": float(SWEEPS[mode][k])}
    return result


def fitted_score(counts, fitted):
    """Full-resolution F0.5 of the fitted ensemble at its fitted threshold."""
    return float(curve(counts[fitted["mode"]])[fitted["index"]])


# ------------------------------------------------------------------------------------------- outputs


def plot_thresholds(path, counts, fitted, fitted_f05):
    """F0.5 against the threshold in both modes: thin lines for members, dashed for the equal-weight average,
    black for the fitted ensemble, a dot at the fitted threshold."""
    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2)
    for ax, mode in zip(axes, THRESHOLD_MODES):
        for name, by_mode in counts.items():
            ax.plot(SWEEPS[mode], curve(by_mode[mode]), label=name, **PLOT_STYLES.get(name, dict(lw=1)))
        if fitted["mode"] == mode:
            ax.plot([fitted["value"]], [fitted_f05], "o", color="red", label="fitted")
        ax.set_xlabel("probability threshold" if mode == "absolute" else "top % of in-mask pixels called ink")
        ax.set_ylabel("OOF F0.5 (all train pixels)")
        ax.set_title(f"{mode} threshold")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, dpi=100)


def table(members, weights, scores):
    """Markdown table: F0.5 at the best threshold of each mode for every member, the average and the ensemble."""
    rows = [(m["backbone"], f"{w:.2f}", scores["members"][m["backbone"]]) for m, w in zip(members, weights)]
    rows += [("equal average", "", scores["equal_average"]), ("fitted ensemble", "", scores["ensemble"])]
    lines = ["| model | weight | F0.5 absolute (threshold) | F0.5 percentile (top %) |", "|---|---|---|---|"]
    for name, weight, s in rows:
        lines.append(f"| {name} | {weight} | {s['absolute']['f05']:.4f} ({s['absolute']['threshold']:.2f}) "
                     f"| {s['percentile']['f05']:.4f} ({s['percentile']['threshold']:g} %) |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    run = RunDir(args.run)
    try:
        if not run.path.is_dir():
            raise RunFileError(f"{run}: run folder not found")
        stores = recorded_stores(run.path, args.stores)
        if args.check:  # reads only: no lock, so that a read-only run folder can be checked
            check_ensemble(run, stores)
            return
        with exclusive(run.path, "ensemble.py"):
            fit_ensemble(run, stores, args)
    except (LockedError, RunFileError, StoreError, OutputError) as err:
        sys.exit(f"error: {err}")


def check_ensemble(run, stores):
    """--check: ensemble.json checked field by field, every member's model files loaded after checking their sha256,
    tile size, stride and inputs, and the train stores in `stores` (if any) against what the run was trained on;
    prints the members and threshold. A RunFileError names the first problem."""
    ensemble = read_ensemble(run.path)
    check_trained_on(run, ensemble["trained_on"], stores, test_only=True)
    members = load_members(run.path, ensemble)
    for member in members:
        print(f"{member['backbone']}: weight {member['weight']:g}, {len(member['models'])} model files "
              f"({member['tile_size']} px tiles, stride {member['stride']}, {member['spec'].family} inputs)")
    threshold = ensemble["threshold"]
    print(f"{run.ensemble}: OK: {len(members)} member(s) with a weight, threshold {threshold['mode']} "
          f"{threshold['value']:g}, trained on {', '.join(sorted(ensemble['trained_on']['train']))}")


def fit_ensemble(run, stores, args):
    """Fit, score, and write ensemble.json and the threshold plot; print the table."""
    record = run.read_record()
    if record is None:
        raise RunFileError(f"{run.record}: not found: not a run folder of train.py (run train.py first)")
    check_trained_on(run, record.trained_on, stores)  # labels of other or changed stores would fit garbage
    members, ids = find_members(run, record, args.allow_missing)
    samples = sample_pixels(run, stores, members, ids, args.fit_pixels, args.seed)
    fitted = fit(samples, len(members))
    lofo_fits = {}  # fragment -> the fit on all the other fragments (none with a single fragment)
    if len(ids) > 1:
        lofo_fits = {s["id"]: fit([o for o in samples if o is not s], len(members)) for s in samples}
    fit_pixels = sum(s["truth"].size for s in samples)
    del samples  # free the sample before the full-resolution pass loads whole maps

    num = len(members)
    scorers = {m["backbone"]: np.eye(num)[i] for i, m in enumerate(members)}
    # names with a space: no backbone name has one, so they cannot clash
    scorers |= {"equal average": np.full(num, 1 / num), "fitted ensemble": fitted["weights"]}
    counts, held_out = score_full_resolution(run, stores, members, ids, scorers, lofo_fits)
    fitted_f05 = fitted_score(counts["fitted ensemble"], fitted)
    scores = {
        "members": {m["backbone"]: best_of(counts[m["backbone"]]) for m in members},
        "equal_average": best_of(counts["equal average"]),
        "ensemble": {**best_of(counts["fitted ensemble"]),
                     "fitted": {"f05": fitted_f05, "fit_pixels_f05": fitted["fit_f05"]}},
        "lofo": None if not lofo_fits else {
            "f05": fbeta_counts(*held_out),
            "fits": {i: {"weights": f["weights"].round(4).tolist(), "mode": f["mode"], "value": f["value"]}
                     for i, f in lofo_fits.items()}},
    }
    weights = [round(float(w), 4) for w in fitted["weights"]]
    write_json(run.ensemble, {
        "members": [{**m, "weight": w} for m, w in zip(members, weights)],
        "threshold": {"mode": fitted["mode"], "value": fitted["value"]},
        "fragments": ids,
        "trained_on": record.trained_on,  # submit.py checks the stores it is given against it
        "fit_pixels": fit_pixels,
        "seed": args.seed,
        "scores": scores,
    })
    plot_thresholds(run.plots / "threshold.png", counts, fitted, fitted_f05)

    print(table(members, weights, scores))
    unit = "" if fitted["mode"] == "absolute" else " %"
    lofo = "n/a (one fragment)" if not lofo_fits else f"{scores['lofo']['f05']:.4f}"
    print(f"\nfitted ensemble: {fitted['mode']} threshold {fitted['value']:g}{unit}: OOF F0.5 {fitted_f05:.4f} "
          f"over {len(ids)} fragments at full resolution; leave-one-fragment-out {lofo}")
    print(f"wrote {run.ensemble} and {run.plots / 'threshold.png'}")


if __name__ == "__main__":
    main()
