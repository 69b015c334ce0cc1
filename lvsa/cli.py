"""The ``lvsa`` command: ``lvsa plan`` shows what the scheduler does for a video, ``lvsa models`` which diffusers video
transformers lvsa runs, ``lvsa drivers`` which
drivers can run on which device here (``lvsa backends``, its earlier name, works until lvsa 0.3), ``lvsa
report`` the settings, drivers and memory. Flags of the settings work on each (``lvsa plan --help``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from . import __version__
from .dense import DenseControls
from .errors import LVSAError
from .families import plan_families
from .geometry import resolve_video_geometry, token_frames
from .log import setup_logging
from .planning import make_plan
from .settings import LVSASettings, add_cli_arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvsa", allow_abbrev=False,
        description="Frame-level block-sparse attention for long-video diffusion transformers.",
    )
    parser.add_argument("--version", action="version", version=f"lvsa {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{plan,models,drivers,report}")

    plan = commands.add_parser(
        "plan",
        allow_abbrev=False,
        help="print the sparse plan for a video: [LVSA] lines, density, mask picture",
        description="Plan the sparse pattern for a video and print what the scheduler decided. Geometry "
        "comes from --model with --num-frames/--height/--width, or from --latent-frames with "
        "--patches-per-frame.",
    )
    video = plan.add_argument_group("video")
    video.add_argument("--model", choices=sorted(plan_families()), metavar="FAMILY",
                       help="model family (reference horizon, VAE factors): " + ", ".join(sorted(plan_families())))
    video.add_argument("--num-frames", type=int, help="video frames (e.g. 321); latent = (F - 1) // 4 + 1")
    video.add_argument("--height", type=int, help="video height in pixels (default: the model's)")
    video.add_argument("--width", type=int, help="video width in pixels (default: the model's)")
    video.add_argument("--latent-frames", type=int, help="latent frames T, instead of --num-frames")
    video.add_argument("--text-tokens", type=int, default=0, help="joint-attention text tokens (default 0)")
    video.add_argument("--text-position", choices=["before", "after"],
                       help="text tokens before or after the video (default: the model's, else after)")
    video.add_argument("--step", type=int, default=0, help="denoising step (rotation offset)")
    video.add_argument("--steps", type=int, help="the run's number of denoising steps (what a dense warm-up "
                       "fraction is taken of)")
    video.add_argument("--no-mask", action="store_true", help="do not print the mask picture")
    video.add_argument("--json", action="store_true", help="print the plan as JSON instead")
    video.add_argument("--png", metavar="FILE", help="also draw the mask as a PNG (needs lvsa[figures])")
    add_cli_arguments(plan.add_argument_group("lvsa settings (each also read from its LVSA_* variable)"))

    report = commands.add_parser(
        "report",
        help="what a bug report needs: versions, devices, drivers, settings and their sources, memory",
        allow_abbrev=False,
    )
    report.add_argument("--json", action="store_true", help="print JSON instead of text")
    report.add_argument("--no-memory", action="store_true", help="skip allocator and nvidia-smi/npu-smi queries")
    add_cli_arguments(report.add_argument_group("lvsa settings (shown with their source)"))

    models = commands.add_parser(
        "models", allow_abbrev=False,
        help="every diffusers video transformer: supported (family, horizon per variant) or refused, and why",
        description="The table of diffusers video transformer classes lvsa supports or refuses, printed from "
        "its declarations (lvsa.families); the README's table is this command's --markdown output.")
    form = models.add_mutually_exclusive_group()
    form.add_argument("--markdown", action="store_true", help="print the README's Markdown table")
    form.add_argument("--json", action="store_true", help="print JSON")

    drivers = commands.add_parser("drivers", aliases=["backends"],
                                  help="which drivers can run on which device here, and why not "
                                  "(`lvsa backends`: its earlier name, removed in lvsa 0.3)")
    drivers.add_argument("--device", help="only this torch device type (cpu, cuda, npu, ...)")
    drivers.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _plan(args: argparse.Namespace) -> int:
    settings = LVSASettings.from_cli(args)
    model = plan_families()[args.model] if args.model else None
    if args.latent_frames is not None:
        T = token_frames(args.latent_frames, model.temporal_patch if model else 1)
        if settings.patches_per_frame is not None:
            P = settings.patches_per_frame
        else:
            P = resolve_video_geometry(1, settings, model, args.height, args.width).patches_per_frame
    elif args.num_frames is not None:
        geometry = resolve_video_geometry(args.num_frames, settings, model, args.height, args.width)
        T, P = geometry.token_frames, geometry.patches_per_frame
    else:
        raise LVSAError("give --num-frames (with --model or the geometry flags) or --latent-frames")
    position = args.text_position or (model.text_position if model and model.text_position else "after")
    dense = DenseControls.from_settings(settings)
    if args.steps is not None and args.steps < 1:
        raise LVSAError(f"--steps {args.steps}: a run has at least one denoising step")
    if dense.needs_step_count and args.steps is None:
        raise LVSAError(f"{dense.warmup_given_as} is a fraction of the denoising steps: give --steps N, the "
                        "run's number of steps")
    dense_lines = [line for line in (dense.warmup_line(args.steps), dense.layers_line()) if line]
    in_warmup = args.step < dense.warmup_steps(args.steps)
    plan = make_plan(T, P, text_tokens=args.text_tokens, text_position=position, step=args.step,
                     settings=settings, model=model, dense=in_warmup)
    if args.png:
        from .figures import mask_png

        label = f"{args.model}, {args.num_frames} frames" if args.model and args.num_frames else ""
        print(f"[LVSA] mask picture written to {mask_png(plan, args.png, label)}", file=sys.stderr)
    if args.json:
        print(json.dumps({
            "latent_frames": plan.latent_frames, "patches_per_frame": plan.patches_per_frame,
            "text_tokens": plan.text_tokens, "text_position": plan.text_position, "step": plan.step,
            "offset": plan.offset, "rotating": plan.rotating, "kfi": plan.keyframe_interval,
            "globals": list(plan.globals),
            "attended_per_frame": plan.attended_per_frame, "density": plan.density,
            "indptr": list(plan.indptr), "indices": list(plan.indices),
            "dense_warmup_steps": dense.warmup_steps(args.steps), "dense_layers": list(dense.layers),
            "dense_step": in_warmup,
        }))
        return 0
    for line in dense_lines:
        print(line)
    if in_warmup:
        print(f"[LVSA] step {args.step} is a dense warm-up step: every frame attends every frame")
    elif dense.layers:
        print("[LVSA] the plan below is that of the other layers")
    for line in plan.log_lines():
        print(line)
    sparsity = 1 - plan.attended_per_frame / plan.latent_frames
    print(
        f"[LVSA] tokens_per_frame={P} seq_len={plan.seq_len} density={plan.density:.3f} "
        f"frame_sparsity={sparsity:.0%} rotating={'yes' if plan.rotating else 'no'} step={plan.step} "
        f"offset={plan.offset}"
    )
    if not args.no_mask:
        print("mask: rows = query frames, columns = key frames; G global, W window, X both, . skipped")
        print(plan.mask_picture())
    return 0


#: the version that drops ``lvsa backends``, the earlier name of ``lvsa drivers``
BACKENDS_COMMAND_REMOVED_IN = "0.3"


def _drivers(args: argparse.Namespace) -> int:
    from .driver_status import available_drivers

    if args.command == "backends":
        print(f"lvsa: note: `lvsa backends` is the earlier name of `lvsa drivers` and goes away in lvsa "
              f"{BACKENDS_COMMAND_REMOVED_IN}", file=sys.stderr)
    rows = available_drivers(args.device)
    if args.json:
        print(json.dumps([row.__dict__ for row in rows], indent=2))
        return 0
    if not rows:
        print("no lvsa driver is installed (is lvsa installed with pip, so that its entry points exist?)")
        return 1
    width = max(len(r.name) for r in rows)
    print(f"{'driver':<{width}}  {'device':<7} {'status':<9} reason")
    for r in rows:
        print(f"{r.name:<{width}}  {r.device:<7} {'usable' if r.available else 'unusable':<9} {r.reason}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from .models_table import markdown_table, rows, text_table

    if args.json:
        print(json.dumps([row.as_dict() for row in rows()], indent=2))
    else:
        print(markdown_table() if args.markdown else text_table(), end="")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .report import collect, render

    report = collect(LVSASettings.from_cli(args), memory=not args.no_memory)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = _parser().parse_args(argv)
    commands = {"plan": _plan, "models": _models, "drivers": _drivers, "backends": _drivers, "report": _report}
    try:
        status = commands[args.command](args)
        sys.stdout.flush()  # inside the try: a reader gone by now is a broken pipe here, not at exit
        return status
    except LVSAError as error:
        print(f"lvsa: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader stopped early (lvsa report | head): end quietly, as Unix tools do, with 128 + SIGPIPE;
        # stdout goes to /dev/null so that the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
