"""Attention benchmark: dense SDPA (cuDNN on CUDA: the fastest dense kernel) against every lvsa driver, in
one run, on the shapes of real long-video models.

    python benchmarks/attention.py                          # CUDA, full sizes, bf16
    python benchmarks/attention.py --device cpu --small     # CPU, small sizes (keeps the script alive in CI)

For each case it prints dense ms, each driver's ms, effective TFLOP/s (the FLOPs the plan needs over the
time), speedup over dense, the fraction of the ideal speedup (1 / density), peak extra memory, and the
relative error against a float64 masked reference on sampled query rows. ``--json PATH`` writes it all."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import lvsa
from lvsa import dispatch, registry
from lvsa.backends.sdpa import SdpaDriver


@dataclass(frozen=True)
class Case:
    name: str
    frames: int  # latent frames
    tokens_per_frame: int
    heads: int
    reference: int
    scale: float = 1.0


CASES = [
    Case("wan-2x (161 frames)", 41, 1560, 12, 21),
    Case("wan-4x (321 frames)", 81, 1560, 12, 21),
    Case("wan-4x s=0.5", 81, 1560, 12, 21, 0.5),
    Case("hunyuan-1.5x (193 frames)", 49, 1590, 16, 33),
    Case("hunyuan-2x (257 frames)", 65, 1590, 16, 33),
    Case("wan-14b-4x (40 heads)", 81, 1560, 40, 21),
]


@dataclass
class Row:
    case: str
    method: str
    ms: float
    tflops: float
    speedup: float
    fraction_of_ideal: float | None
    peak_extra_gb: float | None
    rel_error: float | None
    prepare_ms: float | None = None


def sparse_flops(plan: lvsa.SparsePlan, heads: int, head_dim: int) -> float:
    return 4.0 * heads * head_dim * plan.density * plan.seq_len**2


def timed(fn, device, warmup: int, repeats: int) -> tuple[float, torch.Tensor]:
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        device.synchronize()
        start = time.perf_counter()
        out = fn()
        device.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, out


def sampled_reference(plan, q, k, v, frames, rows_per_frame):
    """float64 attention of a few query rows of a few frames over exactly their attended keys."""
    P = plan.patches_per_frame
    refs, picks = [], []
    text = list(range(plan.text_start, plan.text_start + plan.text_tokens))
    for f in frames:
        keys = [plan.video_start + g * P + i for g in plan.attended(f) for i in range(P)] + text
        keys_t = torch.tensor(keys, device=q.device)
        rows = torch.linspace(0, P - 1, rows_per_frame, device=q.device).long() + plan.video_start + f * P
        qs = q[0, rows].double()
        ks, vs = k[0, keys_t].double(), v[0, keys_t].double()
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / math.sqrt(q.shape[-1])
        refs.append(torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), vs))
        picks.append(rows)
    return torch.cat(picks), torch.cat(refs)


def run_case(case, args, device, dtype, head_dim, methods, gen) -> list[Row]:
    P = 16 if args.small else case.tokens_per_frame
    heads = 2 if args.small else case.heads
    settings = lvsa.LVSASettings(reference_latent_frames=case.reference, sparsity_scale=case.scale)
    plan = lvsa.make_plan(case.frames, P, settings=settings)
    shape = (1, plan.seq_len, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(args.device, dtype) for _ in range(3))
    frames = sorted({0, plan.latent_frames // 2, plan.latent_frames - 1})
    picks, reference = sampled_reference(plan, q, k, v, frames, 32)
    flops = sparse_flops(plan, heads, head_dim)
    dense_flops = 4.0 * heads * head_dim * plan.seq_len**2

    def dense():
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        if args.device == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt)
        return F.scaled_dot_product_attention(qt, kt, vt)

    allocator = device.memory().kind == "allocator"  # a process RSS peak cannot be reset per method
    base = device.memory().current or 0

    def peak_extra() -> float | None:
        return (device.memory().peak - base) / 2**30 if allocator else None

    print(f"\n{case.name}: {plan.latent_frames} frames x {P} tokens x {heads} heads, density {plan.density:.3f}, "
          f"ideal {1 / plan.density:.2f}x   {plan.summary()}", flush=True)
    device.reset_peak()
    dense_ms, _ = timed(dense, device, args.warmup, args.repeats)
    label = "dense cuDNN" if args.device == "cuda" else "dense SDPA"
    rows = [Row(case.name, label, dense_ms, dense_flops / dense_ms / 1e9, 1.0, None, peak_extra(), None)]
    for name, driver in methods.items():
        problem = lvsa.AttentionProblem.from_tensors(q, k, v, plan)
        start = time.perf_counter()
        prepared = driver.prepare(plan, problem)
        device.synchronize()
        prepare_ms = (time.perf_counter() - start) * 1e3
        device.reset_peak()
        ms, out = timed(lambda d=driver, p=prepared: d.run(p, q, k, v), device, args.warmup, args.repeats)
        peak = peak_extra()
        got = out[0, picks].double()
        rel = ((got - reference).norm() / reference.norm()).item()
        speedup = dense_ms / ms
        rows.append(Row(case.name, name, ms, flops / ms / 1e9, speedup, speedup * plan.density, peak, rel, prepare_ms))
        del out, prepared
    return rows


def print_case(rows: list[Row]) -> None:
    print(f"  {'method':<14} {'ms':>9} {'TFLOP/s':>8} {'speedup':>8} {'of ideal':>9} {'+GB':>6} {'rel err':>9} "
          f"{'prep ms':>8}")
    for r in rows:
        gb = "-" if r.peak_extra_gb is None else f"{r.peak_extra_gb:.1f}"
        err = "-" if r.rel_error is None else f"{r.rel_error:.1e}"
        prep = "-" if r.prepare_ms is None else f"{r.prepare_ms:.0f}"
        ideal = "-" if r.fraction_of_ideal is None else f"{r.fraction_of_ideal:.0%}"
        print(f"  {r.method:<14} {r.ms:>9.2f} {r.tflops:>8.1f} {r.speedup:>7.2f}x {ideal:>9} "
              f"{gb:>6} {err:>9} {prep:>8}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="16 tokens per frame, 2 heads (CPU-sized)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on accelerators, float32 on CPU")
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cases", default=None, help="comma-separated substrings of case names")
    parser.add_argument("--methods", default=None, help="comma-separated substrings of driver names to measure")
    parser.add_argument("--json", default=None, help="write every number to this file")
    args = parser.parse_args(argv)

    device = registry.get_device(args.device)
    if device is None or not device.is_available():
        why = "no device module" if device is None else device.is_available().reason
        print(f"error: device {args.device} is not usable: {why}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    head_dim = args.head_dim or (64 if args.small else 128)
    cases = CASES
    if args.cases:
        wanted = [w.strip() for w in args.cases.split(",")]
        cases = [c for c in cases if any(w in c.name for w in wanted)]

    methods: dict[str, object] = {"sdpa (split)": SdpaDriver("split"), "sdpa (gather)": SdpaDriver("gather")}
    for name, driver in registry.drivers().items():
        if name in ("sdpa", "reference") or not driver.auto_select:
            continue
        status = dispatch.backend_status(name, args.device)
        if status.available:
            methods[name] = driver
        else:
            print(f"({name}: not measured: {status.reason})")

    if args.methods:
        wanted_methods = [w.strip() for w in args.methods.split(",")]
        methods = {n: d for n, d in methods.items() if any(w in n for w in wanted_methods)}
    env = {"device": device.describe(), "torch": torch.__version__, "dtype": str(dtype)[6:], "head_dim": head_dim}
    if args.device == "cuda":
        env["cudnn"] = torch.backends.cudnn.version()
    try:
        import flashinfer

        env["flashinfer"] = flashinfer.__version__
    except Exception:
        pass
    print("  ".join(f"{k}={v}" for k, v in env.items()))

    rows: list[Row] = []
    gen = torch.Generator().manual_seed(0)
    for case in cases:
        case_rows = run_case(case, args, device, dtype, head_dim, methods, gen)
        rows += case_rows
        print_case(case_rows)

    bad = [r for r in rows if r.rel_error is not None and not r.rel_error < (2e-2 if dtype != torch.float32 else 1e-4)]
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": env, "rows": [asdict(r) for r in rows]}, handle, indent=2)
    if bad:
        print(f"\nFAILED accuracy: {[(r.case, r.method, r.rel_error) for r in bad]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
