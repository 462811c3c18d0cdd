"""simulsyn_core: TCP simultaneous open through NATs with plain sockets.

The public API is what ``__all__`` names (documented in docs/api.md), plus the
``simulsyn_core.aio`` module; it follows semantic versioning from 1.0 on (before 1.0, a
minor version may change it, said in the changelog of the README). Everything else is
private (the package ``_internal``, the module ``_api``): it may change in any release.

Nothing in this package imports scapy: the broker and the punch must start fast
and run as an ordinary user. The names are imported lazily (``import simulsyn_core``
loads no socket code).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AddressInUse",
    "AuthFailed",
    "Broker",
    "BrokerUnreachable",
    "Connection",
    "NoPeer",
    "PeerLost",
    "PunchFailed",
    "PunchReport",
    "SimulsynError",
    "Tampered",
    "Tuning",
    "__version__",
    "connect",
    "serve_broker",
]

if TYPE_CHECKING:
    from ._api import (
        AddressInUse,
        AuthFailed,
        Broker,
        BrokerUnreachable,
        Connection,
        NoPeer,
        PeerLost,
        PunchFailed,
        SimulsynError,
        Tampered,
        connect,
        serve_broker,
    )
    from ._internal.options import Tuning
    from ._internal.session import PunchReport


def __getattr__(name: str) -> Any:
    if name == "PunchReport":
        from ._internal.session import PunchReport

        return PunchReport
    if name == "Tuning":
        from ._internal.options import Tuning

        return Tuning
    if name in __all__:
        from . import _api

        return getattr(_api, name)
    raise AttributeError(f"module 'simulsyn_core' has no attribute {name!r}")
