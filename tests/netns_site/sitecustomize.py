"""Loaded by every Python process on a test "host" (tests/netns_cluster.py puts this folder on
PYTHONPATH there): Ray learns the host's address from ``KDRAY_TEST_NODE_IP`` instead of
finding it by a UDP probe towards a public DNS server (8.8.8.8), so nothing on these hosts
tries an address that the test did not make."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_ADDRESS = os.environ.get("KDRAY_TEST_NODE_IP")
_MODULE = "ray._common.network_utils"


class _Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module):  # noqa: ANN001, ANN202
            run(module)
            module.node_ip_address_from_perspective = lambda *_args, **_kw: _ADDRESS

        loader.exec_module = exec_module
        return spec


if _ADDRESS:
    sys.meta_path.insert(0, _Patch())
