"""The ``lvsa`` logger and the two line shapes users grep for: ``[LVSA] ...`` and ``[LVSA-FALLBACK] ...``.

Library code logs and never prints. The CLI and the examples call :func:`setup_logging` so that the
``[LVSA]`` lines land on stderr next to the rest of the run log (``grep -E "\\[LVSA" run.log``)."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("lvsa")


class _RankZeroOnly(logging.Filter):
    """Under torch.distributed only rank 0 logs: one set of [LVSA] lines per run, not one per GPU."""

    def filter(self, record: logging.LogRecord) -> bool:
        distributed = sys.modules.get("torch.distributed")
        if distributed is None or not distributed.is_available() or not distributed.is_initialized():
            return True
        return distributed.get_rank() == 0


logger.addFilter(_RankZeroOnly())


def info(message: str) -> None:
    logger.info("[LVSA] %s", message)


def fallback(origin: str, reason: str, **fields: object) -> None:
    """Log one loud ``[LVSA-FALLBACK] origin=.. reason=.. key=value ...`` line at WARNING level."""
    extra = "".join(f" {key}={_format(value)}" for key, value in fields.items())
    logger.warning("[LVSA-FALLBACK] origin=%s reason=%s%s", origin, reason, extra)


def _format(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    text = str(value)
    return f'"{text}"' if " " in text else text


def setup_logging(level: int | str = logging.INFO) -> None:
    """Send lvsa's log lines to stderr (for command-line programs; libraries leave logging to the app)."""
    if any(getattr(h, "_lvsa", False) for h in logger.handlers):
        logger.setLevel(level)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._lvsa = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
