"""The scheduler against the spec: worked examples, and properties over random geometries."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lvsa
from lvsa.errors import ConfigError, GeometryError
from lvsa.plan import PatternKnobs, build_plan, choose_keyframe_interval, global_frames, is_dense_at


def knobs(ref=21, scale=1.0, W=3, n_first=1, kfi=None, rotate=None):
    return PatternKnobs(ref, scale, W, n_first, kfi, rotate)


# ---- worked examples of the spec ------------------------------------------------------------------


def test_wan_4x_horizon_matches_the_spec():
    plan = lvsa.make_plan(81, 1560, model="wan")
    assert plan.kfi == 6
    assert len(plan.globals) == 14
    assert plan.attended_per_frame == 21
    assert plan.summary() == "[LVSA] kfi=6 global_count=14 attended_per_frame=21/81"
    assert plan.globals == (0, 6, 12, 18, 24, 30, 36, 42, 48, 54, 60, 66, 72, 78)


def test_extension_line_format():
    plan = lvsa.make_plan(49, 1590, model="hunyuan")
    assert plan.extension_line() == (
        "[LVSA] reference_latent_frames=33 target_latent_frames=49 extension_ratio=1.48x"
    )


def test_hunyuan_half_scale_budget_is_16_frames_at_the_training_horizon():
    plan = lvsa.make_plan(33, 1590, model="hunyuan", settings=lvsa.LVSASettings(sparsity_scale=0.5))
    assert plan.attended_per_frame == 16
    assert not plan.is_dense


@pytest.mark.parametrize(
    ("frames", "model", "scale", "density"),
    [(41, "wan", 1.0, 0.51), (81, "wan", 1.0, 0.26), (81, "wan", 0.5, 0.12), (49, "hunyuan", 1.0, 0.65)],
)
def test_densities_of_the_benchmark_cases(frames, model, scale, density):
    plan = lvsa.make_plan(frames, 1560, model=model, settings=lvsa.LVSASettings(sparsity_scale=scale))
    assert plan.density == pytest.approx(density, abs=0.005)


@pytest.mark.parametrize(("model", "T"), [("wan", 21), ("hunyuan", 33), ("cogvideox", 13)])
def test_training_horizon_is_fully_dense(model, T):
    plan = lvsa.make_plan(T, 16, model=model)
    assert plan.kfi == 1 and plan.is_dense and plan.density == 1.0
    assert plan.summary() == f"[LVSA] kfi=1 global_count={T} attended_per_frame={T}/{T}"


def test_video_frame_knobs_convert_to_latent_frames():
    s = lvsa.LVSASettings(window_size=16, n_first_frames=4, reference_latent_frames=21)
    plan = lvsa.make_plan(81, 4, settings=s)
    assert plan.window == 4 and plan.n_first == 1


def test_manual_keyframe_interval_in_video_frames():
    s = lvsa.LVSASettings(auto_keyframes=False, key_frame_interval=16, reference_latent_frames=21)
    assert lvsa.make_plan(81, 4, settings=s).kfi == 4


def test_manual_interval_below_one_latent_frame_is_an_error():
    s = lvsa.LVSASettings(auto_keyframes=False, key_frame_interval=2, reference_latent_frames=21)
    with pytest.raises(ConfigError, match="LVSA_KEY_FRAME_INTERVAL"):
        lvsa.make_plan(81, 4, settings=s)


def test_reference_is_required_without_a_model():
    with pytest.raises(ConfigError, match="LVSA_REFERENCE_LATENT_FRAMES"):
        lvsa.make_plan(81, 4)


def test_explicit_reference_beats_the_model_default():
    s = lvsa.LVSASettings(reference_latent_frames=33)
    assert lvsa.make_plan(81, 4, settings=s, model="wan").reference_latent_frames == 33


@pytest.mark.parametrize(
    "kwargs",
    [dict(latent_frames=0, patches_per_frame=4), dict(latent_frames=3, patches_per_frame=0),
     dict(latent_frames=3, patches_per_frame=4, text_tokens=-1),
     dict(latent_frames=3, patches_per_frame=4, text_position="middle"),
     dict(latent_frames=3, patches_per_frame=4, step=-2)],
)
def test_bad_geometry_is_an_error(kwargs):
    with pytest.raises(GeometryError):
        lvsa.make_plan(**kwargs, model="wan")


def test_rotation_off_keeps_the_grid():
    s = lvsa.LVSASettings(rotate_keyframes=False)
    plans = {lvsa.make_plan(81, 4, model="wan", settings=s, step=step).globals for step in range(10)}
    assert len(plans) == 1


def test_rotation_on_by_default_when_sparse_and_moves_one_frame_per_step():
    a = lvsa.make_plan(81, 4, model="wan", step=0)
    b = lvsa.make_plan(81, 4, model="wan", step=1)
    assert a.rotating and b.offset == a.offset + 1
    assert set(b.globals) - {0} == {g + 1 for g in set(a.globals) - {0}}


def test_mask_picture():
    plan = build_plan(6, 1, knobs(ref=3, W=1, n_first=1))
    rows = plan.mask_picture().splitlines()
    assert len(rows) == 6
    for f, row in enumerate(rows):
        index, cells, count = row.split()
        assert int(index) == f and len(cells) == 6 and int(count) == plan.attended_per_frame
        attended = {k for k, c in enumerate(cells) if c != "."}
        assert attended == set(plan.attended(f))
        assert all((c in "GX") == (k in plan.globals) for k, c in enumerate(cells))


def test_plans_are_pure_python():
    code = "import sys, lvsa; lvsa.make_plan(81, 1560, model='wan'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_plans_are_hashable_and_equal_when_rebuilt():
    a, b = lvsa.make_plan(81, 8, model="wan", step=3), lvsa.make_plan(81, 8, model="wan", step=3)
    assert a == b and hash(a) == hash(b) and a is not b
    assert a != lvsa.make_plan(81, 8, model="wan", step=4)


# ---- properties ------------------------------------------------------------------------------------

geometry = st.fixed_dictionaries(
    {
        "T": st.integers(1, 160),
        "ref": st.integers(1, 60),
        "scale": st.sampled_from([0.25, 0.5, 0.75, 1.0, 1.5, 2.0]),
        "W": st.integers(0, 6),
        "n_first": st.integers(0, 4),
        "kfi": st.one_of(st.none(), st.integers(1, 12)),
    }
)


def plan_of(g, step=0, rotate=None):
    return build_plan(g["T"], 3, knobs(g["ref"], g["scale"], g["W"], g["n_first"], g["kfi"], rotate), step=step)


@settings(max_examples=300, deadline=None)
@given(geometry, st.integers(0, 500))
def test_every_frame_attends_itself_and_the_count_follows_the_formula(g, step):
    plan = plan_of(g, step)
    T, G = plan.latent_frames, len(plan.globals)
    expected = G + min(2 * plan.window + 1, T - G)
    for f in range(T):
        row = plan.attended(f)
        assert f in row
        assert set(plan.globals) <= set(row)
        assert len(row) == expected
        assert list(row) == sorted(set(row))


@settings(max_examples=200, deadline=None)
@given(geometry)
def test_global_count_is_constant_across_rotation_offsets(g):
    counts = {len(plan_of(g, step).globals) for step in range(2 * g["T"] + 2)}
    attended = {plan_of(g, step).attended_per_frame for step in range(2 * g["T"] + 2)}
    assert len(counts) == 1 and len(attended) == 1


@settings(max_examples=200, deadline=None)
@given(geometry)
def test_dense_within_the_budget(g):
    knob = knobs(g["ref"], g["scale"], g["W"], g["n_first"], g["kfi"])
    plan = plan_of(g)
    if g["T"] <= knob.scaled_reference:
        assert plan.kfi == 1 and plan.is_dense and plan.density == 1.0
    else:
        assert plan.kfi > 1 or g["kfi"] == 1


@settings(max_examples=200, deadline=None)
@given(geometry, st.integers(0, 300))
def test_is_dense_at_tells_every_steps_plan_covers_every_frame(g, step):
    knob = knobs(g["ref"], g["scale"], g["W"], g["n_first"], g["kfi"])
    plan = plan_of(g, step)
    if is_dense_at(g["T"], knob):
        assert plan.is_dense and plan.density == 1.0
    else:
        assert plan.kfi > 1


@settings(max_examples=200, deadline=None)
@given(geometry)
def test_offset_zero_is_the_spec_grid(g):
    plan = plan_of(g)
    if plan.kfi > 1:
        n_first = min(g["n_first"], g["T"])
        assert set(plan.globals) == set(range(n_first)) | set(range(0, g["T"], plan.kfi))


@settings(max_examples=150, deadline=None)
@given(geometry, st.integers(0, 300))
def test_every_frame_is_a_global_within_two_intervals_of_steps(g, start):
    first = plan_of(g)
    if first.kfi == 1 or len(first.globals) == first.n_first:
        return  # dense, or a budget of leading frames only: no periodic keyframe to rotate
    span = 2 * plan_of(g).kfi - 1
    seen = set()
    for step in range(start, start + span):
        seen |= set(plan_of(g, step).globals)
    assert seen == set(range(g["T"]))


@settings(max_examples=150, deadline=None)
@given(geometry, st.integers(0, 50), st.integers(0, 9), st.sampled_from(["before", "after"]))
def test_csr_and_density_agree_with_attended(g, step, text, position):
    knob = knobs(g["ref"], g["scale"], g["W"], g["n_first"], g["kfi"])
    plan = build_plan(g["T"], 3, knob, step=step, text_tokens=text, text_position=position)
    assert len(plan.indptr) == plan.latent_frames + 1 and plan.indptr[0] == 0
    for f in range(plan.latent_frames):
        assert plan.indices[plan.indptr[f] : plan.indptr[f + 1]] == plan.attended(f)
    S = plan.seq_len
    pairs = sum(len(plan.attended(f)) for f in range(plan.latent_frames)) * 9 + text * S + plan.video_tokens * text
    assert plan.density == pytest.approx(pairs / (S * S))


def test_keyframe_interval_examples_directly():
    assert choose_keyframe_interval(81, knobs()) == 6
    assert choose_keyframe_interval(21, knobs()) == 1
    assert choose_keyframe_interval(49, knobs(ref=33)) == 2
    assert global_frames(81, 1, 6, 0) == tuple(range(0, 81, 6))
