"""How close FlashAttention-4's block-sparse kernel can come to the ideal speedup, and where the fa4 driver's
tiles stand against that ceiling, in one run.

    python -m benchmarks.fa4_ceiling                        # CUDA with the [fa4] extra, bf16
    python -m benchmarks.fa4_ceiling --device cpu --small   # FlexAttention's CPU path (keeps the script alive in CI)

1. **The kernel's ceiling.** FA4 block-sparse on a pattern of whole tiles only: every query tile visits the
   same number ``n`` of key tiles (a band), so no tile is masked and no frame boundary exists. It is timed
   against FA4 dense on the same shape (Wan 4x: 81 frames x 1560 tokens x 12 heads). The fraction of the
   ideal at ``n`` is the best that any plan visiting ``n`` key tiles per query tile can reach with this
   kernel: what it loses is the kernel's own cost per query tile and per sparse tile.
2. **The census of each case of** ``attention.py``: the key tiles per query tile that the plan needs
   (density x tiles), the full and masked tiles the fa4 driver visits, and the query tiles that straddle
   two frames (their windows differ, so they visit both frames' keys, partly through the mask). Then the
   driver against FA4 dense in the same run (the timing of ``attention.py``, see ``timing.py``), once per
   form of its ``mask_mod`` (``--mask-forms``; the first is the row's, the others are listed beside it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass

import torch

import lvsa
from lvsa.backends.fa4 import Fa4Driver
from lvsa.kernels.block_mask import MASK_FORMS, block_tables, flex_attention

from . import timing
from .attention import CASES, case_geometry, sampled_reference, usable_device

BLOCK = 128


@dataclass
class CeilingRow:
    tiles_per_query_tile: int
    density: float
    ms: float
    dense_fa4_ms: float
    fraction_of_ideal: float
    rel_error: float


@dataclass
class CensusRow:
    case: str
    density: float
    query_tiles: int
    needed: float  # key tiles per query tile at the plan's density
    full: float
    masked: float
    straddling_query_tiles: int
    masked_per_straddling: float
    masked_per_other: float
    ms: float | None = None
    dense_fa4_ms: float | None = None
    fraction_of_ideal: float | None = None
    rel_error: float | None = None
    #: every timed mask form's fraction of the ideal against FA4 dense, and its relative error
    by_mask_form: dict[str, float] | None = None
    rel_error_by_mask_form: dict[str, float] | None = None


def band_block_mask(S: int, n: int, device: str):
    """Every query tile visits ``n`` whole key tiles, a band around its own position: a block mask of full
    tiles only. Its ``mask_mod`` states the same band, so FlexAttention's CPU path (which applies only the
    ``mask_mod``) computes it too; FA4 never calls it on a full tile. It is not FlexAttention's
    ``noop_mask``, with which the FLASH backend would drop the tile lists and run dense."""
    from torch.nn.attention.flex_attention import BlockMask

    tiles = -(-S // BLOCK)
    start = (torch.arange(tiles, device=device) - n // 2).clamp(0, tiles - n)
    indices = (start[:, None] + torch.arange(tiles, device=device)[None]) % tiles
    full = torch.full((1, 1, tiles), n, dtype=torch.int32, device=device)
    indices = indices[None, None].to(torch.int32)
    first = start.to(torch.int32)  # an index of the kernel's width, like the driver's tables

    def in_band(b, h, q, k):
        return (k // BLOCK >= first[q // BLOCK]) & (k // BLOCK < first[q // BLOCK] + n)

    return BlockMask.from_kv_blocks(torch.zeros_like(full), indices, full, indices, BLOCK_SIZE=(BLOCK, BLOCK),
                                    mask_mod=in_band, seq_lengths=(S, S)), start


def band_density(S: int, start: torch.Tensor, n: int) -> float:
    """The band's attended pairs over ``S**2``, exactly: the sequence's last tile is short."""
    lengths = (S - torch.arange(0, S, BLOCK)).clamp(max=BLOCK).double()
    keys = torch.stack([lengths[int(s):int(s) + n].sum() for s in start.tolist()])
    return float((lengths * keys).sum()) / S**2


def band_error(out, q, k, v, start, n, rows_checked=48) -> float:
    """Relative error of sampled query rows against float64 attention over their band's keys."""
    S = q.shape[1]
    rows = torch.linspace(0, S - 1, rows_checked, device=q.device).long()
    errors, norms = 0.0, 0.0
    for row in rows.tolist():
        first = int(start[row // BLOCK]) * BLOCK
        keys = slice(first, min(first + n * BLOCK, S))
        scores = torch.einsum("hd,khd->hk", q[0, row].double(), k[0, keys].double()) / math.sqrt(q.shape[-1])
        ref = torch.einsum("hk,khd->hd", torch.softmax(scores, -1), v[0, keys].double())
        errors += (out[0, row].double() - ref).norm().item() ** 2
        norms += ref.norm().item() ** 2
    return math.sqrt(errors / norms)


def kernel(driver: Fa4Driver):
    """FlexAttention exactly as ``driver`` calls it: the same compiled function (so a shape compiles once in
    this process) and kernel options (FA4 through the FLASH backend; the reference path on CPU)."""
    attend = flex_attention(driver.compiled)

    def run(q, k, v, block_mask=None):
        return attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                      kernel_options=driver.kernel_options).transpose(1, 2)
    return run


def ceiling(args, device, dtype, gen, driver) -> list[CeilingRow]:
    frames, P, heads = (81, 16, 2) if args.small else (81, 1560, 12)
    S = frames * P
    tiles = -(-S // BLOCK)
    shape = (1, S, heads, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(args.device, dtype) for _ in range(3))
    run = kernel(driver)
    bands = {n: band_block_mask(S, n, args.device) for n in
             sorted({max(1, round(d * tiles)) for d in args.densities}, reverse=True)}
    calls = [lambda: run(q, k, v)] + [lambda m=mask: run(q, k, v, m) for mask, _ in bands.values()]
    times, outs = timing.interleaved(calls, device, args.warmup, args.repeats, args.timing)
    dense_ms = statistics.median(times[0])
    print(f"\nceiling: FA4 block-sparse, whole tiles only, {frames} x {P} tokens x {heads} heads ({tiles} tiles); "
          f"FA4 dense {dense_ms:.2f} ms")
    print(f"  {'tiles/row':>9} {'density':>8} {'ms':>9} {'of ideal':>9} {'rel err':>9}")
    rows = []
    for (n, (_, start)), band_times, out in zip(bands.items(), times[1:], outs[1:], strict=True):
        ms = statistics.median(band_times)
        density = band_density(S, start, n)
        row = CeilingRow(n, density, ms, dense_ms, timing.speedup(times[0], band_times) * density,
                         band_error(out, q, k, v, start, n))
        rows.append(row)
        print(f"  {n:>9} {density:>8.4f} {ms:>9.2f} {row.fraction_of_ideal:>9.1%} {row.rel_error:>9.1e}", flush=True)
    return rows


def census(case, args, device, dtype, gen, drivers: dict[str, Fa4Driver] | None) -> CensusRow:
    plan, heads, text, valid = case_geometry(case, args.small)
    P = plan.patches_per_frame
    tables = block_tables(plan, BLOCK, "cpu", padded_text=bool(text))
    masked = tables.kv_num_blocks[0, 0].double()
    full = tables.full_kv_num_blocks[0, 0].double()
    queries, S = tables.layout.queries, plan.seq_len
    first = torch.arange(0, S, BLOCK)
    last = (first + BLOCK - 1).clamp(max=S - 1)
    straddling = queries.slot_groups[queries.slot(first)] != queries.slot_groups[queries.slot(last)]
    row = CensusRow(case.name, plan.density, len(first), plan.density * len(first), full.mean().item(),
                    masked.mean().item(), int(straddling.sum()),
                    masked[straddling].mean().item() if straddling.any() else 0.0,
                    masked[~straddling].mean().item() if not straddling.all() else math.nan)
    if drivers:
        shape = (1, S, heads, args.head_dim)
        q, k, v = (torch.randn(shape, generator=gen).to(args.device, dtype) for _ in range(3))
        padding = (torch.arange(text) < valid)[None].to(args.device) if text else None
        dense_plan = lvsa.make_plan(case.frames, P, text_tokens=text,
                                    settings=lvsa.LVSASettings(reference_latent_frames=case.frames))
        first = next(iter(drivers.values()))
        dense = first.prepare(dense_plan, lvsa.AttentionProblem.from_tensors(q, k, v, dense_plan, padding))
        problem = lvsa.AttentionProblem.from_tensors(q, k, v, plan, padding)
        prepared = {form: driver.prepare(plan, problem) for form, driver in drivers.items()}
        calls = [lambda: first.run(dense, q, k, v, padding)] + [
            lambda d=driver, p=prepared[form]: d.run(p, q, k, v, padding) for form, driver in drivers.items()]
        times, outs = timing.interleaved(calls, device, args.warmup, args.repeats, args.timing)
        medians = [statistics.median(t) for t in times]
        frames = sorted({0, plan.latent_frames // 2, plan.latent_frames - 1})
        picks, reference = sampled_reference(plan, q, k, v, frames, 32, valid if text else None)
        errors = [((out[0, picks].double() - reference).norm() / reference.norm()).item() for out in outs[1:]]
        row.dense_fa4_ms, row.ms, row.rel_error = medians[0], medians[1], errors[0]
        row.by_mask_form = {form: timing.speedup(times[0], own) * plan.density
                            for form, own in zip(drivers, times[1:], strict=True)}
        row.fraction_of_ideal = row.by_mask_form[next(iter(drivers))]
        row.rel_error_by_mask_form = dict(zip(drivers, errors, strict=True))
    return row


def print_census(rows: list[CensusRow]) -> None:
    print("\ncensus: key tiles per query tile (fa4 driver's tiles; straddling = query tiles holding two frames)")
    print(f"  {'case':<36} {'density':>7} {'needed':>7} {'full':>7} {'masked':>7} {'straddling':>11} "
          f"{'masked/str.':>11} {'masked/other':>12} {'ms':>8} {'FA4 ms':>8} {'of ideal':>9} {'rel err':>8}")
    for r in rows:
        times = ("" if r.ms is None else
                  f" {r.ms:>8.2f} {r.dense_fa4_ms:>8.2f} {r.fraction_of_ideal:>9.1%} {r.rel_error:>8.1e}")
        if r.by_mask_form and len(r.by_mask_form) > 1:
            times += "  " + " ".join(f"{form} {share:.1%}" for form, share in r.by_mask_form.items())
        print(f"  {r.case:<36} {r.density:>7.4f} {r.needed:>7.1f} {r.full:>7.1f} {r.masked:>7.2f} "
              f"{r.straddling_query_tiles:>5}/{r.query_tiles:<5} {r.masked_per_straddling:>11.1f} "
              f"{'-' if math.isnan(r.masked_per_other) else f'{r.masked_per_other:.2f}':>12}{times}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="16 tokens per frame, 2 heads (CPU-sized)")
    parser.add_argument("--head-dim", type=int, default=None)
    timing.add_arguments(parser)
    parser.add_argument("--densities", type=float, nargs="+", default=[1, 0.5, 0.25, 0.125, 0.0625, 0.03125],
                        help="band widths of the ceiling, as shares of the key tiles")
    parser.add_argument("--cases", default=None, help="comma-separated substrings of attention.py's case names")
    parser.add_argument("--census-only", action="store_true", help="count the tiles, time nothing")
    parser.add_argument("--mask-forms", nargs="+", choices=MASK_FORMS, default=list(MASK_FORMS[:1]),
                        help="time the driver with each form of its mask_mod (the first is the driver's row)")
    parser.add_argument("--json", default=None, help="write every number to this file")
    args = parser.parse_args(argv)

    device = usable_device(args.device)
    if device is None:
        return 2
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    args.head_dim = args.head_dim or (64 if args.small else 128)
    options = {} if cuda else dict(kernel_backend=None, compiled=False, devices=frozenset({"cpu"}),
                                   dtypes=frozenset({torch.float32}))
    drivers = {form: Fa4Driver(mask_form=form, **options) for form in dict.fromkeys(args.mask_forms)}
    driver = next(iter(drivers.values()))
    if not args.census_only:
        status = driver.is_available(args.device)
        if not status:
            print(f"error: the fa4 driver is not usable here: {status.reason} (--census-only counts tiles "
                  "without it)", file=sys.stderr)
            return 2
    cases = CASES
    if args.cases:
        wanted = [w.strip() for w in args.cases.split(",")]
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    env = {"device": device.describe(), "torch": torch.__version__, "dtype": str(dtype)[6:], "head_dim": args.head_dim}
    try:
        env["flash_attn.cute"] = __import__("flash_attn.cute", fromlist=["_"]).__version__
    except Exception:
        pass
    print("  ".join(f"{k}={v}" for k, v in env.items()))

    gen = torch.Generator().manual_seed(0)
    ceiling_rows = [] if args.census_only else ceiling(args, device, dtype, gen, driver)
    census_rows = [census(c, args, device, dtype, gen, None if args.census_only else drivers) for c in cases]
    print_census(census_rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": env, "ceiling": [asdict(r) for r in ceiling_rows],
                       "census": [asdict(r) for r in census_rows]}, handle, indent=2)
    tolerance = 2e-2 if dtype != torch.float32 else 1e-4
    errors = [r.rel_error for r in ceiling_rows]
    errors += [e for r in census_rows for e in (r.rel_error_by_mask_form or {}).values()]
    if not all(e < tolerance for e in errors):
        print(f"\nFAILED accuracy: relative errors {errors}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
