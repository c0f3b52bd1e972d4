"""Shared test setup: make the generated protobuf package (`proto/pdserve`) importable
from a plain checkout, as the installed package does."""

import os
import sys

_PROTO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "proto")
if _PROTO not in sys.path:
    sys.path.insert(0, _PROTO)
