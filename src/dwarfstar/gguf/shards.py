"""A model stored in one GGUF file or split across several, in llama.cpp's split format.

Big models are published as ``NAME-00001-of-00007.gguf`` ... ``NAME-00007-of-00007.gguf``
(llama.cpp's ``gguf-split``, gguf-py's ``GGUFWriter(split_max_tensors=...)``). Each shard is a
complete GGUF file holding some of the tensors and the keys ``split.no`` (0-based),
``split.count`` and ``split.tensors.count`` (tensors in all shards together); the first shard
also holds the model's metadata. Any shard's path opens the whole set; each shard stays
memory-mapped on its own.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dwarfstar.gguf.reader import GGUFError, GGUFFile, TensorInfo

SPLIT_NO = "split.no"
SPLIT_COUNT = "split.count"
SPLIT_TENSORS = "split.tensors.count"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS)

_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_path(first: Path, number: int, count: int) -> Path:
    """The path of shard ``number`` (1-based, as in the file names) of a set named like ``first``."""
    match = _SHARD_NAME.match(first.name)
    if match is None:
        raise ValueError(f"{first.name} is not named like a shard (NAME-00001-of-00003.gguf)")
    return first.with_name(f"{match['stem']}-{number:05d}-of-{count:05d}.gguf")


class GGUFModel:
    """The shards of one model (a single file is a set of one).

    ``metadata`` is the model's (the first shard's, without the ``split.*`` keys); ``tensors``
    maps every tensor name of every shard to its ``TensorInfo``; ``shards`` are the open files
    in order; ``shard_of`` gives the index of the shard holding each tensor.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        given = GGUFFile(path)
        count = given.metadata.get(SPLIT_COUNT, 1)
        self.shards = [given] if count == 1 else _open_shards(given, count)
        self.path = self.shards[0].path
        self.metadata = {k: v for k, v in self.shards[0].metadata.items() if k not in SPLIT_KEYS}
        self.tensors: dict[str, TensorInfo] = {}
        self.shard_of: dict[str, int] = {}
        for index, shard in enumerate(self.shards):
            for name, info in shard.tensors.items():
                if name in self.tensors:
                    first = self.shards[self.shard_of[name]].path.name
                    raise GGUFError(f"{shard.path}: tensor {name!r} is also in {first}")
                self.tensors[name] = info
                self.shard_of[name] = index
        expected = self.shards[0].metadata.get(SPLIT_TENSORS)
        if count > 1 and expected != len(self.tensors):
            raise GGUFError(
                f"{self.path}: the {count} shards hold {len(self.tensors)} tensors, "
                f"{SPLIT_TENSORS} says {expected}"
            )

    def __repr__(self) -> str:
        return f"GGUFModel({str(self.path)!r}, {len(self.shards)} shards, {len(self.tensors)} tensors)"


def _open_shards(given: GGUFFile, count: object) -> list[GGUFFile]:
    """Every shard of the set ``given`` belongs to, checked to be the set's and in place."""
    if not isinstance(count, int) or count < 1:
        raise GGUFError(f"{given.path}: {SPLIT_COUNT} is {count!r}, not a shard count")
    try:
        paths = [shard_path(given.path, i + 1, count) for i in range(count)]
    except ValueError:
        raise GGUFError(
            f"{given.path}: it is shard {given.metadata.get(SPLIT_NO)} of {count}, but its name does not "
            "follow NAME-00001-of-000NN.gguf, so the other shards cannot be found"
        ) from None
    missing = [path for path in paths if not path.exists()]
    if missing:
        names = ", ".join(path.name for path in missing)
        raise GGUFError(
            f"{given.path}: the model is split into {count} files and {len(missing)} are missing "
            f"from {given.path.parent}: {names}"
        )
    shards = []
    for number, path in enumerate(paths):
        shard = given if path.samefile(given.path) else GGUFFile(path)
        found = (shard.metadata.get(SPLIT_NO), shard.metadata.get(SPLIT_COUNT))
        if found != (number, count):
            raise GGUFError(
                f"{path}: split.no / split.count are {found[0]} / {found[1]}, expected {number} / {count}: "
                "a shard of another model or another split?"
            )
        shards.append(shard)
    return shards
