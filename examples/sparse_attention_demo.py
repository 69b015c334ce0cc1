"""Run lvsa's sparse attention on random tensors of a video's shape, next to dense SDPA.

    python examples/sparse_attention_demo.py --model wan --num-frames 161 --height 128 --width 128
    LVSA_SPARSITY_SCALE=0.5 python examples/sparse_attention_demo.py --device cuda --dtype bfloat16 \\
        --height 480 --width 832 --num-frames 321 --heads 12 --head-dim 128

Logs the [LVSA] lines (when the plan is first prepared), prints the time of dense and sparse attention,
and the error against the float64 reference (when the sequence is small enough for its S x S mask).
Every lvsa flag works here too (--sparsity-scale, --backend, ...), each also read from its LVSA_* variable."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lvsa
from lvsa import registry
from lvsa.backends.reference import reference_attention
from lvsa.geometry import FAMILIES, family, resolve_video_geometry
from lvsa.log import setup_logging
from lvsa.memory import MemorySampler, memory_report, summary_lines, write_report
from lvsa.settings import add_cli_arguments

REFERENCE_LIMIT = 6000  # tokens: the reference builds S x S scores in float64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--model", choices=sorted(FAMILIES), default="wan")
    parser.add_argument("--num-frames", type=int, default=161)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cpu", help="torch device type (cpu, cuda, ...)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output-dir", default="outputs", help="where the memory report goes (relative: cwd)")
    parser.add_argument("--output-name", default="sparse_attention_demo")
    add_cli_arguments(parser.add_argument_group("lvsa settings"))
    args = parser.parse_args(argv)
    setup_logging()

    try:
        settings = lvsa.LVSASettings.from_cli(args)
        model = family(args.model)
        geometry = resolve_video_geometry(args.num_frames, settings, model, args.height, args.width)
        plan = lvsa.make_plan(geometry.token_frames, geometry.patches_per_frame, settings=settings, model=model)
    except lvsa.LVSAError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    device = registry.get_device(args.device)
    if device is None or not device.is_available():
        reason = "no device module" if device is None else device.is_available().reason
        print(f"error: device {args.device} is not usable here: {reason}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, plan.seq_len, args.heads, args.head_dim, generator=gen).to(args.device, dtype)
               for _ in range(3))

    def timed(fn):
        fn()  # warm-up (and the driver's prepare)
        device.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            result = fn()
        device.synchronize()
        return result, (time.perf_counter() - start) / args.repeats

    def dense():
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    _, dense_s = timed(dense)
    device.reset_peak()
    with MemorySampler(device, interval=0.2) as sampler:
        out, sparse_s = timed(lambda: lvsa.sparse_attention(q, k, v, plan, settings=settings))
    print(f"tokens {plan.seq_len} ({plan.latent_frames} latent frames x {plan.patches_per_frame}), "
          f"density {plan.density:.3f}")
    print(f"dense SDPA {dense_s * 1e3:.1f} ms | lvsa {sparse_s * 1e3:.1f} ms | speedup {dense_s / sparse_s:.2f}x "
          f"(ideal {1 / plan.density:.2f}x)")
    if plan.seq_len <= REFERENCE_LIMIT:
        expected = reference_attention(q.cpu(), k.cpu(), v.cpu(), plan)
        error = (out.cpu().double() - expected).abs().max().item()
        print(f"max abs error vs float64 reference: {error:.2e}")
    else:
        print(f"(sequence longer than {REFERENCE_LIMIT} tokens: reference check skipped)")
    report = memory_report(device, sampler)
    report_path = write_report(report, Path(args.output_dir) / f"{args.output_name}.memory.json")
    for line in summary_lines(report):
        print(line)
    print(f"memory report: {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
