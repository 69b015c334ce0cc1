"""The benchmarks run on CPU at small sizes, so they cannot rot between GPU sessions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(tmp_path, *argv, timeout=300) -> subprocess.CompletedProcess:
    """``python argv...`` in ``tmp_path``, output captured. The benchmarks package is linked into
    ``tmp_path``, so ``-m benchmarks.<name>`` finds it while ``lvsa`` is the installed one (the repository
    root on the path would put the source folder, without its drivers, in its place)."""
    link = tmp_path / "benchmarks"
    if not link.exists():
        link.symlink_to(BENCHMARKS, target_is_directory=True)
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path)


def test_attention_benchmark_runs_on_cpu(tmp_path):
    report = tmp_path / "attention.json"
    result = _run(tmp_path, "-m", "benchmarks.attention", "--device", "cpu", "--small", "--repeats", "2",
                  "--warmup", "0", "--cases", "wan-4x (321,hunyuan-1.5x", "--json", report)
    assert result.returncode == 0, result.stderr
    assert "kfi=6 global_count=14 attended_per_frame=21/81" in result.stdout
    rows = json.loads(report.read_text())["rows"]
    methods = {(r["case"], r["method"]) for r in rows}
    assert ("wan-4x (321 frames)", "sdpa (split)") in methods and ("wan-4x (321 frames)", "dense SDPA") in methods
    assert all(r["rel_error"] is None or r["rel_error"] < 1e-4 for r in rows)
    # every method's calls are kept, and the reported time is their median
    assert all(len(r["times_ms"]) == 2 and r["ms"] == pytest.approx(sum(r["times_ms"]) / 2) for r in rows)


def test_wan_animate_2_benchmark_runs_on_cpu(tmp_path):
    """Small on the CPU (eager flex attention): both methods timed in one run, lvsa's error against flex
    attention under the plan-narrowed BlockMask printed and small."""
    result = _run(tmp_path, "-m", "benchmarks.wan_animate_2", "--device", "cpu", "--tokens-per-frame", "16",
                  "--heads", "2", "--head-dim", "16", "--segment-frames", "161", "--repeats", "2", "--warmup", "0")
    assert result.returncode == 0, result.stderr
    row = result.stdout.strip().splitlines()[-1].split()
    assert row[:3] == ["161", "42", "3"] and row[5].endswith("x") and float(row[6]) < 1e-5


def test_pipeline_benchmark_runs_on_cpu(tmp_path):
    report = tmp_path / "pipeline.json"
    result = _run(tmp_path, "-m", "benchmarks.pipeline", "--device", "cpu", "--small", "--repeats", "1",
                  "--frames", "81", "161", "--hunyuan-frames", "161", "--methods", "sdpa", "--json", report)
    assert result.returncode == 0, result.stderr
    rows = json.loads(report.read_text())
    by_key = {(r["model"], r["frames"], r["method"]): r for r in rows}
    assert by_key[("wan-small", 81, "sdpa")]["density"] == 1.0  # at the horizon the plan is dense
    assert by_key[("wan-small", 161, "sdpa")]["density"] < 0.6  # 2x: about half the frames
    assert by_key[("hunyuan-small", 161, "dense")]["speedup"] == 1.0
    assert all(r["ms"] > 0 and r["peak_gib"] > 0 for r in rows)


def test_multi_device_benchmark_runs_every_layout_on_four_cpu_processes(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    report = tmp_path / "multi.json"
    result = _run(tmp_path, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-addr", "127.0.0.1",
                  "--master-port", port, "-m", "benchmarks.multi_device", "--device", "cpu", "--small",
                  "--cases", "wan@161", "--repeats", "1", "--json", report, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(report.read_text())
    # the small Wan has 4 heads: Ulysses 4, ring 4 and Ulysses 2 x ring 2 all fit; diffusers' CPU attention has
    # no ring, so dense is timed under Ulysses alone there
    assert {(r["devices"], r["layout"], r["ulysses_degree"], r["ring_degree"], r["method"]) for r in rows} == {
        (1, "single", 1, 1, "dense"), (1, "single", 1, 1, "lvsa sdpa"),
        (4, "ulysses", 4, 1, "dense"), (4, "ulysses", 4, 1, "lvsa sdpa"),
        (4, "ring", 1, 4, "lvsa sdpa"), (4, "ulysses x ring", 2, 2, "lvsa sdpa")}
    assert all(r["ms"] > 0 for r in rows)
    assert "keeps" in result.stdout and "ring steps skipped" in result.stdout


def test_ring_compute_benchmark_runs_on_cpu(tmp_path):
    report = tmp_path / "ring.json"
    result = _run(tmp_path, "-m", "benchmarks.ring_compute", "--device", "cpu", "--small", "--repeats", "1",
                  "--layouts", "1x2", "2x2", "3x1", "--json", report)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(report.read_text())
    assert [r["layout"] for r in rows] == ["1 device", "U1 x R2 (2 devices)", "U2 x R2 (4 devices)"]
    assert "U3 x R1: does not fit (4 heads" in result.stdout
    assert all(r["error"] < 1e-4 for r in rows)  # each layout's lvsa output is the single-device one


def test_fa4_ceiling_benchmark_runs_on_cpu(tmp_path):
    report = tmp_path / "ceiling.json"
    result = _run(tmp_path, "-m", "benchmarks.fa4_ceiling", "--device", "cpu", "--small", "--repeats", "1",
                  "--warmup", "0", "--densities", "1", "0.25", "--cases", "s=0.5,text",
                  "--mask-forms", "interval", "table", "--json", report)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    # the band pattern through FlexAttention's CPU path equals float64 attention over the band's keys
    assert [r["tiles_per_query_tile"] for r in data["ceiling"]] == [11, 3]
    assert all(r["rel_error"] < 1e-4 and 0 < r["density"] <= 1 for r in data["ceiling"])
    census = {r["case"]: r for r in data["census"]}
    assert set(census) == {"wan-4x s=0.5", "hunyuan-1.5x + 1000 text (padded)"}
    for row in census.values():
        # the visited tiles hold every attended pair, and the driver equals the reference
        assert row["full"] + row["masked"] >= row["needed"] > 0
        assert 0 <= row["straddling_query_tiles"] <= row["query_tiles"]
        assert row["rel_error"] < 1e-4 and row["ms"] > 0
        assert set(row["by_mask_form"]) == {"interval", "table"}
        assert all(share > 0 for share in row["by_mask_form"].values())
        assert all(error < 1e-4 for error in row["rel_error_by_mask_form"].values())


class _CountingDevice:
    """An lvsa device module that logs its synchronisations among the calls it times."""

    def __init__(self, name: str, log: list[str]):
        self.name, self.log = name, log

    def synchronize(self, index=None) -> None:
        self.log.append("sync")


def _timing():
    sys.path.insert(0, str(BENCHMARKS.parent))
    try:
        from benchmarks import timing
    finally:
        sys.path.remove(str(BENCHMARKS.parent))
    return timing


def test_queued_timing_keeps_calls_back_to_back_and_reads_device_events(monkeypatch):
    timing = _timing()
    log: list[str] = []
    made: list[object] = []

    class FakeEvent:  # each pair's elapsed time is the call's number, so the median is known
        def __init__(self, device, enable_timing):
            assert enable_timing and device == "cuda"
            self.index = len(made) // 2
            made.append(self)

        def record(self):
            log.append("record")

        def elapsed_time(self, end):
            return float([5, 1, 3][self.index])

    monkeypatch.setattr(timing.torch, "Event", FakeEvent)
    calls = iter(range(100))
    ms, out = timing.timed(lambda: log.append("call") or next(calls), _CountingDevice("cuda", log), 2, 3, "queued")
    assert (ms, out) == (3.0, 4)
    # no synchronisation between the timed calls: the host queues them as a forward queues its layers
    assert log == ["call", "call", "sync"] + ["record", "call", "record"] * 3 + ["sync"]


def test_interleaved_timing_calls_every_method_once_per_round_in_shuffled_orders(monkeypatch):
    timing = _timing()
    log: list[str] = []

    class FakeEvent:  # an event pair's time is that of the call recorded between them (the log's length)
        def __init__(self, device, enable_timing):
            self.at = None

        def record(self):
            self.at = len(log)

        def elapsed_time(self, end):
            return float(int(log[end.at - 1][1:]))

    monkeypatch.setattr(timing.torch, "Event", FakeEvent)
    count = iter(range(1000))
    fns = [lambda name=name: log.append(f"{name}{next(count)}") or name for name in "abc"]
    times, outs = timing.interleaved(fns, _CountingDevice("cuda", log), 1, 6, "queued")
    calls = [entry for entry in log if entry != "sync"]
    assert [c[0] for c in calls[:3]] == ["a", "b", "c"] and outs == ["a", "b", "c"]  # warm-up in order
    rounds = [[c[0] for c in calls[3 + 3 * r: 6 + 3 * r]] for r in range(6)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # each method once per round
    assert len({tuple(r) for r in rounds}) > 1  # in more than one order
    # each method's times are its own calls' (the call number is the fake's time), in call order
    for name, method_times in zip("abc", times, strict=True):
        assert method_times == [float(int(c[1:])) for c in calls[3:] if c[0] == name]
    again, _ = timing.interleaved(fns, _CountingDevice("cpu", []), 0, 6, "synchronized")
    assert [len(t) for t in again] == [6, 6, 6]


def test_synchronized_timing_waits_around_each_call_and_cpu_always_does():
    timing = _timing()
    for name, mode in (("cuda", "synchronized"), ("cpu", "queued")):
        log: list[str] = []
        ms, out = timing.timed(lambda log=log: log.append("call") or len(log), _CountingDevice(name, log), 1, 2, mode)
        assert log == ["call"] + ["sync", "call", "sync"] * 2 and out == 6 and ms >= 0
    with pytest.raises(ValueError, match="repeats"):
        timing.timed(lambda: None, _CountingDevice("cpu", []), 0, 0)
    with pytest.raises(ValueError, match="timing must be one of"):
        timing.timed(lambda: None, _CountingDevice("cpu", []), 0, 1, "events")


def test_speedup_is_the_median_of_the_per_round_ratios():
    """Each round's two calls share the device's state, so their ratio cancels the drift between rounds; the
    median over rounds then sets aside a round where one call alone was disturbed."""
    timing = _timing()
    drift = [1.0, 1.3, 0.9, 1.3, 1.1]
    dense = [10.0 * d for d in drift]
    assert timing.speedup(dense, [5.0 * d for d in drift]) == pytest.approx(2.0)
    disturbed = [5.0 * d for d in drift]
    disturbed[1] *= 3  # one sparse call hit by something else
    assert timing.speedup(dense, disturbed) == pytest.approx(2.0)
    assert timing.speedup([4.0, 9.0, 6.0], [2.0, 3.0, 1.0]) == pytest.approx(3.0)  # ratios 2, 3, 6
    with pytest.raises(ValueError, match="same rounds"):
        timing.speedup(dense, disturbed[:3])


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        image.verify()  # a whole, readable PNG
    with Image.open(path) as image:
        return image.format, image.size


def test_the_fidelity_report_compares_each_run_with_dense(tmp_path):
    report = tmp_path / "fidelity.json"
    videos = tmp_path / "videos"
    result = _run(tmp_path, "-m", "benchmarks.quality", "--small", "--family", "wan", "--steps", "3",
                  "--run", "sparsity_scale=1.0", "--run", "reference_latent_frames=3",
                  "--run", "reference_latent_frames=3,dense_warmup_steps=3", "--run", "reference_latent_frames=3,"
                  "dense_layers='0,1'", "--json", report, "--save-videos", videos, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "note: small random-weight model" in result.stdout
    data = json.loads(report.read_text())
    at_horizon, sparse, warm, layers = data["runs"]
    # at the horizon lvsa is dense: the same video; every step or every layer dense: the same video
    for same in (at_horizon, warm, layers):
        assert same["latent_rel_error"] < 1e-5 and same["ssim"] > 0.9999, same["label"]
    assert warm["dense_call_share"] == 1.0 and layers["dense_call_share"] == 1.0
    # beyond it the plan engages: measurably different, frame by frame
    assert sparse["latent_rel_error"] > 1e-4 and sparse["density"] < 1 and sparse["dense_call_share"] == 0
    assert len(sparse["psnr_per_frame"]) == 33 and all(p is not None and p > 10 for p in sparse["psnr_per_frame"])
    assert sparse["ssim"] < 1 and min(sparse["ssim_per_frame"]) <= sparse["ssim"]
    assert sorted(p.name for p in videos.iterdir()) == ["dense.mp4", "run1.mp4", "run2.mp4", "run3.mp4", "run4.mp4"]


def test_the_fidelity_report_refuses_bad_runs(tmp_path):
    result = _run(tmp_path, "-m", "benchmarks.quality", "--small", "--run", "sparsity_scale=-1")
    assert result.returncode == 2 and "sparsity_scale" in result.stderr.strip().splitlines()[-1]
    result = _run(tmp_path, "-m", "benchmarks.quality", "--small", "--run", "nonsense")
    assert result.returncode != 0 and "name=value" in result.stderr


RECORDED = Path(__file__).resolve().parents[1] / "docs" / "data"


def test_the_figures_are_drawn_from_recorded_json(tmp_path):
    out = tmp_path / "figures"
    result = _run(tmp_path, "-m", "benchmarks.figures", "--out", out, "--size", "640x400",
                  "--scaling", RECORDED / "scaling-h200-2026-12-05.json",
                  "--quality", RECORDED / "fidelity-small-wan-cpu.json")
    assert result.returncode == 0, result.stderr
    names = {"density_vs_frames", "speedup_vs_frames", "fraction_of_ideal", "fidelity_psnr", "fidelity_ssim"}
    assert sorted(Path(p).stem for p in result.stdout.split()) == sorted(names | {"mask"})
    for name in names:
        assert _png_size(out / f"{name}.png") == ("PNG", (640, 400))
    assert _png_size(out / "mask.png") == ("PNG", (640, 720))
    bad = _run(tmp_path, "-m", "benchmarks.figures", "--out", out,
               "--scaling", RECORDED / "fidelity-small-wan-cpu.json")
    assert bad.returncode != 0 and "scaling JSON" in bad.stderr


def test_the_readme_shows_the_recorded_figures():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name in ("speedup_vs_frames", "mask", "density_vs_frames"):
        assert f"](docs/figures/{name}.png)" in readme
        assert (Path(__file__).resolve().parents[1] / "docs" / "figures" / f"{name}.png").is_file()
