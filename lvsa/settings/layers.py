"""The process-wide configuration: what code (:func:`lvsa.configure`) and the command line set, kept as plain
values. The schema reads them when it builds settings from the command line; the store writes them."""

from __future__ import annotations

import threading
from typing import Any


class Layers:
    def __init__(self) -> None:
        self.code: dict[str, Any] = {}
        self.cli: dict[str, Any] = {}
        self.version = 0  # bumped on every change: cached effective settings are then stale
        self.lock = threading.Lock()

    def set(self, code: dict[str, Any], cli: dict[str, Any]) -> None:
        with self.lock:
            self.code, self.cli = code, cli
            self.version += 1


#: the one configuration of this process
configured = Layers()
