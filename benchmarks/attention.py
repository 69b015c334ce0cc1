"""Attention benchmark: the two fastest dense kernels (cuDNN SDPA, and FlashAttention-4 where the fa4 driver is
usable) against every lvsa driver, in one run, on the shapes of real long-video models.

    python -m benchmarks.attention                          # CUDA, full sizes, bf16
    python -m benchmarks.attention --flashinfer-direct      # also FlashInfer's wrapper called directly
    python -m benchmarks.attention --device cpu --small     # CPU, small sizes (keeps the script alive in CI)
    python -m benchmarks.attention --sweep-frames 81 161 321 481   # latency scaling: Wan 2.1 at each length

For each case it prints every method's ms, effective TFLOP/s (the FLOPs the plan needs over the time), the
speedup over dense cuDNN and over dense FA4, the fraction of the ideal speedup (1 / density) against each,
peak extra memory, and the relative error against a float64 masked reference on sampled query rows.
``--json PATH`` writes it all. Each time is the median of ``--repeats`` calls queued back to back with device
events around each, as a layer's attention runs inside a forward (``--timing synchronized``: host clock around
each call, the host's own work included); each speedup is the median of the per-round ratios of the methods'
times, taken in the same interleaved rounds (see ``timing.py``)."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import lvsa
from lvsa import registry
from lvsa.backends.sdpa import SdpaDriver
from lvsa.driver_status import driver_status

from . import timing


@dataclass(frozen=True)
class Case:
    name: str
    frames: int  # latent frames
    tokens_per_frame: int
    heads: int
    reference: int
    scale: float = 1.0
    text: int = 0  # text tokens after the video (HunyuanVideo 1.5's joint attention), padded
    valid_text: int = 0
    model: str = "wan"  # the family, for the figures (density vs frames per model)


def sweep_cases(video_frames: list[int], scales: list[float]) -> list[Case]:
    """The latency-scaling sweep: Wan 2.1 1.3B's attention (1560 tokens per frame at 480x832, 12 heads,
    horizon 21 latent frames) at each length and sparsity scale."""
    return [Case(f"wan {frames}f" + (f" s={scale:g}" if scale != 1.0 else ""), (frames - 1) // 4 + 1, 1560, 12, 21,
                 scale) for frames in video_frames for scale in scales]


CASES = [
    Case("wan-2x (161 frames)", 41, 1560, 12, 21),
    Case("wan-4x (321 frames)", 81, 1560, 12, 21),
    Case("wan-4x s=0.5", 81, 1560, 12, 21, 0.5),
    Case("hunyuan-1.5x (193 frames)", 49, 1590, 16, 33, model="hunyuan"),
    Case("hunyuan-2x (257 frames)", 65, 1590, 16, 33, model="hunyuan"),
    Case("wan-14b-4x (40 heads)", 81, 1560, 40, 21),
    # HunyuanVideo 1.5's joint attention: the prompt's text tokens after the video, about two thirds valid
    Case("hunyuan-1.5x + 1000 text (padded)", 49, 1590, 16, 33, text=1000, valid_text=680, model="hunyuan"),
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
    #: against dense FlashAttention-4 (None where FA4 is not usable)
    speedup_fa4: float | None = None
    fraction_of_ideal_fa4: float | None = None
    #: interquartile range of the timed calls over their median (0 with fewer than 2 calls)
    spread: float = 0.0
    times_ms: list[float] = field(default_factory=list)
    #: the case's geometry, for the figures: latent frames, video frames ((T - 1) x 4 + 1), density, model
    latent_frames: int = 0
    video_frames: int = 0
    density: float = 1.0
    sparsity_scale: float = 1.0
    model: str = ""


@dataclass(frozen=True)
class TimedMethod:
    name: str
    run: Callable[[], torch.Tensor]
    prepare_ms: float | None
    #: bytes its preparation keeps (block tables, workspaces), counted in its peak extra memory
    held: int
    #: a sparse method: checked against the reference, compared with the ideal
    sparse: bool


def sparse_flops(plan: lvsa.SparsePlan, heads: int, head_dim: int) -> float:
    return 4.0 * heads * head_dim * plan.density * plan.seq_len**2


def sampled_reference(plan, q, k, v, frames, rows_per_frame, valid_text=None):
    """float64 attention of a few query rows of a few frames over exactly their attended keys."""
    P = plan.patches_per_frame
    refs, picks = [], []
    text = list(range(plan.text_start, plan.text_start + (plan.text_tokens if valid_text is None else valid_text)))
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


def case_geometry(case: Case, small: bool) -> tuple[lvsa.SparsePlan, int, int, int]:
    """A case's plan, heads, text tokens and valid text tokens, at CPU sizes with ``small``."""
    P = 16 if small else case.tokens_per_frame
    text = min(case.text, 24) if small else case.text
    settings = lvsa.LVSASettings(reference_latent_frames=case.reference, sparsity_scale=case.scale)
    plan = lvsa.make_plan(case.frames, P, text_tokens=text, settings=settings)
    return plan, 2 if small else case.heads, text, min(case.valid_text, 16) if small else case.valid_text


