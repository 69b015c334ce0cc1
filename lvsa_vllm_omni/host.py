"""vLLM-Omni as an lvsa host: what a layer call is executed with, found from what vLLM-Omni passes.

- **Geometry**: the ``video_layout`` a model publishes on its self-attention metadata (Wan 2.1/2.2:
  ``latent_grid = (T, H, W)`` after patching, ``prefix_len`` tokens before the video, ``used_len`` real
  tokens; the rest of the sequence is padding that sequence parallelism appends, which lvsa leaves out).
  Tokens before the video are attended both ways, as text is.
- **Step**: the forward context's ``denoise_step_idx`` (the pipelines record it; both CFG branches see the
  same step).
- **Models that publish neither** (HunyuanVideo 1.5: video then text in one joint sequence, the text's padding
  in a ``[B, S]`` mask): a forward pre-hook on the transformer (:func:`install_transformer_hooks`) reports the
  grid and the timestep to the host, and lvsa's :class:`~lvsa.steps.StepTracker` follows the step.
- **Reference horizon**: the served model's family (Wan; Wan 2.2 TI2V-5B by its 48 latent channels), with
  ``LVSA_REFERENCE_LATENT_FRAMES`` as the override, warned about as ``lvsa.apply`` does.

One :class:`ServingHost` per process holds the plan cache, the fallback policy and the statistics; the
context of a forward is built once per (grid, step) and every layer of that forward shares it. The call goes
through :func:`lvsa.attention.execute`; under ``torch.compile`` it goes through the ``lvsa_vllm_omni::attention``
custom op, which reads the step at run time, so the compiled graph holds no guard on it."""

from __future__ import annotations

import threading
from typing import Any

import torch

from lvsa import log
from lvsa.attention import AttentionContext, DriverChoice, ExecutionStats, FallbackPolicy, PlanCache, execute
from lvsa.dense import DenseControls
from lvsa.geometry import FAMILIES, LatentGrid, ModelFamily
from lvsa.kernels.attention_ops import dense_attention
from lvsa.plan import rotates
from lvsa.planning import knobs_from_settings, settings_for_model
from lvsa.settings import LVSASettings, get_settings
from lvsa.steps import StepTracker

#: the transformers' latent channels of Wan 2.2 TI2V-5B (its 16x VAE), the Wan variant with its own horizon
_TI2V_5B_CHANNELS = 48
_SELF_ATTENTION = "vllm-omni self-attention"


def served_family(model_class_name: str | None, transformer_config: dict[str, Any]) -> ModelFamily:
    """The lvsa family of a served model, from vLLM-Omni's model class name and the transformer's config."""
    name = (model_class_name or "").lower()
    if "hunyuan" in name:
        return FAMILIES["hunyuan"]
    if transformer_config.get("in_channels") == _TI2V_5B_CHANNELS:
        return FAMILIES["wan-ti2v-5b"]
    return FAMILIES["wan"]


