"""Snapshot files: bit-exact restore, memory-mapped load, and rejection of every bad file."""

from __future__ import annotations

import errno
import os
import random
import signal
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import tiny_hf_config

from dwarfstar.engine import kvfile
from dwarfstar.engine.kvfile import KVFileError, Snapshot
from dwarfstar.model.model import Model


@pytest.fixture(scope="module")
def model(gguf_model_factory) -> Model:
    return Model.load(gguf_model_factory("mixed", tiny_hf_config()), quant_sim=False)


def ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 129280, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def snapshot_after(model: Model, tokens: list[int], text: str | None = "some text") -> Snapshot:
    state = model.new_session()
    logits = torch.cat(list(model.prefill_chunks(torch.tensor(tokens), state, chunk=64)))[-1]
    return Snapshot(state, list(tokens), text, logits, {"reason": "test"})


class Saved(tuple):
    def __repr__(self) -> str:  # hypothesis prints its arguments; the bytes are megabytes
        return "saved"


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """A snapshot after 301 tokens, its file's bytes, and the logits of 5 more tokens fed one by one."""
    snap = snapshot_after(model, ids(301))
    path = tmp_path_factory.mktemp("kv") / "a.kv"
    kvfile.write(path, snap, model)
    follow = torch.cat([model.forward(torch.tensor([t]), snap.state) for t in ids(5, seed=1)])
    return Saved((path.read_bytes(), snap, follow))


def test_restoring_gives_bit_identical_logits_and_continues_exactly(model, saved, tmp_path):
    data, original, follow = saved
    path = tmp_path / "a.kv"
    path.write_bytes(data)
    restored = kvfile.read(path, model)
    assert restored.tokens == original.tokens and restored.text == "some text"
    assert restored.extra == {"reason": "test"}
    assert torch.equal(restored.logits, original.logits)
    assert restored.state.n_tokens == 301
    again = torch.cat([model.forward(torch.tensor([t]), restored.state) for t in ids(5, seed=1)])
    assert torch.equal(again, follow)


def test_loading_maps_the_rows_instead_of_copying_them(model, saved, tmp_path):
    data, _, _ = saved
    path = tmp_path / "a.kv"
    path.write_bytes(data)
    restored = kvfile.read(path, model)
    path.unlink()  # the mapping outlives the name
    buffers = [layer.window for layer in restored.state.layers]
    buffers += [layer.compressor.row_buffer for layer in restored.state.layers if layer.compressor]
    assert all(buffer.capacity == len(buffer) > 0 for buffer in buffers)  # the file's pages, adopted
    before = [len(buffer) for buffer in buffers]
    model.forward(torch.tensor(ids(4, seed=3)), restored.state)
    grown = [
        (buffer, n)
        for buffer, n in zip(buffers, before, strict=True)
        if buffer.rows_copied or len(buffer) != n
    ]
    assert grown and all(buffer.rows_copied == n for buffer, n in grown)  # moved once, on the first append


def test_a_file_of_another_model_or_setting_is_rejected(model, saved, tmp_path, gguf_model_factory):
    data, _, _ = saved
    path = tmp_path / "a.kv"
    path.write_bytes(data)
    other_weights = Model.load(gguf_model_factory("mixed", tiny_hf_config(), seed=1), quant_sim=False)
    with pytest.raises(KVFileError, match="another model"):
        kvfile.read(path, other_weights)
    simulated = Model.load(model.file.path, quant_sim=True)
    with pytest.raises(KVFileError, match="another model"):
        kvfile.read(path, simulated)


def test_another_format_version_is_rejected(model, saved, tmp_path):
    data, _, _ = saved
    path = tmp_path / "a.kv"
    path.write_bytes(data[:8] + (kvfile.VERSION + 1).to_bytes(4, "little") + data[12:])
    with pytest.raises(KVFileError, match="version"):
        kvfile.read(path, model)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=0, max_size=4),
    keep=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)),
)
def test_random_corruption_and_truncation_are_always_rejected(model, saved, tmp_path, flips, keep):
    data, _, _ = saved
    if not flips and keep is None:
        return  # the intact file: loads (tested above)
    damaged = bytearray(data)
    for where, xor in flips:
        damaged[int(where * len(data))] ^= xor
    if keep is not None:
        damaged = damaged[: int(keep * len(data))]
    if damaged == data:
        return  # flips that cancel out
    path = tmp_path / "bad.kv"
    path.write_bytes(bytes(damaged))
    with pytest.raises(KVFileError):
        kvfile.read(path, model)


def test_a_failing_write_leaves_no_file(model, saved, tmp_path, monkeypatch):
    _, snap, _ = saved

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        kvfile.write(tmp_path / "a.kv", snap, model)
    assert list(tmp_path.iterdir()) == []


def test_a_save_killed_at_random_points_never_leaves_a_loadable_bad_file(model, tmp_path):
    """A child rewrites a 16 MB snapshot in a loop; SIGKILL it at a random moment, 24 times."""
    big = snapshot_after(model, ids(40))
    layer = next(layer for layer in big.state.layers if layer.compressor is not None)
    layer.compressor.append_rows(torch.randn(64_000, layer.compressor.rows.shape[1]))
    path = tmp_path / "a.kv"
    rng = random.Random(0)
    torn = 0
    for _ in range(24):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: announce, then save again and again until killed
            try:
                os.close(read_end)
                os.write(write_end, b"x")
                while True:
                    kvfile.write(path, big, model)
            finally:
                os._exit(1)
        os.close(write_end)
        os.read(read_end, 1)
        os.close(read_end)
        time.sleep(rng.uniform(0, 0.3))  # the kill lands at a random point of some save
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        leftovers = [p for p in tmp_path.iterdir() if p.name != "a.kv"]
        torn += bool(leftovers)
        assert all(p.name.startswith(".a.kv.") and p.name.endswith(".tmp") for p in leftovers)
        for p in leftovers:
            try:  # a temporary is rejected, or is complete (killed between fsync and rename)
                whole = kvfile.read(p, model)
                assert whole.tokens == big.tokens and torch.equal(whole.logits, big.logits)
            except KVFileError:
                pass
            p.unlink()
        if path.exists():
            restored = kvfile.read(path, model)
            assert restored.tokens == big.tokens and torch.equal(restored.logits, big.logits)
    assert torn > 0  # some kills did land in the middle of a save
    kvfile.write(path, big, model)  # and saving still works afterwards
    assert kvfile.read(path, model).tokens == big.tokens
