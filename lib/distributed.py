"""Band jobs of submit.py, run in this process or spread as Ray tasks over whatever CPUs and GPUs a cluster has.

A job is one row band of one fragment (lib/bands.py): it loads the run's models (once per worker process) and
groups them by tiling with the job's group_models, reads
its own rows' tiles, predicts them with every ensemble member and writes its rows of the fragment's
ProbabilityScratch (lib/writers.py), whole: a job that is run again (Ray retries a band whose worker died)
overwrites the same rows with the same values. Bands give the same result whichever process runs them and in
whichever order, so the output equals the single-process run's exactly, as long as torch runs with the same number
of CPU threads in both (its CPU kernels may round differently with another count: job["threads"]).

On a cluster of several machines, the run folder, the stores and the outputs must be on a filesystem every node
sees at the same path (as for train.py --address).
"""
import os
import time

import numpy as np
import torch

from lib.bands import predict_band
from lib.writers import ProbabilityScratch
from lib.runs import load_members
from lib.store import Store

_LOADED = {}  # per process: (run, ensemble, device, triplets) -> groups; store path -> Store
MAX_RETRIES = 3  # a band whose worker died (killed, out of memory, node lost) is run again up to this often


def _groups_key(job):
    return "groups", job["run"], repr(job["ensemble"]), job["device"], job["triplets"], job["group_models"]


def preload(common, groups):
    """Let this process's jobs with these run-wide fields use `groups`, already loaded, instead of loading them."""
    _LOADED[_groups_key(common)] = groups


def _groups(job):
    key = _groups_key(job)
    if key not in _LOADED:
        members = load_members(job["run"], job["ensemble"], job["device"])
        _LOADED[key] = job["group_models"](members, job["triplets"])
    return _LOADED[key]


def _store(path):
    key = ("store", path, os.stat(path).st_mtime_ns)
    if key not in _LOADED:
        _LOADED[key] = Store(path)
    return _LOADED[key]


def run_job(job):
    """Predict one band job and write its rows of the fragment's scratch; returns (fragment id, band, seconds)."""
    started = time.perf_counter()
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    store = _store(job["store"])
    rows = predict_band(_groups(job), store, job["band"], job["row_counts"], job["predict_group"],
                        job["batch_size"])
    ProbabilityScratch(job["scratch"]).write(job["band"][0], rows)
    return job["fragment_id"], job["band"], time.perf_counter() - started


def run_jobs(jobs, on_band, address=None, workers=0, gpus=0):
    """Run `jobs` here (no address, workers or gpus) or as Ray tasks: on the cluster at `address` (auto or
    HOST:PORT), else on a local Ray of `workers` one-CPU workers or `gpus` one-GPU workers. A job takes 1 CPU, and
    1 GPU when its device is CUDA. on_band(job, seconds) is called in this process as each band finishes, in the
    order they finish."""
    if not jobs:  # every band done already (skipped or kept fragments): no Ray to start
        return
    if not (address or workers or gpus):
        for job in jobs:
            on_band(job, run_job(job)[2])
        return
    import ray

    if address:
        ray.init(address=address)
    else:  # always a Ray of its own, never a cluster someone left running on this machine
        ray.init(address="local", num_cpus=max(workers, gpus), num_gpus=gpus or None, include_dashboard=False,
                 object_store_memory=256 * 2**20)
    try:
        on_gpu = any(str(job["device"]).startswith("cuda") for job in jobs)
        task = ray.remote(num_cpus=1, num_gpus=1 if on_gpu else 0, max_retries=MAX_RETRIES)(run_job)
        pending = {task.remote(job): job for job in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            on_band(job, ray.get(done[0])[2])
    finally:
        ray.shutdown()


def band_jobs(store, store_path, scratch, bands, row_counts, common):
    """The jobs of one fragment: one per band; `common` holds the run-wide fields: run, ensemble (read_ensemble's),
    triplets (an override or None), device, threads (torch's, or None), batch_size, group_models(members, triplets) -> {key:
    models} and predict_group(models, window, key, out) (submit.py's tiling_groups and predict_group)."""
    return [{**common, "fragment_id": store.fragment_id, "store": str(store_path), "scratch": str(scratch),
             "band": (int(y0), int(y1)), "row_counts": {k: tuple(np.asarray(a) for a in v) for k, v in row_counts.items()}}
            for y0, y1 in bands]
