"""Where the model runs: choosing a device and uploading the bound weights to it once.

The GGUF file stays memory-mapped on the host. On the CPU the weights are used in place; on an
accelerator every tensor is copied to device memory once, at load, and the forward pass then
creates every tensor on that device (tests/model/test_device.py checks it).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import platform
import sys

import torch
from tqdm import tqdm

from dwarfstar.quant.tensor import QTensor

DEVICES = ("cpu", "cuda", "mps")


class DeviceError(ValueError):
    """The device asked for is not available, or the model does not fit in its memory."""


def best_device() -> str:
    """CUDA when there is a GPU, else Apple's Metal (mps), else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device named (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ``meta``), or the best available."""
    device = torch.device(best_device() if name is None else name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: this torch sees no CUDA GPU (is it a CUDA build of torch?)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("--device mps: Apple's Metal backend is not available on this machine")
    if device.type not in (*DEVICES, "meta"):
        raise DeviceError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")
    return device


# glibc's mallopt parameters (malloc.h) and the bound below which tensors come from the heap.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_HEAP_BLOCKS = 1 << 30


@functools.cache
def reuse_freed_host_memory() -> bool:
    """Have glibc hand freed tensor memory to the next tensor instead of returning it to the system.

    A prefill creates and frees about a gigabyte of temporaries (a 512-token chunk's queries
    alone are 64 MiB per layer). By default glibc maps each block over 32 MiB afresh and unmaps
    it when freed, and every page faults and is zeroed by the kernel on first touch: about 25 ms
    for a 64 MiB tensor that takes 4 ms to write (docs/benchmarks.md). Here blocks up to 1 GiB
    come from the heap and up to 1 GiB of free heap is kept, in one arena for every thread (the
    server runs the model in a thread of its own, whose arena would map large blocks anyway).
    The price: freed blocks stay resident, so the process keeps about its heap's high-water
    mark, and a freed block below a live one is a hole only blocks that fit reuse (a 256 MiB
    tensor freed under a 1 MiB one, then 300 MiB made: 558 MiB resident for 301 live; after
    ten prefills of the 2-layer file 740-750 MiB against 270-390, docs/benchmarks.md).
    Returns whether it applied: on glibc only, and only where it takes a 1 GiB threshold
    (versions that cap it at 32 MiB refuse the first setting, and then nothing changes).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    settings = ((_M_MMAP_THRESHOLD, _HEAP_BLOCKS), (_M_TRIM_THRESHOLD, _HEAP_BLOCKS), (_M_ARENA_MAX, 1))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)


def device_memory(device: torch.device) -> int | None:
    """Bytes the model may occupy on ``device``: free memory on a GPU; None where unbounded."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory()
    return None


def _leaves(tree: object) -> list[torch.Tensor | QTensor]:
    """Every tensor in a tree of dataclasses and lists (the bound weights)."""
    if isinstance(tree, torch.Tensor | QTensor):
        return [tree]
    if isinstance(tree, list | tuple):
        return [leaf for item in tree for leaf in _leaves(item)]
    if dataclasses.is_dataclass(tree):
        return [leaf for f in dataclasses.fields(tree) for leaf in _leaves(getattr(tree, f.name))]
    return []


def _moved(tree: object, move) -> object:
    if isinstance(tree, torch.Tensor):
        return move(tree)
    if isinstance(tree, QTensor):
        return QTensor(tree.kind, tree.shape, move(tree.data))
    if isinstance(tree, list):
        return [_moved(item, move) for item in tree]
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        changes = {f.name: _moved(getattr(tree, f.name), move) for f in dataclasses.fields(tree)}
        return dataclasses.replace(tree, **changes)
    return tree


def nbytes(tree: object) -> int:
    return sum(
        leaf.nbytes if isinstance(leaf, QTensor) else leaf.numel() * leaf.element_size()
        for leaf in _leaves(tree)
    )


def upload(tree: object, device: torch.device, progress: bool | None = None):
    """A copy of ``tree`` (the bound weights) with every tensor on ``device``.

    On the CPU nothing is copied (the weights stay views of the mapped file). Elsewhere the
    total must fit the device's memory, or a DeviceError says by how much it does not
    (streaming layers from the host is not supported yet). A progress bar on a terminal.
    """
    if device.type == "cpu":
        return tree
    total = nbytes(tree)
    room = device_memory(device)
    if room is not None and total > room:
        raise DeviceError(
            f"the model's weights take {total / 2**30:.1f} GiB, {device} has {room / 2**30:.1f} GiB free: "
            "use a smaller file (e.g. the q2 recipe) or --device cpu"
        )
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"to {device}", disable=not show) as bar:

        def move(t: torch.Tensor) -> torch.Tensor:
            bar.update(t.numel() * t.element_size())
            return t.to(device)

        return _moved(tree, move)
