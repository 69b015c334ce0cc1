"""The benchmarks' JSON as pictures (matplotlib: ``lvsa[figures]``), into one folder:

    python -m benchmarks.figures --out docs/figures --scaling scaling.json --quality fidelity.json

- ``speedup_vs_frames.png``: each driver's attention speedup over dense cuDNN (and dense FA4) against the
  video's frames, beside the ideal (1 / density), from ``benchmarks.attention --sweep-frames ... --json``;
- ``fraction_of_ideal.png``: the share of the ideal speedup each driver reaches, per case;
- ``density_vs_frames.png``: the plan's density against frames per model and ``sparsity_scale`` (from the
  planner itself: no measurement needed);
- ``fidelity_psnr.png`` / ``fidelity_ssim.png``: per-frame PSNR and SSIM of each run against dense, from
  ``benchmarks.quality --json``;
- ``mask.png``: the mask of Wan 2.1 at 161 frames, step 1 (what ``lvsa plan --png`` draws).

Each PNG is ``--size`` pixels (default 800x500; the mask 640x720); the paths written are printed."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import lvsa
from lvsa.figures import bar_chart, line_chart, mask_png

DENSITY_FRAMES = [81, 121, 161, 241, 321, 481, 641]
DENSITY_MODELS = {"wan": "Wan 2.1/2.2", "hunyuan": "HunyuanVideo 1.5", "cogvideox": "CogVideoX"}


def _load(path: str | None) -> Any:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"figures: {path}: cannot read it as JSON ({error})") from None


def scaling_figures(data: dict[str, Any], out: Path, size: tuple[int, int]) -> list[Path]:
    rows = data.get("rows") if isinstance(data, dict) else data
    if not rows or not isinstance(rows[0], dict) or not rows[0].get("video_frames"):
        raise SystemExit("figures: the scaling JSON has no frame counts: make it with "
                         "`python -m benchmarks.attention --sweep-frames 81 161 321 481 --json FILE`")
    device = data.get("environment", {}).get("device", "") if isinstance(data, dict) else ""
    series: dict[str, tuple[list[float], list[float]]] = {}
    ideal: dict[str, dict[int, float]] = defaultdict(dict)
    for row in rows:
        scale = f" s={row['sparsity_scale']:g}" if row.get("sparsity_scale", 1.0) != 1.0 else ""
        ideal[f"ideal (1/density){scale}"][row["video_frames"]] = 1 / row["density"]
        if row["method"].startswith("dense") and (row["method"] != "dense FA4" or scale):
            continue  # dense cuDNN is the 1x line; dense FA4 once (it does not depend on the scale)
        xs, ys = series.setdefault(f"{row['method']}{scale}", ([], []))
        xs.append(row["video_frames"])
        ys.append(row["speedup"])
    for name, points in ideal.items():
        frames = sorted(points)
        series[name] = (frames, [points[f] for f in frames])
    written = [line_chart(out / "speedup_vs_frames.png", series, size=size, dashed=list(ideal),
                          title=f"Attention speedup over dense cuDNN, Wan 2.1 1.3B geometry ({device})",
                          xlabel="video frames (480x832)", ylabel="speedup (x)")]
    cases = sorted({(r["video_frames"], r.get("sparsity_scale", 1.0), r["case"]) for r in rows
                    if r.get("fraction_of_ideal") is not None})
    methods = sorted({r["method"] for r in rows if r.get("fraction_of_ideal") is not None})
    values = {m: [next((r["fraction_of_ideal"] for r in rows if r["case"] == case and r["method"] == m), 0.0)
                  for _, _, case in cases] for m in methods}
    written.append(bar_chart(out / "fraction_of_ideal.png", [c for _, _, c in cases], values, size=size,
                             percent=True, reference=1.0, ylabel="of the ideal speedup (against dense cuDNN)",
                             title=f"Share of the ideal speedup (1/density) each driver reaches ({device})"))
    return written


def density_figure(out: Path, size: tuple[int, int]) -> Path:
    series = {}
    for model, label in DENSITY_MODELS.items():
        for scale in (1.0, 0.5):
            settings = lvsa.LVSASettings(sparsity_scale=scale)
            family = lvsa.geometry.family(model)
            densities = []
            for frames in DENSITY_FRAMES:
                latent = lvsa.geometry.latent_frames(frames, family.vae_temporal_factor)
                plan = lvsa.make_plan(lvsa.geometry.token_frames(latent, family.temporal_patch), 1560,
                                      settings=settings, model=model)
                densities.append(plan.density)
            series[f"{label}, sparsity_scale={scale:g}"] = (DENSITY_FRAMES, densities)
    return line_chart(out / "density_vs_frames.png", series, size=size, percent=True,
                      title="Share of the attention matrix computed, by video length (the planner, default knobs)",
                      xlabel="video frames", ylabel="density")


def fidelity_figures(report: dict[str, Any], out: Path, size: tuple[int, int]) -> list[Path]:
    runs = report.get("runs") or []
    if not runs:
        raise SystemExit("figures: the quality JSON has no runs (make it with `python -m benchmarks.quality --json`)")
    what = f"{report['model']}, {report['num_frames']} frames, {report['steps']} steps"
    cap = 100.0  # identical frames have infinite PSNR: drawn at the top of the chart
    psnr = {r["label"]: (list(range(len(r["psnr_per_frame"]))),
                         [cap if p is None else min(p, cap) for p in r["psnr_per_frame"]]) for r in runs}
    ssim = {r["label"]: (list(range(len(r["ssim_per_frame"]))), r["ssim_per_frame"]) for r in runs}
    note = " (random weights)" if report.get("note") else ""
    return [
        line_chart(out / "fidelity_psnr.png", psnr, size=size, title=f"PSNR against dense per frame: {what}{note}",
                   xlabel="frame", ylabel=f"PSNR (dB; identical frames at {cap:g})"),
        line_chart(out / "fidelity_ssim.png", ssim, size=size, title=f"SSIM against dense per frame: {what}{note}",
                   xlabel="frame", ylabel="SSIM"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--scaling", help="JSON of benchmarks.attention --sweep-frames")
    parser.add_argument("--quality", help="JSON of benchmarks.quality")
    parser.add_argument("--size", default="800x500", help="WIDTHxHEIGHT in pixels of the charts")
    args = parser.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size {args.size!r}: give WIDTHxHEIGHT, such as 800x500")
    size = (width, height)
    out = Path(args.out)
    written = [density_figure(out, size)]
    settings = lvsa.LVSASettings()
    written.append(mask_png(lvsa.make_plan(41, 1560, step=1, settings=settings, model="wan"), out / "mask.png",
                            "Wan 2.1, 161 frames"))
    scaling, quality = _load(args.scaling), _load(args.quality)
    if scaling is not None:
        written += scaling_figures(scaling, out, size)
    if quality is not None:
        written += fidelity_figures(quality, out, size)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
