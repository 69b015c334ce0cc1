"""Shared fixtures: a clean settings/dispatch state per test, and the devices the parity matrix runs on.

``LVSA_TEST_DEVICES=cuda`` (what ``tox -e cuda`` sets) makes those devices required: a missing one fails
the run instead of being skipped. Without it, every registered device present on this host is tested."""

from __future__ import annotations

import os

import pytest

import lvsa
from lvsa import dispatch, registry

KEEP_ENV = {"LVSA_TEST_DEVICES", "LVSA_TEST_BACKENDS", "LVSA_TEST_DTYPES"}


@pytest.fixture(autouse=True)
def clean_lvsa_state(monkeypatch):
    for key in list(os.environ):
        if key.upper().startswith("LVSA_") and key.upper() not in KEEP_ENV:
            monkeypatch.delenv(key)
    lvsa.reset_settings()
    dispatch.clear_caches()
    yield
    lvsa.reset_settings()
    dispatch.clear_caches()


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
    """Parametrize ``parity_target`` = (device, driver, dtype) over everything present (or required)."""
    if "parity_target" not in metafunc.fixturenames:
        return
    import torch

    params = []
    required = set(required_backends())
    for device in test_devices():
        for name in sorted(set(registry.backend_plugins()) | required):
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
    metafunc.parametrize("parity_target", params)


@pytest.fixture
def backends_required() -> list[str]:
    return required_backends()


def pytest_report_header(config):
    return f"lvsa parity devices: {', '.join(test_devices())}; drivers: {', '.join(registry.drivers())}"
