"""The example scripts' engine: one text-to-video generation through a diffusers pipeline, with or without lvsa.

``examples/wan_generate.py`` and its siblings are one line each: ``sys.exit(main("wan"))``. Every lvsa flag
is generated from :class:`lvsa_app.settings.AppSettings` (the library's settings and the application's
``--lvsa``/``--flashinfer``), so each also reads its ``LVSA_*`` variable. ``--model PATH``
loads a diffusers checkpoint with ``from_pretrained``; without it a small model of the same architecture
with random weights is built (the video is noise, but every step of a real run happens). The video is
written atomically as mp4, or, with ``--output-latent``, the denoised latent as ``<name>.pt``."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lvsa import log
from lvsa.errors import LVSAError
from lvsa.files import atomic_write
from lvsa.geometry import ModelFamily, resolve_video_geometry
from lvsa.settings import add_cli_arguments, declare_variables, env_var, flag

from .models import ExampleModel, example_model
from .settings import AppSettings

#: defaults of the small random-weight model: about 2x the training horizon, tiny frames, few steps
TINY_DEFAULTS = {"height": 64, "width": 64, "steps": 4}
TINY_FRAMES = {"wan": 161, "hunyuan": 257, "cogvideox": 97}
MODEL_FRAMES = {"wan": 81, "hunyuan": 121, "cogvideox": 49}
PRINT_PREFIX = "[lvsa example]"
#: settings the example sets from its own flags (--height/--width), not from generated ones
APPLICATION_GEOMETRY = ("video_height", "video_width")
OUTPUT_SUFFIXES = (".mp4", ".pt")

declare_variables({"LVSA_COLLECTIVE_TIMEOUT": "the example scripts' --collective-timeout"})


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
                     help="Ulysses context parallelism over N processes: splits the heads, so N must divide "
                          "them (torchrun --nproc-per-node N ... --ulysses-degree N)")
    run.add_argument("--ring-degree", type=int, default=1,
                     help="ring attention over R processes: splits the sequence, past the head count; with "
                          "--ulysses-degree U, launch U x R processes (torchrun --nproc-per-node U*R)")
    run.add_argument("--collective-timeout", type=float, default=None,
                     help="seconds a process waits for the others in a collective before the run fails "
                          "(a stopped or stuck rank) [env: LVSA_COLLECTIVE_TIMEOUT] (default: 600)")
    # the video's height and width are --height/--width here: the geometry overrides of the same quantities
    # would be a second flag for one setting
    add_cli_arguments(parser.add_argument_group("lvsa settings (each also read from its LVSA_* variable)"),
                      exclude=APPLICATION_GEOMETRY, settings_class=AppSettings)
    return parser


def main(adapter_name: str, argv: list[str] | None = None) -> int:
    from lvsa.adapters import adapter_named

    parser = build_parser(adapter_name)
    args = parser.parse_args(argv)
    log.setup_logging()
    try:
        settings = AppSettings.from_cli(args)
        adapter = adapter_named(adapter_name)
        problem = check_arguments(args, adapter, settings)
        if problem:  # one line naming the flag and the rule, exit status 2, before any model is loaded
            print(f"{parser.prog}: error: {problem}", file=sys.stderr)
            return 2
        _warn_unused_settings(settings)
        terminate_on_sigterm()
        return _generate(adapter, args, settings)
    except LVSAError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        from lvsa.parallel import leave_distributed

        leave_distributed()


def check_arguments(args: argparse.Namespace, adapter: Any, settings: AppSettings) -> str | None:
    """What is wrong with the command line, in one line naming the flag and the rule, or ``None``. Runs
    before the model is loaded, with the family's factors (checked again against a loaded checkpoint)."""
    family = adapter.family_defaults()
    for option, value in (("--num-frames", args.num_frames), ("--steps", args.steps), ("--height", args.height),
                          ("--width", args.width), ("--fps", args.fps), ("--ulysses-degree", args.ulysses_degree),
                          ("--ring-degree", args.ring_degree)):
        if value is not None and value < 1:
            return f"{option} {value}: must be a positive integer"
    if args.collective_timeout is None:  # the variable, read here so that a bad value is one line, not a traceback
        given = os.environ.get("LVSA_COLLECTIVE_TIMEOUT", "600")
        try:
            args.collective_timeout = float(given)
        except ValueError:
            return f"LVSA_COLLECTIVE_TIMEOUT={given}: must be a positive number of seconds"
        if not (math.isfinite(args.collective_timeout) and args.collective_timeout > 0):
            return f"LVSA_COLLECTIVE_TIMEOUT={given}: must be a positive number of seconds"
    if not (math.isfinite(args.collective_timeout) and args.collective_timeout > 0):
        return f"--collective-timeout {args.collective_timeout}: must be a positive number of seconds"
    if not math.isfinite(args.guidance):
        return f"--guidance {args.guidance}: must be a finite number (nan would switch guidance off, inf gives NaN)"
    problem = geometry_problem(family, args.num_frames, args.height, args.width)
    if problem:
        return problem
    for name in APPLICATION_GEOMETRY:
        if settings.source_of(name) != "default":
            return (f"{env_var(name)}={getattr(settings, name)} is set, but the example takes the video size from "
                    "--height/--width: unset it")
    return output_problem(args, adapter.name)