def run_case(case, args, device, dtype, head_dim, methods, gen) -> list[Row]:
    from lvsa.kernels.attention_ops import dense_attention, sequence_key_mask

    plan, heads, text, valid = case_geometry(case, args.small)
    P = plan.patches_per_frame
    shape = (1, plan.seq_len, heads, head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(args.device, dtype) for _ in range(3))
    padding = (torch.arange(text) < valid)[None].to(args.device) if text else None
    key_mask = sequence_key_mask(plan, padding, 1, torch.device(args.device))
    frames = sorted({0, plan.latent_frames // 2, plan.latent_frames - 1})
    picks, reference = sampled_reference(plan, q, k, v, frames, 32, valid if text else None)
    flops = sparse_flops(plan, heads, head_dim)
    dense_flops = 4.0 * heads * head_dim * plan.seq_len**2

    def dense():
        if args.device == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            # cuDNN alone when it takes the call; with a padding mask, torch's order with cuDNN first
            if key_mask is None:
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                    return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
        return dense_attention(q, k, v, key_mask)

    allocator = device.memory().kind == "allocator"  # a process RSS peak cannot be reset per method
    print(f"\n{case.name}: {plan.latent_frames} frames x {P} tokens x {heads} heads + {text} text, density "
          f"{plan.density:.3f}, ideal {1 / plan.density:.2f}x   {plan.summary()}", flush=True)
    timed_methods: list[TimedMethod] = []

    def add(name: str, prepare: Callable[[], Callable[[], torch.Tensor]], sparse: bool = True) -> None:
        """Prepare a method now (its prepare time and the memory it keeps are counted) and time it later."""
        before = device.memory().current or 0
        start = time.perf_counter()
        run = prepare()
        device.synchronize()
        prepare_ms = (time.perf_counter() - start) * 1e3 if sparse else None
        timed_methods.append(TimedMethod(name, run, prepare_ms, (device.memory().current or 0) - before, sparse))

    add("dense cuDNN" if args.device == "cuda" else "dense SDPA", lambda: dense, sparse=False)
    if "fa4" in methods:  # FA4's dense kernel: the fa4 driver on the dense plan of the same geometry
        dense_plan = lvsa.make_plan(case.frames, P, text_tokens=text,
                                    settings=lvsa.LVSASettings(reference_latent_frames=case.frames))
        fa4 = methods["fa4"]

        def dense_fa4():
            prepared = fa4.prepare(dense_plan, lvsa.AttentionProblem.from_tensors(q, k, v, dense_plan, padding))
            return lambda: fa4.run(prepared, q, k, v, padding)
        add("dense FA4", dense_fa4, sparse=False)
    for name, driver in methods.items():
        problem = lvsa.AttentionProblem.from_tensors(q, k, v, plan, padding)
        if driver.check(problem):
            print(f"  ({name}: not measured: {'; '.join(driver.check(problem))})")
            continue

        def driven(d=driver, problem=problem):
            prepared = d.prepare(plan, problem)
            return lambda: d.run(prepared, q, k, v, padding)
        add(name, driven)
    if args.flashinfer_direct and not text and "flashinfer" in methods:
        for megabytes in (128, 512):
            def direct(megabytes=megabytes):
                wrapper = flashinfer_direct(plan, q, megabytes)
                return lambda: wrapper.run(q[0], k[0], v[0])[None]
            add(f"FI direct {megabytes}M", direct)

    # memory and accuracy: one call of each method alone
    peaks: dict[str, float | None] = {}
    errors: dict[str, float] = {}
    for method in timed_methods:
        before = device.memory().current or 0
        device.reset_peak()
        out = method.run()
        device.synchronize()
        peaks[method.name] = (method.held + (device.memory().peak or 0) - before) / 2**30 if allocator else None
        if method.sparse:
            errors[method.name] = ((out[0, picks].double() - reference).norm() / reference.norm()).item()
        del out
    # time: the methods in turn, so that a drift of the device touches all of them alike (see timing.py)
    times, outs = timing.interleaved([m.run for m in timed_methods], device, args.warmup, args.repeats, args.timing)
    del outs
    samples = {m.name: t for m, t in zip(timed_methods, times, strict=True)}
    median = {name: statistics.median(times) for name, times in samples.items()}
    dense_times = samples[timed_methods[0].name]
    fa4_times = samples.get("dense FA4")
    rows = []
    geometry = dict(latent_frames=plan.latent_frames, video_frames=(plan.latent_frames - 1) * 4 + 1,
                    density=plan.density, sparsity_scale=case.scale, model=case.model)
    for method in timed_methods:
        ms, own = median[method.name], samples[method.name]
        spread = _spread(own)
        vs_dense = timing.speedup(dense_times, own)  # paired per round (see timing.py)
        vs_fa4 = None if fa4_times is None else timing.speedup(fa4_times, own)
        if method.sparse:
            rows.append(Row(case.name, method.name, ms, flops / ms / 1e9, vs_dense, vs_dense * plan.density,
                            peaks[method.name], errors[method.name], method.prepare_ms, vs_fa4,
                            None if vs_fa4 is None else vs_fa4 * plan.density, spread, own, **geometry))
        else:
            rows.append(Row(case.name, method.name, ms, dense_flops / ms / 1e9, vs_dense, None,
                            peaks[method.name], None, None, vs_fa4, None, spread, own, **geometry))
    return rows


def _spread(times: list[float]) -> float:
    if len(times) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, n=4)
    return (q3 - q1) / statistics.median(times)


def flashinfer_direct(plan, q, workspace_mb: int):
    """FlashInfer's block-sparse wrapper planned and called directly on the plan (no lvsa in between)."""
    import flashinfer

    heads, head_dim, P = q.shape[2], q.shape[3], plan.patches_per_frame
    workspace = torch.empty(workspace_mb << 20, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BlockSparseAttentionWrapper(workspace)
    wrapper.plan(torch.tensor(plan.indptr, dtype=torch.int32), torch.tensor(plan.indices, dtype=torch.int32),
                 plan.video_tokens, plan.video_tokens, P, P, heads, heads, head_dim,
                 q_data_type=q.dtype, kv_data_type=q.dtype, o_data_type=q.dtype)
    return wrapper


def usable_device(name: str):
    """The device module of ``name``, or None after saying on stderr why it cannot run here."""
    device = registry.get_device(name)
    if device is None or not device.is_available():
        why = "no device module" if device is None else device.is_available().reason
        print(f"error: device {name} is not usable: {why}", file=sys.stderr)
        return None
    return device


def print_case(rows: list[Row]) -> None:
    print(f"  {'method':<16} {'ms':>9} {'TFLOP/s':>8} {'vs cuDNN':>9} {'of ideal':>9} {'vs FA4':>7} {'of ideal':>9} "
          f"{'+GB':>6} {'rel err':>9} {'prep ms':>8} {'spread':>7}")
    for r in rows:
        gb = "-" if r.peak_extra_gb is None else f"{r.peak_extra_gb:.1f}"
        err = "-" if r.rel_error is None else f"{r.rel_error:.1e}"
        prep = "-" if r.prepare_ms is None else f"{r.prepare_ms:.0f}"
        ideal = "-" if r.fraction_of_ideal is None else f"{r.fraction_of_ideal:.0%}"
        fa4 = "-" if r.speedup_fa4 is None else f"{r.speedup_fa4:.2f}x"
        ideal_fa4 = "-" if r.fraction_of_ideal_fa4 is None else f"{r.fraction_of_ideal_fa4:.0%}"
        print(f"  {r.method:<16} {r.ms:>9.2f} {r.tflops:>8.1f} {r.speedup:>8.2f}x {ideal:>9} {fa4:>7} {ideal_fa4:>9} "
              f"{gb:>6} {err:>9} {prep:>8} {r.spread:>7.1%}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="16 tokens per frame, 2 heads (CPU-sized)")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on accelerators, float32 on CPU")
    parser.add_argument("--head-dim", type=int, default=None)
    timing.add_arguments(parser)
    parser.add_argument("--cases", default=None, help="comma-separated substrings of case names")
    parser.add_argument("--methods", default=None, help="comma-separated substrings of driver names to measure")
    parser.add_argument("--json", default=None, help="write every number to this file")
    parser.add_argument("--sweep-frames", type=int, nargs="+", metavar="F",
                        help="instead of the cases: Wan 2.1's attention at these video frame counts (81 161 321 481)")
    parser.add_argument("--sweep-scales", type=float, nargs="+", default=[1.0], metavar="S",
                        help="sparsity scales of the sweep (default 1.0)")
    parser.add_argument("--flashinfer-direct", action="store_true",
                        help="also time FlashInfer's wrapper called directly (128 and 512 MB workspaces)")
    args = parser.parse_args(argv)

    device = usable_device(args.device)
    if device is None:
        return 2
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    head_dim = args.head_dim or (64 if args.small else 128)
    cases = sweep_cases(args.sweep_frames, args.sweep_scales) if args.sweep_frames else CASES
    if args.cases:
        wanted = [w.strip() for w in args.cases.split(",")]
        cases = [c for c in cases if any(w in c.name for w in wanted)]

    methods: dict[str, object] = {"sdpa (split)": SdpaDriver("split"), "sdpa (gather)": SdpaDriver("gather")}
    for name, driver in registry.drivers().items():
        if name in ("sdpa", "reference") or not driver.auto_select:
            continue
        status = driver_status(name, args.device)
        if status.available:
            methods[name] = driver
        else:
            print(f"({name}: not measured: {status.reason})")

    if args.methods:
        wanted_methods = [w.strip() for w in args.methods.split(",")]
        methods = {n: d for n, d in methods.items() if any(w in n for w in wanted_methods)}
    env = {"device": device.describe(), "torch": torch.__version__, "dtype": str(dtype)[6:], "head_dim": head_dim,
           "timing": f"{args.timing}, median of {args.repeats} interleaved after {args.warmup} warm-up; "
                     "speedups: median of per-round ratios"}
    if args.device == "cuda":
        env["cudnn"] = torch.backends.cudnn.version()
    for module in ("flashinfer", "flash_attn.cute"):
        try:
            env[module] = __import__(module, fromlist=["_"]).__version__
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
