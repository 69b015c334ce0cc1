"""Ring attention's steps, every driver on every device, against the float64 reference.

The ring is simulated in one process: each rank's query shard runs :func:`lvsa.attention.ring.ring_attention` with
every rank's key/value shards handed in (what the all-gather gives) and its text partial recorded (what the
group merges). The shard counts cut frames in the middle, so frames split across shards are covered. The
same grid as the parity matrix (text before and after with padding, GQA, batch 2, one token per frame)."""

from __future__ import annotations

import pytest
import torch

import lvsa
import lvsa.driver_status
from lvsa import registry
from lvsa.attention import RingGroup
from lvsa.attention.ring import ring_attention
from lvsa.backends.reference import attention_with_lse_float64, reference_attention, token_mask
from lvsa.kernels.attention_ops import merge
from lvsa.shards import skipped_key_shards

from .test_parity import CASES, TOLERANCE, Case, _make, usable_target

pytestmark = pytest.mark.parity

SHARDS = (2, 3, 4)


def _split(plan, q, k, v, shards):
    vs, V = plan.video_start, plan.video_tokens
    size = V // shards
    video = [[t[:, vs + i * size : vs + (i + 1) * size] for i in range(shards)] for t in (q, k, v)]
    text = None
    if plan.text_tokens:
        ts = plan.text_start
        text = tuple(t[:, ts : ts + plan.text_tokens] for t in (q, k, v))
    return video, text


def simulate_ring(plan, q, k, v, mask, shards, backend, stepwise=False):
    """The whole output of ring attention over ``shards`` simulated ranks, and each rank's skipped shards."""
    (qs, ks, vs_), text = _split(plan, q, k, v, shards)
    settings = lvsa.LVSASettings(backend=backend)
    partials: list[tuple[torch.Tensor, torch.Tensor]] = []
    video, skipped = [], []
    for rank in range(shards):
        result = ring_attention((qs[rank], ks[rank], vs_[rank]), text, plan, mask, RingGroup(None, shards, rank),
                                settings, key_value_shards=(ks, vs_),
                                merge_text=lambda o, lse: partials.append((o, lse)) or o, stepwise=stepwise)
        assert result.driver == backend and result.steps == shards
        video.append(result.video)
        skipped.append(result.skipped)
    out = torch.empty_like(q)
    out[:, plan.video_start : plan.video_start + plan.video_tokens] = torch.cat(video, dim=1)
    if text is not None:
        merge(partials, out[:, plan.text_start : plan.text_start + plan.text_tokens])
    return out, skipped


def _cases():
    for case in CASES:
        for shards in SHARDS:
            if (case.T * case.P) % shards == 0 and case.T * case.P >= shards:
                yield pytest.param(case, shards, id=f"{case.name}-R{shards}")


@pytest.mark.parametrize("stepwise", [False, True], ids=["gathered", "stepwise"])
@pytest.mark.parametrize(("case", "shards"), list(_cases()))
def test_ring_steps_match_reference(parity_target, case: Case, shards, stepwise, backends_required, request):
    device, backend, dtype = usable_target(parity_target, backends_required, request)
    plan, q, k, v, mask = _make(case, device, dtype)
    (qs, ks, _), _ = _split(plan, q, k, v, shards)
    problem = lvsa.AttentionProblem.for_ring(qs[0], ks[0], ks[0], plan, shards, mask)
    driver = registry.drivers()[backend]
    unsupported = driver.check(problem)
    if unsupported:
        pytest.skip(f"{backend} does not support this case: {'; '.join(unsupported)}")
    if driver.check_lse(problem):  # refused, with the reason, and never a wrong answer
        with pytest.raises(lvsa.DriverUnavailable, match=f"backend '{backend}' cannot run the ring steps"):
            simulate_ring(plan, q, k, v, mask, shards, backend, stepwise)
        return

    out, skipped = simulate_ring(plan, q, k, v, mask, shards, backend, stepwise)
    expected = reference_attention(*(t.cpu() for t in (q, k, v)), plan, None if mask is None else mask.cpu())
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    error = (out.cpu().double() - expected).abs().max().item()
    assert error <= TOLERANCE[dtype], f"max abs error {error:.2e} > {TOLERANCE[dtype]:.0e}"
    assert skipped == [skipped_key_shards(plan, shards, rank) for rank in range(shards)]


def _token_mask_skips(plan, shards):
    """Skipped key shards per rank, read off the reference's token mask: no True in the shard pair's block."""
    mask = token_mask(plan)
    vs, size = plan.video_start, plan.video_tokens // shards
    block = lambda i, j: mask[vs + i * size : vs + (i + 1) * size, vs + j * size : vs + (j + 1) * size]  # noqa: E731
    return [tuple(j for j in range(shards) if not block(i, j).any()) for i in range(shards)]


@pytest.mark.parametrize(("case", "shards"), list(_cases()))
def test_skipped_steps_are_exactly_those_without_an_attended_pair(case, shards):
    plan = _make(case, "cpu", torch.float32)[0]
    assert [skipped_key_shards(plan, shards, i) for i in range(shards)] == _token_mask_skips(plan, shards)


def test_the_grid_skips_steps():
    """The checks above would be vacuous if no case skipped a step; and a dense plan never skips one."""
    skipped = {(c.name, s): sum(map(len, _token_mask_skips(_make(c, "cpu", torch.float32)[0], s)))
               for c in CASES for s in SHARDS if (c.T * c.P) % s == 0}
    assert sum(skipped.values()) >= 10
    assert skipped[("training-horizon-dense", 2)] == 0