def geometry_problem(family: ModelFamily, frames: int | None, height: int | None, width: int | None) -> str | None:
    """The model's frame rule (``k * temporal factor + 1``) and resolution multiple, checked, never rounded."""
    vt = family.vae_temporal_factor
    if frames is not None and (frames - 1) % vt:
        low = (frames - 1) // vt * vt + 1
        return (f"--num-frames {frames}: {family.name} takes {vt}k+1 frames; use {low} or {low + vt}")
    step = family.vae_spatial_factor * family.patch_size
    for option, value in (("--height", height), ("--width", width)):
        if value is not None and value % step:
            low = value // step * step
            return (f"{option} {value}: {family.name} takes multiples of {step} pixels (VAE x patch); use "
                    f"{low or step} or {low + step}")
    return None


def output_name(args: argparse.Namespace, adapter_name: str, frames: int, mode: str) -> str:
    """The file name: the user's, with the extension appended (a known extension is replaced)."""
    name = args.output_name or f"{adapter_name}_{frames}f_{mode}"
    for suffix in OUTPUT_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name + (".pt" if args.output_latent else ".mp4")


def output_problem(args: argparse.Namespace, adapter_name: str) -> str | None:
    """Where the output goes must be writable before the run starts, and the name must be a name."""
    name = args.output_name
    if name is not None and (not name or name in (".", "..") or "/" in name or os.sep in name):
        return (f"--output-name {name!r}: give a file name, not a path (the folder is --output-dir)")
    folder = output_folder(args)
    if folder.exists() and not folder.is_dir():
        return f"--output-dir {args.output_dir}: {folder} is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe, path = tempfile.mkstemp(prefix=".lvsa-probe.", dir=folder)
        os.close(probe)
        os.unlink(path)
    except OSError as error:
        return f"--output-dir {args.output_dir}: cannot write in {folder}: {error.strerror or error}"
    target = folder / output_name(args, adapter_name, args.num_frames or 0, "x")
    if args.output_name and target.is_dir():
        return f"--output-name {name}: {target} is a folder"
    return None


def output_folder(args: argparse.Namespace) -> Path:
    folder = Path(args.output_dir).expanduser()
    return folder if folder.is_absolute() else Path.cwd() / folder


def _warn_unused_settings(settings: AppSettings) -> None:
    """lvsa settings given (flag or variable) that a dense run ignores."""
    if settings.enabled:
        return
    riflex_fields = {"riflex", "riflex_s", "enabled"}
    ignored = [flag(name, AppSettings) for name in type(settings).model_fields
               if name not in riflex_fields and settings.source_of(name) in ("cli", "env")]
    if ignored:
        log.logger.warning("[LVSA] %s: no effect without --lvsa (LVSA_ENABLED=1); this run uses the model's dense "
                           "attention", ", ".join(ignored))


