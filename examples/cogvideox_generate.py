"""Generate a video with CogVideoX through diffusers, with lvsa sparse attention (--lvsa) or dense attention.

    python examples/cogvideox_generate.py --lvsa                      # small random-weight model, CPU, 5-20 seconds
    python examples/cogvideox_generate.py --model /models/<checkpoint> --num-frames 97 --lvsa --rotate-keyframes

Every flag: --help. Every lvsa flag also reads its LVSA_* variable (LVSA_SPARSITY_SCALE=0.5, ...)."""

from lvsa.parallel import exit_process
from lvsa_app.generation import main

if __name__ == "__main__":
    exit_process(main("cogvideox"))
