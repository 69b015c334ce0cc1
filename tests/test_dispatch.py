"""Driver choice, errors that list every driver, the loud fallback, and plan-once-run-many caching."""

from __future__ import annotations

import logging

import pytest
import torch

import lvsa
from lvsa import caches, registry
from lvsa.attention import drivers as dispatch
from lvsa.backends.sdpa import SdpaDriver
from lvsa.errors import DriverUnavailable, GeometryError
from lvsa.registry import Plugin


def small_problem(text=0, heads=(2, 2), batch=1):
    s = lvsa.LVSASettings(reference_latent_frames=3, window_size=4)
    plan = lvsa.make_plan(9, 4, text_tokens=text, settings=s)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(batch, plan.seq_len, heads[0], 8, generator=gen)
    k = torch.randn(batch, plan.seq_len, heads[1], 8, generator=gen)
    v = torch.randn(batch, plan.seq_len, heads[1], 8, generator=gen)
    return plan, q, k, v


class CountingDriver(SdpaDriver):
    name = "counting"
    priority = 50
    prepares = 0

    def prepare(self, plan, problem):
        type(self).prepares += 1
        return super().prepare(plan, problem)


class FussyDriver(SdpaDriver):
    name = "fussy"
    priority = 100
    head_dims = frozenset({128})


@pytest.fixture
def extra_drivers(monkeypatch):
    plugins = dict(registry.driver_plugins())
    for cls in (CountingDriver, FussyDriver):
        plugins[cls.name] = Plugin(cls.name, f"tests:{cls.__name__}", None, cls(), None)
    CountingDriver.prepares = 0
    with registry.use_plugins(registry.DRIVERS_NAMESPACE, plugins):
        yield


def test_auto_uses_sdpa_on_cpu_and_never_the_reference():
    plan, q, k, v = small_problem()
    problem = lvsa.AttentionProblem.from_tensors(q, k, v, plan)
    assert dispatch.select_driver(problem, "auto", "error").name == "sdpa"


def test_auto_skips_a_driver_that_cannot_run_the_problem_and_says_so(extra_drivers, caplog):
    plan, q, k, v = small_problem()
    problem = lvsa.AttentionProblem.from_tensors(q, k, v, plan)
    with caplog.at_level(logging.INFO, logger="lvsa"):
        assert dispatch.select_driver(problem, "auto", "error").name == "counting"
    assert "fussy: head_dim 8 not in [128]" in caplog.text


def test_unknown_backend_lists_the_installed_drivers(monkeypatch):
    plan, q, k, v = small_problem()
    with pytest.raises(DriverUnavailable) as error:
        lvsa.sparse_attention(q, k, v, plan, backend="nosuch")
    message = str(error.value)
    assert "'nosuch'" in message and "not installed" in message
    assert "sdpa" in message and "reference" in message and "LVSA_FALLBACK=warn" in message


def test_fallback_warn_logs_and_uses_the_next_driver(monkeypatch, caplog):
    monkeypatch.setenv("LVSA_FALLBACK", "warn")
    plan, q, k, v = small_problem()
    with caplog.at_level(logging.WARNING, logger="lvsa"):
        out = lvsa.sparse_attention(q, k, v, plan, backend="nosuch")  # settings refuse the name; a call may ask
    line = next(r.getMessage() for r in caplog.records if "[LVSA-FALLBACK]" in r.getMessage())
    assert "origin=dispatch reason=driver_not_installed requested=nosuch using=sdpa device=cpu" in line
    expected = lvsa.sparse_attention(q, k, v, plan, backend="sdpa")
    assert torch.equal(out, expected)


def test_unsupported_problem_is_an_error_naming_the_reason(extra_drivers):
    plan, q, k, v = small_problem()
    with pytest.raises(DriverUnavailable, match="head_dim 8 not in \\[128\\]"):
        lvsa.sparse_attention(q, k, v, plan, backend="fussy")