@pytest.mark.parametrize("stepwise", [False, True], ids=["gathered", "stepwise"])
@pytest.mark.parametrize("shards", [3, 4])
def test_skipping_changes_nothing(shards, stepwise):
    """The ring with every step computed (a float64 attention of each shard pair under the reference's token
    mask, skipped steps included) equals the ring that skips: a skipped step contributes exactly nothing."""
    case = CASES[3]  # odd P (frames cut by the shards), GQA, batch 2: it skips steps at 3 and 4 shards
    plan, q, k, v, _ = _make(case, "cpu", torch.float64)
    mask = token_mask(plan)
    size = plan.video_tokens // shards
    lvsa_out, skipped = simulate_ring(plan, q, k, v, None, shards, "reference", stepwise)
    assert sum(map(len, skipped)) > 0
    for i in range(shards):
        rows = slice(i * size, (i + 1) * size)
        parts = []
        for j in range(shards):
            cols = slice(j * size, (j + 1) * size)
            keep = mask[rows, cols]
            out, lse = _masked_step(q[:, rows], k[:, cols], v[:, cols], keep)
            if j in skipped[i]:
                assert torch.isneginf(lse).all() and not out.any()  # nothing for the merge to weigh
            parts.append((out, lse))
        full = torch.empty_like(parts[0][0])
        merge(parts, full)
        torch.testing.assert_close(lvsa_out[:, rows], full, rtol=1e-10, atol=1e-10)


def _masked_step(q, k, v, keep):
    """Float64 attention of a query shard against a key shard under a token mask; lse -inf where nothing is kept."""
    groups = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~keep[None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", weights, v), lse


def test_ring_step_is_cached_per_plan_and_step():
    """The ring's indices live in the drivers' one prepared-state cache: once per plan, problem and shard."""
    plan, q, k, v, _ = _make(CASES[3], "cpu", torch.float32)
    from lvsa.attention.ring import prepare_ring

    driver = registry.drivers()["sdpa"]
    problem = lvsa.AttentionProblem.for_ring(q[:, :42], k[:, :42], v[:, :42], plan, 2)
    stepwise = prepare_ring(driver, plan, problem, 2, 0, stepwise=True)
    assert stepwise is prepare_ring(driver, plan, problem, 2, 0, stepwise=True)
    assert prepare_ring(driver, plan, problem, 2, 1, False) is prepare_ring(driver, plan, problem, 2, 1, False)
    assert stepwise.per_step[1] is not None or 1 in stepwise.skipped
    # a frame's whole window in one gather: every chunk of the gathered index has one key count, no padding
    gathered = prepare_ring(driver, plan, problem, 2, 1, False).end_to_end
    assert len({chunk.width for chunk in gathered.chunks}) == 1


def test_float64_attention_with_lse_matches_torch():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 5, 4, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    keep = torch.tensor([[True] * 5, [True, False, True, False, False]])
    out, lse = attention_with_lse_float64(q, k[:, :, :2], v[:, :, :2], keep)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k[:, :, :2].repeat_interleave(2, 2).transpose(1, 2),
        v[:, :, :2].repeat_interleave(2, 2).transpose(1, 2), attn_mask=keep[:, None, None, :]).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    assert lse.shape == (2, 4, 5) and torch.isfinite(lse).all()


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_frame_references_under_ring_match_reference(parity_target, shards, backends_required, request):
    """WanAnimate2's frame-paired reference keys (query frame f also attends reference frame f - 1): in one
    process, and each simulated ring rank merging its own query frames' references into its ring steps."""
    from lvsa.attention import FrameReferences
    from lvsa.attention.executor import _shard_references
    from lvsa.attention.references import attend_with_references
    from lvsa.backends.reference import reference_with_frame_references

    device, backend, dtype = usable_target(parity_target, backends_required, request)
    settings = lvsa.LVSASettings(backend=backend, reference_latent_frames=4, window_size=4)
    plan = lvsa.make_plan(12, 8, settings=settings)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 96, 4, 64, generator=gen).to(device, dtype) for _ in range(3))
    references = FrameReferences(*(torch.randn(2, 11 * 8, 4, 64, generator=gen).to(device, dtype)
                                   for _ in range(2)), 11, 1)
    size = 96 // shards
    problem = lvsa.AttentionProblem.for_ring(q[:, :size], k[:, :size], v[:, :size], plan, shards)
    driver = registry.drivers()[backend]
    if driver.check(problem):
        pytest.skip(f"{backend} does not support this case: {'; '.join(driver.check(problem))}")

    def run():
        if shards == 1:
            return attend_with_references((q, k, v), plan, references, settings)
        keys, values = list(k.split(size, dim=1)), list(v.split(size, dim=1))
        outs = []
        for rank in range(shards):
            ring = RingGroup(None, shards, rank)
            query = q[:, rank * size:(rank + 1) * size]
            outs.append(ring_attention((query, keys[rank], values[rank]), None, plan, None, ring, settings,
                                       key_value_shards=(keys, values),
                                       more_keys=_shard_references("layer", query, plan, references, ring)).video)
        return torch.cat(outs, dim=1)

    if driver.check_lse(problem):  # refused, with the reason, and never a wrong answer
        with pytest.raises(lvsa.DriverUnavailable, match=f"backend '{backend}' cannot run"):
            run()
        return
    out = run()
    expected = reference_with_frame_references(*(t.cpu() for t in (q, k, v)), plan,
                                               references.with_tensors(lambda t: t.cpu()))
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    error = (out.cpu().double() - expected).abs().max().item()
    assert error <= TOLERANCE[dtype], f"max abs error {error:.2e} > {TOLERANCE[dtype]:.0e}"