def terminate_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C (SystemExit 143), so a file being written is removed, not left behind."""
    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def _generate(adapter: Any, args: argparse.Namespace, settings: AppSettings) -> int:
    import torch

    import lvsa
    from lvsa import registry
    from lvsa.adapters import transformers_of
    from lvsa.memory import MemorySampler, memory_report, summary_lines, write_report

    device_type, device = _pick_device(args.device)
    if settings.enabled:  # a requested driver that cannot run here is said now, not after the model is built
        from lvsa.attention.drivers import check_requested

        check_requested(settings, device_type)
    rank, world = 0, 1
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    degrees = args.ulysses_degree * args.ring_degree
    if degrees > 1 or launched > 1:
        if degrees != launched:
            raise LVSAError(
                f"launched with {launched} process(es) but --ulysses-degree {args.ulysses_degree} x --ring-degree "
                f"{args.ring_degree} = {degrees}: use torchrun --nproc-per-node {degrees}, or degrees whose "
                f"product is {launched}")
        from lvsa.parallel import init_distributed

        rank, world, local_rank = init_distributed(device_type, timeout=args.collective_timeout)
        if device_type != "cpu":
            device = f"{device_type}:{local_rank}"
    say = print if rank == 0 else _silent  # one process speaks and writes; every process computes
    dtype = getattr(torch, args.dtype or ("float32" if device_type == "cpu" else "bfloat16"))
    tiny = args.model is None
    frames = args.num_frames if args.num_frames is not None else (TINY_FRAMES if tiny else MODEL_FRAMES)[adapter.name]
    steps = args.steps if args.steps is not None else (TINY_DEFAULTS["steps"] if tiny else 50)
    mode = "lvsa" if settings.enabled else "dense"
    target = output_folder(args) / output_name(args, adapter.name, frames, mode)
    say(f"{PRINT_PREFIX} the output will be written to {target}")

    torch.manual_seed(args.seed)  # the small model's random weights: the same on every rank
    example = example_model(adapter.name)
    pipe = example.tiny_pipeline() if tiny else load_pipeline(adapter, args.model, dtype)
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
        from lvsa.parallel import enable_context_parallel

        enable_context_parallel(pipe, args.ulysses_degree, ring_degree=args.ring_degree)
        say(f"{PRINT_PREFIX} context parallel over {world} processes: Ulysses {args.ulysses_degree} x ring "
            f"{args.ring_degree} ({registry.get_device(device_type).collective_backend})")

    family: ModelFamily = adapter.model_family(pipe.transformer)
    height = args.height if args.height is not None else (TINY_DEFAULTS["height"] if tiny else family.default_height)
    width = args.width if args.width is not None else (TINY_DEFAULTS["width"] if tiny else family.default_width)
    problem = geometry_problem(family, frames, height, width)  # the loaded checkpoint's own factors
    if problem:
        raise LVSAError(problem)

    handle = None
    if settings.enabled or settings.riflex:
        handle = lvsa.apply(pipe, settings, sparse=settings.enabled)
        if rank == 0 and settings.enabled:
            _print_plan(handle, pipe, family, frames, height, width, args.show_mask)
        elif not settings.enabled:
            say(f"{PRINT_PREFIX} RIFLEx on the temporal RoPE; attention stays dense (add --lvsa for sparse)")
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
        for key, value in example.pipeline_inputs(pipe, args.prompt, args.seed).items()
    }
    call = {
        **prompt_inputs,
        **example.call_arguments(pipe, args.guidance),
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
    _refuse_non_finite(result, target)
    if args.output_latent:
        atomic_write(target, lambda path: torch.save(_latent_record(result, frames, height, width, settings,
                                                                       adapter.name, args.model), path))
    else:
        write_mp4(result[0], target, args.fps)
    # named after the whole output name: a latent run and an mp4 run of one name keep their own reports
    report_path = write_report(report if world == 1 else {"ranks": reports},
                               target.with_name(target.name + ".memory.json"))
    if handle is not None:
        stats = handle.stats
        say(f"{PRINT_PREFIX} lvsa: {stats.sparse_calls} layer calls sparse, {stats.fallback_calls} fell back, "
            f"{stats.plan_builds} plans built over {stats.steps} steps")
        if stats.ring_steps:  # rank 0's ring steps: those whose shards share no attended frame pair were skipped
            say(f"{PRINT_PREFIX} ring attention (rank 0): {stats.ring_steps_skipped} of {stats.ring_steps} ring "
                "steps skipped (no attended frame pair)")
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
    from lvsa import registry

    if requested:
        import torch

        try:
            device_type = torch.device(requested).type
        except (RuntimeError, ValueError):
            raise LVSAError(f"--device {requested}: not a device name (cpu, cuda, cuda:1, npu, ...)") from None
        module = registry.get_device(device_type)
        if module is None:
            known = ", ".join(registry.devices()) or "none"
            raise LVSAError(f"--device {requested}: lvsa has no device module for {device_type} (installed: {known})")
        if not module.is_available():
            raise LVSAError(f"--device {requested}: {module.is_available().reason}")
        return device_type, requested
    for device_type in ("cuda", "npu"):
        module = registry.get_device(device_type)
        if module is not None and module.is_available():
            return device_type, device_type
    return "cpu", "cpu"


def load_pipeline(adapter: Any, path: str, dtype: Any) -> Any:
    """The diffusers pipeline saved in folder ``path`` (the family's pipeline class for ``adapter``), in ``dtype``."""
    import diffusers

    folder = Path(path).expanduser()
    index = folder / "model_index.json"
    if not index.is_file():
        raise LVSAError(f"--model {path}: no model_index.json there (expected a diffusers pipeline folder)")
    config = json.loads(index.read_text())
    transformer = config.get("transformer")
    if isinstance(transformer, list) and len(transformer) == 2 and transformer[1] is not None:
        if transformer[1] not in adapter.transformer_classes:
            raise LVSAError(f"--model {path}: its transformer is {transformer[1]}, not a {adapter.name} model "
                            f"({', '.join(adapter.transformer_classes)}); use the example script of its family")
    # components saved as [null, null] (no text encoder in a test model) must be passed as None explicitly
    absent = {name: None for name, value in config.items()
              if isinstance(value, list) and len(value) == 2 and value[0] is None}
    example: ExampleModel = example_model(adapter.name)
    pipeline_class = getattr(diffusers, config.get("_class_name", example.pipeline_class))
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

    from lvsa.plan import build_plan

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


def _latent_record(latent: Any, frames: int, height: int, width: int, settings: AppSettings, model: str,
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


def _refuse_non_finite(result: Any, target: Path) -> None:
    """A result with NaN or inf values (a guidance or weights that overflow, a checkpoint corrupted in its data)
    is an error naming it; nothing is written under ``target``."""
    import numpy as np
    import torch

    values = result[0] if isinstance(result, (list, tuple)) else result
    finite = bool(torch.isfinite(values).all()) if torch.is_tensor(values) else bool(np.isfinite(values).all())
    if not finite:
        raise LVSAError(f"the generated video holds NaN or infinite values (check --guidance and the checkpoint's "
                        f"weights); nothing was written to {target}")


def write_mp4(frames: Any, target: Path, fps: int) -> None:
    """``frames`` as an mp4 at ``target``, written atomically (nothing under that name unless it is complete)."""
    atomic_write(target, lambda path: encode_mp4(frames, path, fps))


def encode_mp4(frames: Any, path: Path, fps: int) -> None:
    """H.264 mp4 of ``[F, H, W, 3]`` frames (floats in 0..1 or uint8) through imageio's bundled ffmpeg.

    Raises when the encoder exits non-zero (a full disk, a file-size limit) or the file holds fewer frames
    than were sent: the caller then leaves nothing under the final name."""
    import imageio_ffmpeg
    import numpy as np

    video = np.asarray(frames)
    if video.dtype != np.uint8:
        video = (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)
    count, height, width = video.shape[0], video.shape[1], video.shape[2]
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{width}x{height}", "-r", str(fps), "-i", "-", "-an", "-vf",
               "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-f", "mp4", str(path)]
    encoder = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        try:
            for frame in video:
                encoder.stdin.write(np.ascontiguousarray(frame).tobytes())
            encoder.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # the encoder stopped: its exit status and message say why
        status = encoder.wait()
    except BaseException:
        encoder.kill()
        encoder.wait()
        raise
    message = encoder.stderr.read().decode(errors="replace").strip().splitlines()
    encoder.stderr.close()
    if status != 0:
        raise LVSAError(f"writing the mp4 failed: ffmpeg exited with status {status}"
                        f"{': ' + message[-1] if message else ''} (full disk or a file-size limit?)")
    written = imageio_ffmpeg.count_frames_and_secs(str(path))[0]
    if written != count:
        raise LVSAError(f"writing the mp4 failed: {written} of {count} frames are in the file")
