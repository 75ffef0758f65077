"""The IKE SA state machine as a table (CONVENTIONS §2): everything that decides a transition
lives here; this module knows nothing about bytes, keys or roles.

    initiator:  INITIAL --send_init--> INIT_SENT --init_response--> AUTH_SENT
                AUTH_SENT --auth_response--> ESTABLISHED
    responder:  INITIAL --init_request--> INIT_DONE --auth_request--> ESTABLISHED
    both:       ESTABLISHED --send_rekey--> REKEYING --rekey_done/rekey_failed--> ESTABLISHED
                ESTABLISHED --send_delete--> DELETING --delete_response--> CLOSED
                ESTABLISHED, REKEYING, DELETING --delete_request--> CLOSED
                any but CLOSED --fail--> FAILED

An IKE SA rekey (RFC 7296 §2.18) keeps the connection ESTABLISHED: REKEYING only says that
our own CREATE_CHILD_SA rekeying it is out. Answering the peer's rekey changes no state.

An event that the table does not allow in the current state is a local error (a bug in the
caller), never silently ignored.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["IkeEvent", "IkeState", "LocalStateError", "next_state"]


class IkeState(Enum):
    INITIAL = "initial"
    INIT_SENT = "init-sent"  # initiator: IKE_SA_INIT request out
    AUTH_SENT = "auth-sent"  # initiator: IKE_AUTH request out
    INIT_DONE = "init-done"  # responder: IKE_SA_INIT answered, waiting for IKE_AUTH
    ESTABLISHED = "established"
    REKEYING = "rekeying"  # our CREATE_CHILD_SA rekeying the IKE SA is out
    DELETING = "deleting"  # our Delete is out
    CLOSED = "closed"
    FAILED = "failed"


class IkeEvent(Enum):
    SEND_INIT = "send_init"
    RETRY_INIT = "retry_init"  # COOKIE or INVALID_KE_PAYLOAD answered: IKE_SA_INIT again
    INIT_RESPONSE = "init_response"
    AUTH_RESPONSE = "auth_response"
    INIT_REQUEST = "init_request"
    AUTH_REQUEST = "auth_request"
    SEND_REKEY = "send_rekey"
    REKEY_DONE = "rekey_done"
    REKEY_FAILED = "rekey_failed"
    SEND_DELETE = "send_delete"
    DELETE_RESPONSE = "delete_response"
    DELETE_REQUEST = "delete_request"
    FAIL = "fail"


class LocalStateError(RuntimeError):
    """An event the state table does not allow: a programming error."""


S, E = IkeState, IkeEvent
TRANSITIONS: dict[tuple[IkeState, IkeEvent], IkeState] = {
    (S.INITIAL, E.SEND_INIT): S.INIT_SENT,
    (S.INIT_SENT, E.RETRY_INIT): S.INIT_SENT,
    (S.INIT_SENT, E.INIT_RESPONSE): S.AUTH_SENT,
    (S.AUTH_SENT, E.AUTH_RESPONSE): S.ESTABLISHED,
    (S.INITIAL, E.INIT_REQUEST): S.INIT_DONE,
    (S.INIT_DONE, E.AUTH_REQUEST): S.ESTABLISHED,
    (S.ESTABLISHED, E.SEND_REKEY): S.REKEYING,
    (S.REKEYING, E.REKEY_DONE): S.ESTABLISHED,
    (S.REKEYING, E.REKEY_FAILED): S.ESTABLISHED,
    (S.ESTABLISHED, E.SEND_DELETE): S.DELETING,
    (S.DELETING, E.DELETE_RESPONSE): S.CLOSED,
    (S.ESTABLISHED, E.DELETE_REQUEST): S.CLOSED,
    # RFC 7296 §2.25.2: a Delete for the IKE SA we are rekeying: answer it, forget our rekey.
    (S.REKEYING, E.DELETE_REQUEST): S.CLOSED,
    # RFC 7296 §2.8.1/§2.25: a Delete crossing ours; both sides close.
    (S.DELETING, E.DELETE_REQUEST): S.CLOSED,
}
for _state in IkeState:
    if _state not in (S.CLOSED, S.FAILED):
        TRANSITIONS[(_state, E.FAIL)] = S.FAILED


def next_state(state: IkeState, event: IkeEvent) -> IkeState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise LocalStateError(f"{event.value} is not allowed in state {state.value}") from None
