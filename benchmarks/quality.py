"""The fidelity report: one pipeline, one seed, run dense and with lvsa under each of several settings, and how
far each lvsa run's video is from the dense one.

    python -m benchmarks.quality --family wan --model /models/Wan2.1-T2V-1.3B-Diffusers --num-frames 161 \\
        --steps 30 --prompt "a red fox running through snow" \\
        --run "sparsity_scale=1.0" --run "sparsity_scale=0.5" \\
        --run "sparsity_scale=0.5,dense_warmup_fraction=0.2" --json fidelity.json
    python -m benchmarks.quality --family wan --small      # the small random-weight model (what CI runs)

Per run: PSNR and SSIM of every decoded frame against the dense run's (torchmetrics; ``lvsa[quality]``), their
means, the relative error of the final latent (what the VAE decodes), the plan's density and the share of
layer calls that ran dense (warm-up, dense layers). ``--json`` writes it all, with the per-frame curves that
``benchmarks/figures.py`` draws. On the small random-weight model the numbers only say how far lvsa moves the
output from dense on that model; the output says so. ``--save-videos DIR`` writes each run's mp4, and
``--vbench DIR`` hands those to VBench's custom-input evaluation when ``vbench`` is installed (untested here:
VBench and its weights are not installable on the machines lvsa is tested on)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import lvsa
from lvsa.caches import clear as clear_caches
from lvsa.files import atomic_write

SMALL_NOTE = ("small random-weight model: these numbers say how far lvsa moves the output from dense on this "
              "model, not how good a video is; run with --model on real weights for the measurement")


@dataclass
class Fidelity:
    label: str
    settings: dict[str, Any]
    psnr_db: float | None  # mean over frames; None: every frame identical to dense
    ssim: float
    latent_rel_error: float
    density: float | None
    dense_call_share: float
    seconds: float
    psnr_per_frame: list[float | None] = field(default_factory=list)
    ssim_per_frame: list[float] = field(default_factory=list)


def parse_run(text: str) -> dict[str, Any]:
    """``"sparsity_scale=0.5,dense_layers=0-1"`` -> settings values (strings: the settings convert and check
    them, as they do a variable). ``dense_layers`` ranges keep their commas when quoted: ``dense_layers='0,1'``."""
    values: dict[str, Any] = {}
    for part in _split_outside_quotes(text):
        name, equals, value = part.partition("=")
        if not equals or not name.strip():
            raise SystemExit(f"quality: --run {text!r}: give settings as name=value[,name=value...]")
        values[name.strip()] = value.strip().strip("'\"")
    return values


def _split_outside_quotes(text: str) -> list[str]:
    parts, current, quote = [], "", ""
    for char in text:
        if char in "'\"" and (not quote or quote == char):
            quote = "" if quote else char
        if char == "," and not quote:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


def frame_metrics(frames: torch.Tensor, reference: torch.Tensor) -> tuple[list[float | None], list[float]]:
    """Per-frame PSNR (dB; None where identical) and SSIM of ``[F, C, H, W]`` frames in 0..1 against the reference."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    frames, reference = frames.double(), reference.double()
    psnr = peak_signal_noise_ratio(frames, reference, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(frames, reference, data_range=1.0, reduction="none")
    return [None if math.isinf(p) else float(p) for p in psnr.tolist()], [float(s) for s in ssim.tolist()]


def generate(pipe: Any, example: Any, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The decoded frames ``[F, C, H, W]`` in 0..1, the latent the VAE decoded, and the seconds it took."""
    seen: list[torch.Tensor] = []
    decode = pipe.vae.decode

    def recording(latents: torch.Tensor, *rest: Any, **kwargs: Any) -> Any:
        seen.append(latents.detach().clone())
        return decode(latents, *rest, **kwargs)

    pipe.vae.decode = recording
    call = {**example.pipeline_inputs(pipe, args.prompt, args.seed), **example.call_arguments(pipe, args.guidance),
            "num_frames": args.num_frames, "num_inference_steps": args.steps, "output_type": "pt",
            "generator": torch.Generator().manual_seed(args.seed)}
    if args.height:
        call.update(height=args.height, width=args.width)
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            frames = pipe(**call).frames[0]
        seconds = time.perf_counter() - start
    finally:
        del pipe.vae.decode
    if not seen:
        raise SystemExit("quality: the pipeline never called its VAE's decode: no latent to compare")
    return frames.float().cpu(), torch.cat([s.float().cpu() for s in seen]), seconds


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    from lvsa.adapters import adapter_named
    from lvsa_app.generation import load_pipeline
    from lvsa_app.models import example_model

    example = example_model(args.family)
    if args.small:
        torch.manual_seed(0)
        pipe = example.tiny_pipeline()
    else:
        pipe = load_pipeline(adapter_named(args.family), args.model, getattr(torch, args.dtype))
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, example


def run(args: argparse.Namespace) -> dict[str, Any]:
    pipe, example = load(args)
    specs = [parse_run(r) for r in (args.run or ["sparsity_scale=1.0", "sparsity_scale=0.5"])]
    print(f"quality: {args.family} {'(small random-weight model)' if args.small else args.model}, "
          f"{args.num_frames} frames, {args.steps} steps, seed {args.seed}: dense, then {len(specs)} lvsa runs",
          file=sys.stderr)
    dense_frames, dense_latent, dense_seconds = generate(pipe, example, args)
    videos = Path(args.save_videos) if args.save_videos else None
    if videos is not None:
        _save_video(dense_frames, videos / "dense.mp4")
    results: list[Fidelity] = []
    for index, values in enumerate(specs):
        settings = lvsa.LVSASettings(**values)
        clear_caches()
        handle = lvsa.apply(pipe, settings)
        try:
            frames, latent, seconds = generate(pipe, example, args)
        finally:
            stats, plan = handle.stats, handle.runtime.last_plan
            handle.remove()
        if stats.fallback_calls:
            raise SystemExit(f"quality: run {values}: {stats.fallback_calls} layer calls fell back to the model's "
                             "attention; the comparison would not be of lvsa")
        psnr, ssim = frame_metrics(frames, dense_frames)
        finite = [p for p in psnr if p is not None]
        label = ", ".join(f"{k}={v}" for k, v in values.items()) or "defaults"
        results.append(Fidelity(
            label, values, sum(finite) / len(finite) if finite else None, sum(ssim) / len(ssim),
            float((latent - dense_latent).norm() / dense_latent.norm().clamp_min(1e-12)),
            None if plan is None else plan.density, stats.dense_calls / max(stats.sparse_calls, 1), seconds,
            psnr, ssim))
        if videos is not None:
            _save_video(frames, videos / f"run{index + 1}.mp4")
    report = {
        "model": args.model or f"{args.family} (small random weights)", "family": args.family,
        "num_frames": args.num_frames, "steps": args.steps, "seed": args.seed, "prompt": args.prompt,
        "device": args.device, "date": time.strftime("%Y-%m-%d"), "dense_seconds": dense_seconds,
        "note": SMALL_NOTE if args.small else "", "runs": [asdict(r) for r in results],
    }
    if args.vbench and videos is not None:
        report["vbench"] = _vbench(videos, Path(args.vbench))
    return report


def _save_video(frames: torch.Tensor, path: Path) -> None:
    from lvsa_app.generation import write_mp4

    write_mp4(frames.permute(0, 2, 3, 1).numpy(), path, fps=16)


def _vbench(videos: Path, output: Path) -> dict[str, Any]:
    """VBench's custom-input evaluation of the saved videos, when installed. Untested here (see the module)."""
    try:
        from vbench import VBench  # noqa: F401
    except ImportError:
        return {"skipped": "vbench is not installed (pip install vbench; it downloads its own weights)"}
    import subprocess

    command = ["vbench", "evaluate", "--videos_path", str(videos), "--mode", "custom_input", "--output_path",
               str(output)]
    done = subprocess.run(command, capture_output=True, text=True)
    return {"command": command, "returncode": done.returncode, "output": str(output), "untested_here": True}


def _default_device() -> str:
    """The first accelerator lvsa's device modules find, else the CPU."""
    from lvsa import registry

    for name in ("cuda", "npu"):
        device = registry.get_device(name)
        if device is not None and device.is_available():
            return name
    return "cpu"


def print_table(report: dict[str, Any]) -> None:
    if report["note"]:
        print(f"note: {report['note']}")
    print(f"{'run':<48} {'PSNR dB':>8} {'SSIM':>7} {'latent err':>10} {'density':>8} {'dense calls':>11} {'s':>7}")
    for r in report["runs"]:
        psnr = "inf" if r["psnr_db"] is None else f"{r['psnr_db']:.2f}"
        density = "-" if r["density"] is None else f"{r['density']:.3f}"
        print(f"{r['label'][:48]:<48} {psnr:>8} {r['ssim']:>7.4f} {r['latent_rel_error']:>10.2e} {density:>8} "
              f"{r['dense_call_share']:>11.0%} {r['seconds']:>7.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="wan", choices=["wan", "hunyuan", "cogvideox"])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a diffusers checkpoint folder of the family")
    source.add_argument("--small", action="store_true", help="the family's small random-weight model")
    parser.add_argument("--run", action="append", metavar="SETTINGS",
                        help="lvsa settings of one run, name=value[,name=value] (repeat for several; "
                        "default: sparsity_scale=1.0 and sparsity_scale=0.5)")
    parser.add_argument("--num-frames", type=int, default=None, help="default: 161 (33 with --small)")
    parser.add_argument("--steps", type=int, default=None, help="default: 30 (4 with --small)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--prompt", default="a red fox running through fresh snow, tracking shot")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: the first accelerator present, else cpu")
    parser.add_argument("--dtype", default="bfloat16", help="of a --model checkpoint (the small model runs float32)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--save-videos", metavar="DIR", help="write dense.mp4 and run<N>.mp4 here")
    parser.add_argument("--vbench", metavar="DIR", help="score the saved videos with VBench into DIR (when installed)")
    args = parser.parse_args(argv)
    args.device = args.device or _default_device()
    if args.vbench and not args.save_videos:
        parser.error("--vbench scores the saved videos: give --save-videos DIR too")
    if args.small:
        args.num_frames = args.num_frames or 33
        args.steps = args.steps or 4
        if args.height is None and args.family != "hunyuan":
            args.height = args.width = 64
    else:
        args.num_frames = args.num_frames or 161
        args.steps = args.steps or 30
    try:
        import torchmetrics  # noqa: F401
    except ImportError:
        print("quality: needs torchmetrics: pip install 'lvsa[quality]'", file=sys.stderr)
        return 2
    try:
        report = run(args)
    except lvsa.LVSAError as error:
        print(f"quality: error: {error}", file=sys.stderr)
        return 2
    print_table(report)
    if args.json:
        atomic_write(args.json, lambda path: path.write_text(json.dumps(report, indent=2)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
