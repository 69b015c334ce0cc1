"""Ring attention's edges: drivers without log-sum-exp are refused (or loudly replaced), bad degrees and
geometry are errors naming the numbers, and the ``[LVSA]`` lines appear under ring attention too. (The
ring against the reference is tests/parity/test_ring_parity.py; across processes, test_context_parallel.py.)"""

from __future__ import annotations

import logging

import pytest
import torch

import lvsa
from lvsa import caches, registry
from lvsa.attention import RingGroup, check_degrees
from lvsa.attention import drivers as dispatch
from lvsa.attention.ring import ring_attention
from lvsa.backends.sdpa import SdpaDriver
from lvsa.driver import Driver
from lvsa.errors import ConfigError, DriverUnavailable, GeometryError
from lvsa.registry import Plugin
from lvsa.shards import RingStep, shard_span
from lvsa_app.generation import main


class NoLseDriver(SdpaDriver):
    """A driver that runs self-attention but returns no log-sum-exp (as a third-party one might)."""

    name = "nolse"
    priority = 100
    check_lse = Driver.check_lse


@pytest.fixture
def no_lse_driver(monkeypatch):
    plugins = dict(registry.driver_plugins())
    plugins["nolse"] = Plugin("nolse", "tests:NoLseDriver", None, NoLseDriver(), None)
    with registry.use_plugins(registry.DRIVERS_NAMESPACE, plugins):
        yield


def ring_inputs(shards=2, text=3):
    plan = lvsa.make_plan(12, 6, text_tokens=text, settings=lvsa.LVSASettings(reference_latent_frames=4, window_size=4))
    gen = torch.Generator().manual_seed(0)
    size = plan.video_tokens // shards
    k = [torch.randn(1, size, 2, 16, generator=gen) for _ in range(shards)]
    v = [torch.randn(1, size, 2, 16, generator=gen) for _ in range(shards)]
    q = torch.randn(1, size, 2, 16, generator=gen)
    text_qkv = tuple(torch.randn(1, text, 2, 16, generator=gen) for _ in range(3)) if text else None
    return plan, (q, k[0], v[0]), text_qkv, (k, v)


def run_rank0(plan, video, text, shards, settings):
    return ring_attention(video, text, plan, None, RingGroup(None, len(shards[0]), 0), settings,
                          key_value_shards=shards, merge_text=lambda o, lse: o)


def test_a_driver_without_log_sum_exp_is_refused_with_the_reason(no_lse_driver):
    plan, video, text, shards = ring_inputs()
    with pytest.raises(DriverUnavailable, match=r"backend 'nolse' cannot run this call with log-sum-exp \(ring "
                                                r"steps, frame-paired reference keys\) on cpu: nolse returns no "
                                                r"log-sum-exp"):
        run_rank0(plan, video, text, shards, lvsa.LVSASettings(backend="nolse"))
    # it still runs plain self-attention: the refusal is about ring steps only
    problem = lvsa.AttentionProblem.for_ring(*video, plan, 2)
    assert dispatch.select_driver(problem, "nolse", "error").name == "nolse"


def test_auto_passes_over_it_and_says_so(no_lse_driver, caplog):
    plan, video, text, shards = ring_inputs()
    with caplog.at_level(logging.INFO, logger="lvsa"):
        result = run_rank0(plan, video, text, shards, lvsa.LVSASettings(backend="auto"))
    assert result.driver == "sdpa"
    assert "backend=auto chose sdpa for this call with log-sum-exp (ring steps" in caplog.text
    assert "nolse: nolse returns no log-sum-exp" in caplog.text


def test_fallback_warn_replaces_it_loudly(no_lse_driver, caplog):
    plan, video, text, shards = ring_inputs()
    with caplog.at_level(logging.WARNING, logger="lvsa"):
        result = run_rank0(plan, video, text, shards, lvsa.LVSASettings(backend="nolse", fallback="warn"))
    assert result.driver == "sdpa"
    assert "[LVSA-FALLBACK]" in caplog.text and "requested=nolse" in caplog.text and "using=sdpa" in caplog.text


def test_the_plan_lines_are_logged_under_ring_attention(caplog):
    caches.clear()
    plan, video, text, shards = ring_inputs()
    with caplog.at_level(logging.INFO, logger="lvsa"):
        run_rank0(plan, video, text, shards, lvsa.LVSASettings(backend="sdpa"))
        run_rank0(plan, video, text, shards, lvsa.LVSASettings(backend="sdpa"))
    assert caplog.text.count(plan.summary()) == 1  # once per plan shape, not per layer call


