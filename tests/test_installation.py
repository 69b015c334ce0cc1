"""What apply leaves installed stays true: shared transformers, processors changed after apply, copies,
compiled models. Through the real diffusers pipelines (small random-weight models)."""

from __future__ import annotations

import copy
import logging
import pickle

import pytest
import torch

import lvsa
from lvsa.adapters import adapter_named, handle_of
from lvsa.errors import ConfigError
from lvsa_app.models import example_model


def _wan(seed=0):
    torch.manual_seed(seed)
    pipe = example_model("wan").tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _a14b(pipe):
    from diffusers import WanPipeline

    second = _wan(1).transformer
    two = WanPipeline(tokenizer=None, text_encoder=None, transformer=pipe.transformer, transformer_2=second,
                      vae=pipe.vae, scheduler=pipe.scheduler, boundary_ratio=0.5)
    two.set_progress_bar_config(disable=True)
    return two


def _generate(pipe, frames=17, steps=2):
    adapter = adapter_named("wan")
    example = example_model(adapter.name)
    with torch.inference_mode():
        return pipe(**example.pipeline_inputs(pipe, None, seed=0), guidance_scale=5.0,
                    height=64, width=64,
                    num_frames=frames, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                    output_type="latent").frames


def _sparse_everywhere(handle):
    return all(type(m.processor).__name__ == "WanLVSAProcessor" for m in handle.layers.values())


# -- shared transformers -----------------------------------------------------------------------------------

def test_a_pipeline_sharing_a_transformer_with_the_same_settings_shares_the_installation():
    first = _a14b(_wan())
    handle = lvsa.apply(first, lvsa.LVSASettings())
    other = _wan()
    other.transformer = first.transformer  # a second pipeline on the same high-noise expert
    again = lvsa.apply(other, lvsa.LVSASettings())
    assert again is handle
    assert len(handle.layers) == 4 and _sparse_everywhere(handle)  # transformer_2 kept too
    assert handle_of(first.transformer_2) is handle
    _generate(other)
    assert handle.stats.sparse_calls > 0


def test_a_pipeline_sharing_a_transformer_with_other_settings_fails_naming_the_modules():
    first = _a14b(_wan())
    handle = lvsa.apply(first, lvsa.LVSASettings())
    other = _wan()
    other.transformer = first.transformer
    with pytest.raises(ConfigError, match=r"transformer, transformer_2 of WanPipeline.*WanTransformer3DModel"):
        lvsa.apply(other, lvsa.LVSASettings(sparsity_scale=0.5))
    assert len(handle.layers) == 4 and _sparse_everywhere(handle)  # nothing was changed


def test_a_second_pipeline_on_the_same_transformer_never_changes_the_first_ones_settings():
    """Two pipelines on one transformer, each wholly inside the other's modules: applying to the second with
    other settings would change the first behind its back, so it is refused; the same settings share."""
    first = _wan()
    handle = lvsa.apply(first, lvsa.LVSASettings())
    other = _wan()
    other.transformer = first.transformer
    with pytest.raises(ConfigError, match=r"would change the settings of WanPipeline too"):
        lvsa.apply(other, lvsa.LVSASettings(sparsity_scale=0.5))
    assert handle.runtime.settings.sparsity_scale == 1.0 and _sparse_everywhere(handle)
    assert lvsa.apply(other, lvsa.LVSASettings()) is handle
    _generate(other)
    assert handle.stats.sparse_calls > 0


def test_reapplying_to_the_same_pipeline_replaces(caplog):
    pipe = _a14b(_wan())
    first = lvsa.apply(pipe, lvsa.LVSASettings())
    caplog.set_level(logging.INFO, logger="lvsa")
    second = lvsa.apply(pipe, lvsa.LVSASettings(sparsity_scale=0.5))
    assert second is not first and not first.layers and len(second.layers) == 4
    assert "replacing it" in caplog.text


# -- processors changed after apply -------------------------------------------------------------------------

@pytest.mark.parametrize("fallback", ["error", "warn"])
def test_processors_replaced_after_apply_are_noticed(fallback, caplog):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    pipe = _wan()
    handle = lvsa.apply(pipe, lvsa.LVSASettings(fallback=fallback))
    pipe.transformer.blocks[1].attn1.set_processor(WanAttnProcessor())
    caplog.set_level(logging.WARNING, logger="lvsa")
    if fallback == "error":
        with pytest.raises(ConfigError, match=r"processor_replaced.*blocks\.1\.attn1"):
            _generate(pipe)
        return
    _generate(pipe)
    assert "[LVSA-FALLBACK]" in caplog.text and "blocks.1.attn1" in caplog.text
    assert handle.stats.fallback_reasons["processor_replaced"] > 0
    user = pipe.transformer.blocks[1].attn1.processor
    handle.remove()  # restores only the layer lvsa still owns
    assert pipe.transformer.blocks[1].attn1.processor is user
    assert type(pipe.transformer.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"


def test_set_attn_processor_on_the_whole_model_is_noticed():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    pipe = _wan()
    handle = lvsa.apply(pipe, lvsa.LVSASettings(fallback="warn"))
    pipe.transformer.set_attn_processor(WanAttnProcessor())
    _generate(pipe)
    assert handle.stats.fallback_reasons.get("processor_replaced", 0) > 0
    assert handle.stats.sparse_calls == 0


# -- copies ---------------------------------------------------------------------------------------------------

def test_copying_a_model_with_lvsa_is_a_clear_error():
    pipe = _wan()
    lvsa.apply(pipe, lvsa.LVSASettings())
    with pytest.raises(TypeError, match=r"lvsa.remove\(model\), copy it"):
        copy.deepcopy(pipe.transformer)
    with pytest.raises(TypeError, match="cannot be copied or pickled"):
        pickle.dumps(pipe.transformer.blocks[0].attn1.processor)
    lvsa.remove(pipe)
    copy.deepcopy(pipe.transformer)  # and without it, copying works as before


# -- torch.compile ------------------------------------------------------------------------------------------

def test_apply_to_a_compiled_transformer_installs_on_the_model_inside():
    pipe = _wan()
    dense = _generate(pipe, frames=33)
    compiled = torch.compile(pipe.transformer)
    handle = lvsa.apply(compiled, lvsa.LVSASettings(sparsity_scale=1.0))
    assert handle.transformers[0] is pipe.transformer and len(handle.layers) == 2
    assert handle_of(compiled) is handle and lvsa.handle_of(compiled) is handle  # the README's name
    assert lvsa.remove(compiled)
    assert not handle.layers
    torch.testing.assert_close(_generate(pipe, frames=33), dense)
