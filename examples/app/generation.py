"""The example scripts' engine: one text-to-video generation through a diffusers pipeline, with or without lvsa.

``examples/wan_generate.py`` and its siblings are one line each: ``sys.exit(main("wan"))``. Every lvsa flag
is generated from :class:`lvsa_app.settings.AppSettings` (the library's settings and the application's
``--lvsa``/``--flashinfer``), so each also reads its ``LVSA_*`` variable. ``--model PATH``
loads a diffusers checkpoint with ``from_pretrained``; without it a small model of the same architecture
with random weights is built (the video is noise, but every step of a real run happens). The video is
written atomically as mp4, or, with ``--output-latent``, the denoised latent as ``<name>.pt``."""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lvsa import log
from lvsa.errors import LVSAError
from lvsa.files import OutputClaim, atomic_write, claim_output, numbered_path
from lvsa.geometry import ModelFamily
from lvsa.settings import add_cli_arguments, declare_variables, env_var

from .estimate import estimate_run
from .models import ExampleModel, example_model
from .settings import AppSettings

#: defaults of the small random-weight model: about 2x the training horizon, tiny frames, few steps
TINY_DEFAULTS = {"height": 64, "width": 64, "steps": 4}
PRINT_PREFIX = "[lvsa example]"
#: settings the example sets from its own flags (--height/--width), not from generated ones
APPLICATION_GEOMETRY = ("video_height", "video_width")
OUTPUT_SUFFIXES = (".mp4", ".pt")
DEFAULT_OUTPUT_DIR = "outputs"

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
    out.add_argument("--output-dir", help="relative paths resolve against the working directory (default: "
                     f"{DEFAULT_OUTPUT_DIR}; with an --output-name that holds a folder: the working directory)")
    out.add_argument("--output-name", help="file name, extension optional, or a path under the working directory "
                     "such as results/clip.mp4 (folders are made); default: <model>_<frames>f_<lvsa|dense>, "
                     "numbered -2, -3... when taken")
    out.add_argument("--overwrite", action="store_true",
                     help="replace an existing file of that --output-name (else the run refuses to start)")
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
    status = 1  # an exception on its way out
    try:
        settings = AppSettings.from_cli(args)
        adapter = adapter_named(adapter_name)
        problem = check_arguments(args, adapter, settings)
        if problem:  # one line naming the flag and the rule, exit status 2, before any model is loaded
            print(f"{parser.prog}: error: {problem}", file=sys.stderr)
            return 2
        _warn_unused_settings(settings)
        terminate_on_sigterm()
        with contextlib.ExitStack() as cleanup:
            status = _generate(adapter, args, settings, cleanup)
    except LVSAError as error:
        print(f"error: {error}", file=sys.stderr)
        status = 2
    finally:
        from lvsa.parallel import leave_distributed

        leave_distributed(wait_for_peers=status == 0)
    return status


