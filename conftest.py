"""Test-session set-up: keep every library offline and Ray on loopback before anything imports
them."""

from __future__ import annotations

import os

# The same variables as ../shared/offline-env.sh: no hub downloads, no telemetry, Ray bound to
# 127.0.0.1, and any non-local HTTP(S) sent to a closed loopback port.
_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost,::1",
    "no_proxy": "127.0.0.1,localhost,::1",
}
os.environ.update(_OFFLINE_ENV)