def test_prepare_once_per_plan_not_per_layer(extra_drivers, caplog):
    plan, q, k, v = small_problem()
    with caplog.at_level(logging.INFO, logger="lvsa"):
        for _layer in range(30):
            lvsa.sparse_attention(q, k, v, plan, backend="counting")
        assert CountingDriver.prepares == 1
        # the next denoising step rotates the keyframes: a new plan, prepared once more
        s = lvsa.LVSASettings(reference_latent_frames=3, window_size=4)
        next_step = lvsa.make_plan(9, 4, settings=s, step=1)
        assert next_step != plan
        for _layer in range(30):
            lvsa.sparse_attention(q, k, v, next_step, backend="counting")
    assert CountingDriver.prepares == 2
    # the [LVSA] lines are logged when the plan's shape changes, not at every rotation
    assert sum("[LVSA] kfi=" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda q, k, v: (q[:, :-1], k[:, :-1], v[:, :-1]), "does not match the plan"),
        (lambda q, k, v: (q, k[..., :1, :].repeat(1, 1, 3, 1), v[..., :1, :].repeat(1, 1, 3, 1)), "multiple"),
        (lambda q, k, v: (q[0], k[0], v[0]), "batch, seq, heads, head_dim"),
        (lambda q, k, v: (q, k.double(), v.double()), "different dtypes"),
    ],
)
def test_wrong_geometry_is_an_error(mutate, message):
    plan, q, k, v = small_problem()
    with pytest.raises(GeometryError, match=message):
        lvsa.sparse_attention(*mutate(q, k, v), plan)


def test_padding_mask_needs_text_tokens_and_its_shape():
    plan, q, k, v = small_problem()
    with pytest.raises(GeometryError, match="no text tokens"):
        lvsa.sparse_attention(q, k, v, plan, key_padding_mask=torch.ones(1, 3, dtype=torch.bool))
    plan, q, k, v = small_problem(text=3)
    with pytest.raises(GeometryError, match=r"\[1, 3\]"):
        lvsa.sparse_attention(q, k, v, plan, key_padding_mask=torch.ones(1, 4, dtype=torch.bool))


def test_available_backends_lists_every_driver_per_device():
    rows = lvsa.available_drivers("cpu")
    by_name = {r.name: r for r in rows}
    assert by_name["sdpa"].available and by_name["reference"].available
    assert by_name["sdpa"].target == "lvsa.backends.sdpa:SdpaDriver"
    everywhere = lvsa.available_drivers()
    assert {r.device for r in everywhere} >= {"cpu", "cuda"}
    if not registry.get_device("cuda").is_available():
        assert all(not r.available and r.code == "device_absent" for r in everywhere if r.device == "cuda")


def test_explicit_scale_is_used():
    plan, q, k, v = small_problem()
    a = lvsa.sparse_attention(q, k, v, plan, backend="sdpa", scale=0.05)
    b = lvsa.sparse_attention(q, k, v, plan, backend="reference", scale=0.05)
    c = lvsa.sparse_attention(q, k, v, plan, backend="sdpa")
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-3)


def test_scale_is_fixed_at_planning_time_per_problem():
    """The scale is part of the problem: each scale gets its own prepared state, and a bad one is refused."""
    plan, q, k, v = small_problem()
    caches.clear()
    for scale in (0.05, 0.2):
        out = lvsa.sparse_attention(q, k, v, plan, backend="sdpa", scale=scale)
        torch.testing.assert_close(out, lvsa.sparse_attention(q, k, v, plan, backend="reference", scale=scale))
    scales = {state.problem.scale for name, state in dispatch.prepared_states() if name == "sdpa"}
    assert scales == {0.05, 0.2}
    with pytest.raises(GeometryError, match="scale must be a positive finite number"):
        lvsa.sparse_attention(q, k, v, plan, backend="sdpa", scale=float("nan"))


def test_a_driver_written_for_the_earlier_contract_is_refused(monkeypatch):
    """prepare() returning bare state (the contract before the scale moved into the problem) must not run:
    such a driver would ignore the caller's scale without a word."""

    class OldStyleDriver(SdpaDriver):
        name = "oldstyle"

        def prepare(self, plan, problem):
            return (plan, "state")

    plan, q, k, v = small_problem()
    plugins = dict(registry.driver_plugins())
    plugins["oldstyle"] = Plugin("oldstyle", "tests:OldStyleDriver", None, OldStyleDriver(), None)
    with registry.use_plugins(registry.DRIVERS_NAMESPACE, plugins), \
            pytest.raises(DriverUnavailable, match=r"oldstyle.*returned tuple, not a lvsa\.driver\.Prepared"):
        lvsa.sparse_attention(q, k, v, plan, backend="oldstyle", scale=0.05)
