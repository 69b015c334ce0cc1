"""One denoising forward of a real-size video transformer: dense attention vs each lvsa driver, in one run.

    python -m benchmarks.pipeline --dense-fa4          # CUDA: Wan 2.1 1.3B at 81/161/321 frames + HunyuanVideo 1.5
    python -m benchmarks.pipeline --small --device cpu # a small config on CPU (what the test suite runs)

The transformers are built from their real configs with random weights (no download) in bfloat16. Dense
is the model's own attention through diffusers with cuDNN SDPA (``_native_cudnn``) on CUDA; ``--dense-fa4``
adds FlashAttention-4's dense kernel (the fa4 driver on a dense plan). Each lvsa row
installs lvsa with ``lvsa.apply`` on the same transformer. Times are the median of ``--repeats`` forwards
after one warm-up; "peak" is the allocator's peak during a forward and "extra" what it adds over the
memory held before the forward. Speedup and memory ratios are against the dense row of the same length."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

import lvsa
from lvsa import registry
from lvsa.caches import clear as clear_caches

# Wan 2.1 T2V 1.3B and HunyuanVideo 1.5 480p, as published in their diffusers configs
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
HUNYUAN_15 = dict(in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
                  num_refiner_layers=2, mlp_ratio=4.0, patch_size=1, patch_size_t=1, text_embed_dim=3584,
                  text_embed_2_dim=1472, image_embed_dim=1152, rope_axes_dim=(16, 56, 56), task_type="t2v")
SMALL_WAN = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=32, text_dim=64, ffn_dim=128, num_layers=2)
SMALL_HUNYUAN = dict(HUNYUAN_15, num_attention_heads=2, attention_head_dim=32, num_layers=2, num_refiner_layers=1,
                     text_embed_dim=32, text_embed_2_dim=32, image_embed_dim=16, rope_axes_dim=(8, 12, 12))


@dataclass
class Row:
    model: str
    frames: int
    latent_frames: int
    tokens: int
    method: str
    sparsity_scale: float | None
    density: float | None
    ms: float
    speedup: float | None
    peak_gib: float
    extra_gib: float
    extra_vs_dense: float | None


def wan_case(small: bool, device: str, dtype: torch.dtype, frames: int, height: int, width: int):
    from diffusers import WanTransformer3DModel

    config = SMALL_WAN if small else WAN_1_3B
    T = (frames - 1) // 4 + 1
    inputs = {
        "hidden_states": torch.randn(1, 16, T, height // 8, width // 8, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, 512, config["text_dim"], device=device, dtype=dtype),
        "timestep": torch.tensor([999.0], device=device),
        "return_dict": False,
    }
    return WanTransformer3DModel, config, inputs, T


def hunyuan_case(small: bool, device: str, dtype: torch.dtype, frames: int, height: int, width: int,
                 layers: int | None):
    from diffusers import HunyuanVideo15Transformer3DModel

    config = dict(SMALL_HUNYUAN if small else HUNYUAN_15)
    if layers:
        config["num_layers"] = layers
    T = (frames - 1) // 4 + 1
    text, byt5 = 256, 64  # padded lengths; about two thirds valid, as in a real prompt
    inputs = {
        "hidden_states": torch.randn(1, config["in_channels"], T, height // 16, width // 16, device=device,
                                     dtype=dtype),
        "timestep": torch.tensor([999.0], device=device, dtype=dtype),  # its time embedder takes the model dtype
        "encoder_hidden_states": torch.randn(1, text, config["text_embed_dim"], device=device, dtype=dtype),
        "encoder_attention_mask": (torch.arange(text, device=device) < 170).long()[None],
        "encoder_hidden_states_2": torch.randn(1, byt5, config["text_embed_2_dim"], device=device, dtype=dtype),
        "encoder_attention_mask_2": (torch.arange(byt5, device=device) < 40).long()[None],
        "image_embeds": torch.zeros(1, 729, config["image_embed_dim"], device=device, dtype=dtype),
        "return_dict": False,
    }
    return HunyuanVideo15Transformer3DModel, config, inputs, T


def measure(model: torch.nn.Module, inputs: dict[str, Any], device_module: Any, repeats: int) -> tuple[float, int, int]:
    with torch.inference_mode():
        model(**inputs)  # warm-up: kernels, lvsa's plan and the driver's prepare
        device_module.synchronize()
        before = device_module.memory().current or 0
        device_module.reset_peak()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            device_module.synchronize()
            times.append(time.perf_counter() - start)
        peak = device_module.memory().peak or 0
    return statistics.median(times) * 1e3, peak, before


def run_model(name: str, build: Any, args: argparse.Namespace, device_module: Any, dtype: torch.dtype) -> list[Row]:
    rows: list[Row] = []
    model = None
    for frames in args.frames:
        cls, config, inputs, T = build(frames)
        if model is None:
            with torch.device(args.device):
                model = cls(**config).to(dtype).eval()
        tokens = inputs["hidden_states"].shape[-1] * inputs["hidden_states"].shape[-2] * T
        if name.startswith("wan"):
            tokens //= 4  # 2x2 spatial patches
        dense_backend = "_native_cudnn" if args.device.startswith("cuda") else None
        if dense_backend:
            model.set_attention_backend(dense_backend)
        dense_ms, dense_peak, before = measure(model, inputs, device_module, args.repeats)
        dense_extra = dense_peak - before
        rows.append(Row(name, frames, T, tokens, "dense", None, None, dense_ms, 1.0, dense_peak / 2**30,
                        dense_extra / 2**30, 0.0))
        _print(rows[-1])
        if dense_backend:
            model.reset_attention_backend()
        if args.dense_fa4:  # FA4's dense kernel: the fa4 driver under a horizon that keeps the plan dense
            clear_caches()
            handle = lvsa.apply(model, lvsa.LVSASettings(backend="fa4", reference_latent_frames=T))
            try:
                ms, peak, before = measure(model, inputs, device_module, args.repeats)
                rows.append(Row(name, frames, T, tokens, "dense FA4", None, 1.0, ms, dense_ms / ms, peak / 2**30,
                                (peak - before) / 2**30, (peak - dense_peak) / max(dense_peak, 1)))
                _print(rows[-1])
            except lvsa.LVSAError as error:
                print(f"  dense FA4: skipped: {error}".splitlines()[0])
            finally:
                handle.remove()
        for method in args.methods:
            backend, _, budget = method.partition("@")
            for scale in args.sparsity_scales:
                if budget:
                    from lvsa.backends.sdpa import SdpaDriver

                    SdpaDriver.gather_budget_bytes = int(budget) << 20
                clear_caches()
                settings = lvsa.LVSASettings(backend=backend, sparsity_scale=scale)
                handle = lvsa.apply(model, settings)
                try:
                    ms, peak, before = measure(model, inputs, device_module, args.repeats)
                except lvsa.LVSAError as error:
                    print(f"  {method} s={scale}: skipped: {error}".splitlines()[0])
                    handle.remove()
                    continue
                plan = handle.runtime.last_plan
                handle.remove()
                extra = peak - before
                rows.append(Row(name, frames, T, tokens, method, scale, plan.density if plan else None, ms,
                                dense_ms / ms, peak / 2**30, extra / 2**30, (peak - dense_peak) / max(dense_peak, 1)))
                _print(rows[-1])
        del inputs
        clear_caches()
    return rows


def _print(row: Row) -> None:
    scale = "-" if row.sparsity_scale is None else f"{row.sparsity_scale:g}"
    density = "-" if row.density is None else f"{row.density:.3f}"
    vs = "" if row.extra_vs_dense is None else f"{row.extra_vs_dense * 100:+.1f}%"
    print(f"{row.model:<14} {row.frames:>4}f T={row.latent_frames:<3} {row.tokens:>7} tok  {row.method:<16} "
          f"s={scale:<4} density={density:<6} {row.ms:9.1f} ms  {row.speedup:5.2f}x  "
          f"peak {row.peak_gib:6.2f} GiB ({vs} vs dense)  extra {row.extra_gib:5.2f} GiB", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="small configs and sizes (CPU smoke run)")
    parser.add_argument("--models", nargs="+", default=["wan", "hunyuan"], choices=["wan", "hunyuan"])
    parser.add_argument("--frames", nargs="+", type=int, default=[81, 161, 321])
    parser.add_argument("--hunyuan-frames", nargs="+", type=int, default=[121, 241])
    parser.add_argument("--hunyuan-layers", type=int, default=None,
                        help="build HunyuanVideo 1.5 with fewer of its 54 blocks (times scale with the count)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--dense-fa4", action="store_true", help="also time FA4's dense kernel (the fa4 driver)")
    parser.add_argument("--methods", nargs="+", default=["sdpa", "flashinfer", "fa4"],
                        help="lvsa drivers; sdpa@MIB sets the sdpa driver's gather budget in MiB")
    parser.add_argument("--sparsity-scales", nargs="+", type=float, default=[1.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if args.small:
        args.height, args.width = 64, 64
    device_module = registry.get_device(args.device.split(":")[0])
    if device_module is None or not device_module.is_available():
        print(f"error: device {args.device} is not usable here", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if not args.device.startswith("cpu") else torch.float32
    torch.manual_seed(0)
    rows = []
    if "wan" in args.models:
        rows += run_model("wan-1.3b" if not args.small else "wan-small",
                          lambda f: wan_case(args.small, args.device, dtype, f, args.height, args.width),
                          args, device_module, dtype)
    if "hunyuan" in args.models:
        hv_args = argparse.Namespace(**{**vars(args), "frames": args.hunyuan_frames})
        label = "hunyuan-1.5" if not args.small else "hunyuan-small"
        if args.hunyuan_layers:
            label += f"/{args.hunyuan_layers}L"
        rows += run_model(label, lambda f: hunyuan_case(args.small, args.device, dtype, f, args.height, args.width,
                                                        args.hunyuan_layers), hv_args, device_module, dtype)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([asdict(r) for r in rows], handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
