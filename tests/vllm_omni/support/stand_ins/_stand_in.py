"""Test support: import-only stand-ins. Any submodule imports (``torchvision.io``...), any name can be imported
from one (``from torchvision.io import decode_image``), and using such a name raises, naming the missing
real package."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

PACKAGES = ("torchvision", "torchaudio")


class Unusable:
    def __init__(self, name: str) -> None:
        self._name = name

    def _refuse(self, *_args, **_kwargs):
        raise RuntimeError(f"{self._name}: this is the tests' import-only stand-in (CPU tests of the vLLM-Omni "
                           "integration); the real package is not installed")

    __call__ = _refuse

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return Unusable(f"{self._name}.{name}")

    def __mro_entries__(self, bases):
        return (object,)


class StandIn(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return Unusable(f"{self.__name__}.{name}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in PACKAGES and "." in fullname:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = StandIn(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.append(_Finder())
