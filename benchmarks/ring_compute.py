"""The compute of ring attention's steps on one device: does lvsa keep its speedup over dense when the
sequence is cut into ring shards? (Communication excluded: dense and lvsa exchange the same key/value shards.)

    python -m benchmarks.ring_compute                       # Wan 2.1 1.3B @ 321 frames, one attention layer
    python -m benchmarks.ring_compute --device cpu --small  # a smoke run (in the tests)

For each layout (Ulysses U x ring R over U*R devices), every ring rank's work is timed on this one device:
dense is the ring as diffusers runs it (each key shard through cuDNN attention with log-sum-exp, merged),
lvsa is :func:`lvsa.ring.ring_attention` (only the attended pairs of each shard pair; steps without one
skipped) with the key/value shards handed in. A layout's time is its slowest rank's, as on R devices. The
single-device row is dense cuDNN SDPA against lvsa's ``sparse_attention`` on the whole sequence. "keeps" is
the layout's speedup over dense as a fraction of the single-device speedup (the issue's target: >= 90%).
Each layout's lvsa output is checked against the single-device lvsa output."""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

import lvsa
from lvsa import registry
from lvsa.attention import RingGroup
from lvsa.attention.ring import ring_attention
from lvsa.kernels.attention_ops import attention_with_lse, dense_attention
from lvsa.kernels.ring_step import LseAccumulator
from lvsa.shards import skipped_key_shards

from .timing import timed

WAN_1_3B = {"frames": 321, "height": 480, "width": 832, "heads": 12, "head_dim": 128, "model": "wan"}
SMALL = {"frames": 161, "height": 64, "width": 64, "heads": 4, "head_dim": 32, "model": "wan"}


def ms(fn, device_module, repeats: int) -> float:
    """One rank's work, synchronised around each call (as recorded in docs/performance.md), after one warm-up."""
    return timed(fn, device_module, 1, repeats, "synchronized")[0]


def dense_ring_rank(q, keys, values, rank):
    """One rank's ring as diffusers runs it: every key shard, cuDNN attention with log-sum-exp, merged."""
    acc = LseAccumulator(q)
    for s in range(len(keys)):
        j = (rank - s) % len(keys)
        acc.add(*attention_with_lse(q, keys[j], values[j]))
    return acc.out


def time_layout(u: int, r: int, q, k, v, plan, settings, sparse_out, device_module, repeats: int):
    """Each ring rank's dense and lvsa time for Ulysses ``u`` x ring ``r`` (one Ulysses rank: they all do the
    same work on their heads), and lvsa's largest deviation from the single-device lvsa output."""
    heads = slice(0, q.shape[2] // u)
    size = q.shape[1] // r
    qs, ks, vs = ([t[:, i * size:(i + 1) * size, heads].contiguous() for i in range(r)] for t in (q, k, v))
    dense_ranks, lvsa_ranks, stepwise_ranks, error = [], [], [], 0.0
    for rank in range(r):
        dense_ranks.append(ms(partial(dense_ring_rank, qs[rank], ks, vs, rank), device_module, repeats))
        for stepwise, times in ((False, lvsa_ranks), (True, stepwise_ranks)):
            run = partial(ring_attention, (qs[rank], ks[rank], vs[rank]), None, plan, None, RingGroup(None, r, rank),
                          settings, key_value_shards=(ks, vs), stepwise=stepwise)
            expected = sparse_out[:, rank * size:(rank + 1) * size, heads]
            error = max(error, (run().video.float() - expected.float()).abs().max().item())
            times.append(ms(run, device_module, repeats))
    return dense_ranks, lvsa_ranks, stepwise_ranks, error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--layouts", nargs="+", default=["1x2", "1x4", "1x8", "2x2", "4x2", "2x4"],
                        help="UxR: Ulysses degree x ring degree")
    parser.add_argument("--backend", default="sdpa")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    shape = SMALL if args.small else WAN_1_3B
    device_module = registry.get_device(args.device.split(":")[0])
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    settings = lvsa.LVSASettings(backend=args.backend)
    T = (shape["frames"] - 1) // 4 + 1
    P = (shape["height"] // 16) * (shape["width"] // 16)
    plan = lvsa.make_plan(T, P, model=shape["model"], settings=settings)
    H, D = shape["heads"], shape["head_dim"]
    gen = torch.Generator(args.device).manual_seed(0)
    q, k, v = (torch.randn(1, T * P, H, D, device=args.device, dtype=dtype, generator=gen) for _ in range(3))
    print(f"{plan.summary()}  {T} x {P} tokens, {H} heads x {D}, {dtype}, {device_module.describe()}", flush=True)

    dense_ms = ms(lambda: dense_attention(q, k, v), device_module, args.repeats)
    sparse_out = lvsa.sparse_attention(q, k, v, plan, settings=settings)
    lvsa_ms = ms(lambda: lvsa.sparse_attention(q, k, v, plan, settings=settings), device_module, args.repeats)
    single = dense_ms / lvsa_ms
    rows = [{"layout": "1 device", "dense_ms": dense_ms, "lvsa_ms": lvsa_ms, "speedup": single, "keeps": 1.0,
             "skipped": 0.0, "stepwise_ms": lvsa_ms, "error": 0.0}]
    for layout in args.layouts:
        u, r = (int(x) for x in layout.split("x"))
        if H % u or (T * P) % r:
            print(f"U{u} x R{r}: does not fit ({H} heads, {T * P} tokens)", flush=True)
            continue
        dense_ranks, lvsa_ranks, stepwise_ranks, error = time_layout(u, r, q, k, v, plan, settings, sparse_out,
                                                                     device_module, args.repeats)
        skipped = sum(len(skipped_key_shards(plan, r, i)) for i in range(r)) / (r * r)
        speedup = max(dense_ranks) / max(lvsa_ranks)
        rows.append({"layout": f"U{u} x R{r} ({u * r} devices)", "dense_ms": max(dense_ranks),
                     "lvsa_ms": max(lvsa_ranks), "speedup": speedup, "keeps": speedup / single, "skipped": skipped,
                     "stepwise_ms": max(stepwise_ranks), "error": error})
    print(f"{'layout':<22} {'dense ms':>9} {'lvsa ms':>9} {'speedup':>8} {'keeps':>6} {'skipped':>8} "
          f"{'stepwise ms':>11} {'max err':>8}")
    for row in rows:
        print(f"{row['layout']:<22} {row['dense_ms']:9.2f} {row['lvsa_ms']:9.2f} {row['speedup']:7.2f}x "
              f"{row['keeps']:6.0%} {row['skipped']:8.0%} {row['stepwise_ms']:11.2f} {row['error']:8.1e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
