"""Every diffusers video transformer lvsa knows, as data: the declared families it runs (:data:`DECLARED`,
run by :class:`lvsa.adapters.declared.DeclaredAdapter`), the families with an adapter module of their own
(Wan, HunyuanVideo 1.5, CogVideoX: :data:`ADAPTER_MODULES`), and the classes it refuses, with the reason
(:data:`REFUSED`). ``lvsa models`` and the README's table are printed from here (:mod:`lvsa.models_table`).
Pure Python: nothing here imports torch or diffusers.

A declared horizon is the number of video frames the family's diffusers pipeline generates by default, in
latent frames (``(frames - 1) // vae_temporal + 1``): the length the checkpoints were published for. Its
source names the pipeline, and ``tests/test_families.py`` reads that default off the pipeline's signature."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Variant:
    """One checkpoint line of a family: its name, its reference horizon in latent frames and where that number
    comes from. ``when`` holds the config values that identify it (empty: the family's default variant)."""

    name: str
    reference_latent_frames: int
    source: str
    when: Mapping[str, Any] = field(default_factory=dict)
    #: the variant's VAE frames per latent frame, where it differs from the family's
    vae_temporal_factor: int | None = None
    #: why lvsa does not run this variant ("" where it does): ``lvsa.apply`` stops with it
    refusal: str = ""

    def matches(self, config: Any) -> bool:
        return all(_config_value(config, key) == value for key, value in self.when.items())


@dataclass(frozen=True)
class Family:
    """What lvsa needs to know of one family of diffusers video transformers.

    ``layers`` name the video self-attention modules as patterns over ``named_modules()`` (``*`` is one name
    component: ``blocks.*.attn1``), in the order dense layer indices count them. ``other_tokens`` says where
    the tokens that are not video (text, images) sit in the sequence a layer attends over: ``none``,
    ``before`` or ``after`` the video. ``mask`` says what the model passes as ``attn_mask`` to those layers:
    ``none``, or ``key_padding`` (a mask over the keys of the joined sequence whose video part is valid by
    construction: lvsa honours its text part). ``grid`` is ``latent`` (the ``hidden_states`` input is
    ``[B, C, F, H, W]``, patched by the config's ``patch_size``/``patch_size_t``; ``latent_list``: a list of
    per-sample ``[C, F, H, W]`` latents of one size) or ``forward_sizes`` (the
    input is already a token sequence, and the forward's ``num_frames``, ``height`` and ``width`` give the
    latent grid; a family with ``grid_coordinates`` reads the grid off that argument's per-token
    ``[B, 3, N]`` ``(t, h, w)`` coordinates when a call gives no sizes) or ``packed_rows`` (one packed
    sequence of several modalities, described per row by the
    forward's ``position_ids`` (rotary ``(t, h, w)``) and ``video_indices``: the video rows that end the
    sequence are the grid, a frame per run of equal ``t``; everything before them counts as other tokens)."""

    name: str
    classes: tuple[str, ...]
    layers: tuple[str, ...]
    variants: tuple[Variant, ...]
    pipelines: tuple[str, ...]
    vae_temporal_factor: int
    vae_spatial_factor: int
    default_height: int
    default_width: int
    #: the transformer's spatial patch in the default checkpoint (a loaded model's config wins)
    patch_size: int = 2
    other_tokens: Literal["none", "before", "after"] = "none"
    mask: Literal["none", "key_padding"] = "none"
    grid: Literal["latent", "latent_list", "forward_sizes", "packed_rows"] = "latent"
    #: with ``forward_sizes``: the forward's argument of per-token ``(t, h, w)`` coordinates, ``[B, 3, N]``,
    #: that gives the grid when a call passes them instead of the sizes (checked to be one frame-major grid)
    grid_coordinates: str | None = None
    #: how the forward's timestep tells the denoising step: ``timestep`` (the forward's timestep, which falls
    #: over the loop) or ``packed_rows`` (a table of timesteps indexed per row by ``timestep_indices``: the
    #: last row's, which rises from 0 to 1 over the loop)
    step_clock: Literal["timestep", "packed_rows"] = "timestep"
    #: a VAE that encodes fixed chunks: (video frames, latent frames) per chunk (:attr:`ModelFamily.vae_chunk`)
    vae_chunk: tuple[int, int] | None = None
    #: the call the model's processor attends with, where lvsa takes over: diffusers' ``dispatch_attention_fn``,
    #: or torch's ``F.scaled_dot_product_attention`` for processors that call it themselves
    attention_call: Literal["dispatch_attention_fn", "F.scaled_dot_product_attention"] = "dispatch_attention_fn"
    #: under ``torch.compile`` the layers run outside the compiled graph (a processor that breaks the graph
    #: itself, such as Mochi's per-sample loop)
    eager_under_compile: bool = False
    #: where frames, height and width sit in ``hidden_states`` (``grid="latent"``)
    latent_axes: tuple[int, int, int] = (2, 3, 4)
    #: processor arguments that, when true, make the model's own processor skip attention by design (LTX-2's
    #: spatio-temporal guidance pass, which takes the value projection): such a call never reaches the attention
    #: call, and lvsa lets it pass; any other call that does not reach it is an error (``not_dispatched``)
    skip_arguments: tuple[str, ...] = ()
    #: lvsa's Ulysses and ring paths are declared (and tested) for the family, with the model's own diffusers
    #: context-parallel plan or :attr:`cp_plan`
    context_parallel: bool = False
    #: diffusers' sharding plan for a model that ships none, as data: ``{module: {input: ("split", dim,
    #: expected_dims, split_output)}}`` (a list of those for an input that is a list of tensors) and
    #: ``{module: ("gather", dim, expected_dims)}``; a module name may end in ``.-1``, the last module of a
    #: list (``blocks.-1``), and ``""`` is the transformer's own forward; ``{module: ("split_values", dim,
    #: expected_dims)}`` splits every table of a module's dict output, and ``{module: {input: ("split_within",
    #: index, dim, expected_dims)}}`` every tensor at ``input[index]`` of a nested tuple, which diffusers' hooks
    #: cannot (lvsa's hooks), ``{module: {input: ("split_input", dim, expected_dims)}}`` splits an input tensor
    #: where diffusers' hook cannot take the module's output, and ``{module: ("gather_item", index, dim,
    #: expected_dims)}`` gathers the tensor at
    #: ``output[index]`` of a module's tuple output; for a packed sequence (``grid="packed_rows"``)
    #: ``{module: {input: ("split_tail", dim)}}`` splits only the video rows that end it (a tensor or a tuple of
    #: tensors) and ``{module: ("gather_tail", dim)}`` gathers them; ``expected_dims=None`` splits a tensor of any
    #: rank; ``{module: {input: ("gather_input", dim, expected_dims)}}`` gathers an input from every rank, and
    #: ``{module: ("frame_grid", grid_input, table_input)}`` gives modules (a pattern) whose rotary embedding
    #: counts rows from the grid's start (WanAnimate2's ``rope_apply``) this rank's shard of the grid: the
    #: per-sample ``(frames, height, width)`` rows cut to the shard's frames, and the rotary table's time columns
    #: (the first ``c - 2 * (c // 3)`` of its ``c``, Wan's split) starting at the shard's first frame
    cp_plan: Mapping[str, Any] | None = None
    #: forward arguments whose value makes a forward run whole on every rank under context parallelism: nothing
    #: is split or gathered, and its layers attend in one process each (WanAnimate2's reference pass, once per
    #: segment, whose cached keys every rank then holds whole); its ``cp_plan`` entries must all be lvsa's own
    cp_whole_when: Mapping[str, Any] = field(default_factory=dict)
    #: why the model's own attention cannot run under :attr:`cp_plan` ("" where it can): its self-attention must
    #: run through lvsa, and a forward under context parallelism without lvsa installed is an error
    cp_needs_lvsa: str = ""
    #: forward arguments that must be unset (or false) under context parallelism, with why
    cp_refused_arguments: Mapping[str, str] = field(default_factory=dict)
    #: forward arguments that must hold one value per sample (at most one dimension) under context parallelism,
    #: with why (a per-token timestep embedding that :attr:`cp_plan` does not split)
    cp_per_sample_arguments: Mapping[str, str] = field(default_factory=dict)
    #: every shard must hold whole latent frames (per-frame inputs, such as Wan Animate's motion features, are
    #: split with the frames)
    cp_whole_frames: bool = False
    #: attention layers whose keys are whole on every rank under :attr:`cp_plan` (cross-attention to a text
    #: that is not split): they run without diffusers' context parallelism, each rank for its own queries
    cp_local_layers: tuple[str, ...] = ()
    #: attention layers whose queries are whole on every rank but whose keys are split (LTX-2's audio attending
    #: the video), with the keyword inputs that carry those keys and their token dimension: under Ulysses alone
    #: diffusers runs them; under ring attention (which diffusers' native backend lacks) each rank gathers those
    #: inputs (tensors, or tuples of tensors) from every rank and runs the layer locally
    cp_ring_gathered: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    #: config values the model must have under context parallelism: ``{key: (accepted values, why others
    #: are refused)}``
    cp_accepted_config: Mapping[str, tuple[tuple[Any, ...], str]] = field(default_factory=dict)
    #: ring attention is declared too (a model whose cross-attention diffusers cannot run in a ring on every
    #: backend gets Ulysses only)
    ring: bool = True
    #: why context parallelism is not declared (every family without it says why)
    no_context_parallel: str = ""
    #: keys a layer attends besides its video: ``none``, or ``packed_by_frame`` (WanAnimate2's in-context
    #: reference: a generation pass packs the video and a reference pass's cached keys and values into one
    #: buffer, and the model's flex ``BlockMask`` lets frame ``f`` see reference frame ``f - 1``; lvsa plans the
    #: video, attends each frame's reference beside it, and leaves a call whose plan is dense to the model)
    reference_keys: Literal["none", "packed_by_frame"] = "none"
    #: the forward's per-frame token types (``[B, F]``): the nonzero frames that end the latent are reference
    #: frames appended after the video (Kandinsky 6's image, at the first frame's rotary position). They leave
    #: the grid and attend, and are attended by, every frame, as other tokens after the video do
    #: (``other_tokens="after"``); a reference frame inside the video is refused
    reference_frames: str | None = None
    #: pipelines of the family's transformers that lvsa refuses, with why (``lvsa.apply`` stops on them)
    refused_pipelines: Mapping[str, str] = field(default_factory=dict)
    #: what puts tokens beside the grid in a layer's sequence that lvsa does not plan (named in the refusal of
    #: such a call, so that the user learns which input caused it)
    unplanned_tokens: str = ""
    #: what a user should know (shown in the table)
    notes: str = ""

    def variant(self, config: Any) -> Variant:
        for candidate in self.variants:
            if candidate.when and candidate.matches(config):
                return candidate
        return next(v for v in self.variants if not v.when)

    def model_family(self, variant: Variant | None = None) -> Any:
        """lvsa's :class:`~lvsa.geometry.ModelFamily` of a variant (the default one when ``None``): what the
        planner, ``lvsa plan --model`` and the table know of it."""
        from dataclasses import replace

        from .geometry import ModelFamily

        default = next(v for v in self.variants if not v.when)
        found = ModelFamily(self.name, default.reference_latent_frames,
                            default.vae_temporal_factor or self.vae_temporal_factor, self.vae_spatial_factor,
                            self.patch_size, None if self.other_tokens == "none" else self.other_tokens,
                            self.default_height, self.default_width, vae_chunk=self.vae_chunk)
        if variant is None or variant is default:
            return found
        return replace(found, name=f"{self.name} ({variant.name})",
                       reference_latent_frames=variant.reference_latent_frames,
                       vae_temporal_factor=variant.vae_temporal_factor or self.vae_temporal_factor)

    def layer_pattern(self, layers: tuple[str, ...] | None = None) -> re.Pattern[str]:
        """A pattern of :attr:`layers` (or of ``layers``: names with ``*`` for one name component)."""
        parts = ["\\.".join("[^.]+" if piece == "*" else re.escape(piece) for piece in p.split("."))
                 for p in (self.layers if layers is None else layers)]
        return re.compile("|".join(f"(?:{part})" for part in parts))


@dataclass(frozen=True)
class Refusal:
    """A diffusers video transformer lvsa does not run, and why (said by ``lvsa.apply`` and ``lvsa models``).
    ``final``: its attention is not full attention over the 3-D grid, so a frame pattern does not apply;
    otherwise it is full attention that lvsa has not declared yet, and ``reason`` says what it needs."""

    classes: tuple[str, ...]
    reason: str
    final: bool = True

    def message(self, cls: str) -> str:
        if self.final:
            return f"lvsa does not run {cls}: {self.reason}"
        return f"lvsa does not run {cls} yet: {self.reason}"


def _config_value(config: Any, key: str) -> Any:
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return tuple(value) if isinstance(value, list) else value



def _pipeline_default(pipeline: str, frames: int) -> str:
    return f"{pipeline} default num_frames={frames}"


#: sharding of a joint-attention model whose text joins inside each layer: the video tokens split where the
#: blocks start and gathered after the output projection, the text whole on every rank (lvsa takes its heads)
_VIDEO_TOKENS_SPLIT = {"transformer_blocks.0": {"hidden_states": ("split", 1, 3, False)}, "proj_out": ("gather", 1, 3)}
#: a rotary module's (cos, sin) tables, one row per video token, split with them
_ROPE_ROWS_SPLIT = {0: ("split", 0, 2, True), 1: ("split", 0, 2, True)}

DECLARED: tuple[Family, ...] = (
    Family(
        name="wan-vace",
        classes=("WanVACETransformer3DModel",),
        layers=("blocks.*.attn1", "vace_blocks.*.attn1"),
        variants=(Variant("Wan 2.1 VACE", 21, _pipeline_default("WanVACEPipeline", 81)),),
        pipelines=("WanVACEPipeline",),
        vae_temporal_factor=4, vae_spatial_factor=8, default_height=480, default_width=832,
        notes="the control (VACE) blocks attend over the same grid and are planned like the main blocks",
        context_parallel=True,
        # Wan's sharding, with the control branch's two inputs split where it starts
        cp_plan={"rope": {0: ("split", 1, 4, True), 1: ("split", 1, 4, True)},
                 "vace_blocks.0": {"hidden_states": ("split", 1, 3, False),
                                   "control_hidden_states": ("split", 1, 3, False)},
                 "blocks.0": {"hidden_states": ("split", 1, 3, False)},
                 "proj_out": ("gather", 1, 3)},
    ),
    Family(
        name="skyreels-v2",
        classes=("SkyReelsV2Transformer3DModel",),
        layers=("blocks.*.attn1",),
        variants=(Variant("SkyReels-V2 540P", 25, _pipeline_default("SkyReelsV2Pipeline", 97)),),
        pipelines=("SkyReelsV2Pipeline", "SkyReelsV2ImageToVideoPipeline", "SkyReelsV2DiffusionForcingPipeline",
                   "SkyReelsV2DiffusionForcingImageToVideoPipeline", "SkyReelsV2DiffusionForcingVideoToVideoPipeline"),
        vae_temporal_factor=4, vae_spatial_factor=8, default_height=544, default_width=960,
        notes="diffusion forcing with causal_block_size > 1 passes a causal frame mask, which lvsa refuses "
              "(LVSA_FALLBACK=warn runs those layers dense)",
        context_parallel=True,
        # Wan's sharding (SkyReels-V2 is Wan's backbone), without the per-token timestep Wan 2.2 TI2V has
        cp_plan={"rope": {0: ("split", 1, 4, True), 1: ("split", 1, 4, True)},
                 "blocks.0": {"hidden_states": ("split", 1, 3, False)},
                 "proj_out": ("gather", 1, 3)},
        cp_refused_arguments={"enable_diffusion_forcing": "diffusion forcing's per-frame timestep embedding is "
                                                          "not sharded with the sequence"},
        # the text is whole on every rank: its cross-attention runs locally (diffusers would ask its backend for
        # ring attention, which its native backend lacks)
        cp_local_layers=("blocks.*.attn2",),
    ),
    Family(
        name="chronoedit",
        classes=("ChronoEditTransformer3DModel",),
        layers=("blocks.*.attn1",),
        variants=(Variant("ChronoEdit", 21, _pipeline_default("ChronoEditPipeline", 81)),),
        pipelines=("ChronoEditPipeline",),
        vae_temporal_factor=4, vae_spatial_factor=8, default_height=480, default_width=832,
        context_parallel=True,
    ),
    Family(
        name="hunyuan-video",
        classes=("HunyuanVideoTransformer3DModel",),
        layers=("transformer_blocks.*.attn", "single_transformer_blocks.*.attn"),
        variants=(Variant("HunyuanVideo T2V, I2V", 33, _pipeline_default("HunyuanVideoPipeline", 129)),),
        pipelines=("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline", "HunyuanSkyreelsImageToVideoPipeline"),
        vae_temporal_factor=4, vae_spatial_factor=8, default_height=720, default_width=1280,
        other_tokens="after", mask="key_padding",
        notes="joint attention: the text tokens follow the video; their padding mask is honoured",
        context_parallel=True,
        # the forward builds the joint mask before the split: it spans the whole video
        cp_plan={"rope": _ROPE_ROWS_SPLIT, **_VIDEO_TOKENS_SPLIT},
        cp_accepted_config={"image_condition_type": (
            (None, "latent_concat"), "the token_replace image-to-video model modulates the first frame's tokens "
                                     "apart, counted from the start of each rank's shard")},
    ),
    Family(
        name="ltx-video",
        classes=("LTXVideoTransformer3DModel",),
        layers=("transformer_blocks.*.attn1",),
        variants=(Variant("LTX-Video 0.9", 21, _pipeline_default("LTXPipeline", 161)),),
        pipelines=("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline"),
        vae_temporal_factor=8, vae_spatial_factor=32, default_height=512, default_width=704, patch_size=1,
        # LTXConditionPipeline passes the tokens' coordinates, not the sizes
        grid="forward_sizes", grid_coordinates="video_coords",
        notes="LTXConditionPipeline: conditions at frame 0, the grid read off video_coords; a condition at a later "
              "frame_index joins the sequence as tokens apart from the grid and is refused",
        refused_pipelines={"LTXI2VLongMultiPromptPipeline": (
            "each window after the first appends the previous window's tail frames (and any guidance and "
            "negative-index frames) after its own, at rotary coordinates of the window's head, which lvsa does "
            "not plan; generate the long video in one pass with LTXPipeline or LTXConditionPipeline")},
        context_parallel=True,
        # diffusers' own plan splits the text too, and then its masked cross-attention needs context parallelism
        # (which diffusers' native backend lacks); here only the video and its rotary rows are split, and the
        # cross-attention attends the whole text on every rank
        cp_plan={"rope": {0: ("split", 1, 3, True), 1: ("split", 1, 3, True)},
                 "transformer_blocks.0": {"hidden_states": ("split", 1, 3, False)},
                 "proj_out": ("gather", 1, 3)},
        cp_local_layers=("transformer_blocks.*.attn2",),
        cp_per_sample_arguments={"timestep": "the image-to-video and condition pipelines' per-token timestep "
                                             "is embedded for every token before the blocks, unsplit"},
    ),
    Family(
        name="cosmos",
        classes=("CosmosTransformer3DModel",),
        layers=("transformer_blocks.*.attn1",),
        # Cosmos 1.0 (its own 8x8x8 VAE) has the learnable extra position embedding; Predict 2 and 2.5 run on
        # Wan's VAE (4x temporal)
        variants=(Variant("Cosmos Predict 2, 2.5", 24, _pipeline_default("Cosmos2VideoToWorldPipeline", 93),
                          vae_temporal_factor=4),
                  Variant("Cosmos 1.0", 16, _pipeline_default("CosmosTextToWorldPipeline", 121),
                          when={"extra_pos_embed_type": "learnable"})),
        pipelines=("CosmosTextToWorldPipeline", "CosmosVideoToWorldPipeline", "Cosmos2VideoToWorldPipeline",
                   "Cosmos2_5_PredictBasePipeline"),
        vae_temporal_factor=8, vae_spatial_factor=8, default_height=704, default_width=1280,
        notes="the variant is read off extra_pos_embed_type (learnable: 1.0); Cosmos 1.0's VAE normalises its "
              "latents with statistics of 16 latent frames, so its pipelines encode and decode at most 121 frames "
              "(beyond, diffusers stops with a size mismatch; output_type='latent' keeps the latents)",
        context_parallel=True,
        # the video tokens and their rotary rows split where the blocks start; what the forward gives every block
        # per token (Video2World's per-frame timestep embeddings, Cosmos 1.0's learnable position embedding) split
        # by each block (a per-sample embedding has two dimensions and passes whole); the last block's output is
        # gathered before the output norm, which reads the embeddings whole
        cp_plan={"rope": {0: ("split", 0, 2, True), 1: ("split", 0, 2, True)},
                 "transformer_blocks.0": {"hidden_states": ("split", 1, 3, False)},
                 "transformer_blocks.*": {"embedded_timestep": ("split", 1, 3, False),
                                          "temb": ("split", 1, 3, False),
                                          "extra_pos_emb": ("split", 1, 3, False)},
                 "transformer_blocks.-1": ("gather", 1, 3)},
        cp_local_layers=("transformer_blocks.*.attn2",),
        cp_refused_arguments={"block_controlnet_hidden_states": "ControlNet residuals arrive per token, unsplit"},
    ),
    Family(
        name="consisid",
        classes=("ConsisIDTransformer3DModel",),
        layers=("transformer_blocks.*.attn1",),
        variants=(Variant("ConsisID", 13, "the config's default sample_frames=49 (video frames)"),),
        pipelines=("ConsisIDPipeline",),
        vae_temporal_factor=4, vae_spatial_factor=8, default_height=480, default_width=720,
        other_tokens="before", attention_call="F.scaled_dot_product_attention", latent_axes=(1, 3, 4),
        notes="CogVideoX's joint attention (text first); the identity branch's cross-attention stays dense",
        context_parallel=True,
        # CogVideoX's sharding: the rotary tables arrive from the pipeline, split at the forward
        cp_plan={"": {"image_rotary_emb": [("split", 0, 2, False), ("split", 0, 2, False)]}, **_VIDEO_TOKENS_SPLIT},
    ),
    Family(
        name="easyanimate",
        classes=("EasyAnimateTransformer3DModel",),
        layers=("transformer_blocks.*.attn1",),
        variants=(Variant("EasyAnimate V5.1", 13, _pipeline_default("EasyAnimatePipeline", 49)),),
        pipelines=("EasyAnimatePipeline", "EasyAnimateInpaintPipeline", "EasyAnimateControlPipeline"),
        vae_temporal_factor=4, vae_spatial_factor=8, default_height=512, default_width=512,
        other_tokens="before", attention_call="F.scaled_dot_product_attention",
        notes="joint attention (text first)",
        context_parallel=True,
        cp_plan={"rope_embedding": _ROPE_ROWS_SPLIT, **_VIDEO_TOKENS_SPLIT},
    ),
    Family(
        name="mochi",
        classes=("MochiTransformer3DModel",),
        layers=("transformer_blocks.*.attn1",),
        # MochiPipeline's default num_frames (19) is a short preview, not the release's length
        variants=(Variant("Mochi 1", 28, "the Mochi 1 release's 163 frames (5.4 s at 30 fps)"),),
        pipelines=("MochiPipeline",),
        vae_temporal_factor=6, vae_spatial_factor=8, default_height=480, default_width=848,
        other_tokens="after", attention_call="F.scaled_dot_product_attention", eager_under_compile=True,
        notes="joint attention (text after the video); the model cuts each prompt's padding off per sample, so "
              "every call holds only valid text; under torch.compile its attention layers run outside the graph, "
              "where the model breaks it anyway",
        context_parallel=True,
        # the video tokens and their rotary rows ([tokens, heads, dim / 2]) split where the blocks start; the text
        # whole on every rank, each sample's valid tokens as the model cuts them
        cp_plan={"rope": {0: ("split", 0, 3, True), 1: ("split", 0, 3, True)},
                 "transformer_blocks.0": {"hidden_states": ("split", 1, 3, False)},
                 "proj_out": ("gather", 1, 3)},
    ),
    Family(
        name="allegro",
        classes=("AllegroTransformer3DModel",),
        layers=("transformer_blocks.*.attn1",),
        variants=(Variant("Allegro", 22, "the config's default sample_frames=22 (latent frames)"),),
        pipelines=("AllegroPipeline",),
        vae_temporal_factor=4, vae_spatial_factor=8, default_height=720, default_width=1280,
        attention_call="F.scaled_dot_product_attention",
        notes="a video attention_mask (padded frames) is refused",
        context_parallel=True,
        # the video tokens split where the blocks start; its rotary embedding arrives as nested tuples (per-axis
        # tables, per-token positions), which diffusers' hooks cannot split: lvsa splits the positions for each
        # block and keeps the tables whole; the text's cross-attention runs locally
        cp_plan={"transformer_blocks.0": {"hidden_states": ("split", 1, 3, False)},
                 "transformer_blocks.*": {"image_rotary_emb": ("split_within", 1, 1, 2)},
                 "proj_out": ("gather", 1, 3)},
        cp_local_layers=("transformer_blocks.*.attn2",),
    ),
    Family(
        name="motif-video",
        classes=("MotifVideoTransformer3DModel",),
        layers=("transformer_blocks.*.attn", "single_transformer_blocks.*.attn"),
        variants=(Variant("Motif-Video", 31, _pipeline_default("MotifVideoPipeline", 121)),),
        pipelines=("MotifVideoPipeline", "MotifVideoImage2VideoPipeline"),
        vae_temporal_factor=4, vae_spatial_factor=8, default_height=736, default_width=1280,
        other_tokens="after", mask="key_padding",
        notes="joint attention: the text tokens follow the video; their padding mask is honoured",
        context_parallel=True,
        # HunyuanVideo's sharding (an image's tokens join the text, whole on every rank)
        cp_plan={"rope": _ROPE_ROWS_SPLIT, **_VIDEO_TOKENS_SPLIT},
        cp_accepted_config={"num_decoder_layers": (
            (0,), "its decoder blocks attend a copy of the video taken before the first block, with the main "
                  "stream's video as their context, which a plan would have to shard and keep whole at once")},
    ),
    Family(
        name="anyflow",
        classes=("AnyFlowTransformer3DModel",),
        layers=("blocks.*.attn1",),
        variants=(Variant("AnyFlow", 21, _pipeline_default("AnyFlowPipeline", 81)),),
        pipelines=("AnyFlowPipeline",),
        vae_temporal_factor=4, vae_spatial_factor=8, default_height=480, default_width=832,
        latent_axes=(1, 3, 4),  # its latents are [B, F, C, H, W]
        notes="the bidirectional AnyFlow, a timestep per frame (the frame-autoregressive AnyFlowFAR is refused)",
        context_parallel=True,
        # the video tokens split where the blocks start; its rotary tables come as a dict (diffusers' hooks split
        # tensors and lists: lvsa splits the dict's tables); each block splits its own copy of the per-token
        # timestep embedding; the last block's output is gathered before the output norm, which reads it whole
        cp_plan={"rope": ("split_values", 2, 4),
                 "blocks.0": {"hidden_states": ("split", 1, 3, False)},
                 "blocks.*": {"temb": ("split", 1, 4, False)},
                 "blocks.-1": ("gather", 1, 3)},
        cp_local_layers=("blocks.*.attn2",),
    ),
    Family(
        name="ltx-2",
        classes=("LTX2VideoTransformer3DModel",),
        layers=("transformer_blocks.*.attn1",),
        variants=(Variant("LTX-2", 16, _pipeline_default("LTX2InContextPipeline", 121)),),
        pipelines=("LTX2Pipeline", "LTX2ImageToVideoPipeline", "LTX2ConditionPipeline", "LTX2InContextPipeline"),
        vae_temporal_factor=8, vae_spatial_factor=32, default_height=512, default_width=768, patch_size=1,
        grid="forward_sizes", skip_arguments=("all_perturbed",),
        notes="the video stream's self-attention; the audio stream and the audio-video cross-attention stay "
              "dense; a video self-attention mask (LTX2InContextPipeline's reference videos) and the keyframe "
              "tokens that LTX2ConditionPipeline appends for a condition past index 0 are refused; the "
              "spatio-temporal guidance pass skips attention in its blocks, as the model does",
        unplanned_tokens="LTX2ConditionPipeline appends keyframe tokens after the video for a condition past "
                         "index 0, and LTX2InContextPipeline a reference video's tokens",
        context_parallel=True,
        # the video tokens and their rotary rows (self- and cross-modal attention's) split; the text and the audio
        # whole on every rank: the layers whose keys are whole run locally, and the audio's attention to the
        # video runs with diffusers' Ulysses, or over the video gathered from every rank under ring attention;
        # the rotary tables' tokens are their second to last dimension in both rope types ([B, T, D]
        # interleaved, [B, H, T, D / 2] split)
        cp_plan={"rope": {0: ("split", -2, None, True), 1: ("split", -2, None, True)},
                 "cross_attn_rope": {0: ("split", -2, None, True), 1: ("split", -2, None, True)},
                 "transformer_blocks.0": {"hidden_states": ("split", 1, 3, False)},
                 "proj_out": ("gather", 1, 3)},
        cp_local_layers=("transformer_blocks.*.attn2", "transformer_blocks.*.audio_attn1",
                         "transformer_blocks.*.audio_attn2", "transformer_blocks.*.audio_to_video_attn"),
        cp_ring_gathered={"transformer_blocks.*.video_to_audio_attn": {"encoder_hidden_states": 1,
                                                                       "key_rotary_emb": -2}},
        cp_per_sample_arguments={"timestep": "the image-to-video and condition pipelines' per-token timestep "
                                             "is embedded for every token before the blocks, unsplit"},
    ),
    Family(
        name="wan-animate",
        classes=("WanAnimateTransformer3DModel",),
        layers=("blocks.*.attn1",),
        # the grid holds the reference image's latent frame, then the segment's
        variants=(Variant("Wan 2.2 Animate", 21, "WanAnimatePipeline default segment_frame_length=77 "
                                                 "(+1 reference frame)"),),
        pipelines=("WanAnimatePipeline",),
        vae_temporal_factor=4, vae_spatial_factor=8, default_height=720, default_width=1280,
        notes="the reference image is the grid's first frame (a global anchor); the pipeline cuts long videos "
              "into segments of segment_frame_length, so lvsa engages when segments pass the horizon; the face "
              "adapter's attention stays dense",
        context_parallel=True,
        # Wan's sharding; each face adapter attends a frame's tokens to that frame's motion features, so the
        # motion features split with the frames (the shards hold whole frames), and it runs locally, as does
        # the cross-attention to the text and image
        cp_plan={"rope": {0: ("split", 1, 4, True), 1: ("split", 1, 4, True)},
                 "blocks.0": {"hidden_states": ("split", 1, 3, False)},
                 "face_adapter.*": {"encoder_hidden_states": ("split", 1, 4, False)},
                 "proj_out": ("gather", 1, 3)},
        cp_local_layers=("blocks.*.attn2", "face_adapter.*"), cp_whole_frames=True,
    ),
    Family(
        name="wan-animate-2",
        classes=("WanAnimate2Transformer3DModel",),
        layers=("blocks.*.self_attn",),
        # the generation grid holds the reference image's latent frame, then the segment's 21
        variants=(Variant("Wan-Animate 2", 22, "WanAnimate2ModularPipeline default segment_frame_length=81 "
                                               "(+1 reference frame)"),),
        pipelines=("WanAnimate2ModularPipeline",),
        vae_temporal_factor=4, vae_spatial_factor=8, default_height=800, default_width=640,
        grid="latent_list", reference_keys="packed_by_frame", eager_under_compile=True,
        notes="both passes are planned: the reference pass's self-attention over the driving video's segment, "
              "and the generation pass's over its video, where each frame also attends its driving frame's cached "
              "keys as the model's BlockMask says; a generation call whose plan is dense runs the model's own flex "
              "attention; the pipeline cuts long videos into segments of segment_frame_length, so lvsa engages "
              "when segments pass the horizon; under torch.compile its self-attention runs outside the graph "
              "(in the graph within the horizon, where lvsa leaves the model as it is); under context parallelism "
              "the reference pass runs whole on every rank, once per segment",
        context_parallel=True,
        # diffusers ships no plan: the generation pass is split where the blocks start and gathered where the
        # head starts; its processor applies the rotary tables to rows counted from the grid's start, so each
        # block gets its shard's grid; the reference pass runs whole, so every rank caches every reference key
        # (each generation frame attends its driving frame's, whichever rank holds the frame)
        cp_plan={"blocks.0": {"hidden_states": ("split_input", 1, 3)},
                 "blocks.*": ("frame_grid", "grid_sizes", "rotary_emb"),
                 "head": {"x": ("gather_input", 1, 3)}},
        cp_whole_when={"kv_cache_mode": "extract"},
        cp_needs_lvsa="its generation pass's flex attention has no context parallelism: each rank would attend "
                      "only its own frames",
        cp_local_layers=("blocks.*.cross_attn",), cp_whole_frames=True,
    ),
    Family(
        name="kandinsky-5",
        classes=("Kandinsky5Transformer3DModel",),
        layers=("visual_transformer_blocks.*.self_attention",),
        variants=(Variant("Kandinsky 5.0 Video", 31, _pipeline_default("Kandinsky5T2VPipeline", 121)),
                  Variant("Kandinsky 5.0 Video with NABLA attention", 0, "", when={"attention_type": "nabla"},
                          refusal="the checkpoint runs its own NABLA block-sparse attention (attention_type="
                                  "'nabla'), whose token order and mask are the model's; a second sparse pattern on "
                                  "top would not be the model's")),
        pipelines=("Kandinsky5T2VPipeline", "Kandinsky5I2VPipeline"),
        vae_temporal_factor=4, vae_spatial_factor=8, default_height=512, default_width=768,
        latent_axes=(1, 2, 3),  # its latents are channels last: [B, F, H, W, C]
        notes="the video blocks' self-attention (the text has blocks of its own and reaches the video through "
              "cross-attention, which stays dense)",
        context_parallel=True,
        # the flattened video enters the first video block split; every block splits its own copy of the rope
        # (the forward hands the same full tensor to each); the last video block's output is gathered before
        # the output layer unflattens it
        cp_plan={"visual_transformer_blocks.0": {"visual_embed": ("split", 1, 3, False)},
                 "visual_transformer_blocks.*": {"rope": ("split", 1, 6, False)},
                 "visual_transformer_blocks.-1": ("gather", 1, 3)},
        # the text and its own blocks are whole on every rank: they and the video's cross-attention run locally
        cp_local_layers=("text_transformer_blocks.*.self_attention", "visual_transformer_blocks.*.cross_attention"),
    ),
    Family(
        name="kandinsky-6",
        classes=("Kandinsky6Transformer3DModel",),
        layers=("visual_transformer_blocks.*.video_dec_block.self_attention",),
        variants=(Variant("Kandinsky 6 TI2VA", 31, _pipeline_default("Kandinsky6TI2VAPipeline", 121)),),
        pipelines=("Kandinsky6TI2VAPipeline",),
        vae_temporal_factor=4, vae_spatial_factor=8, default_height=512, default_width=768,
        latent_axes=(1, 2, 3),  # its latents are channels last: [B, F, H, W, C]
        # image-to-video appends the image's latent as a frame after the video, marked by its token type
        other_tokens="after", reference_frames="visual_token_type_ids",
        notes="the video stream's self-attention in the fused video/audio blocks; the audio stream, the "
              "audio-video and text cross-attention stay dense; the image frame that image-to-video appends "
              "after the video attends, and is attended by, every frame",
        context_parallel=True,
        # the video tokens and their rotary rows split where the fused blocks start; the text and the audio stay
        # whole on every rank, so the layers whose keys are whole run locally, and the audio's attention to the
        # video runs with diffusers' Ulysses, or over the video gathered from every rank under ring attention;
        # the last block returns (video, audio or None): lvsa gathers the video alone
        # (split by lvsa: diffusers' split hook refuses the blocks' (video, None) output without audio)
        cp_plan={"visual_transformer_blocks.0": {"vis": ("split_input", 1, 3)},
                 "visual_transformer_blocks.*": {"vis_rope": ("split_input", 0, 5)},
                 "visual_transformer_blocks.-1": ("gather_item", 0, 1, 3)},
        cp_local_layers=("video_text_transformer_blocks.*.attn", "audio_text_transformer_blocks.*.attn",
                         "visual_transformer_blocks.*.video_dec_block.cross_attention",
                         "visual_transformer_blocks.*.audio_dec_block.*",
                         "visual_transformer_blocks.*.va_cross_attention"),
        cp_ring_gathered={"visual_transformer_blocks.*.av_cross_attention": {"encoder_hidden_states": 1,
                                                                            "rope_kv": 0}},
        cp_refused_arguments={"visual_token_type_ids": "the image frame that image-to-video appends after the "
                                                       "video would be split with it"},
    ),
    Family(
        name="minimax-h3",
        classes=("MiniMaxH3Transformer3DModel",),
        layers=("transformer_blocks.*.attn",),
        # its pipeline generates 5 to 15 s at 24 fps (its VAE takes 17n + 5 frames): the longest is the horizon
        variants=(Variant("MiniMax-H3", 102, "MiniMaxH3ModularPipeline max_duration=15 s at 24 fps: 345 frames"),),
        pipelines=("MiniMaxH3ModularPipeline",),
        vae_temporal_factor=4, vae_spatial_factor=16, default_height=768, default_width=1344, vae_chunk=(17, 5),
        other_tokens="before", grid="packed_rows", step_clock="packed_rows",
        notes="one packed sequence [text | keyframe or reference rows | soundtrack | video]: the target video's "
              "rows are the grid, every other row attends and is attended like text; its pipeline stops at 15 s, "
              "so lvsa engages for longer layouts (a pipeline whose max_duration is raised, or a caller's own); "
              "window and keyframe spacing in video frames are converted at 4 frames per latent frame (its VAE "
              "makes 5 latent frames of every 17 frames)",
        context_parallel=True,
        # only the video rows that end the packed sequence split (diffusers' own plan would split the text,
        # conditioning and audio rows with them): where the blocks start, and each block's copy of the per-row
        # AdaLN indices and rotary tables; every other row attends like text, whole on every rank
        cp_plan={"transformer_blocks.0": {"hidden_states": ("split_tail", 1)},
                 "transformer_blocks.*": {"adaln_indices": ("split_tail", 0), "rotary_emb": ("split_tail", 0)},
                 "transformer_blocks.-1": ("gather_tail", 1)},
        cp_local_layers=("token_refiner.refiner_blocks.*.attn",),
    ),
)

#: families that run through an adapter module of their own (a processor written for the model): per class,
#: the adapter's name and its variants as (key of lvsa.geometry.FAMILIES, variant, where the horizon comes from)
ADAPTER_MODULES: dict[str, tuple[str, tuple[tuple[str, str, str], ...]]] = {
    "WanTransformer3DModel": ("wan", (
        ("wan", "Wan 2.1/2.2 T2V, I2V, A14B", _pipeline_default("WanPipeline", 81)),
        ("wan-ti2v-5b", "Wan 2.2 TI2V-5B (48 latent channels)", "the TI2V-5B release's 121 frames"),
    )),
    "HunyuanVideo15Transformer3DModel": ("hunyuan", (
        ("hunyuan", "HunyuanVideo 1.5 T2V, I2V", "129 frames, HunyuanVideo's training length"),
    )),
    "CogVideoXTransformer3DModel": ("cogvideox", (
        ("cogvideox", "CogVideoX 2B, 5B", _pipeline_default("CogVideoXImageToVideoPipeline", 49)),
        ("cogvideox-1.5", "CogVideoX 1.5 (patch_size_t=2)", "documented 16N+1 frames with N <= 10: 161 frames"),
    )),
}

REFUSED: tuple[Refusal, ...] = (
    Refusal(("LatteTransformer3DModel",),
            "factorised attention: alternating spatial (per frame) and temporal (per position) layers, no "
            "attention over the 3-D grid for a frame pattern to sparsify"),
    Refusal(("SanaVideoTransformer3DModel",),
            "linear attention (ReLU kernels), already linear in the frame count: no attention matrix for a "
            "block-sparse pattern"),
    Refusal(("SanaWMTransformer3DModel",),
            "its main branch is linear attention over time (a gated delta rule with ReLU kernels): no attention "
            "matrix for a block-sparse pattern"),
    Refusal(("AnyFlowFARTransformer3DModel",),
            "frame-autoregressive: causal attention over chunks with a KV cache, not one bidirectional attention "
            "over the grid"),
    Refusal(("Kandinsky6SRTransformer3DModel",),
            "super-resolution over tiles with its own NABLA block-sparse attention (sparse_params); a second "
            "sparse pattern on top would not be the model's"),
    Refusal(("JoyImageEditTransformer3DModel", "JoyImageEditPlusTransformer3DModel"),
            "image editing: the frame axis holds a few reference and target images, not a video whose length "
            "grows past a horizon"),
    Refusal(("HunyuanVideoFramepackTransformer3DModel", "HeliosTransformer3DModel"),
            "generates a long video as fixed chunks (FramePack: latent_window_size=9, Helios: "
            "num_latent_frames_per_chunk=9 latent frames) attending compressed history tokens: every call "
            "stays far below a horizon, and the history tokens are not frames of the grid"),
    Refusal(("SanaWMLTX2RefinerTransformer3DModel",),
            "chunk-causal autoregressive refiner: it denoises block_size latent frames at a time against a "
            "sliding-window KV cache (attention sink, recent history, active block), already bounded per block, "
            "not one attention over the grid"),
)


def declared(name: str) -> Family:
    for family in DECLARED:
        if family.name == name:
            return family
    raise KeyError(name)


def plan_families() -> dict[str, Any]:
    """Every family ``lvsa plan --model`` knows: lvsa.geometry's and each declared family's default variant."""
    from .geometry import FAMILIES

    return {**FAMILIES, **{family.name: family.model_family() for family in DECLARED}}
