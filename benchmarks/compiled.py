"""A compiled transformer with lvsa over the steps of a generation: graphs compiled, time per step, and the
output against the same model uncompiled, for each driver, in one run.

    python -m benchmarks.compiled --frames 321 --layers 4 --methods sdpa flashinfer fa4     # CUDA
    python -m benchmarks.compiled --device cpu --small --methods sdpa                       # CPU smoke run

Wan 2.1 1.3B's real block shapes (``--layers`` of its 30 blocks, random weights). lvsa is applied to the bare
transformer; each step sets the rotation step (``handle.runtime.set_step``) as a custom loop would, so the
keyframes move every step. A recompilation after the first step, or a graph break, is printed as FAILED."""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import lvsa
from lvsa import registry
from lvsa.caches import clear as clear_caches

from .pipeline import SMALL_WAN, WAN_1_3B


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--frames", type=int, default=321)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--methods", nargs="+", default=["sdpa", "flashinfer", "fa4"])
    args = parser.parse_args(argv)
    device_module = registry.get_device(args.device)
    if device_module is None or not device_module.is_available():
        print(f"error: device {args.device} is not usable here", file=sys.stderr)
        return 2
    from diffusers import WanTransformer3DModel

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    height, width = (64, 64) if args.small else (480, 832)
    config = dict(SMALL_WAN if args.small else WAN_1_3B, num_layers=args.layers)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = WanTransformer3DModel(**config).to(dtype).eval()
    T = (args.frames - 1) // 4 + 1
    inputs = {
        "hidden_states": torch.randn(1, 16, T, height // 8, width // 8, device=args.device, dtype=dtype),
        "encoder_hidden_states": torch.randn(1, 512, config["text_dim"], device=args.device, dtype=dtype),
        "return_dict": False,
    }
    failed = False
    for method in args.methods:
        clear_caches()
        handle = lvsa.apply(model, lvsa.LVSASettings(backend=method))
        try:
            with torch.inference_mode():
                eager = []
                for step in range(2):
                    handle.runtime.set_step(step)
                    eager.append(model(**inputs, timestep=torch.tensor([999.0 - step], device=args.device))[0])
                torch._dynamo.reset()
                counters.clear()
                counter = CompileCounterWithBackend(args.backend)
                compiled = torch.compile(model, backend=counter)
                graphs, times = [], []
                for step in range(args.steps):
                    handle.runtime.set_step(step)
                    device_module.synchronize()
                    start = time.perf_counter()
                    out = compiled(**inputs, timestep=torch.tensor([999.0 - step], device=args.device))[0]
                    device_module.synchronize()
                    times.append((time.perf_counter() - start) * 1e3)
                    graphs.append(counter.frame_count)
                    if step < 2:
                        error = ((out.float() - eager[step].float()).norm() / eager[step].float().norm()).item()
                        print(f"  {method} step {step}: relative difference to eager {error:.1e}")
        except lvsa.LVSAError as error:
            print(f"{method}: skipped: {error}".splitlines()[0])
            handle.remove()
            continue
        plan = handle.runtime.last_plan
        handle.remove()
        breaks = sum(counters["graph_break"].values())
        ok = graphs[-1] == graphs[0] and not breaks and handle.stats.fallback_calls == 0
        failed |= not ok
        steady = sorted(times[2:])[len(times[2:]) // 2] if len(times) > 2 else times[-1]
        print(f"{method:<11} {T} latent frames, kfi={plan.keyframe_interval}: graphs after each step {graphs}, "
              f"graph breaks "
              f"{breaks}, first step {times[0] / 1e3:.1f} s, then {steady:.1f} ms per forward "
              f"{'ok' if ok else 'FAILED'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
