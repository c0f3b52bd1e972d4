"""Shared test setup: make the generated protobuf package (`proto/pdserve`) importable
from a plain checkout, as the installed package does."""

import os
import sys

_PROTO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "proto")
if _PROTO not in sys.path:
    sys.path.insert(0, _PROTO)

# Ray clusters made by tests (ray.cluster_utils.Cluster, several nodes on this
# machine) must stay on loopback: with this set, Ray resolves "this node" to
# 127.0.0.1 instead of the machine's network address. Set before Ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
