"""Generate a video with any diffusers video pipeline folder lvsa supports: the family is read off the folder's
model_index.json (its transformer class), then the run is that family's example (every flag: --help).

    python examples/generate.py --model /models/<checkpoint> --num-frames 193 --lvsa
    python examples/generate.py --family skyreels-v2 --lvsa      # the family's small random-weight model

`lvsa models` lists the supported transformer classes; the families with example pipelines are those of
lvsa_app.models."""

import sys

from lvsa.parallel import exit_process
from lvsa_app.generation import family_of_argv, main

if __name__ == "__main__":
    family, argv = family_of_argv(sys.argv[1:])
    exit_process(main(family, argv) if family else 2)
