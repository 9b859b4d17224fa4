"""Worker process hooks: code that runs once in each worker process before it takes work (load a model, open
a client), and one compute thread per worker process for the numeric libraries.

Why one thread: ``pgflow worker --concurrency N`` already runs N processes, one per core. A numeric library
left to its defaults (PyTorch, OpenMP, MKL, OpenBLAS) starts a thread per core in *each* process, so N
processes run N x cores threads that fight over the cores: two worker processes running all-MiniLM-L6-v2 on
2 cores embedded 8 chunks/s instead of 78. The worker therefore sets ``OMP_NUM_THREADS``,
``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``NUMEXPR_NUM_THREADS`` and ``VECLIB_MAXIMUM_THREADS`` (those
not set already: your environment wins) and ``torch.set_num_threads`` when torch is imported.
``--compute-threads N`` changes the number; 0 leaves everything as it is.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from .registry import import_attribute

log = logging.getLogger("pgflow.worker")

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS")

#: functions marked with @worker_init in this process (run in each worker process, after those of --init)
_INIT: list[Callable[[], Any]] = []


def worker_init(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Decorator: run ``fn()`` once in each worker process before it takes work (the module defining it
    must be imported by the worker: ``pgflow worker --import module``)."""
    _INIT.append(fn)
    return fn


def limit_compute_threads(threads: int) -> None:
    """One (or ``threads``) compute thread per process for the numeric libraries; 0 changes nothing."""
    if threads <= 0:
        return
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, str(threads))
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def init_functions(refs: Iterable[str]) -> list[Callable[[], Any]]:
    """The ``module:function`` hooks named on the command line (imported now, so a typo fails at start)."""
    functions = []
    for ref in refs:
        if ":" not in ref:
            raise ValueError(f"--init needs module:function, not {ref!r}")
        fn = import_attribute(ref)
        if not callable(fn):
            raise ValueError(f"--init {ref!r} is not a function")
        functions.append(fn)
    return functions


def start_worker_process(init: Iterable[Callable[[], Any]], threads: int) -> None:
    """What a worker process does before it takes work: limit compute threads, run the hooks (each once),
    then limit again (a hook may have imported torch)."""
    limit_compute_threads(threads)
    for fn in [*init, *(f for f in _INIT if f not in init)]:
        log.info("worker process %d: running init hook %s", os.getpid(), getattr(fn, "__qualname__", fn))
        fn()
    limit_compute_threads(threads)
