"""Shared fixtures: a clean settings and cache state per test, and the devices the parity matrix runs on.

``LVSA_TEST_DEVICES=cuda`` (what ``tox -e cuda`` sets) makes those devices required: a missing one fails
the run instead of being skipped. Without it, every registered device present on this host is tested."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

import lvsa
import lvsa.attention
from lvsa import caches, registry
from lvsa.settings import declare_variables

TEST_VARIABLES = {
    "LVSA_TEST_DEVICES": "device list of the parity tests (tox -e cuda/npu)",
    "LVSA_TEST_BACKENDS": "drivers the parity tests require",
    "LVSA_TEST_DTYPES": "dtypes the parity tests run",
    "LVSA_TEST_VLLM_OMNI": "1: the vLLM-Omni integration's tests must run (tox -e vllm-omni)",
}
KEEP_ENV = set(TEST_VARIABLES)
declare_variables(TEST_VARIABLES)  # the test suite's own variables: not settings, and no warning


@pytest.fixture(autouse=True)
def clean_lvsa_state(monkeypatch):
    for key in list(os.environ):
        if key.upper().startswith("LVSA_") and key.upper() not in KEEP_ENV:
            monkeypatch.delenv(key)
    lvsa.reset_settings()
    caches.clear("drivers")
    yield
    lvsa.reset_settings()
    caches.clear("drivers")


def _split(variable: str) -> list[str]:
    return [item.strip() for item in os.environ.get(variable, "").split(",") if item.strip()]


def required_devices() -> list[str]:
    return _split("LVSA_TEST_DEVICES")


def required_backends() -> list[str]:
    return _split("LVSA_TEST_BACKENDS")


def test_devices() -> list[str]:
    """Devices the parity matrix runs on; raises when a required one is missing."""
    required = required_devices()
    if required:
        missing = []
        for name in required:
            device = registry.get_device(name)
            if device is None:
                missing.append(f"{name}: no device module registered (lvsa.devices entry point)")
                continue
            availability = device.is_available()
            if not availability:
                missing.append(f"{name}: {availability.reason}")
        if missing:
            raise pytest.UsageError(
                "LVSA_TEST_DEVICES asks for devices this host does not have:\n  " + "\n  ".join(missing)
            )
        return required
    return [name for name, device in registry.devices().items() if device.is_available()]


test_devices.__test__ = False  # a helper, not a test


def pytest_generate_tests(metafunc):
    """Parametrize ``parity_target`` = (device, driver, dtype) over everything present (or required), and
    ``accelerator`` over the devices other than the CPU."""
    if "accelerator" in metafunc.fixturenames:
        metafunc.parametrize("accelerator", [name for name in test_devices() if name != "cpu"])
    if "parity_target" not in metafunc.fixturenames:
        return
    import torch

    params = []
    required = set(required_backends())
    for device in test_devices():
        for name in sorted(set(registry.driver_plugins()) | required):
            driver = registry.drivers().get(name)
            if name == "reference" or (driver is not None and driver.devices is not None
                                       and device not in driver.devices and name not in required):
                continue  # the ground truth itself, or a driver that never claims this device
            dtypes = (torch.float32, torch.bfloat16) + ((torch.float16,) if device != "cpu" else ())
            chosen = _split("LVSA_TEST_DTYPES")  # e.g. "bfloat16" to limit kernel compilation on a GPU run
            for dtype in dtypes:
                if chosen and str(dtype)[6:] not in chosen:
                    continue
                params.append(pytest.param((device, name, dtype), id=f"{device}-{name}-{str(dtype)[6:]}"))
        if device == "cpu" and importlib.util.find_spec("torch_npu") is None:
            # no Ascend host: the npu driver runs on the CPU against the torch_npu test double
            for dtype in (torch.bfloat16, torch.float16):
                params.append(pytest.param((device, "npu", dtype), id=f"cpu-npu-emulated-{str(dtype)[6:]}"))
    metafunc.parametrize("parity_target", params)


@pytest.fixture
def npu_emulation(monkeypatch):
    """Install tests/fakes/torch_npu.py as ``torch_npu`` (and ``torch.npu``), and let the npu driver take
    CPU tensors. Returns the fake module (its ``calls`` list records every op call)."""
    import torch

    from lvsa.backends.npu import NpuDriver

    spec = importlib.util.spec_from_file_location("torch_npu", Path(__file__).parent / "fakes" / "torch_npu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    monkeypatch.setattr(torch, "npu", module.EmulatedNpu(), raising=False)
    monkeypatch.setattr(NpuDriver, "devices", frozenset({"npu", "cpu"}))
    caches.clear("drivers")
    yield module
    caches.clear("drivers")


@pytest.fixture
def backends_required() -> list[str]:
    return required_backends()


def pytest_report_header(config):
    return f"lvsa parity devices: {', '.join(test_devices())}; drivers: {', '.join(registry.drivers())}"


class _Calls(list):
    """The recorded calls, and beside them each call's frame-paired reference keys (``None`` for most)."""

    def __init__(self) -> None:
        super().__init__()
        self.references: list = []

    def clear(self) -> None:
        super().clear()
        self.references.clear()


@pytest.fixture
def layer_calls(monkeypatch):
    """Every layer call the diffusers host's processors hand to the executor, as it is run: ``(denoising
    step, layer, plan, video q/k/v, text q/k/v or None, key padding mask, (video out, text out))``."""
    from lvsa.adapters import base
    from lvsa.attention.executor import PLAN_IN_CALL

    calls = _Calls()
    real = base.execute

    def recording(context, origin, video, text=None, key_padding_mask=None, plan=PLAN_IN_CALL, references=None):
        out = real(context, origin, video, text, key_padding_mask, plan, references)
        calls.append((context.denoising_step, origin, plan, video, text, key_padding_mask, out))
        calls.references.append(references)
        return out

    monkeypatch.setattr(base, "execute", recording)
    return calls


@pytest.fixture
def torchrun():
    """``torchrun(processes, *args, cwd=...)``: a CPU launch of ``processes`` ranks on a free port (the
    completed process; 15 minutes at most)."""
    import socket
    import subprocess

    def launch(processes: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        with socket.socket() as probe:  # a free port for the rendezvous
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                   "--master-addr", "127.0.0.1", "--master-port", str(port), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=cwd)

    return launch
