"""torchrun worker for tests/test_families.py: one declared family's transformer under lvsa with context
parallelism on CPU (gloo). Arguments: model folder, class name, inputs file, output file, ulysses degree, ring
degree, the family (its step where that is not one forward: tests/family_calls.py) and, optionally, what is
compiled with which backend (``blocks:inductor``, ``model:eager``) or ``lvsa:removed`` (lvsa applied, then
removed); the inputs file holds the forward's keyword
arguments, ``timesteps`` (one step each) and the model's ``dtype``. Rank 0 writes the output."""

from __future__ import annotations

import logging
import sys

import diffusers
import torch
from family_calls import STEPS

import lvsa
from lvsa.parallel import enable_context_parallel, exit_process, init_distributed, leave_distributed


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main(folder: str, cls: str, inputs: str, out: str, ulysses: int, ring: int, family: str,
         variant: str | None = None) -> None:
    # diffusers' sharding hooks skip, with a warning only, an input whose rank is not the plan's: recorded
    # for the test, which allows it only where the plan means it
    skipped = _Records()
    logging.getLogger("diffusers.hooks.context_parallel").addHandler(skipped)
    rank, _world, _local = init_distributed("cpu")
    try:
        kwargs = torch.load(inputs)
        timesteps = kwargs.pop("timesteps")  # one step each
        dtype = kwargs.pop("dtype", torch.float32)
        model = getattr(diffusers, cls).from_pretrained(folder, torch_dtype=dtype).eval()
        enable_context_parallel(model, ulysses, ring_degree=ring)
        handle = lvsa.apply(model, lvsa.LVSASettings(fallback="error"))
        if variant == "lvsa:removed":
            handle.remove()
        elif variant:  # "blocks:BACKEND" (diffusers' compile_repeated_blocks) or "model:BACKEND" (torch.compile)
            what, backend = variant.split(":")
            if what == "blocks":
                model.compile_repeated_blocks(backend=backend)
            else:
                model = torch.compile(model, backend=backend)
        step = STEPS.get(family)
        with torch.no_grad():
            # every output of the forward (LTX-2's audio beside its video)
            outputs = [(step(model, kwargs, timestep),) if step else model(**kwargs, timestep=timestep,
                                                                            return_dict=False)
                       for timestep in timesteps]
        if rank == 0:
            torch.save({"outputs": outputs, "sparse_calls": handle.stats.sparse_calls,
                        "ulysses": handle.stats.ulysses_degree, "ring": handle.stats.ring_degree,
                        "diffusers_warnings": skipped.messages}, out)
    finally:
        leave_distributed()


if __name__ == "__main__":
    folder, cls, inputs, out, ulysses, ring, family, *variant = sys.argv[1:]
    main(folder, cls, inputs, out, int(ulysses), int(ring), family, *variant)
    exit_process(0)