def family_of_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """For ``examples/generate.py``: the family of the run (``--family NAME``, or the transformer class of the
    ``--model`` folder's model_index.json) and the arguments for its example; ``(None, ...)`` after an error
    line on stderr (or the help)."""
    from lvsa.adapters import adapters
    from lvsa.models_table import rows

    from .models import EXAMPLES

    known = ", ".join(sorted(EXAMPLES))
    usage = ("usage: generate.py (--model FOLDER | --family NAME) [the family example's flags; --help with "
             f"either]\nfamilies with example pipelines: {known}")
    rest = list(argv)
    family = None
    if "--family" in rest:
        index = rest.index("--family")
        if index + 1 >= len(rest):
            print(f"generate.py: error: --family needs a family name ({known})", file=sys.stderr)
            return None, rest
        family = rest[index + 1]
        del rest[index:index + 2]
    folder = next((rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--model"), None)
    folder = folder or next((a.split("=", 1)[1] for a in rest if a.startswith("--model=")), None)
    if family is None and folder is None:
        print(usage, file=sys.stderr if rest and rest[0] not in ("-h", "--help") else sys.stdout)
        return None, rest
    if family is None:
        index = Path(folder).expanduser() / "model_index.json"
        if not index.exists() and (index.parent / "modular_model_index.json").exists():
            print(f"generate.py: error: --model {folder}: a modular pipeline (modular_model_index.json), which "
                  "generate.py does not load; call lvsa.apply(pipe) on the ModularPipeline in your own code",
                  file=sys.stderr)
            return None, rest
        try:
            transformer = json.loads(index.read_text()).get("transformer")
        except (OSError, ValueError, AttributeError) as error:
            print(f"generate.py: error: --model {folder}: cannot read {index}: {error}", file=sys.stderr)
            return None, rest
        cls = transformer[1] if isinstance(transformer, list) and len(transformer) == 2 else None
        family = next((name for name, a in adapters().items() if cls in a.transformer_classes), None)
        if family is None:
            why = next((r.notes for r in rows() if r.cls == cls), "not a diffusers video transformer lvsa knows")
            print(f"generate.py: error: --model {folder}: its transformer {cls} is not supported by lvsa: {why}",
                  file=sys.stderr)
            return None, rest
    if family not in EXAMPLES:
        print(f"generate.py: error: no example pipelines for the family {family!r} (lvsa runs it through "
              f"lvsa.apply in your own code; families with examples: {known})", file=sys.stderr)
        return None, rest
    return family, rest


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
    return output_problem(args, adapter.name, "lvsa" if settings.enabled else "dense")


def geometry_problem(family: ModelFamily, frames: int | None, height: int | None, width: int | None) -> str | None:
    """The model's frame rule (``k * temporal factor + 1``) and resolution multiple, checked, never rounded."""
    vt = family.vae_temporal_factor
    if frames is not None and family.vae_chunk is not None:
        chunk, latents = family.vae_chunk
        if frames % chunk != latents % chunk:
            low = max(latents, frames - (frames - latents) % chunk)
            return f"--num-frames {frames}: {family.name} takes {chunk}k+{latents} frames; use {low} or {low + chunk}"
    elif frames is not None and (frames - 1) % vt:
        low = (frames - 1) // vt * vt + 1
        return (f"--num-frames {frames}: {family.name} takes {vt}k+1 frames; use {low} or {low + vt}")
    step = family.vae_spatial_factor * family.patch_size
    for option, value in (("--height", height), ("--width", width)):
        if value is not None and value % step:
            low = value // step * step
            return (f"{option} {value}: {family.name} takes multiples of {step} pixels (VAE x patch); use "
                    f"{low or step} or {low + step}")
    return None


def video_frames(args: argparse.Namespace, adapter_name: str) -> int:
    """The number of video frames the run makes: the flag's, else the model's (small model: ~2x its horizon)."""
    if args.num_frames is not None:
        return args.num_frames
    example = example_model(adapter_name)
    return example.tiny_frames if args.model is None else example.model_frames


def output_target(args: argparse.Namespace, adapter_name: str, mode: str) -> Path:
    """Where the output goes: ``--output-dir``/``--output-name`` with the extension of the output kind (a known
    extension is replaced), or the default name in ``--output-dir``."""
    default = f"{adapter_name}_{video_frames(args, adapter_name)}f_{mode}"
    name = Path(args.output_name).name if args.output_name else default
    for suffix in OUTPUT_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return output_folder(args) / (name + (".pt" if args.output_latent else ".mp4"))


def output_problem(args: argparse.Namespace, adapter_name: str, mode: str) -> str | None:
    """Where the output goes must be a place under the user's control, writable before the run starts, and not
    an existing file unless ``--overwrite`` says so."""
    name = args.output_name
    if name is not None:
        path = Path(name)
        if not name or name in (".", "..") or name.endswith(("/", os.sep)):
            return f"--output-name {name!r}: give a file name, or a path such as results/clip.mp4"
        if path.is_absolute():  # inside a container, an absolute path is the container's, lost with --rm
            return (f"--output-name {name}: give a name, or a path under the working directory; for another "
                    f"folder: --output-dir {path.parent} --output-name {path.name}")
        if ".." in path.parts:
            return (f"--output-name {name}: a path may not leave the working directory ('..'); use "
                    f"--output-dir to write elsewhere")
        if len(path.parts) > 1 and args.output_dir is not None:
            return (f"--output-name {name} holds a folder and --output-dir {args.output_dir} is given too: give "
                    f"the folder in one of them (--output-dir {Path(args.output_dir) / path.parent} "
                    f"--output-name {path.name})")
    target = output_target(args, adapter_name, mode)
    folder = target.parent
    given = f"--output-dir {args.output_dir}" if args.output_dir is not None else f"--output-name {name}"
    if folder.exists() and not folder.is_dir():
        return f"{given}: {folder} is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe, path_made = tempfile.mkstemp(prefix=".lvsa-probe.", dir=folder)
        os.close(probe)
        os.unlink(path_made)
    except OSError as error:
        return f"{given}: cannot write in {folder}: {error.strerror or error}"
    if name is not None and target.is_dir():
        return f"--output-name {name}: {target} is a folder"
    if name is not None and target.exists() and not args.overwrite:
        return f"--output-name {name}: {target} exists; pass --overwrite to replace it, or give another name"
    return None


def claim_target(args: argparse.Namespace, target: Path) -> tuple[Path, OutputClaim]:
    """Claim the output's name for this run, so that no other run writes it meanwhile. A default name that is
    taken (an earlier output, or a run writing it now) becomes the next free ``-2``, ``-3``...; a name the user
    gave is refused when another run holds it."""
    if args.output_name is not None or args.overwrite:
        claim = claim_output(target)
        if claim is None:
            raise LVSAError(f"another run is writing {target} now; give another --output-name")
        return target, claim
    for number in itertools.count(1):
        candidate = numbered_path(target, number)
        if candidate.exists():
            continue
        claim = claim_output(candidate)
        if claim is None:  # another run is writing it
            continue
        if candidate.exists():  # written between the look and the claim
            claim.release()
            continue
        return candidate, claim
    raise AssertionError("unreachable")


def output_folder(args: argparse.Namespace) -> Path:
    """The folder of the output: --output-dir (relative to the working directory), the folder part of a
    path-like --output-name (relative to the working directory), else the default folder."""
    if args.output_dir is not None:
        folder = Path(args.output_dir).expanduser()
    elif args.output_name and len(Path(args.output_name).parts) > 1:
        folder = Path(args.output_name).parent
    else:
        folder = Path(DEFAULT_OUTPUT_DIR)
    return folder if folder.is_absolute() else Path.cwd() / folder


def _warn_unused_settings(settings: AppSettings) -> None:
    """lvsa settings given (flag or variable) that a dense run ignores."""
    if settings.enabled:
        return
    riflex_fields = {"riflex", "riflex_s", "enabled"}
    ignored = [settings.given_as(name) for name in type(settings).model_fields
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


def _generate(adapter: Any, args: argparse.Namespace, settings: AppSettings, cleanup: contextlib.ExitStack) -> int:
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
    frames = video_frames(args, adapter.name)
    steps = args.steps if args.steps is not None else (TINY_DEFAULTS["steps"] if tiny else 50)
    mode = "lvsa" if settings.enabled else "dense"
    target = output_target(args, adapter.name, mode)
    if rank == 0:
        named, claim = claim_target(args, target)
        cleanup.callback(claim.release)
        if named != target:
            say(f"{PRINT_PREFIX} {target.name} is taken (an earlier output, or a run writing it now): this run "
                f"writes {named.name} (--output-name NAME [--overwrite] chooses)")
        target = named
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
    # a terminal gets the pipeline's bar (log lines printed above it); a log file gets the bar's states as lines
    # of their own, so that no [LVSA] line shares a line with a bar (grep "\[LVSA" run.log: log lines only)
    interactive = sys.stderr.isatty()
    pipe.set_progress_bar_config(desc="denoising", disable=rank != 0,
                                 **({} if interactive else {"file": ProgressLines(sys.stderr), "mininterval": 0}))
    if args.vae_tiling and not args.output_latent:
        _enable_vae_tiling(pipe.vae)
    if world > 1:
        from lvsa.parallel import enable_context_parallel

        enable_context_parallel(pipe, args.ulysses_degree, ring_degree=args.ring_degree)
        say(f"{PRINT_PREFIX} context parallel over {world} processes: Ulysses {args.ulysses_degree} x ring "
            f"{args.ring_degree} ({registry.get_device(device_type).collective_backend})")

    from lvsa.adapters import pipeline_family

    family: ModelFamily = pipeline_family(pipe, adapter)  # the loaded pipeline's own factors
    height = args.height if args.height is not None else (TINY_DEFAULTS["height"] if tiny else family.default_height)
    width = args.width if args.width is not None else (TINY_DEFAULTS["width"] if tiny else family.default_width)
    problem = geometry_problem(family, frames, height, width)  # the loaded checkpoint's own factors
    if problem:
        raise LVSAError(problem)

    handle = None
    if settings.enabled or settings.riflex:
        handle = lvsa.apply(pipe, settings, sparse=settings.enabled)
        if rank == 0 and settings.enabled:
            _print_plan(handle, frames, height, width, args.show_mask)
        elif not settings.enabled:
            say(f"{PRINT_PREFIX} RIFLEx on the temporal RoPE; attention stays dense (add --lvsa for sparse)")
    else:
        say(f"{PRINT_PREFIX} dense attention (the model's own); add --lvsa for sparse attention")

    device_module = registry.get_device(device_type) or registry.get_device("cpu")
    if rank == 0:
        _print_estimate(adapter, pipe, handle if settings.enabled else None, args, device_module, frames, height,
                        width)
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
            with _log_above_bar() if interactive else contextlib.nullcontext():
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
        record = _latent_record(result, frames, height, width, settings, adapter.name, args.model)
        with _writing("the latent", target):
            atomic_write(target, lambda path: torch.save(record, path), replace=args.overwrite)
    else:
        write_mp4(result[0], target, args.fps, replace=args.overwrite)
    # named after the whole output name: a latent run and an mp4 run of one name keep their own reports
    with _writing("the memory report", target.with_name(target.name + ".memory.json")) as report_path:
        write_report(report if world == 1 else {"ranks": reports}, report_path)
    if handle is not None:
        stats = handle.stats
        dense = f" ({stats.dense_calls} of them dense: warm-up steps, dense layers)" if stats.dense_calls else ""
        say(f"{PRINT_PREFIX} lvsa: {stats.sparse_calls} layer calls sparse{dense}, {stats.fallback_calls} fell back, "
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


class ProgressLines(io.TextIOBase):
    """A progress bar's output as whole lines (for a log file): tqdm redraws its bar after a carriage return;
    each state it draws becomes a line, so nothing else ever shares a line with it."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.last: str | None = None

    def write(self, text: str) -> int:
        for part in text.replace("\n", "\r").split("\r"):
            state = part.strip()
            if state and state != self.last:
                self.stream.write(state + "\n")
                self.last = state
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _log_above_bar() -> Any:
    """lvsa's log lines printed above the progress bar, not inside it."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm(loggers=[log.logger])


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
    """The diffusers pipeline saved in folder ``path`` (the family's pipeline class for ``adapter``), in ``dtype``.

    The folder is checked first (:func:`check_model_folder`), and whatever diffusers still refuses is one line
    naming the folder: a broken checkpoint is an error to fix, not a traceback to read."""
    import diffusers

    folder = Path(path).expanduser()
    config = check_model_folder(folder, adapter)
    # components saved as [null, null] (no text encoder in a test model) must be passed as None explicitly
    absent = {name: None for name, value in config.items()
              if isinstance(value, list) and len(value) == 2 and value[0] is None}
    example: ExampleModel = example_model(adapter.name)
    class_name = config.get("_class_name", example.pipeline_class)
    pipeline_class = getattr(diffusers, class_name, None)
    if pipeline_class is None:
        raise LVSAError(f"--model {path}: model_index.json names the pipeline {class_name}, which this diffusers "
                        f"({diffusers.__version__}) does not have")
    try:
        pipe = pipeline_class.from_pretrained(folder, dtype=dtype, **absent)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LVSAError(f"--model {path}: diffusers could not load {class_name}: {first}") from None
    log.info(f"loaded {pipeline_class.__name__} from {folder}")
    return pipe


def check_model_folder(folder: Path, adapter: Any) -> dict[str, Any]:
    """``model_index.json`` of a diffusers pipeline folder, after checking what a load needs: valid JSON, a
    transformer of ``adapter``'s family, a folder with a readable config for every component it lists, and
    complete safetensors files (header and length; safetensors has no checksum of the data itself). Each
    problem is an :class:`LVSAError` naming the file and what is wrong."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise LVSAError(f"--model {folder}: no model_index.json there (expected a diffusers pipeline folder)")
    config = _json_file(index, folder)
    if not isinstance(config, dict):
        raise LVSAError(f"--model {folder}: {index} is not a JSON object")
    transformer = config.get("transformer")
    if not (isinstance(transformer, list) and len(transformer) == 2 and transformer[1] is not None):
        raise LVSAError(f"--model {folder}: model_index.json lists no transformer ({json.dumps(transformer)}); "
                        f"lvsa runs on the video transformer, which the pipeline folder must hold")
    if transformer[1] not in adapter.transformer_classes:
        raise LVSAError(f"--model {folder}: its transformer is {transformer[1]}, not a {adapter.name} model "
                        f"({', '.join(adapter.transformer_classes)}); use the example script of its family")
    for name, value in config.items():
        if name.startswith("_") or not (isinstance(value, list) and len(value) == 2 and value[0] is not None):
            continue
        component = folder / name
        if not component.is_dir():
            raise LVSAError(f"--model {folder}: model_index.json lists {name} ({value[1]}) but there is no folder "
                            f"{component}")
        for config_file in ("config.json", "scheduler_config.json"):
            if (component / config_file).is_file():
                _json_file(component / config_file, folder)
        for weights in sorted(component.glob("*.safetensors")):
            _check_safetensors(weights, folder)
    return config


def _json_file(path: Path, folder: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LVSAError(f"--model {folder}: {path} is not valid JSON ({error})") from None


def _check_safetensors(path: Path, folder: Path) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt"):
            pass
    except (SafetensorError, OSError) as error:
        detail = str(error).removeprefix("Error while deserializing header: ")
        raise LVSAError(f"--model {folder}: {path} is not a complete safetensors file ({detail}; a truncated "
                        "download or copy?)") from None


def _enable_vae_tiling(vae: Any) -> None:
    for method in ("enable_tiling", "enable_slicing"):
        if hasattr(vae, method):
            getattr(vae, method)()


def _print_plan(handle: Any, frames: int, height: int, width: int, show_mask: bool) -> None:
    """The plan of the first step, as the run will build it (the handle's, from the loaded pipeline)."""
    plan = handle.plan_for_video(frames, height, width)
    # without the [LVSA] tag: the log lines come from the run itself, once, and grep should see them once
    print(f"{PRINT_PREFIX} plan: {plan.summary().removeprefix('[LVSA] ')}; "
          f"{plan.extension_line().removeprefix('[LVSA] ')}")
    print(f"{PRINT_PREFIX} density {plan.density:.3f} (ideal attention speedup {1 / plan.density:.2f}x), "
          f"rotation {'on' if plan.rotating else 'off'}")
    if show_mask:
        print(plan.mask_picture())


def _print_estimate(adapter: Any, pipe: Any, handle: Any, args: argparse.Namespace, device_module: Any, frames: int,
                    height: int, width: int) -> None:
    """Tokens, attention FLOPs and the least memory the run needs, and a warning when that exceeds what the
    device has free (before the first step: a run that cannot fit is not started blind)."""
    from lvsa.adapters import pipeline_family

    family = pipeline_family(pipe, adapter)
    spatial = family.vae_spatial_factor
    grid = adapter.grid_of(pipe.transformer, family.latent_frames(frames),
                           height // spatial, width // spatial)
    density = handle.plan_for_video(frames, height, width).density if handle is not None else None
    try:
        free = device_module.free_bytes()
    except Exception:  # an estimate never stops a run
        free = None
    estimate = estimate_run(pipe.transformer, adapter, video_tokens=grid.latent_frames * grid.patches_per_frame,
                            sequences=2 if args.guidance > 1 else 1, density=density, frames=frames,
                            height=height, width=width, output_latent=args.output_latent, free_bytes=free)
    for line in estimate.lines():
        print(f"{PRINT_PREFIX} {line}")
    if estimate.too_large:
        print(f"{PRINT_PREFIX} warning: {estimate.shortfall()}: it will likely run out of memory (fewer "
              "--num-frames, a smaller --height/--width, --output-latent, or a device with more memory)",
              file=sys.stderr)


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


def write_mp4(frames: Any, target: Path, fps: int, *, replace: bool = True) -> None:
    """``frames`` as an mp4 at ``target``, written atomically (nothing under that name unless it is complete);
    with ``replace=False`` an existing file there is never replaced."""
    with _writing("the mp4", target):
        atomic_write(target, lambda path: encode_mp4(frames, path, fps), replace=replace)


@contextlib.contextmanager
def _writing(what: str, target: Path) -> Iterator[Path]:
    """A failed write of ``target`` (a full disk, a file-size limit, a folder that vanished) is one line naming
    it; :func:`~lvsa.files.atomic_write` has left nothing under the name."""
    try:
        yield target
    except LVSAError:
        raise
    except (OSError, RuntimeError) as error:  # torch.save reports a short write as a RuntimeError
        detail = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
        raise LVSAError(f"writing {what} {target} failed: {detail} (full disk or a file-size limit?); nothing "
                        "was written under that name") from None


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
