"""lvsa inside ``torch.compile``d transformers: both orders (apply then compile, compile then apply), no graph
break and no recompilation after the first denoising step while the keyframes rotate (measured with dynamo's
counters over 12 steps), and the same output as the uncompiled model. Through the real diffusers pipelines."""

from __future__ import annotations

import logging

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import lvsa
from lvsa.adapters import adapter_named
from lvsa_app.models import example_model

FAMILIES = ["wan", "hunyuan", "cogvideox"]
STEPS = 12
# 33 frames = 9 latent frames against a 3-frame horizon: sparse, and the keyframes rotate every step
SPARSE = {"reference_latent_frames": 3}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _pipe(name):
    torch.manual_seed(0)
    pipe = example_model(name).tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, name):
    adapter = adapter_named(name)
    example = example_model(adapter.name)
    with torch.inference_mode():
        return pipe(**example.pipeline_inputs(pipe, None, seed=0), **example.call_arguments(pipe, 5.0), height=64,
                    width=64, num_frames=33, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                    output_type="latent").frames


def _compile(pipe, backend="aot_eager", fullgraph=True):
    counter = CompileCounterWithBackend(backend)
    pipe.transformer = torch.compile(pipe.transformer, backend=counter, fullgraph=fullgraph)
    return counter


def _graph_breaks():
    return dict(counters["graph_break"])


def _graphs_after_each_step(pipe, name, counter):
    """The output, and the number of graphs compiled so far after each denoising step (the scheduler's
    ``step`` ends one in every pipeline)."""
    graphs = []
    step = pipe.scheduler.step

    def counted(*args, **kwargs):
        graphs.append(counter.frame_count)
        return step(*args, **kwargs)

    pipe.scheduler.step = counted
    try:
        return _generate(pipe, name), graphs
    finally:
        del pipe.scheduler.step


@pytest.mark.parametrize("name", FAMILIES)
def test_apply_then_compile_rotates_without_recompiling(name):
    """HunyuanVideo 1.5's own forward breaks the graph (``if torch.all(image_embeds == 0)``): there lvsa must add
    no break of its own, so its breaks are compared with the dense model's; the others compile whole."""
    fullgraph = name != "hunyuan"
    dense_pipe = _pipe(name)
    dense_counter = _compile(dense_pipe, fullgraph=fullgraph)
    _generate(dense_pipe, name)
    dense_graphs, dense_breaks = dense_counter.frame_count, _graph_breaks()
    torch._dynamo.reset()
    counters.clear()

    pipe = _pipe(name)
    handle = lvsa.apply(pipe, lvsa.LVSASettings(**SPARSE))
    eager = _generate(pipe, name)
    eager_builds, eager_plan = handle.stats.plan_builds, handle.runtime.last_plan
    assert eager_plan.kfi > 1 and eager_builds >= STEPS  # really sparse, a new plan every step

    handle.runtime.reset()  # forget the eager run's plans: the compiled run must build its own every step
    counter = _compile(pipe, fullgraph=fullgraph)
    compiled, graphs = _graphs_after_each_step(pipe, name, counter)

    assert len(graphs) == STEPS
    assert graphs[0] > 0, "nothing was compiled"
    assert graphs[-1] == graphs[0], f"recompiled after the first step: graphs per step {graphs}"
    assert _graph_breaks() == dense_breaks  # none of lvsa's own (and none at all where fullgraph=True)
    assert graphs[-1] == dense_graphs + 1  # the model's graphs, plus lvsa's forward pre-hook
    assert handle.stats.steps == 2 * STEPS and handle.stats.fallback_calls == 0
    assert handle.stats.plan_builds >= STEPS  # the compiled run planned every step
    assert handle.runtime.last_plan.latent_frames == eager_plan.latent_frames
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
def test_regional_compilation_compiles_one_graph_for_every_block(name):
    """diffusers' ``compile_repeated_blocks``: every block shares one graph. A per-layer constant in lvsa's
    path would give each block its own (and hit dynamo's recompile limit on a real model's 40-60 blocks)."""
    dense_pipe = _pipe(name)
    dense_counter = CompileCounterWithBackend("aot_eager")
    dense_pipe.transformer.compile_repeated_blocks(backend=dense_counter, fullgraph=True)
    _generate(dense_pipe, name)
    torch._dynamo.reset()

    pipe = _pipe(name)
    handle = lvsa.apply(pipe, lvsa.LVSASettings(**SPARSE))
    eager = _generate(pipe, name)
    counter = CompileCounterWithBackend("aot_eager")
    pipe.transformer.compile_repeated_blocks(backend=counter, fullgraph=True)
    compiled, graphs = _graphs_after_each_step(pipe, name, counter)
    # one graph per kind of block, as without lvsa (Wan: 1; HunyuanVideo 1.5 also compiles its refiner's)
    assert graphs == [dense_counter.frame_count] * STEPS, (graphs, dense_counter.frame_count)
    assert handle.stats.sparse_calls > 0 and handle.stats.fallback_calls == 0
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_compile_then_apply_equals_apply_then_compile():
    name = "wan"
    pipe = _pipe(name)
    reference = lvsa.apply(pipe, lvsa.LVSASettings(**SPARSE))
    eager = _generate(pipe, name)
    lvsa.remove(pipe)

    counter = _compile(pipe)
    handle = lvsa.apply(pipe, lvsa.LVSASettings(**SPARSE))  # pipe.transformer is the compiled wrapper now
    assert handle.transformers[0] is pipe.transformer._orig_mod
    compiled, graphs = _graphs_after_each_step(pipe, name, counter)
    assert graphs[-1] == graphs[0], graphs
    assert handle.stats.sparse_calls > 0 and reference is not handle
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_compiled_dense_model_after_remove_runs_the_original_attention():
    name = "wan"
    pipe = _pipe(name)
    dense = _generate(pipe, name)
    handle = lvsa.apply(pipe, lvsa.LVSASettings(**SPARSE))
    lvsa.remove(pipe)
    _compile(pipe)
    torch.testing.assert_close(_generate(pipe, name), dense, rtol=1e-4, atol=1e-4)
    assert handle.stats.sparse_calls == 0


