"""The disk cache: session snapshots in a directory, found again by the text they hold.

Each file is a snapshot (``kvfile``) named by the SHA-1 of its rendered text (of its token ids
when the text is not known), so a prompt finds the longest saved prefix of its own text, or of
its tokens, by hashing its prefixes of the saved lengths.
Over the space budget, files are removed by score (time since last use divided by one plus
their hits, the count kept in each file), oldest and least used first, never one a session of
this process still reads from (a restored session's rows stay in the file's pages until it
writes them), nor a file being written (it has a temporary name until it is whole). Bad files
(truncated, corrupt, another model or format version) are skipped with a warning and removed.
A full disk stops saving, with a warning, while serving goes on. Several servers may share a
directory: writes are atomic renames, a file being read stays readable when another process
removes it, and each name always holds a whole file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from dwarfstar.engine import kvfile
from dwarfstar.engine.kvfile import KVFileError, Snapshot
from dwarfstar.model.model import Model

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[0-9a-f]{40}\.kv$")
# Temporary files of a save that was killed are removed after this long.
_STALE_TEMPORARY_SECONDS = 3600.0


@dataclass
class Entry:
    """One file of the cache, as its header describes it."""

    path: Path
    text_length: int | None  # characters of rendered text the snapshot holds, when known
    n_tokens: int
    token_key: str | None  # SHA-1 of its token ids (int32 little-endian)
    size: int
    last_used: float  # the file's modification time: set when written and on each hit
    hits: int = 0  # times loaded, by any process: kept in the file
    tool_calls: dict[str, str] = field(default_factory=dict)  # call id -> the text the model wrote


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def token_key(tokens: list[int]) -> str:
    return hashlib.sha1(array("i", tokens).tobytes()).hexdigest()


class DiskCache:
    """Snapshots in ``directory`` up to ``space_bytes``; only prompts of ``min_tokens`` or
    more are worth a file (shorter ones are cheap to read again)."""

    def __init__(
        self, directory: str | os.PathLike[str], model: Model, space_bytes: int, min_tokens: int = 512
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.space_bytes = space_bytes
        self.min_tokens = min_tokens
        self.saving = True  # false after the disk filled up
        self._known: dict[str, tuple[tuple[int, int], Entry]] = {}

    def entries(self) -> list[Entry]:
        """The usable files now in the directory (headers read once per file version)."""
        found, now = {}, time.time()
        for item in os.scandir(self.directory):
            if item.name.endswith(".tmp") and item.name.startswith("."):
                self._remove_stale_temporary(item, now)
                continue
            if not _NAME.match(item.name):
                continue
            try:
                stat = item.stat()
            except FileNotFoundError:
                continue  # removed meanwhile (another server)
            version = (stat.st_mtime_ns, stat.st_size)
            known = self._known.get(item.name)
            if known is not None and known[0] == version:
                found[item.name] = known
                continue
            try:
                header = kvfile.read_header(item.path)
                extra = header.get("extra") or {}
                entry = Entry(
                    Path(item.path),
                    len(header["text"]) if isinstance(header["text"], str) else None,
                    int(header["n_tokens"]),
                    extra.get("token_key"),
                    stat.st_size,
                    stat.st_mtime,
                    int(header["hits"]),
                    _tool_calls(extra.get("tool_calls")),
                )
            except FileNotFoundError:
                continue
            except (KVFileError, OSError, KeyError, TypeError, ValueError) as err:
                self._reject(Path(item.path), f"unreadable header ({err})")
                continue
            found[item.name] = (version, entry)
        self._known = found
        return [entry for _, entry in found.values()]

    def tool_calls(self) -> dict[str, str]:
        """The tool-call texts the files carry (a more recently used file's win)."""
        texts: dict[str, str] = {}
        for entry in sorted(self.entries(), key=lambda e: e.last_used):
            texts.update(entry.tool_calls)
        return texts

    def lookup(self, text: str | None, tokens: list[int] | None) -> Entry | None:
        """The file holding the longest prefix of a prompt (the most tokens): of its text, or
        of its tokens when they are given."""
        best = None
        for entry in self.entries():
            if best is not None and entry.n_tokens <= best.n_tokens:
                continue
            by_text = (
                text is not None
                and entry.text_length is not None
                and entry.text_length <= len(text)
                and entry.path.name == text_key(text[: entry.text_length]) + ".kv"
            )
            by_tokens = (
                tokens is not None
                and entry.n_tokens <= len(tokens)
                and entry.token_key == token_key(tokens[: entry.n_tokens])
            )
            if by_text or by_tokens:
                best = entry
        return best

    def load(self, entry: Entry, text: str | None, tokens: list[int] | None) -> Snapshot | None:
        """The snapshot in ``entry``, checked to hold a prefix of the prompt (its ``text`` or
        its ``tokens``); None (the file removed, with a warning) when it is not usable."""
        try:
            snapshot = kvfile.read(entry.path, self.model)
        except KVFileError as err:
            self._reject(entry.path, str(err))
            return None
        by_text = text is not None and snapshot.text is not None and text.startswith(snapshot.text)
        if not by_text and (tokens is None or tokens[: len(snapshot.tokens)] != snapshot.tokens):
            self._reject(entry.path, "it holds neither the text nor the tokens its name and header say")
            return None
        with contextlib.suppress(OSError, KVFileError):
            kvfile.record_hit(entry.path)
        return snapshot

    def save(self, snapshot: Snapshot, reason: str) -> bool:
        """Write ``snapshot`` under its name, making room by eviction; False when it is not
        saved (too short, too big for the budget, or saving stopped)."""
        if not self.saving or len(snapshot.tokens) < self.min_tokens:
            return False
        # Named by its text; a state whose text is not known (it ends inside a character) by
        # its tokens.
        key = token_key(snapshot.tokens) if snapshot.text is None else text_key(snapshot.text)
        path = self.directory / (key + ".kv")
        if path.exists():
            os.utime(path)  # the same text is the same state: already saved
            return True
        need = estimated_size(snapshot)
        if need > self.space_bytes:
            log.warning(
                "kv cache: a %d-token snapshot (%d MB) exceeds the disk budget; not saved",
                len(snapshot.tokens),
                need >> 20,
            )
            return False
        if not self._make_room(need):
            log.warning(
                "kv cache: no room for a %d-token snapshot (%d MB) beside the files in use; not saved",
                len(snapshot.tokens),
                need >> 20,
            )
            return False
        snapshot.extra = {**snapshot.extra, "reason": reason, "token_key": token_key(snapshot.tokens)}
        try:
            kvfile.write(path, snapshot, self.model)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                self.saving = False
                log.warning(
                    "kv cache: %s is full (%s); saving stops, serving goes on", self.directory, err.strerror
                )
            else:
                log.warning("kv cache: cannot save to %s (%s)", self.directory, err.strerror or err)
            return False
        return True

    def _make_room(self, need: int) -> bool:
        """Remove files, the lowest scores first, until ``need`` more bytes fit the budget;
        False when they cannot (the files left are in use)."""
        entries = self.entries()
        used = sum(entry.size for entry in entries)
        now = time.time()
        entries.sort(key=lambda e: (now - e.last_used) / (1 + e.hits), reverse=True)
        for entry in entries:
            if used + need <= self.space_bytes:
                break
            if kvfile.in_use(entry.path):
                continue
            entry.path.unlink(missing_ok=True)
            used -= entry.size
            self._known.pop(entry.path.name, None)
        return used + need <= self.space_bytes

    def _reject(self, path: Path, why: str) -> None:
        log.warning("kv cache: skipping and removing %s: %s", path.name, why)
        path.unlink(missing_ok=True)
        self._known.pop(path.name, None)

    def _remove_stale_temporary(self, item: os.DirEntry, now: float) -> None:
        try:
            if now - item.stat().st_mtime > _STALE_TEMPORARY_SECONDS:
                os.unlink(item.path)
        except OSError:
            pass


def estimated_size(snapshot: Snapshot) -> int:
    """An upper bound of the file's size: the payload with its alignment, and a header of at
    most 160 bytes per tensor entry, 6 per byte of text (JSON escapes) and 16 KiB of the rest."""
    tensors = kvfile.state_tensors(snapshot.state)
    payload = sum(t.numel() * t.element_size() + 64 for _, t in tensors)
    payload += 4 * len(snapshot.tokens) + snapshot.logits.numel() * snapshot.logits.element_size() + 128
    header = 160 * (len(tensors) + 2) + 6 * len((snapshot.text or "").encode()) + (16 << 10)
    return payload + header


def _tool_calls(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}
