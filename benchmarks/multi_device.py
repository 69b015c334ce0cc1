"""Context-parallel scaling: one denoising forward on 1 GPU and on N GPUs under Ulysses, ring attention and
Ulysses x ring, dense vs lvsa, in one launch per GPU count.

    torchrun --nproc-per-node 8 -m benchmarks.multi_device         # Wan 1.3B @ 321 frames, Wan 14B shapes @ 161
    torchrun --nproc-per-node 4 -m benchmarks.multi_device --device cpu --small  # gloo smoke run (in the tests)

Rank 0 first times the forward alone (the other ranks wait). Then, for each layout that fits N processes
(``--layouts``: ``ulysses`` N when N divides the heads, ``ring`` N, and ``mixed``: Ulysses U x ring N/U with
U the largest divisor of N and of the heads below N), a fresh model joins diffusers' context parallelism
(``lvsa.parallel.enable_context_parallel``) and the same forward runs sharded. Dense is the model's own
attention through diffusers (cuDNN SDPA on CUDA, which supports Ulysses and ring; diffusers' native CPU
attention has no ring, so CPU runs time lvsa alone there); lvsa is ``lvsa.apply`` with ``--backend``.
Transformers are built from their published configs with random weights, bfloat16. "scaling" is the
1-device time of the same method over the N-device time; "keeps" is lvsa's speedup over dense under the
layout as a fraction of its single-device speedup (the issue's ring target: at least 90%)."""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch

import lvsa
from lvsa import registry
from lvsa.caches import clear as clear_caches
from lvsa.parallel import enable_context_parallel, exit_process, init_distributed, leave_distributed

from .pipeline import SMALL_WAN, WAN_1_3B, measure  # the single-device benchmark's pieces

WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
# the small Wan with 4 heads, so that Ulysses 4, ring 4 and Ulysses 2 x ring 2 all fit 4 CPU processes
CONFIGS = {"wan-1.3b": WAN_1_3B, "wan-14b": WAN_14B, "wan-small": dict(SMALL_WAN, num_attention_heads=4)}