def test_a_fallback_inside_the_compiled_graph_is_loud_and_dense(caplog):
    """A geometry lvsa cannot plan: under compile the op runs dense attention over the same tensors, after
    the same [LVSA-FALLBACK] line and count as the eager path."""
    name = "hunyuan"  # text tokens with a padding mask: the dense fallback must honour it
    pipe = _pipe(name)
    dense = _generate(pipe, name)
    handle = lvsa.apply(pipe, lvsa.LVSASettings(patches_per_frame=3, fallback="warn", **SPARSE))
    _compile(pipe, fullgraph=False)
    caplog.set_level(logging.WARNING, logger="lvsa")
    out = _generate(pipe, name)
    assert "[LVSA-FALLBACK]" in caplog.text and "reason=geometry_detect" in caplog.text
    assert handle.stats.sparse_calls == 0 and handle.stats.fallback_calls > 0
    torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)


def test_fallback_error_raises_through_the_compiled_graph():
    name = "wan"
    pipe = _pipe(name)
    lvsa.apply(pipe, lvsa.LVSASettings(patches_per_frame=3, fallback="error", **SPARSE))
    _compile(pipe)
    with pytest.raises(lvsa.GeometryError, match="reason=geometry_detect"):
        _generate(pipe, name)


def test_processors_replaced_after_compile_are_noticed(caplog):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    name = "wan"
    pipe = _pipe(name)
    handle = lvsa.apply(pipe, lvsa.LVSASettings(fallback="warn", **SPARSE))
    _compile(pipe)
    _generate(pipe, name)
    handle.transformers[0].blocks[0].attn1.set_processor(WanAttnProcessor())
    caplog.set_level(logging.WARNING, logger="lvsa")
    _generate(pipe, name)
    assert "reason=processor_replaced" in caplog.text
    assert handle.stats.fallback_reasons["processor_replaced"] > 0


