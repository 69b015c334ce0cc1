"""The example scripts' engine: one text-to-video generation through a diffusers pipeline, with or without lvsa.

``examples/wan_generate.py`` and its siblings are one line each: ``sys.exit(main("wan"))``. Every lvsa flag
is generated from :class:`lvsa.LVSASettings`, so each also reads its ``LVSA_*`` variable. ``--model PATH``
loads a diffusers checkpoint with ``from_pretrained``; without it a small model of the same architecture
with random weights is built (the video is noise, but every step of a real run happens). The video is
written atomically as mp4, or, with ``--output-latent``, the denoised latent as ``<name>.pt``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import log
from .errors import LVSAError
from .files import atomic_write
from .geometry import ModelFamily, resolve_video_geometry
from .settings import LVSASettings, add_cli_arguments

#: defaults of the small random-weight model: about 2x the training horizon, tiny frames, few steps
TINY_DEFAULTS = {"height": 64, "width": 64, "steps": 4}
TINY_FRAMES = {"wan": 161, "hunyuan": 257, "cogvideox": 97}
MODEL_FRAMES = {"wan": 81, "hunyuan": 121, "cogvideox": 49}
PRINT_PREFIX = "[lvsa example]"


def build_parser(adapter_name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{adapter_name}_generate.py",
        description=f"Generate a video with a {adapter_name} diffusers pipeline, with lvsa sparse attention "
                    "(--lvsa) or the model's dense attention.",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    run = parser.add_argument_group("generation")
    run.add_argument("--model", help="diffusers checkpoint folder (from_pretrained); omitted: a small model with "
                     "random weights")
    run.add_argument("--prompt", default="a red fox running through snow, cinematic")
    run.add_argument("--negative-prompt", default="")
    run.add_argument("--num-frames", type=int, help="video frames (default: the model's; small model: ~2x horizon)")
    run.add_argument("--height", type=int, help="pixels (default: the model's; small model: 64)")
    run.add_argument("--width", type=int, help="pixels (default: the model's; small model: 64)")
    run.add_argument("--steps", type=int, help="denoising steps (default: 50; small model: 4)")
    run.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--fps", type=int, default=16)
    run.add_argument("--device", help="torch device (default: the first accelerator present, else cpu)")
    run.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                     help="default: bfloat16 on accelerators, float32 on cpu")
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default="outputs", help="relative paths resolve against the working directory")
    out.add_argument("--output-name", help="file name without extension (default: <model>_<frames>f_<lvsa|dense>)")
    out.add_argument("--output-latent", action="store_true",
                     help="save the denoised latent as <name>.pt instead of decoding it (the decode is what runs "
                          "out of memory at long lengths)")
    out.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=True,
                     help="tiled and sliced VAE decoding where the VAE supports it")
    out.add_argument("--show-mask", action="store_true", help="print the frame mask of the first step")
    run.add_argument("--ulysses-degree", type=int, default=1,
                     help="context parallelism over N processes (torchrun --nproc-per-node N ... --ulysses-degree N)")
    add_cli_arguments(parser.add_argument_group("lvsa settings (each also read from its LVSA_* variable)"))
    return parser


def main(adapter_name: str, argv: list[str] | None = None) -> int:
    from .adapters import adapter_named

    args = build_parser(adapter_name).parse_args(argv)
    log.setup_logging()
    try:
        settings = LVSASettings.from_cli(args)
        adapter = adapter_named(adapter_name)
        return _generate(adapter, args, settings)
    except LVSAError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _generate(adapter: Any, args: argparse.Namespace, settings: LVSASettings) -> int:
    import torch

    import lvsa

    from . import registry
    from .adapters import transformers_of
    from .memory import MemorySampler, memory_report, summary_lines, write_report

    device_type, device = _pick_device(args.device)
    rank, world = 0, 1
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if args.ulysses_degree > 1 or launched > 1:
        if args.ulysses_degree != launched:
            raise LVSAError(f"launched with {launched} process(es) but --ulysses-degree {args.ulysses_degree}: "
                            f"use torchrun --nproc-per-node N ... --ulysses-degree N")
        from .parallel import init_distributed

        rank, world, local_rank = init_distributed(device_type)
        if device_type != "cpu":
            device = f"{device_type}:{local_rank}"
    say = print if rank == 0 else _silent  # one process speaks and writes; every process computes
    dtype = getattr(torch, args.dtype or ("float32" if device_type == "cpu" else "bfloat16"))
    tiny = args.model is None
    frames = args.num_frames or (TINY_FRAMES if tiny else MODEL_FRAMES)[adapter.name]
    steps = args.steps or (TINY_DEFAULTS["steps"] if tiny else 50)

    torch.manual_seed(args.seed)  # the small model's random weights: the same on every rank
    pipe = adapter.tiny_pipeline() if tiny else _load_pipeline(adapter, args.model, dtype)
    if tiny:
        say(f"{PRINT_PREFIX} no --model given: using a small {type(pipe.transformer).__name__} with RANDOM "
            "weights (the video is noise; pass --model PATH for real weights)")
    if tiny and dtype != torch.float32:
        pipe.to(dtype=dtype)  # a loaded checkpoint got its dtype from from_pretrained
    pipe.to(device)
    pipe.set_progress_bar_config(desc="denoising", disable=rank != 0)
    if args.vae_tiling and not args.output_latent:
        _enable_vae_tiling(pipe.vae)
    if world > 1:
        from .parallel import enable_context_parallel

        enable_context_parallel(pipe, args.ulysses_degree)
        say(f"{PRINT_PREFIX} context parallel: Ulysses over {world} processes "
            f"({registry.get_device(device_type).collective_backend})")

    family: ModelFamily = adapter.family(pipe.transformer)
    height = args.height or (TINY_DEFAULTS["height"] if tiny else family.default_height)
    width = args.width or (TINY_DEFAULTS["width"] if tiny else family.default_width)
    mode = "lvsa" if settings.enabled else "dense"
    name = args.output_name or f"{adapter.name}_{frames}f_{mode}"
    output_dir = Path(args.output_dir).expanduser()
    output_dir = output_dir if output_dir.is_absolute() else Path.cwd() / output_dir
    target = (output_dir / name).with_suffix(".pt" if args.output_latent else ".mp4")

    handle = None
    if settings.enabled or settings.riflex:
        handle = lvsa.apply(pipe, settings, sparse=settings.enabled)
        if rank == 0:
            _print_plan(handle, pipe, family, frames, height, width, args.show_mask)
    else:
        say(f"{PRINT_PREFIX} dense attention (the model's own); add --lvsa for sparse attention")

    device_module = registry.get_device(device_type) or registry.get_device("cpu")
    forward_ends: list[float] = []

    def after_forward(*_: Any) -> None:  # denoising time = until the last transformer forward ends
        device_module.synchronize()
        forward_ends.append(time.perf_counter())

    timing_hooks = [t.register_forward_hook(after_forward) for t in transformers_of(pipe)]
    device_module.reset_peak()
    prompt_inputs = {  # random embeddings are made on the CPU: give them the model's device and dtype
        key: (value.to(device, dtype) if torch.is_floating_point(value) else value.to(device))
        if torch.is_tensor(value) else value
        for key, value in adapter.pipeline_inputs(pipe, args.prompt, args.seed).items()
    }
    call = {
        **prompt_inputs,
        **adapter.call_arguments(pipe, args.guidance),
        "height": height, "width": width, "num_frames": frames, "num_inference_steps": steps,
        "generator": torch.Generator(device="cpu").manual_seed(args.seed),
        "output_type": "latent" if args.output_latent else "np",
    }
    start = time.perf_counter()
    with MemorySampler(device_module, interval=0.5) as sampler:
        with torch.inference_mode():
            result = pipe(**call).frames
    wall = time.perf_counter() - start
    denoise = (forward_ends[-1] - start) if forward_ends else wall
    for hook in timing_hooks:
        hook.remove()

    report = memory_report(device_module, sampler)
    reports = _gather_reports(report, world)  # every rank's memory, for the report rank 0 writes
    if rank != 0:
        return 0
    if args.output_latent:
        atomic_write(target, lambda path: torch.save(_latent_record(result, frames, height, width, settings,
                                                                       adapter.name, args.model), path))
    else:
        _write_mp4(result[0], target, args.fps)
    report_path = write_report(report if world == 1 else {"ranks": reports}, target.with_suffix(".memory.json"))
    if handle is not None:
        stats = handle.stats
        say(f"{PRINT_PREFIX} lvsa: {stats.sparse_calls} layer calls sparse, {stats.fallback_calls} fell back, "
            f"{stats.plan_builds} plans built over {stats.steps} steps")
    say(f"{PRINT_PREFIX} output: {target}")
    say(f"{PRINT_PREFIX} wall time {wall:.1f} s, {denoise / max(steps, 1):.2f} s/step over {steps} steps "
        f"({mode}, {device}{f' x {world} processes' if world > 1 else ''}, {str(dtype).removeprefix('torch.')})")
    for index, each in enumerate(reports):
        for line in summary_lines(each):
            say(f"{PRINT_PREFIX} {f'rank {index}: ' if world > 1 else ''}{line}")
    say(f"{PRINT_PREFIX} memory report: {report_path}")
    return 0


def _silent(*_: Any, **__: Any) -> None:
    pass


def _gather_reports(report: dict[str, Any], world: int) -> list[dict[str, Any]]:
    if world == 1:
        return [report]
    import torch.distributed as dist

    reports: list[Any] = [None] * world
    dist.all_gather_object(reports, report)
    return reports


def _pick_device(requested: str | None) -> tuple[str, str]:
    from . import registry

    if requested:
        device_type = requested.split(":")[0]
        module = registry.get_device(device_type)
        if module is not None and not module.is_available():
            raise LVSAError(f"--device {requested}: {module.is_available().reason}")
        return device_type, requested
    for device_type in ("cuda", "npu"):
        module = registry.get_device(device_type)
        if module is not None and module.is_available():
            return device_type, device_type
    return "cpu", "cpu"


def _load_pipeline(adapter: Any, path: str, dtype: Any) -> Any:
    import diffusers

    folder = Path(path).expanduser()
    index = folder / "model_index.json"
    if not index.is_file():
        raise LVSAError(f"--model {path}: no model_index.json there (expected a diffusers pipeline folder)")
    config = json.loads(index.read_text())
    # components saved as [null, null] (no text encoder in a test model) must be passed as None explicitly
    absent = {name: None for name, value in config.items()
              if isinstance(value, list) and len(value) == 2 and value[0] is None}
    pipeline_class = getattr(diffusers, config.get("_class_name", adapter.pipeline_class))
    pipe = pipeline_class.from_pretrained(folder, dtype=dtype, **absent)
    log.info(f"loaded {pipeline_class.__name__} from {folder}")
    return pipe


def _enable_vae_tiling(vae: Any) -> None:
    for method in ("enable_tiling", "enable_slicing"):
        if hasattr(vae, method):
            getattr(vae, method)()


def _print_plan(handle: Any, pipe: Any, family: ModelFamily, frames: int, height: int, width: int,
                show_mask: bool) -> None:
    from dataclasses import replace

    from .plan import build_plan

    runtime = handle.runtime
    transformer = pipe.transformer
    patch = transformer.config.patch_size
    patch = patch[-1] if isinstance(patch, (tuple, list)) else patch
    # the factors of this pipeline (a small test VAE may differ from the family's)
    here = replace(family, vae_temporal_factor=pipe.vae_scale_factor_temporal,
                   vae_spatial_factor=pipe.vae_scale_factor_spatial, patch_size=patch)
    try:
        geometry = resolve_video_geometry(frames, runtime.settings, here, height, width)
    except LVSAError as error:
        print(f"{PRINT_PREFIX} cannot preview the plan: {error}")
        return
    plan = build_plan(geometry.token_frames, geometry.patches_per_frame, runtime.knobs)
    # without the [LVSA] tag: the log lines come from the run itself, once, and grep should see them once
    print(f"{PRINT_PREFIX} plan: {plan.summary().removeprefix('[LVSA] ')}; "
          f"{plan.extension_line().removeprefix('[LVSA] ')}")
    print(f"{PRINT_PREFIX} density {plan.density:.3f} (ideal attention speedup {1 / plan.density:.2f}x), "
          f"rotation {'on' if plan.rotating else 'off'}")
    if show_mask:
        print(plan.mask_picture())


def _latent_record(latent: Any, frames: int, height: int, width: int, settings: LVSASettings, model: str,
                   path: str | None) -> dict[str, Any]:
    return {
        "latent": latent.detach().cpu(),
        "num_frames": frames,
        "height": height,
        "width": width,
        "model": model,
        "checkpoint": path,
        "settings": settings.model_dump(mode="json"),
    }


def _write_mp4(frames: Any, target: Path, fps: int) -> None:
    from diffusers.utils import export_to_video

    atomic_write(target, lambda path: export_to_video(list(frames), str(path), fps=fps))
