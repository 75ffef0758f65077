"""espline's VICI admin socket: strongSwan's admin protocol, so swanctl and vici clients work.

``protocol`` is the sans-IO wire format, ``commands`` the command set and the ``Backend`` it
asks, ``server`` the asyncio Unix-socket server and ``client`` a small synchronous client.
"""

from .client import ViciClient, ViciClientError
from .commands import (
    AuthInfo,
    Backend,
    ChildConnInfo,
    ChildSaInfo,
    CommandError,
    Commands,
    ConnInfo,
    IkeSaInfo,
    StatsInfo,
    VersionInfo,
    child_rekey_event,
    child_updown_event,
    ike_rekey_event,
    ike_updown_event,
    log_event,
)
from .protocol import ViciProtocolError
from .server import ViciServer, ViciServerError

__all__ = [
    "AuthInfo",
    "Backend",
    "ChildConnInfo",
    "ChildSaInfo",
    "CommandError",
    "Commands",
    "ConnInfo",
    "IkeSaInfo",
    "StatsInfo",
    "VersionInfo",
    "ViciClient",
    "ViciClientError",
    "ViciProtocolError",
    "ViciServer",
    "ViciServerError",
    "child_rekey_event",
    "child_updown_event",
    "ike_rekey_event",
    "ike_updown_event",
    "log_event",
]
