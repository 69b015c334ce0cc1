"""Test support: an import-only stand-in (see ../README.md); using anything from it raises."""

import sys

from _stand_in import StandIn

sys.modules[__name__].__class__ = StandIn
__version__ = "0.0.0+stand-in"
