"""`irece bench crr --ray [ADDRESS]`: the CRR table's missing (method, concept) cells as Ray tasks, on a local Ray
instance or a cluster, so that the 2-hour CPU table spreads over many cores.

A cell is `crr.run_cell`, the very function the sequential run calls, with the same settings and the same
content-hash cache: each task writes its cell and artifacts under the cache directory given (the driver's,
absolute: on a cluster, a shared volume at that path lets every node reuse every artifact; otherwise a node makes
what it lacks, the same bytes, since every artifact is seeded). The driver caches every returned cell too and
assembles the table in the sequential order, so the result is the sequential run's, cell for cell. Each task runs
torch with the driver's thread count (float sums depend on it) and reserves that many CPUs.

On a cluster every node needs irece installed (`pip install 'irece[ray]'`, the same version) and the model folder
at the same path (the mini world is package data).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

LOCAL_OBJECT_STORE = 200 * 1024 * 1024  # cells return small dicts; nothing big goes through the object store


def _cell_task(model_dir: str, method: str, concept: str, scenarios: list, s, cache_dir: str, threads: int) -> dict:
    import torch

    from miniworld.judge import load_judge

    from . import cache, crr
    torch.set_num_threads(threads)
    cache.CACHE_DIR = Path(cache_dir)
    return crr.run_cell(model_dir, method, concept, scenarios, s, load_judge())


def run_cells(address: str | None, model_dir: str, cells: list[tuple[str, str]], scenarios, s,
              cpus: int | None = None, threads: int | None = None) -> Iterator[tuple[tuple[str, str], dict]]:
    """Yield ((method, concept), cell) as the tasks finish. `address`: None or "local" starts a Ray instance here
    (`cpus` CPUs, default this process's CPU affinity), else the cluster there; Ray is shut down afterwards if it
    was started here. `threads`: torch threads (and CPUs reserved) per task, default this process's."""
    import ray
    import torch

    from . import cache
    threads = threads or torch.get_num_threads()
    started = not ray.is_initialized()
    if started:
        if address in (None, "local"):
            ray.init(num_cpus=max(cpus or len(os.sched_getaffinity(0)), threads), include_dashboard=False,
                     object_store_memory=LOCAL_OBJECT_STORE, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    task = ray.remote(num_cpus=threads, max_retries=0)(_cell_task)
    cache_dir = str(Path(cache.CACHE_DIR).resolve())
    pending = {task.remote(model_dir, m, c, list(scenarios), s, cache_dir, threads): (m, c) for m, c in cells}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                yield pending.pop(ref), ray.get(ref)
    finally:
        for ref in pending:  # interrupted: stop what still runs
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
