"""Context-parallel scaling: one denoising forward on 1 GPU and on N GPUs (Ulysses), dense vs lvsa, one launch.

    torchrun --nproc-per-node 2 benchmarks/multi_device.py                   # Wan 1.3B @ 321 frames, Wan 14B @ 161
    torchrun --nproc-per-node 2 benchmarks/multi_device.py --device cpu --small  # gloo smoke run (in the tests)

Rank 0 first times the forward alone (the other ranks wait), then every rank joins diffusers' context
parallelism (``lvsa.parallel.enable_context_parallel``) and the same forward runs sharded. Dense is the
model's own attention through diffusers (cuDNN SDPA on CUDA, which supports Ulysses); lvsa is
``lvsa.apply`` with ``--backend``. Transformers are built from their published configs with random weights,
bfloat16. "scaling" is the 1-device time over the N-device time of the same method."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import SMALL_WAN, WAN_1_3B, measure  # the single-device benchmark's pieces

import lvsa
from lvsa import registry
from lvsa.dispatch import clear_caches
from lvsa.parallel import enable_context_parallel, init_distributed

WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
CONFIGS = {"wan-1.3b": WAN_1_3B, "wan-14b": WAN_14B, "wan-small": SMALL_WAN}


def run_case(label: str, frames: int, args: argparse.Namespace, rank: int, world: int, device: str,
             device_module, dtype: torch.dtype) -> list[dict]:
    import torch.distributed as dist
    from diffusers import WanTransformer3DModel

    config = CONFIGS[label]
    T = (frames - 1) // 4 + 1
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**config).to(dtype).eval()
    inputs = {
        "hidden_states": torch.randn(1, 16, T, args.height // 8, args.width // 8, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, 512, config["text_dim"], device=device, dtype=dtype),
        "timestep": torch.tensor([999.0], device=device),
        "return_dict": False,
    }
    dense_backend = "_native_cudnn" if device.startswith("cuda") else None
    rows: list[dict] = []

    def time_both(devices: int) -> None:
        if dense_backend:
            model.set_attention_backend(dense_backend)
        dense_ms, dense_peak, _ = measure(model, inputs, device_module, args.repeats)
        if dense_backend:
            model.reset_attention_backend()
        clear_caches()
        handle = lvsa.apply(model, lvsa.LVSASettings(backend=args.backend))
        lvsa_ms, lvsa_peak, _ = measure(model, inputs, device_module, args.repeats)
        degree, density = handle.stats.ulysses_degree, handle.runtime.last_plan.density
        handle.remove()
        for method, ms, peak in (("dense", dense_ms, dense_peak), (f"lvsa {args.backend}", lvsa_ms, lvsa_peak)):
            rows.append({"model": label, "frames": frames, "devices": devices, "method": method, "ms": ms,
                         "peak_gib": peak / 2**30, "ulysses_degree": degree if method != "dense" else devices,
                         "density": density})

    if rank == 0:
        time_both(1)
    dist.barrier()
    enable_context_parallel(model, world)
    time_both(world)
    clear_caches()
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
        base = {(r["model"], r["frames"], r["method"]): r["ms"] for r in rows if r["devices"] == 1}
        dense = {(r["model"], r["frames"], r["devices"]): r["ms"] for r in rows if r["method"] == "dense"}
        for r in rows:
            r["scaling"] = base[(r["model"], r["frames"], r["method"])] / r["ms"]
            r["speedup_vs_dense"] = dense[(r["model"], r["frames"], r["devices"])] / r["ms"]
            print(f"{r['model']:<10} {r['frames']:>4}f  {r['devices']} device(s)  {r['method']:<12} "
                  f"{r['ms']:9.1f} ms  vs dense {r['speedup_vs_dense']:5.2f}x  scaling {r['scaling']:5.2f}x  "
                  f"peak {r['peak_gib']:6.2f} GiB  (ulysses {r['ulysses_degree']}, density {r['density']:.3f})",
                  flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
