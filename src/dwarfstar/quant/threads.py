"""One pool of worker threads for CPU work shared out from Python, torch on one thread in each.

The items go to whichever thread is free, so a thread the system deschedules delays only its
current item, where torch's own (OpenMP) threads wait for each other at the end of every
operation: on a machine whose cores other processes also use, that wait cost more than the
operations (docs/benchmarks.md). The banded products (`cpu.py`) and a prefill's attention
blocks (`model/attention.py`) share it; the compiled kernels have threads of their own in C.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

Item = TypeVar("Item")

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _forget_pools_in_child() -> None:
    """A forked child has none of the pools' threads, and the lock, were another thread making a
    pool at the fork, would stay held for ever. Its torch runs on one thread: GNU OpenMP (torch's
    threads in the Linux wheels) hangs a child's first parallel operation when the parent had
    used its threads before the fork."""
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()
    torch.set_num_threads(1)


os.register_at_fork(after_in_child=_forget_pools_in_child)


def share_out(work: Callable[[Item], None], items: Iterable[Item], threads: int) -> None:
    """``work(item)`` for every item, shared out among ``threads`` threads that each run torch
    on one thread, in the caller's inference mode; on the calling thread alone when ``threads``
    is 1 or there is one item."""
    items = list(items)
    if threads == 1 or len(items) == 1:
        for item in items:
            work(item)
        return
    inference = torch.is_inference_mode_enabled()  # a thread's own: the pool's threads follow the caller

    def run(item: Item) -> None:
        with torch.inference_mode(inference):
            work(item)

    for _ in _pool(threads).map(run, items):
        pass


def _pool(threads: int) -> ThreadPoolExecutor:
    """The pool of ``threads`` threads, each with torch set to one thread of its own."""
    with _pools_lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = ThreadPoolExecutor(
                threads, "dwarfstar-cpu", initializer=torch.set_num_threads, initargs=(1,)
            )
            # Start every thread now; torch.set_num_threads(1) in them also set the count that
            # threads started later begin with, so set the caller's count back afterwards.
            before = torch.get_num_threads()
            started = threading.Barrier(threads)
            for _ in pool.map(lambda _: started.wait(), range(threads)):
                pass
            torch.set_num_threads(before)
            _pools[threads] = pool
    return pool
