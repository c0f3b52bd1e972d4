"""The credential check a decode worker's KV service admits transfers with (`transfer.credentials`):
one-time credentials bound to a reservation, signed under the per-deployment secret."""

from __future__ import annotations

import threading

import pytest

from pdserve.transfer.config import TransferConfig
from pdserve.transfer.credentials import CREDENTIAL_BYTES, KVAuthError, KVGate, auth_tag, secret_bytes

SECRET = "credential-tests-secret"


def refused(gate: KVGate, req_id: str, credential: bytes, tag: str | None) -> str:
    """The status a claim is refused with (the test fails if it is admitted)."""
    with pytest.raises(KVAuthError) as info:
        gate.claim(req_id, credential, tag)
    return info.value.code


def test_a_credential_opens_its_own_reservation_once() -> None:
    gate = KVGate(SECRET)
    credential = gate.issue("r1", [7, 3, 9], 4096)
    assert len(credential) == CREDENTIAL_BYTES and len(gate) == 1
    assert gate.claimed_at("r1") is None
    reservation = gate.claim("r1", credential, auth_tag(SECRET, "r1", credential))
    assert reservation.req_id == "r1" and reservation.block_ids == (7, 3, 9) and reservation.nbytes == 4096
    assert gate.claimed_at("r1") is not None and len(gate) == 0
    # consumed at first use: the very same credentials, replayed, open nothing
    assert refused(gate, "r1", credential, auth_tag(SECRET, "r1", credential)) == "PERMISSION_DENIED"
    gate.revoke("r1")
    assert gate.claimed_at("r1") is None


def test_forgeries_are_refused_and_leave_the_real_reservation_open() -> None:
    gate = KVGate(SECRET)
    credential = gate.issue("live", [1, 2], 1024)
    other = gate.issue("other", [5], 512)
    guess = bytes(CREDENTIAL_BYTES)
    # Without the deployment's secret no tag is right, whatever the request and credential.
    assert refused(gate, "live", credential, None) == "UNAUTHENTICATED"
    assert refused(gate, "live", credential, "") == "UNAUTHENTICATED"
    assert refused(gate, "live", credential, auth_tag("another deployment", "live", credential)) == (
        "UNAUTHENTICATED"
    )
    assert refused(gate, "live", credential, auth_tag(SECRET, "other", credential)) == "UNAUTHENTICATED"
    tag = auth_tag(SECRET, "live", credential)
    assert refused(gate, "live", credential, tag[:-1] + ("1" if tag[-1] == "0" else "0")) == "UNAUTHENTICATED"
    # With the secret but the wrong credential: another request's, a guess, an unknown request.
    assert refused(gate, "live", other, auth_tag(SECRET, "live", other)) == "PERMISSION_DENIED"
    assert refused(gate, "live", guess, auth_tag(SECRET, "live", guess)) == "PERMISSION_DENIED"
    assert refused(gate, "nobody", credential, auth_tag(SECRET, "nobody", credential)) == "PERMISSION_DENIED"
    assert len(gate) == 2  # no refusal closed anything
    assert gate.claim("live", credential, auth_tag(SECRET, "live", credential)).block_ids == (1, 2)


def test_revoked_and_reissued_credentials_open_nothing_old() -> None:
    gate = KVGate(SECRET)
    first = gate.issue("r", [1], 64)
    second = gate.issue("r", [2], 64)  # a fresh reservation under the same id replaces the first
    assert refused(gate, "r", first, auth_tag(SECRET, "r", first)) == "PERMISSION_DENIED"
    assert gate.revoke("r") and not gate.revoke("r")
    assert refused(gate, "r", second, auth_tag(SECRET, "r", second)) == "PERMISSION_DENIED"


def test_concurrent_claims_of_one_credential_admit_exactly_one() -> None:
    gate = KVGate(SECRET)
    credential = gate.issue("r", [4], 64)
    tag = auth_tag(SECRET, "r", credential)
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def claim() -> None:
        start.wait()
        try:
            gate.claim("r", credential, tag)
            outcomes.append("ok")
        except KVAuthError as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert sorted(outcomes) == ["PERMISSION_DENIED"] * 7 + ["ok"]


def test_credentials_are_unguessable_and_the_secret_never_shows() -> None:
    gate = KVGate(SECRET)
    credentials = {gate.issue(f"r{i}", [i], 64) for i in range(1000)}
    assert len(credentials) == 1000  # 128 random bits each
    assert SECRET not in repr(gate) and SECRET not in repr(TransferConfig(secret=SECRET))
    with pytest.raises(ValueError, match="transfer.secret is empty") as info:
        KVGate("")
    assert "secret" in str(info.value)
    assert secret_bytes(SECRET) == SECRET.encode()
    config = TransferConfig().with_secret()
    assert len(config.secret) == 64 and config.with_secret() is config  # kept once set
    assert TransferConfig().with_secret().secret != config.secret  # a fresh one per deployment
