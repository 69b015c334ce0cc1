"""WanAnimate2's generation-pass attention: the model's own flex attention over its packed ``[video | cached
reference]`` buffer under its BlockMask (compiled, as the model's docs ask), against lvsa's path for the same
call (the plan over the video, each frame's reference merged through log-sum-exp), in the same run.

    python -m benchmarks.wan_animate_2                 # CUDA, bf16, Wan-Animate 2 14B's heads at 480p
    python -m benchmarks.wan_animate_2 --segment-frames 81 161 321

The segment's latent frames ``F`` give a grid of ``F + 1`` frames (the reference image's first); lvsa's horizon
is 22 of them (81-frame segments). Each time is the median of interleaved rounds (``timing.py``); the error
is lvsa's against flex attention under the plan-narrowed BlockMask, in float32 on the same inputs."""

from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch

import lvsa
from lvsa.attention import DriverChoice, FrameReferences
from lvsa.attention.references import attend_with_references
from lvsa.backends.reference import frame_mask
from lvsa.families import declared

from . import timing
from .attention import usable_device


def packed(frames: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype, device: str,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Packed query, key and value as WanAnimate2AttnProcessor builds them (each part padded to 128 rows)."""
    video_rows = math.ceil((frames + 1) * tokens / 128) * 128
    reference_rows = math.ceil(frames * tokens / 128) * 128
    q = torch.zeros(1, video_rows, heads, head_dim, dtype=dtype, device=device)
    k = torch.zeros(1, video_rows + reference_rows, heads, head_dim, dtype=dtype, device=device)
    v = torch.zeros_like(k)
    video, reference = (frames + 1) * tokens, frames * tokens
    for x, rows in ((q, [(0, video)]), (k, [(0, video), (video_rows, reference)]), (v, [(0, video),
                                                                                      (video_rows, reference)])):
        for start, count in rows:
            x[:, start : start + count] = torch.randn(1, count, heads, head_dim, generator=gen).to(device, dtype)
    return q, k, v, video_rows


def run_case(video_frames: int, args: argparse.Namespace, device, compiled, dtype: torch.dtype,
             gen: torch.Generator) -> None:
    """One segment length: both methods timed in the same rounds, lvsa's error, one printed row."""
    from diffusers import WanAnimate2Transformer3DModel
    from torch.nn.attention.flex_attention import create_block_mask

    P, H, D = args.tokens_per_frame, args.heads, args.head_dim
    frames = (video_frames - 1) // 4 + 1
    q, k, v, video_rows = packed(frames, P, H, D, dtype, args.device, gen)
    model_mask = WanAnimate2Transformer3DModel.create_mask(None, frames, P, args.device)
    plan = lvsa.make_plan(frames + 1, P, model=declared("wan-animate-2").model_family())
    tokens, cached = (frames + 1) * P, slice(video_rows, video_rows + frames * P)
    reference = FrameReferences(k[:, cached], v[:, cached], frames, first=1)
    video = (q[:, :tokens], k[:, :tokens], v[:, :tokens])
    request = DriverChoice("auto")

    def flex():
        return compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=model_mask)

    def sparse():
        return attend_with_references(video, plan, reference, request)

    times, (_, sparse_out) = timing.interleaved([flex, sparse], device, args.warmup, args.repeats, args.timing)
    allowed = frame_mask(plan).to(args.device)
    rule = model_mask.mask_mod

    def narrowed(b, h, qi, kv):
        pair = allowed[(qi // P).clamp(max=frames), (kv // P).clamp(max=frames)]
        return rule(b, h, qi, kv) & ((kv >= video_rows) | pair)

    # compiled on CUDA: eager creation forms the whole [rows, keys] mask (over 30 GB at 321 frames)
    make_mask = torch.compile(create_block_mask) if args.device == "cuda" else create_block_mask
    mask = make_mask(narrowed, None, None, q.shape[1], k.shape[1], device=args.device)
    expected = compiled(*(x.float().transpose(1, 2) for x in (q, k, v)), block_mask=mask).transpose(1, 2)
    error = (sparse_out.float() - expected[:, :tokens]).abs().max().item()
    flex_ms, sparse_ms = statistics.median(times[0]), statistics.median(times[1])
    print(f"{video_frames:>8} {frames + 1:>5} {plan.kfi:>4} {flex_ms:>9.2f} {sparse_ms:>9.2f} "
          f"{timing.speedup(times[0], times[1]):>7.2f}x {error:>9.2e}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segment-frames", type=int, nargs="+", default=[161, 321], help="video frames per segment")
    parser.add_argument("--tokens-per-frame", type=int, default=1560, help="480x832: 30 x 52 patches")
    parser.add_argument("--heads", type=int, default=40)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    timing.add_arguments(parser, repeats=5, warmup=2)
    args = parser.parse_args(argv)
    device = usable_device(args.device)
    if device is None:
        return 2
    from torch.nn.attention.flex_attention import flex_attention

    # compiled on CUDA, as the model needs it; eager flex attention (which forms the whole matrix) for a CPU check
    compiled = torch.compile(flex_attention) if args.device == "cuda" else flex_attention
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    print(f"{'segment':>8} {'grid':>5} {'kfi':>4} {'flex ms':>9} {'lvsa ms':>9} {'speedup':>8} {'max err':>9}")
    for video_frames in args.segment_frames:
        run_case(video_frames, args, device, compiled, dtype, gen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
