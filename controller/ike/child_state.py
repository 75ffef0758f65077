"""The Child SA state machine as a table (CONVENTIONS §2), the counterpart of ``state.py``:
everything that decides a Child SA's transitions lives here; nothing about bytes or keys.

    INSTALLED --send_rekey--> REKEYING --rekey_done--> REKEYED      (our rekey, RFC 7296 §1.3.3)
    REKEYING --rekey_failed--> INSTALLED
    INSTALLED --peer_rekey--> REKEYED                                (the peer rekeyed it)
    REKEYING --peer_rekey--> REKEYING            (RFC 7296 §2.8.1: a collision, noted for later)
    INSTALLED, REKEYED --send_delete--> DELETING --delete_response--> DELETED
    INSTALLED, REKEYING, REKEYED --delete_request--> DELETED         (RFC 7296 §1.4.1)
    DELETING --delete_request--> DELETING     (deletes crossing: our response finishes it)
    any but DELETED --expire--> DELETED       (hard lifetime, or the IKE SA is gone)

REKEYED is the old SA of a rekey: it still receives (make-before-break, DESIGN §5) until its
Delete exchange completes. An event the table does not allow is a local error.
"""

from __future__ import annotations

from enum import Enum

from .state import LocalStateError

__all__ = ["ChildEvent", "ChildState", "next_child_state"]


class ChildState(Enum):
    INSTALLED = "installed"
    REKEYING = "rekeying"  # our CREATE_CHILD_SA with REKEY_SA for it is out
    REKEYED = "rekeyed"  # replaced by a newer SA; waiting for its Delete exchange
    DELETING = "deleting"  # our Delete for it is out
    DELETED = "deleted"


class ChildEvent(Enum):
    SEND_REKEY = "send_rekey"
    REKEY_DONE = "rekey_done"
    REKEY_FAILED = "rekey_failed"
    PEER_REKEY = "peer_rekey"
    SEND_DELETE = "send_delete"
    DELETE_RESPONSE = "delete_response"
    DELETE_REQUEST = "delete_request"
    EXPIRE = "expire"


S, E = ChildState, ChildEvent
TRANSITIONS: dict[tuple[ChildState, ChildEvent], ChildState] = {
    (S.INSTALLED, E.SEND_REKEY): S.REKEYING,
    (S.REKEYING, E.REKEY_DONE): S.REKEYED,
    (S.REKEYING, E.REKEY_FAILED): S.INSTALLED,
    (S.INSTALLED, E.PEER_REKEY): S.REKEYED,
    (S.REKEYING, E.PEER_REKEY): S.REKEYING,
    (S.INSTALLED, E.SEND_DELETE): S.DELETING,
    (S.REKEYED, E.SEND_DELETE): S.DELETING,
    (S.DELETING, E.DELETE_RESPONSE): S.DELETED,
    (S.INSTALLED, E.DELETE_REQUEST): S.DELETED,
    (S.REKEYING, E.DELETE_REQUEST): S.DELETED,
    (S.REKEYED, E.DELETE_REQUEST): S.DELETED,
    (S.DELETING, E.DELETE_REQUEST): S.DELETING,
}
for _state in ChildState:
    if _state is not S.DELETED:
        TRANSITIONS[(_state, E.EXPIRE)] = S.DELETED


def next_child_state(state: ChildState, event: ChildEvent) -> ChildState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise LocalStateError(
            f"Child SA: {event.value} is not allowed in state {state.value}"
        ) from None