def test_riflex_under_compile_equals_eager():
    name = "wan"
    pipe = _pipe(name)
    handle = lvsa.apply(pipe, lvsa.LVSASettings(riflex=True, **SPARSE))
    eager = _generate(pipe, name)
    counter = _compile(pipe)
    compiled, graphs = _graphs_after_each_step(pipe, name, counter)
    assert graphs[-1] == graphs[0], graphs
    assert handle.stats.sparse_calls > 0
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_inductor_equals_eager():
    """The default backend, which generates code for the ops around lvsa's (CPU: C++)."""
    name = "wan"
    pipe = _pipe(name)
    lvsa.apply(pipe, lvsa.LVSASettings(**SPARSE))
    eager = _generate(pipe, name)
    counter = _compile(pipe, backend="inductor")
    compiled, graphs = _graphs_after_each_step(pipe, name, counter)
    assert graphs[-1] == graphs[0], graphs
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", FAMILIES)
def test_half_precision_counts_every_step_without_recompiling(name, dtype):
    """In fp16/bf16 the pipelines cast the timestep and neighbouring steps collide; compiled, the step still
    comes from the schedule (behind the op), once per denoising step, with no recompilation."""
    torch.manual_seed(0)
    pipe = example_model(name).tiny_pipeline().to(dtype)
    pipe.set_progress_bar_config(disable=True)
    handle = lvsa.apply(pipe, lvsa.LVSASettings(**SPARSE))
    seen = []  # read in the scheduler (eager): a hook inside the compiled region would itself guard on it
    counter = _compile(pipe, fullgraph=name != "hunyuan")
    adapter = adapter_named(name)
    example = example_model(adapter.name)
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in example.pipeline_inputs(pipe, None, seed=0).items()}
    graphs = []
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda *a, **kw: (graphs.append(counter.frame_count), seen.append(handle.runtime.step),
                                            step(*a, **kw))[2]
    with torch.inference_mode():
        out = pipe(**inputs, **example.call_arguments(pipe, 5.0), height=64, width=64, num_frames=33,
                   num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="latent").frames
    assert torch.isfinite(out.float()).all()
    assert graphs[-1] == graphs[0], graphs
    assert seen == list(range(STEPS)), seen
    assert handle.stats.steps == STEPS and handle.stats.fallback_calls == 0


def test_wan22_two_compiled_transformers_both_stay_sparse():
    """Wan 2.2 A14B: both experts compiled; each runs lvsa, and the step is shared between them."""
    from diffusers import WanPipeline

    first = _pipe("wan")
    torch.manual_seed(1)
    second = example_model("wan").tiny_pipeline().transformer
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=first.transformer, transformer_2=second,
                       vae=first.vae, scheduler=first.scheduler, boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    handle = lvsa.apply(pipe, lvsa.LVSASettings(**SPARSE))
    eager = _generate(pipe, "wan")
    calls = handle.stats.sparse_calls
    counters_by_expert = [CompileCounterWithBackend("aot_eager") for _ in range(2)]
    pipe.transformer = torch.compile(pipe.transformer, backend=counters_by_expert[0], fullgraph=True)
    pipe.transformer_2 = torch.compile(pipe.transformer_2, backend=counters_by_expert[1], fullgraph=True)
    compiled = _generate(pipe, "wan")
    assert all(c.frame_count > 0 for c in counters_by_expert)  # both experts ran, compiled
    assert handle.stats.sparse_calls == 2 * calls and handle.stats.fallback_calls == 0
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_compiled_dense_steps_and_layers_do_not_recompile():
    """A dense step or layer is data the op reads, not a guard: no graph after the first step's."""
    torch._dynamo.reset()
    try:
        eager_pipe = _pipe("wan")
        settings = lvsa.LVSASettings(reference_latent_frames=3, dense_warmup_steps=3, dense_layers="1")
        lvsa.apply(eager_pipe, settings)
        eager = _generate(eager_pipe, "wan")
        pipe = _pipe("wan")
        handle = lvsa.apply(pipe, settings)
        counter = CompileCounterWithBackend("aot_eager")
        pipe.transformer = torch.compile(pipe.transformer, backend=counter, fullgraph=True)
        compiled, graphs = _graphs_after_each_step(pipe, "wan", counter)
        assert graphs[-1] == graphs[0], graphs
        per_step = handle.stats.calls_by_step
        assert len(per_step) == STEPS and per_step[0][1] == 0 and per_step[STEPS - 1][0] == per_step[STEPS - 1][1]
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    finally:
        torch._dynamo.reset()
