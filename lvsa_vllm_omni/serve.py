"""``python -m lvsa_vllm_omni.serve <model> [lvsa flags] [vllm-omni serve flags]``: ``vllm-omni serve`` with lvsa as
the self-attention backend.

vLLM-Omni's per-role attention JSON takes no extra keys, so lvsa's flags (``--sparsity-scale 0.5``, every flag of
``lvsa plan --help``) become ``LVSA_*`` variables, which the server's worker processes read. The wrapper adds
``--diffusion-attention-config '{"per_role": {"self": {"backend": "LVSA"}}}'`` (merged into one the command
already has) and ``--omni``, refuses what would run dense without a word (ring and AllGather-KV sequence
parallelism), checks the settings before the server starts, and replaces itself with the server."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from collections.abc import Sequence

from lvsa.dense import DenseControls
from lvsa.errors import ConfigError, LVSAError
from lvsa.settings import LVSASettings, add_cli_arguments, env_var

from . import BACKEND_NAME

_BYPASSING = {"--ring-degree": "ring sequence parallelism", "--allgather-degree": "AllGather-KV sequence parallelism"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lvsa_vllm_omni.serve", allow_abbrev=False,
        description="Serve a video model with vLLM-Omni, its self-attention through lvsa. Every argument lvsa does "
        "not know goes to `vllm-omni serve`.",
        epilog="Example: python -m lvsa_vllm_omni.serve Wan-AI/Wan2.1-T2V-1.3B-Diffusers --sparsity-scale 0.5 "
        "--port 8000")
    parser.add_argument("model", help="the model folder or name, as `vllm-omni serve` takes it")
    parser.add_argument("--dry-run", action="store_true", help="print the server command and the LVSA_* variables, "
                        "then exit")
    add_cli_arguments(parser.add_argument_group("lvsa settings (passed to the server as LVSA_* variables)"))
    return parser


def _variable_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def _attention_config(rest: list[str]) -> list[str]:
    """``rest`` with the per-role config selecting LVSA for self-attention (merged into a given one)."""
    flag = "--diffusion-attention-config"
    given, kept, i = None, [], 0
    while i < len(rest):
        arg = rest[i]
        if arg == flag and i + 1 < len(rest):
            given, i = rest[i + 1], i + 2
            continue
        if arg.startswith(flag + "="):
            given, i = arg.split("=", 1)[1], i + 1
            continue
        kept.append(arg)
        i += 1
    config = {}
    if given is not None:
        try:
            config = json.loads(given)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{flag} {given!r} is not JSON: {error}") from None
        if not isinstance(config, dict):
            raise ConfigError(f"{flag} must be a JSON object, not {given!r}")
    roles = config.setdefault("per_role", {})
    own = roles.get("self", {})
    if isinstance(own, dict) and own.get("backend", BACKEND_NAME).upper() != BACKEND_NAME:
        raise ConfigError(f"{flag} selects {own['backend']!r} for self-attention; this wrapper serves with "
                          f"{BACKEND_NAME}: drop that entry, or run `vllm-omni serve` directly")
    roles["self"] = {**(own if isinstance(own, dict) else {}), "backend": BACKEND_NAME}
    return [*kept, flag, json.dumps(config, separators=(",", ":"))]


def _refuse_bypassing_parallelism(rest: list[str]) -> None:
    for i, arg in enumerate(rest):
        name, _, inline = arg.partition("=")
        if name in _BYPASSING:
            value = inline or (rest[i + 1] if i + 1 < len(rest) else "")
            if value.strip().isdigit() and int(value) > 1:
                raise ConfigError(f"{name} {value}: lvsa does not run under {_BYPASSING[name]} (vLLM-Omni runs it "
                                  "without the attention backend, densely); use --ulysses-degree instead")


def command(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The ``vllm-omni serve`` command line and the ``LVSA_*`` variables for ``argv``."""
    args, rest = _parser().parse_known_args(list(argv))
    given = {name: value for name, value in vars(args).items() if name in LVSASettings.model_fields}
    variables = {env_var(name): _variable_value(value) for name, value in given.items()}
    settings = LVSASettings.from_cli(given)  # every value checked now, with the flag's name, not in a worker later
    DenseControls.from_settings(settings).refuse("the vLLM-Omni host")
    _refuse_bypassing_parallelism(rest)
    rest = _attention_config(rest)
    if "--omni" not in rest:
        rest = ["--omni", *rest]
    return ["vllm-omni", "serve", args.model, *rest], variables


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        server, variables = command(argv)
    except LVSAError as error:
        print(f"lvsa_vllm_omni.serve: error: {error}", file=sys.stderr)
        return 2
    if "--dry-run" in argv:
        for name, value in sorted(variables.items()):
            print(f"{name}={value}")
        print(shlex.join(server))
        return 0
    executable = shutil.which(server[0])
    if executable is None:
        print("lvsa_vllm_omni.serve: error: `vllm-omni` is not on PATH: pip install 'lvsa[vllm-omni]' (and vLLM for "
              "your accelerator)", file=sys.stderr)
        return 2
    print(f"[LVSA] serving {server[2]} with self-attention through lvsa: {' '.join(server)}", file=sys.stderr)
    os.execvpe(executable, server, {**os.environ, **variables})


if __name__ == "__main__":
    sys.exit(main())
