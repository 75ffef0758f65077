"""The IKE error taxonomy: one exception per RFC 7296 §3.10.1 error notify.

Every problem found in a peer's message is an ``IkeProtocolError``; ``notify`` is the error
type to answer with and ``notification_data`` the bytes RFC 7296 puts in that notify.
Whether an answer is sent at all (never to an unauthenticated message that fails to parse,
RFC 7296 §2.21.1) is the message loop's decision, not this module's. Any other exception
escaping the IKE core is a bug.
"""

from __future__ import annotations

from .constants import NotifyType

__all__ = [
    "AuthenticationFailed",
    "ChildSaNotFound",
    "FailedCpRequired",
    "IkeProtocolError",
    "InternalAddressFailure",
    "InvalidIkeSpi",
    "InvalidKePayload",
    "InvalidMajorVersion",
    "InvalidMessageId",
    "InvalidSelectors",
    "InvalidSpi",
    "InvalidSyntax",
    "NoAdditionalSas",
    "NoProposalChosen",
    "SinglePairRequired",
    "TemporaryFailure",
    "TsUnacceptable",
    "UnsupportedCriticalPayload",
]


class IkeProtocolError(Exception):
    """A peer broke RFC 7296 (or asked for something refused): answer with ``notify``."""

    def __init__(self, notify: NotifyType, reason: str) -> None:
        super().__init__(reason)
        self.notify = notify
        self.reason = reason

    @property
    def notification_data(self) -> bytes:
        """The Notification Data of the error notify (empty unless RFC 7296 defines some)."""
        return b""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.notify.name}, {self.reason!r})"


class _Simple(IkeProtocolError):
    """An error notify with no data: the subclass names the notify type."""

    NOTIFY: NotifyType

    def __init__(self, reason: str) -> None:
        super().__init__(self.NOTIFY, reason)


class InvalidSyntax(_Simple):
    """Malformed message: a field, length or count is outside what RFC 7296 allows."""

    NOTIFY = NotifyType.INVALID_SYNTAX


class InvalidMajorVersion(IkeProtocolError):
    """The header's major version is not 2 (RFC 7296 §2.5, §3.1).

    RFC 7296 §2.5 asks for an INVALID_MAJOR_VERSION answer only when the version is higher
    than ours (``major_version > 2``); a lower one is IKEv1, which espline does not speak.
    """

    def __init__(self, major_version: int, reason: str | None = None) -> None:
        super().__init__(
            NotifyType.INVALID_MAJOR_VERSION,
            reason or f"IKE major version {major_version}, only 2 is supported",
        )
        self.major_version = major_version


class UnsupportedCriticalPayload(IkeProtocolError):
    """An unrecognized payload had the critical bit set (RFC 7296 §3.2)."""

    def __init__(self, payload_type: int, reason: str | None = None) -> None:
        super().__init__(
            NotifyType.UNSUPPORTED_CRITICAL_PAYLOAD,
            reason or f"unrecognized payload type {payload_type} marked critical",
        )
        self.payload_type = payload_type

    @property
    def notification_data(self) -> bytes:
        # RFC 7296 §3.10.1: "the one-octet payload type"
        return bytes((self.payload_type,))


class InvalidKePayload(IkeProtocolError):
    """The KE payload's group is not the one selected; ``group`` is the one to ask for."""

    def __init__(self, group: int, reason: str | None = None) -> None:
        super().__init__(
            NotifyType.INVALID_KE_PAYLOAD, reason or f"KE payload must use group {group}"
        )
        self.group = group

    @property
    def notification_data(self) -> bytes:
        # RFC 7296 §3.10.1: "the accepted D-H Group # in big endian order" (two octets)
        return self.group.to_bytes(2, "big")


class InvalidIkeSpi(_Simple):
    NOTIFY = NotifyType.INVALID_IKE_SPI


class InvalidMessageId(_Simple):
    NOTIFY = NotifyType.INVALID_MESSAGE_ID


class InvalidSpi(_Simple):
    NOTIFY = NotifyType.INVALID_SPI


class NoProposalChosen(_Simple):
    NOTIFY = NotifyType.NO_PROPOSAL_CHOSEN


class AuthenticationFailed(_Simple):
    NOTIFY = NotifyType.AUTHENTICATION_FAILED


class SinglePairRequired(_Simple):
    NOTIFY = NotifyType.SINGLE_PAIR_REQUIRED


class NoAdditionalSas(_Simple):
    NOTIFY = NotifyType.NO_ADDITIONAL_SAS


class InternalAddressFailure(_Simple):
    NOTIFY = NotifyType.INTERNAL_ADDRESS_FAILURE


class FailedCpRequired(_Simple):
    NOTIFY = NotifyType.FAILED_CP_REQUIRED


class TsUnacceptable(_Simple):
    NOTIFY = NotifyType.TS_UNACCEPTABLE


class InvalidSelectors(_Simple):
    NOTIFY = NotifyType.INVALID_SELECTORS


class TemporaryFailure(_Simple):
    NOTIFY = NotifyType.TEMPORARY_FAILURE


class ChildSaNotFound(_Simple):
    NOTIFY = NotifyType.CHILD_SA_NOT_FOUND
