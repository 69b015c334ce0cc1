"""Every process-wide cache is registered with lvsa.caches and emptied by its one clear; use_plugins swaps a
namespace's plugins for a block and leaves no choice made with them behind."""

from __future__ import annotations

import pytest
import torch

import lvsa
from lvsa import caches, registry
from lvsa.attention import drivers
from lvsa.backends.sdpa import SdpaDriver
from lvsa.registry import Plugin


def _prepared_once():
    plan = lvsa.make_plan(8, 4, model="wan", settings=lvsa.LVSASettings(reference_latent_frames=3))
    q = torch.randn(1, plan.seq_len, 2, 8)
    lvsa.sparse_attention(q, q, q, plan, backend="sdpa")
    return plan


def test_every_cache_is_registered():
    assert {"plugins", "drivers", "ring-shards", "settings", "settings-warnings"} <= set(caches.registered())


def test_clear_empties_the_prepared_states_and_the_plugins():
    _prepared_once()
    assert drivers.prepared_states() and registry.driver_plugins()
    caches.clear()
    assert drivers.prepared_states() == []
    assert "sdpa" in registry.driver_plugins()  # loaded again on the next question


def test_clear_by_name_and_unknown_names():
    _prepared_once()
    caches.clear("drivers")
    assert drivers.prepared_states() == []
    with pytest.raises(KeyError, match="no cache named nosuch"):
        caches.clear("nosuch")


class _Marked(SdpaDriver):
    name = "marked"
    priority = 1000


def test_use_plugins_swaps_a_namespace_for_a_block_only():
    plan = lvsa.make_plan(8, 4, model="wan", settings=lvsa.LVSASettings(reference_latent_frames=3))
    q = torch.randn(1, plan.seq_len, 2, 8)
    problem = lvsa.AttentionProblem.from_tensors(q, q, q, plan)
    before = dict(registry.driver_plugins())
    found = {**before, "marked": Plugin("marked", "tests:_Marked", None, _Marked(), None)}
    with registry.use_plugins(registry.DRIVERS_NAMESPACE, found):
        assert drivers.select_driver(problem, "auto", "error").name == "marked"
    assert "marked" not in registry.driver_plugins() and registry.driver_plugins().keys() == before.keys()
    assert drivers.select_driver(problem, "auto", "error").name == "sdpa"  # no choice outlived the block