class ServingHost:
    """lvsa's state in one vLLM-Omni process: the settings, the model's knobs, the plans, the policy."""

    def __init__(self, settings: LVSASettings, family: ModelFamily) -> None:
        self.settings = settings_for_model(settings, family)
        DenseControls.from_settings(self.settings).refuse("the vLLM-Omni host")
        self.family = family
        self.knobs = knobs_from_settings(self.settings, family)
        self.stats = ExecutionStats()
        self.plans = PlanCache(self.stats)
        self.fallback = FallbackPolicy(self.settings.fallback, self.stats)
        self.driver = DriverChoice(self.settings.backend, self.settings.fallback)
        self.steps = StepTracker()
        #: the grid and step a transformer's pre-hook reported for the forward now running (models without
        #: video_layout)
        self.forward: tuple[LatentGrid, int] | None = None
        self._context: tuple[tuple[int, ...], AttentionContext] | None = None
        self._warned_no_step = False
        self._lock = threading.Lock()
        log.info(f"vLLM-Omni backend LVSA for {family.name} (reference_latent_frames="
                 f"{self.knobs.reference_latent_frames}, backend={self.settings.backend})")

    def begin_forward(self, grid: LatentGrid, timestep: Any) -> None:
        """A transformer's forward starts (models whose layers carry no ``video_layout``)."""
        published = current_step()
        step = self.steps.observe(timestep) if published is None else published
        self.forward = (grid, step)

    def context(self, grid: LatentGrid, step: int | None) -> AttentionContext:
        """The context of the forward over ``grid`` at denoising ``step`` (built once, shared by its layers)."""
        if step is None:
            if not self._warned_no_step:
                self._warned_no_step = True
                log.logger.warning("[LVSA] vLLM-Omni did not publish the denoising step (ForwardContext."
                                   "denoise_step_idx): the keyframes do not rotate between steps")
            step = 0
        plan_step = step if rotates(grid.latent_frames, self.knobs) else 0
        key = (grid.latent_frames, grid.patches_per_frame, plan_step)
        with self._lock:
            cached = self._context
            if cached is not None and cached[0] == key:
                return cached[1]
            if cached is None or cached[1].step != plan_step:
                self.stats.steps += 1
            context = AttentionContext(
                grid=grid, patches_per_frame=grid.patches_per_frame, step=plan_step, knobs=self.knobs,
                text_position=self.family.text_position or "before", parallel=None, driver=self.driver,
                fallback=self.fallback, plans=self.plans, stats=self.stats, model=self.family.name)
            self._context = (key, context)
            return context

    def attend(self, origin: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int],
               prefix_len: int, used_len: int, step: int | None, scale: float) -> torch.Tensor:
        """One layer call ``[B, S, H, D]``: the first ``used_len`` tokens (``prefix_len`` of them before a
        ``T x H x W`` video) through lvsa; the padding after them, which no real query attends, stays zero."""
        t, h, w = grid
        if prefix_len + t * h * w != used_len or used_len > q.shape[1]:
            raise ValueError(f"LVSA: video_layout prefix_len={prefix_len} + latent_grid={tuple(grid)} does not "
                             f"match used_len={used_len} of a {q.shape[1]}-token sequence")
        context = self.context(LatentGrid(t, h * w), step)
        video = tuple(x[:, prefix_len:used_len] for x in (q, k, v))
        prefix = None if prefix_len == 0 else tuple(x[:, :prefix_len] for x in (q, k, v))
        if scale != q.shape[-1] ** -0.5:
            raise ValueError(f"LVSA: softmax_scale={scale} is not 1/sqrt(head_dim); lvsa plans the standard scale")
        video_out, prefix_out = execute(context, origin, video, prefix)  # type: ignore[arg-type]
        out = torch.zeros_like(q)
        out[:, prefix_len:used_len] = video_out
        if prefix_out is not None:
            out[:, :prefix_len] = prefix_out
        return out

    def attend_joint(self, origin: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None, scale: float, text_tokens: int | None = None) -> torch.Tensor:
        """One joint layer call of a model without ``video_layout``: the video tokens of the forward's grid,
        then text tokens, whose padding the ``[B, S]`` mask (True = keep) marks. ``text_tokens``: the text is
        the last that many tokens, and the tokens between it and the video are sequence parallelism's padding
        (left out; their rows stay zero); None: everything after the video is text."""
        if self.forward is None:
            return self.dense(origin, "no_t_lat", "the transformer's forward hook did not run (the model publishes "
                              "no video_layout and its transformer is not one lvsa hooks)", q, k, v, scale)
        grid, step = self.forward
        video_tokens = grid.latent_frames * grid.patches_per_frame
        if scale != q.shape[-1] ** -0.5:
            raise ValueError(f"LVSA: softmax_scale={scale} is not 1/sqrt(head_dim); lvsa plans the standard scale")
        context = self.context(grid, step)
        if q.shape[1] < video_tokens:  # the plan reports the numbers (an error, or a loud line and dense)
            return execute(context, origin, (q, k, v))[0]
        text_start = video_tokens if text_tokens is None else q.shape[1] - text_tokens
        if text_start < video_tokens:
            return execute(context, origin, (q, k, v))[0]  # the plan reports the numbers
        video = tuple(x[:, :video_tokens] for x in (q, k, v))
        text = tuple(x[:, text_start:] for x in (q, k, v)) if q.shape[1] > text_start else None
        # the mask as given: asking whether it pads anything would synchronise with the device in every layer call
        padding = None if mask is None or text is None else mask[:, text_start:].bool()
        video_out, text_out = execute(context, origin, video, text, padding)  # type: ignore[arg-type]
        if text_out is None:
            return video_out
        if text_start == video_tokens:
            return torch.cat([video_out, text_out], dim=1)
        out = torch.zeros_like(q)
        out[:, :video_tokens], out[:, text_start:] = video_out, text_out
        return out

    def dense(self, origin: str, reason: str, detail: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              scale: float) -> torch.Tensor:
        """A call lvsa cannot plan: the policy's error, or its loud line and dense attention."""
        self.fallback.fall_back(origin, reason, detail, "Select another backend for this role, or set "
                                "LVSA_FALLBACK=warn to run such calls densely", once=q.shape[1], seq_len=q.shape[1])
        return dense_attention(q, k, v, None, scale)