def test_a_shard_that_does_not_match_the_plan_is_an_error():
    plan, (q, k, v), _, _ = ring_inputs()
    with pytest.raises(GeometryError, match=r"ring shard of 36 tokens x 3 shards != the plan's 12 latent frames x 6 "
                                            r"tokens = 72 video tokens"):
        lvsa.AttentionProblem.for_ring(q, k, v, plan, 3)
    with pytest.raises(GeometryError, match="72 video tokens do not split into 5 equal ring shards"):
        RingStep(plan, 5, 0, 1).attends  # noqa: B018
    with pytest.raises(GeometryError, match=r"ring shard 4 outside 0\.\.3"):
        shard_span(72, 4, 4)


@pytest.mark.parametrize(("world", "ulysses", "ring", "message"), [
    (8, 2, 2, r"ulysses_degree=2 x ring_degree=2 = 4 processes, but 8 were launched: launch torchrun "
              r"--nproc-per-node 4, or choose degrees whose product is 8"),
    (4, 0, 4, r"ulysses_degree=0: must be an integer >= 1"),
    (4, 1, 2.0, r"ring_degree=2.0: must be an integer >= 1"),
])
def test_bad_degrees_are_errors_naming_the_numbers(world, ulysses, ring, message):
    with pytest.raises(ConfigError, match=message):
        check_degrees(world, ulysses, ring)


def test_the_example_checks_the_launch_against_both_degrees(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main("wan", ["--lvsa", "--ulysses-degree", "2", "--ring-degree", "2", "--steps", "1"]) == 2
    assert ("launched with 1 process(es) but --ulysses-degree 2 x --ring-degree 2 = 4: use torchrun "
            "--nproc-per-node 4" in capsys.readouterr().err)
    assert main("wan", ["--lvsa", "--ring-degree", "0"]) == 2
    assert "--ring-degree 0: must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize(("shards", "first", "frames"), [(2, 1, 11), (3, 1, 11), (3, 5, 3), (4, 0, 2)])
def test_ring_ranks_attend_their_query_frames_references(shards, first, frames):
    """Frame-paired reference keys under ring attention (WanAnimate2's generation pass): each rank merges the
    references of its own query frames into its ring steps, and the shards together equal one process; a
    rank none of whose frames has a reference attends the video only."""
    from lvsa.attention import FrameReferences
    from lvsa.attention.executor import _shard_references
    from lvsa.attention.references import attend_with_references
    from lvsa.backends.reference import reference_with_frame_references

    settings = lvsa.LVSASettings(reference_latent_frames=4, window_size=4)
    plan = lvsa.make_plan(12, 6, settings=settings)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 72, 2, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    references = FrameReferences(*(torch.randn(2, frames * 6, 2, 16, generator=gen, dtype=torch.float64)
                                   for _ in range(2)), frames, first)
    whole = attend_with_references((q, k, v), plan, references, settings)
    torch.testing.assert_close(whole, reference_with_frame_references(q, k, v, plan, references), rtol=1e-6,
                               atol=1e-6)
    size = 72 // shards
    keys, values = list(k.split(size, dim=1)), list(v.split(size, dim=1))
    outs = []
    for rank in range(shards):
        ring = RingGroup(None, shards, rank)
        query = q[:, rank * size:(rank + 1) * size]
        more = _shard_references("layer", query, plan, references, ring)
        start, stop = rank * 12 // shards, (rank + 1) * 12 // shards
        assert (more is None) == (first >= stop or first + frames <= start)
        outs.append(ring_attention((query, keys[rank], values[rank]), None, plan, None, ring, settings,
                                   key_value_shards=(keys, values), more_keys=more).video)
    torch.testing.assert_close(torch.cat(outs, dim=1), whole, rtol=1e-10, atol=1e-10)
    # without them, the frames that have references differ
    alone = ring_attention((q[:, :size], keys[0], values[0]), None, plan, None, RingGroup(None, shards, 0),
                           settings, key_value_shards=(keys, values)).video
    assert torch.equal(alone, outs[0]) == (first >= 12 // shards)


def test_ring_shards_of_part_frames_cannot_take_references():
    from lvsa.attention import FrameReferences
    from lvsa.attention.executor import _shard_references

    plan = lvsa.make_plan(12, 6, settings=lvsa.LVSASettings(reference_latent_frames=4))
    references = FrameReferences(torch.zeros(1, 6, 2, 16), torch.zeros(1, 6, 2, 16), 1, 1)
    with pytest.raises(GeometryError, match="need ring shards of whole frames, and 12 latent frames do not split "
                                            "into 5"):
        _shard_references("layer", torch.zeros(1, 14, 2, 16), plan, references, RingGroup(None, 5, 0))
