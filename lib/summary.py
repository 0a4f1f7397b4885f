"""A run's summary: summary.csv and summary.md of its finished trials (F0.5 per backbone x fold, the mean per backbone,
epochs, minutes), and the trials that did not finish, for people; status.json (lib.runs.RunDir) says the same for
programs."""
import csv
import io

import numpy as np

from lib.outputs import write_atomically

FIELDS = ["backbone", "fold", "fragment", "rows", "oof_f05", "threshold", "best_val_f05", "epochs", "minutes"]


def summary_rows(trials, results):
    """One row of FIELDS per finished trial of [(backbone, Fold)], from `results` {(backbone, fold name): TrialResult}."""
    rows = []
    for backbone, fold in trials:
        r = results.get((backbone, fold.name))
        if r:
            rows.append(dict(backbone=backbone, fold=fold.name, fragment=fold.fragment_id,
                             rows="all" if fold.rows is None else f"{fold.rows[0]}:{fold.rows[1]}",
                             oof_f05=round(r.oof_f05, 4), threshold=round(r.oof_threshold, 3),
                             best_val_f05=round(r.best_val_f05, 4), epochs=r.epoch, minutes=round(r.minutes, 2)))
    return sorted(rows, key=lambda r: (r["backbone"], r["fold"]))


def write_summary(run, trials, results, failures, minutes):
    """RUN/summary.csv and RUN/summary.md (atomically); summary.md lists the trials that did not finish, with the
    `failures` lines. Returns summary.md's table text."""
    rows = summary_rows(trials, results)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    lines = ["| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
    lines += ["| " + " | ".join(str(r[k]) for k in FIELDS) + " |" for r in rows]
    lines += ["", "| backbone | mean OOF F0.5 | folds |", "|---|---|---|"]
    for backbone in sorted({r["backbone"] for r in rows}):
        scores = [r["oof_f05"] for r in rows if r["backbone"] == backbone]
        lines.append(f"| {backbone} | {np.mean(scores):.4f} | {len(scores)} |")
    lines += ["", f"Wall time of the last attempt: {minutes:.1f} minutes."]
    missing = [f"{b} fold {f.name}" for b, f in trials if (b, f.name) not in results]
    if missing:
        lines += ["", f"Unfinished: {', '.join(missing)} (make train, or train.py --run {run} --resume, retries them)."]
        lines += [f"- {line}" for line in failures]
    text = "\n".join(lines) + "\n"
    write_atomically(run.summary_csv, lambda f: f.write(table.getvalue()))
    write_atomically(run.summary_md, lambda f: f.write(f"# Run {run.path.name}\n\n{text}"))
    return text
