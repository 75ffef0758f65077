"""strongSwan in the tests: bench/strongswan.py's charon, skipped where it is not installed."""

from __future__ import annotations

import os

import pytest

from bench.strongswan import CHARON, Charon, missing, swanctl_conf

__all__ = ["CHARON", "Charon", "require_strongswan", "swanctl_conf"]


def require_strongswan() -> None:
    """Skip without strongSwan, unless ESPLINE_REQUIRE_STRONGSWAN=1 (CI): then fail."""
    reason = missing()
    if reason is None:
        return
    if os.environ.get("ESPLINE_REQUIRE_STRONGSWAN") == "1":
        pytest.fail(reason)
    pytest.skip(reason)