_host: ServingHost | None = None
_host_lock = threading.Lock()


def host() -> ServingHost:
    """This process's host, made on first use from the settings (``LVSA_*``) and the served model."""
    global _host
    with _host_lock:
        if _host is None:
            from vllm_omni.diffusion.config import get_current_diffusion_config_or_none

            config = get_current_diffusion_config_or_none()
            class_name = getattr(config, "model_class_name", None)
            params = dict(getattr(getattr(config, "tf_model_config", None), "params", None) or {})
            _host = ServingHost(get_settings(), served_family(class_name, params))
        return _host


def reset_host() -> None:
    """Forget this process's host (a new model or new settings in the same process: tests)."""
    global _host
    with _host_lock:
        _host = None


def current_step() -> int | None:
    from vllm_omni.diffusion.forward_context import get_forward_context, is_forward_context_available

    return get_forward_context().denoise_step_idx if is_forward_context_available() else None


@torch.library.custom_op("lvsa_vllm_omni::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: list[int], prefix_len: int,
                 used_len: int, scale: float) -> torch.Tensor:
    """The layer call behind a compiled graph: the step is read here, at run time."""
    return host().attend(_SELF_ATTENTION, q, k, v, (grid[0], grid[1], grid[2]), prefix_len, used_len,
                         current_step(), scale).contiguous()


@attention_op.register_fake
def _(q, k, v, grid, prefix_len, used_len, scale):
    return torch.empty_like(q)


@torch.library.custom_op("lvsa_vllm_omni::joint_attention", mutates_args=())
def joint_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float, text_tokens: int) -> torch.Tensor:
    """A joint layer call behind a compiled graph: the grid and step the transformer's hook reported, read here
    (``text_tokens`` < 0: everything after the video is text)."""
    return host().attend_joint(_SELF_ATTENTION, q, k, v, mask, scale,
                               None if text_tokens < 0 else text_tokens).contiguous()


@joint_attention_op.register_fake
def _(q, k, v, mask, scale, text_tokens):
    return torch.empty_like(q)


#: transformers whose layers carry no video_layout: module, class, and how their input gives the latent grid
_HOOKED = {
    "vllm_omni.diffusion.models.hunyuan_video.hunyuan_video_15_transformer": "HunyuanVideo15Transformer3DModel",
}


def install_transformer_hooks() -> None:
    """Report each forward's grid and timestep to the host from the transformers that publish no
    ``video_layout`` (HunyuanVideo 1.5), by wrapping their class's ``forward`` once the module is loaded (the
    backend asks while such a model is being built). The transformer's forward runs outside vLLM-Omni's
    regional compile, which compiles its blocks."""
    import sys

    for module_name, class_name in _HOOKED.items():
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if cls is None or getattr(cls.forward, "_lvsa_hooked", False):
            continue
        original = cls.forward

        def forward(self, hidden_states, timestep, *args, _original=original, **kwargs):
            _, _, frames, height, width = hidden_states.shape
            patch_t, patch = self.patch_size_t, self.patch_size
            grid = LatentGrid(frames // patch_t, (height // patch) * (width // patch))
            host().begin_forward(grid, timestep)
            return _original(self, hidden_states, timestep, *args, **kwargs)

        forward._lvsa_hooked = True  # type: ignore[attr-defined]
        cls.forward = forward
