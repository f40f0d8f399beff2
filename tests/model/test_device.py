"""The model is device-generic: every tensor of a forward pass lives on the weights' device.

The forward pass runs on torch's `meta` device (shapes only, no data) under a dispatch mode
that records every operation touching a tensor elsewhere. Meta tensors also refuse to be read
back (`.item()`, `.tolist()`, `int(t)`, a Python `if` on a value), so a decode step that runs
there proves it never synchronises with the host, which is what a GPU (and a CUDA graph) needs.
The matrix products get shape-only kernels for `meta`, standing in for a device's kernels.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from models import tiny_hf_config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dwarfstar import quant
from dwarfstar.model import device as devices
from dwarfstar.model.device import DeviceError, upload
from dwarfstar.model.model import Model
from dwarfstar.quant.formats import SUPPORTED_KINDS

META = torch.device("meta")


class DeviceCheck(TorchDispatchMode):
    """Records each operation that has an input or output on a device other than `device`."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.strays: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor) and t.device != self.device:
                self.strays.append(f"{func} on {t.device} {tuple(t.shape)}")
        return out


@pytest.fixture(scope="module")
def path(gguf_model_factory):
    return gguf_model_factory("f32", tiny_hf_config())


def _shape_only_linear(x: torch.Tensor, w) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def _shape_only_experts(x: torch.Tensor, w, ids: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*ids.shape, w.shape[1])


@pytest.fixture
def meta_kernels(monkeypatch):
    """Shape-only matrix products for meta tensors, as a device's kernels would register."""
    for kind in SUPPORTED_KINDS:
        monkeypatch.setitem(quant.LINEAR_KERNELS, ("meta", kind), _shape_only_linear)
        monkeypatch.setitem(quant.EXPERT_KERNELS, ("meta", kind), _shape_only_experts)


def test_prefill_and_decode_stay_on_the_device_without_host_reads(path, meta_kernels):
    cpu_model = Model.load(path, quant_sim=True)
    model = Model(upload(cpu_model.weights, META), quant_sim=True)
    assert model.device == META
    session = model.new_session()
    check = DeviceCheck(META)
    with check:
        tokens = torch.zeros(140, dtype=torch.long, device=META)  # completes ratio-4 and 128 windows
        assert model.forward(tokens, session, all_logits=False).shape == (1, model.config.vocab_size)
        for _ in range(3):  # decode steps: one token each, the sampled id already on the device
            logits = model.forward(torch.zeros(1, dtype=torch.long, device=META), session)
    assert logits.device == META and session.n_tokens == 143
    assert check.strays == []
    assert all(t.device == META for layer in session.layers for t in layer.tensors())


def test_a_decode_step_copies_nothing_from_the_host(path, meta_kernels, monkeypatch):
    """What a CUDA graph capture needs besides no reads: no tensor made from host values on the
    device inside the step (a host-to-device copy is refused while capturing). Tensors made
    once and kept (a codebook per device) are made by the warm-up step, as before a capture."""
    model = Model(upload(Model.load(path, quant_sim=True).weights, META), quant_sim=True)
    session = model.new_session()
    model.forward(torch.zeros(140, dtype=torch.long, device=META), session, all_logits=False)
    model.forward(torch.zeros(1, dtype=torch.long, device=META), session)  # warm-up
    copies = []

    def spying(name, make):
        def spy(*args, **kwargs):
            out = make(*args, **kwargs)
            source = args[0] if args else kwargs.get("data")
            if out.device == META and not (isinstance(source, torch.Tensor) and source.device == META):
                copies.append(name)
            return out

        return spy

    for name in ("tensor", "as_tensor", "from_numpy"):
        monkeypatch.setattr(torch, name, spying(name, getattr(torch, name)))
    check = DeviceCheck(META)
    with check:
        for _ in range(2):
            model.forward(torch.zeros(1, dtype=torch.long, device=META), session)
    assert copies == [] and check.strays == []


def test_the_check_sees_a_stray_tensor():
    check = DeviceCheck(META)
    with check:
        torch.ones(2, device=META) + torch.ones(2).sum()  # a CPU scalar mixed in: torch allows it
    assert any("cpu" in stray for stray in check.strays)


def test_cpu_load_keeps_the_mapped_weights_and_the_logits(path):
    model = Model.load(path, device="cpu")
    assert model.device == torch.device("cpu")
    again = Model.load(path)
    tokens = torch.arange(5)
    assert torch.equal(model.prefill(tokens, model.new_session()), again.prefill(tokens, again.new_session()))


def test_weights_larger_than_the_device_memory_are_a_clear_error(path, monkeypatch):
    weights = Model.load(path).weights
    monkeypatch.setattr(devices, "device_memory", lambda device: 1 << 20)
    with pytest.raises(DeviceError, match=r"GiB free: use a smaller file"):
        upload(weights, META)


def test_unavailable_devices_are_named():
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA GPU"):
            devices.resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        devices.resolve_device("xla")
    assert devices.resolve_device(None).type == devices.best_device()


def test_the_cli_names_a_missing_device(path, tmp_path):
    missing = "cuda" if not torch.cuda.is_available() else "mps"
    (tmp_path / "ids.json").write_text("[1, 2]")
    code = "import sys; from dwarfstar.cli.main import main; sys.exit(main())"
    args = [
        "logits",
        "-m",
        str(path),
        "--tokens",
        str(tmp_path / "ids.json"),
        "--out",
        str(tmp_path / "o.npy"),
    ]
    result = subprocess.run(
        [sys.executable, "-c", code, *args, "--device", missing], capture_output=True, text=True
    )
    assert result.returncode == 2 and f"--device {missing}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    ok = subprocess.run(
        [sys.executable, "-c", code, *args, "--device", "cpu"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr


FAULTS_OF_FREED_TENSORS = """
import resource, sys, threading, torch
from dwarfstar.model.model import Model
from dwarfstar.model.device import reuse_freed_host_memory
if sys.argv[1] == "reuse":
    Model(Model.load(sys.argv[2]).weights)  # a CPU model sets the policy
faults = []
def prefill_like():  # in a thread of its own, as the server runs the model
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(16 << 20)  # 64 MiB
        y = x[: 12 << 20] * 2  # 48 MiB
        del x
        z = torch.cat((y, y))  # 96 MiB
        del y, z
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=prefill_like)
thread.start()
thread.join()
print(reuse_freed_host_memory(), sum(faults[3:]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator policy")
def test_a_cpu_model_reuses_freed_tensor_memory(path):
    """Large tensors made and freed in a loop in a thread fault all their pages in afresh each
    time under glibc's defaults (53k pages per round), and fewer once a CPU model has set the
    policy (the heap's layout decides how many: 0 to 25k per round in trials)."""
    runs = {}
    for mode in ("default", "reuse"):
        out = subprocess.run(
            [sys.executable, "-c", FAULTS_OF_FREED_TENSORS, mode, str(path)], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        applied, faults = out.stdout.split()
        runs[mode] = int(faults)
    assert applied == "True"
    assert runs["default"] >= 3 * 50000
    assert runs["reuse"] < 0.6 * runs["default"]
