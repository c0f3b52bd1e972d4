"""Who may write KV into a decode worker: per-request credentials under a per-deployment secret.

    decode worker  reserve():  credential = receive_side.expect(req_id, block_ids)   (KVGate.issue)
                   -> KVHandle.credential -> router -> prefill worker
    prefill worker send():     presents (req_id, credential, auth_tag(secret, req_id, credential))
    decode receive side:       KVGate.claim(req_id, credential, tag) before reading or allocating
                               anything; the transfer then writes only `Reservation.block_ids`.

The credential is 16 random bytes (`secrets.token_bytes`), unguessable, issued for one
reservation (req_id -> its block ids and byte count) and consumed by its first claim, so a
replay finds nothing. The tag is an HMAC-SHA256 of (req_id, credential) under the deployment's
secret (`transfer.secret`, which `pdserve up` generates when unset): a sender outside the
deployment cannot make one even with a credential it saw. Both are compared with
`hmac.compare_digest`. A missing or wrong tag is `UNAUTHENTICATED`; an unknown request, a
wrong or used credential is `PERMISSION_DENIED` (`KVAuthError.code`, a gRPC status name).

Torch-free: the router and the deploy config load it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.transfer.contract import KVTransferError

__all__ = [
    "CREDENTIAL_BYTES",
    "KVAuthError",
    "KVGate",
    "Reservation",
    "auth_tag",
    "secret_bytes",
]

CREDENTIAL_BYTES = 16
UNAUTHENTICATED = "UNAUTHENTICATED"
PERMISSION_DENIED = "PERMISSION_DENIED"


class KVAuthError(KVTransferError):
    """A transfer refused before anything was read: `code` is UNAUTHENTICATED or PERMISSION_DENIED."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def secret_bytes(secret: str | bytes) -> bytes:
    """The deployment secret as HMAC key bytes; ValueError when it is empty (never echoed)."""
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not key:
        raise ValueError(
            "transfer.secret is empty: the KV service needs the deployment's secret "
            "(`pdserve up` generates one; in code use TransferConfig.with_secret())"
        )
    return key


def auth_tag(secret: str | bytes, req_id: str, credential: bytes) -> str:
    """Hex HMAC-SHA256 under the deployment secret, binding `credential` to `req_id`."""
    message = req_id.encode() + b"\0" + bytes(credential)
    return hmac.new(secret_bytes(secret), message, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Reservation:
    """What a decode worker reserved for one request: the only blocks its KV may go to."""

    req_id: str
    block_ids: tuple[int, ...]
    nbytes: int  # the packed buffer's size for these blocks
    issued_at: float  # time.monotonic()


class KVGate:
    """A decode worker's open reservations and their credentials. Thread-safe."""

    def __init__(self, secret: str | bytes) -> None:
        self._secret = secret_bytes(secret)
        self._lock = threading.Lock()
        self._open: dict[str, tuple[bytes, Reservation]] = {}  # req_id -> (credential, reservation)
        self._claimed: dict[str, float] = {}  # req_id -> time.monotonic() of its claim, until revoked

    def __repr__(self) -> str:  # never the secret nor a credential
        return f"KVGate(open={len(self)})"

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def issue(self, req_id: str, block_ids: Sequence[int], nbytes: int) -> bytes:
        """A fresh credential for `req_id`'s reservation (replacing any earlier one for that id)."""
        credential = secrets.token_bytes(CREDENTIAL_BYTES)
        reservation = Reservation(req_id, tuple(int(b) for b in block_ids), int(nbytes), time.monotonic())
        with self._lock:
            self._open[req_id] = (credential, reservation)
        return credential

    def revoke(self, req_id: str) -> bool:
        """Forget `req_id` (landed, aborted, expired): its credential if still open, its claim;
        True if a credential was open."""
        with self._lock:
            self._claimed.pop(req_id, None)
            return self._open.pop(req_id, None) is not None

    def claimed_at(self, req_id: str) -> float | None:
        """time.monotonic() when `req_id`'s credential was claimed (its transfer began), or None."""
        with self._lock:
            return self._claimed.get(req_id)

    def check_tag(self, req_id: str, credential: bytes, tag: str | bytes | None) -> None:
        """Raise KVAuthError(UNAUTHENTICATED) unless `tag` is the deployment's tag for these."""
        expected = auth_tag(self._secret, req_id, credential)
        presented = tag.encode() if isinstance(tag, str) else (tag or b"")
        if not hmac.compare_digest(expected.encode(), presented):
            raise KVAuthError(UNAUTHENTICATED, f"{req_id}: KV transfer without this deployment's credentials")

    def claim(self, req_id: str, credential: bytes, tag: str | bytes | None) -> Reservation:
        """The reservation `credential` was issued for, consumed (single use). KVAuthError:
        UNAUTHENTICATED for a bad tag, PERMISSION_DENIED for an unknown request or a wrong or
        already used credential (which leaves the real one open)."""
        self.check_tag(req_id, credential, tag)
        with self._lock:
            entry = self._open.get(req_id)
            if entry is None or not hmac.compare_digest(entry[0], bytes(credential)):
                raise KVAuthError(
                    PERMISSION_DENIED,
                    f"{req_id}: no open reservation for this credential (unknown request, or used)",
                )
            del self._open[req_id]
            self._claimed[req_id] = time.monotonic()
        return entry[1]
