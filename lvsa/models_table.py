"""The table of every diffusers video transformer lvsa knows (``lvsa models``, the README): supported, with
each variant's reference horizon and its source, or refused, with the reason. Printed from
:mod:`lvsa.families`, never written by hand."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .families import ADAPTER_MODULES, DECLARED, REFUSED, Family
from .geometry import FAMILIES


@dataclass(frozen=True)
class ModelRow:
    cls: str
    status: str  # "supported", "refused" or "not yet"
    family: str  # lvsa's name of the family ("" where refused)
    #: per variant: "name: T latent frames (F video frames; source)"
    horizons: tuple[str, ...]
    notes: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _horizon(variant: str, latent: int, video: int, source: str) -> str:
    return f"{variant}: {latent} latent frames ({video} video frames; {source})"


def _parallelism(family: Family) -> str:
    if not family.context_parallel:
        return f"no context parallelism: {family.no_context_parallel}"
    kinds = "Ulysses and ring" if family.ring else "Ulysses"
    limits = [f"not with {name}" for name in family.cp_refused_arguments]
    limits += [f"one {name} per sample" for name in family.cp_per_sample_arguments]
    limits += [f"{key}={' or '.join(repr(v) for v in values)}"
               for key, (values, _why) in family.cp_accepted_config.items()]
    if family.cp_whole_frames:
        limits.append("whole latent frames per rank")
    if family.cp_needs_lvsa:
        limits.append("its self-attention through lvsa only")
    return f"context parallelism ({kinds}{''.join(', ' + limit for limit in limits)})"


def rows() -> list[ModelRow]:
    """One row per class, sorted by class name."""
    found: list[ModelRow] = []
    for cls, (adapter, variants) in ADAPTER_MODULES.items():
        horizons = []
        for key, label, source in variants:
            f = FAMILIES[key]
            horizons.append(_horizon(label, f.reference_latent_frames, f.reference_video_frames, source))
        notes = "a processor of lvsa's own (lvsa.adapters); RIFLEx; context parallelism (Ulysses and ring)"
        found.append(ModelRow(cls, "supported", adapter, tuple(horizons), notes))
    for family in DECLARED:
        horizons = tuple(f"{v.name}: refused, {v.refusal}" if v.refusal else
                         _horizon(v.name, v.reference_latent_frames, family.model_family(v).reference_video_frames,
                                  v.source)
                         for v in family.variants)
        refused = "; ".join(f"refused: {name}, {why}" for name, why in family.refused_pipelines.items())
        notes = "; ".join(x for x in (f"pipelines: {', '.join(family.pipelines)}", refused, family.notes,
                                      _parallelism(family)) if x)
        for cls in family.classes:
            found.append(ModelRow(cls, "supported", family.name, horizons, notes))
    for refusal in REFUSED:
        for cls in refusal.classes:
            found.append(ModelRow(cls, "refused" if refusal.final else "not yet", "", (), refusal.reason))
    return sorted(found, key=lambda r: r.cls)


def markdown_table() -> str:
    lines = ["| Class | lvsa | Family | Reference horizon per variant (source) | Notes, or why not |",
             "|---|---|---|---|---|"]
    for row in rows():
        cells = [f"`{row.cls}`", row.status, row.family, "<br>".join(row.horizons), row.notes]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def text_table() -> str:
    out = []
    for row in rows():
        out.append(f"{row.cls}  [{row.status}]" + (f"  family {row.family}" if row.family else ""))
        out.extend(f"    horizon {h}" for h in row.horizons)
        if row.notes:
            out.append(f"    {row.notes}")
    return "\n".join(out) + "\n"
