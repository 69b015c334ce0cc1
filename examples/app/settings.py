"""The example application's settings: the library's, plus the two knobs only the example scripts have.

``--lvsa`` (``LVSA_ENABLED``) decides whether a run installs lvsa at all (the library's ``lvsa.apply``
always does), and ``--flashinfer`` (``LVSA_FLASHINFER``) is the original tool's spelling of
``--backend flashinfer``, kept because its users' commands carry it."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from lvsa.settings import LVSASettings


class AppSettings(LVSASettings):
    """:class:`lvsa.LVSASettings` and the example scripts' own knobs, read the same way (flag > variable)."""

    flag_names: ClassVar[dict[str, str]] = {"enabled": "--lvsa"}

    enabled: bool = Field(
        False, description="run self-attention through lvsa; off runs the model's dense attention"
    )
    flashinfer: bool = Field(False, description="the original tool's spelling of --backend flashinfer")

    @model_validator(mode="after")
    def _flashinfer_means_backend(self) -> AppSettings:
        if self.flashinfer:
            if self.backend not in ("auto", "flashinfer"):
                raise ValueError(
                    f"--flashinfer asks for the flashinfer driver but backend={self.backend!r} is also set; "
                    "keep one of them"
                )
            self.backend = "flashinfer"
        return self