def layouts_for(world: int, heads: int, wanted: list[str]) -> list[tuple[str, int, int]]:
    """``(name, ulysses_degree, ring_degree)`` of each requested layout that fits ``world`` processes."""
    if world == 1:
        return []
    found = []
    if "ulysses" in wanted and heads % world == 0:
        found.append(("ulysses", world, 1))
    if "ring" in wanted:
        found.append(("ring", 1, world))
    mixed = [u for u in range(2, world) if world % u == 0 and heads % u == 0]
    if "mixed" in wanted and mixed:
        found.append(("ulysses x ring", mixed[-1], world // mixed[-1]))
    return found


def run_case(label: str, frames: int, args: argparse.Namespace, rank: int, world: int, device: str,
             device_module, dtype: torch.dtype) -> list[dict]:
    import torch.distributed as dist
    from diffusers import WanTransformer3DModel

    config = CONFIGS[label]
    T = (frames - 1) // 4 + 1
    inputs = {
        "hidden_states": torch.randn(1, 16, T, args.height // 8, args.width // 8, device=device, dtype=dtype,
                                     generator=torch.Generator(device).manual_seed(0)),
        "encoder_hidden_states": torch.randn(1, 512, config["text_dim"], device=device, dtype=dtype,
                                             generator=torch.Generator(device).manual_seed(1)),
        "timestep": torch.tensor([999.0], device=device),
        "return_dict": False,
    }
    dense_backend = "_native_cudnn" if device.startswith("cuda") else None
    rows: list[dict] = []

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        with torch.device(device):
            return WanTransformer3DModel(**config).to(dtype).eval()

    def time_both(model: torch.nn.Module, devices: int, layout: str, ulysses: int, ring: int) -> None:
        common = {"model": label, "frames": frames, "devices": devices, "layout": layout, "ulysses_degree": ulysses,
                  "ring_degree": ring}
        if ring == 1 or dense_backend:  # diffusers' native (CPU) attention cannot run ring steps
            if dense_backend:
                model.set_attention_backend(dense_backend)
            dense_ms, dense_peak, _ = measure(model, inputs, device_module, args.repeats)
            if dense_backend:
                model.reset_attention_backend()
            rows.append({**common, "method": "dense", "ms": dense_ms, "peak_gib": dense_peak / 2**30})
        clear_caches()
        handle = lvsa.apply(model, lvsa.LVSASettings(backend=args.backend))
        lvsa_ms, lvsa_peak, _ = measure(model, inputs, device_module, args.repeats)
        stats = handle.stats
        assert (stats.ulysses_degree, stats.ring_degree) == (ulysses, ring), "the layout did not engage"
        skipped = stats.ring_steps_skipped / stats.ring_steps if stats.ring_steps else 0.0
        rows.append({**common, "method": f"lvsa {args.backend}", "ms": lvsa_ms, "peak_gib": lvsa_peak / 2**30,
                     "density": handle.runtime.last_plan.density, "ring_steps_skipped": skipped})
        handle.remove()

    if rank == 0:
        time_both(build(), 1, "single", 1, 1)
    dist.barrier()
    heads = config["num_attention_heads"]
    for layout, ulysses, ring in layouts_for(world, heads, args.layouts):
        model = build()  # diffusers' parallelism is set once per model
        enable_context_parallel(model, ulysses, ring_degree=ring)
        time_both(model, world, layout, ulysses, ring)
        del model
        clear_caches()
        gc.collect()
        if not device.startswith("cpu"):
            torch.accelerator.empty_cache()  # the next layout's model fits beside nothing of this one
    if rank == 0 and "ulysses" in args.layouts and world > 1 and heads % world:
        print(f"{label}: ulysses alone cannot run on {world} devices ({heads} heads do not split {world} ways)",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="a small Wan config at 64x64 (CPU smoke run)")
    parser.add_argument("--cases", nargs="+", default=["wan-1.3b@321", "wan-14b@161"],
                        help="MODEL@FRAMES with MODEL in " + ", ".join(CONFIGS))
    parser.add_argument("--backend", default="sdpa", help="the lvsa driver")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layouts", nargs="+", default=["ulysses", "ring", "mixed"],
                        choices=["ulysses", "ring", "mixed"], help="context-parallel layouts to time at N > 1")
    parser.add_argument("--json", help="rank 0 writes the rows here")
    args = parser.parse_args(argv)
    if args.small:
        args.cases, args.height, args.width = [f"wan-small@{c.split('@')[1]}" for c in args.cases], 64, 64
    device_type = args.device.split(":")[0]
    rank, world, local_rank = init_distributed(device_type)
    device = "cpu" if device_type == "cpu" else f"{device_type}:{local_rank}"
    device_module = registry.get_device(device_type)
    dtype = torch.float32 if device_type == "cpu" else torch.bfloat16
    rows = []
    for case in args.cases:
        label, _, frames = case.partition("@")
        rows += run_case(label, int(frames), args, rank, world, device, device_module, dtype)
    if rank == 0:
        report(rows)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    leave_distributed()
    return 0


def report(rows: list[dict]) -> None:
    """Scaling over the single device, speedup over dense in the same layout, and how much of the
    single-device speedup each layout keeps; one line per row."""
    base = {(r["model"], r["frames"], r["method"]): r["ms"] for r in rows if r["devices"] == 1}
    dense = {(r["model"], r["frames"], r["layout"]): r["ms"] for r in rows if r["method"] == "dense"}
    for r in rows:
        r["scaling"] = base[(r["model"], r["frames"], r["method"])] / r["ms"]
        dense_ms = dense.get((r["model"], r["frames"], r["layout"]))
        r["speedup_vs_dense"] = dense_ms / r["ms"] if dense_ms else None
    single = {(r["model"], r["frames"]): r["speedup_vs_dense"] for r in rows
              if r["layout"] == "single" and r["method"] != "dense"}
    for r in rows:
        one = single.get((r["model"], r["frames"]))
        keeps = (r["speedup_vs_dense"] / one if r["method"] != "dense" and r["devices"] > 1 and r["speedup_vs_dense"]
                 and one else None)
        r["keeps"] = keeps
        vs_dense = f"{r['speedup_vs_dense']:5.2f}x" if r["speedup_vs_dense"] else "  n/a "
        extra = ""
        if r["method"] != "dense":
            extra = f"  density {r['density']:.3f}  ring steps skipped {r['ring_steps_skipped']:.0%}"
            extra += f"  keeps {keeps:.0%} of the 1-device speedup" if keeps else ""
        print(f"{r['model']:<10} {r['frames']:>4}f  {r['devices']} dev  {r['layout']:<15} "
              f"(U{r['ulysses_degree']} x R{r['ring_degree']})  {r['method']:<11} {r['ms']:9.1f} ms  "
              f"vs dense {vs_dense}  scaling {r['scaling']:5.2f}x  peak {r['peak_gib']:6.2f} GiB{extra}", flush=True)


if __name__ == "__main__":
    exit_process(main())
