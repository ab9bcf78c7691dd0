"""The broker's SSH certificate authority, enforced by a real sshd (Debian's openssh-server).

Nothing here is mocked: sshd itself checks each certificate's signer, principal, validity, forced
command and the CA's KRL. Each test signs a certificate the way the broker does for one step and
shows what sshd accepts and refuses.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from demo.sshd import SshdProcess, run_with_certificate, sshd_installed
from firebreak.broker.ssh_ca import CertificateRefused, SshCertificateAuthority, SshCertificateRequest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sshd_installed() and not os.environ.get("CI"),
                       reason="openssh-server not installed (bash scripts/setup installs it)"),
]

PRINCIPAL = "firebreak-host.restart"
COMMAND = "echo restarted demo-app"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> SshCertificateAuthority:
    return SshCertificateAuthority(tmp_path_factory.mktemp("broker") / "ssh_ca")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory, ca: SshCertificateAuthority) -> Iterator[SshdProcess]:
    with SshdProcess(tmp_path_factory.mktemp("sshd"), ca.public_key_line, ca.krl_file,
                     {"root": [PRINCIPAL]}) as server:
        yield server


def ephemeral() -> tuple[bytes, str]:
    """What the activity makes in memory: a key pair, of which only the public half goes to the broker."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return pem, public.decode()


def request(*, principal: str = PRINCIPAL, valid_s: int = 120, start: datetime | None = None,
            key_id: str | None = None) -> SshCertificateRequest:
    start = start or datetime.now(timezone.utc)
    return SshCertificateRequest(key_id=key_id or f"grant-{uuid.uuid4().hex}", principal=principal,
                                 command=COMMAND, not_before=start, not_after=start + timedelta(seconds=valid_s))


def test_a_certificate_runs_exactly_its_forced_command_and_sshd_logs_the_grant(ca, sshd):
    pem, public = ephemeral()
    req = request()
    done = run_with_certificate(sshd, "root", pem, ca.sign(public, req), command="cat /etc/shadow")
    # The client asked for another command; sshd ran the certificate's.
    assert done.returncode == 0 and done.stdout.strip() == "restarted demo-app", done.stderr
    assert f'ID {req.key_id} (serial 0)' in sshd.log.read_text()


def refused_by_sshd(sshd: SshdProcess, pem: bytes, certificate: str) -> str:
    """Use the certificate; it must be refused. What sshd logged about it."""
    seen = len(sshd.log.read_text())
    done = run_with_certificate(sshd, "root", pem, certificate)
    assert done.returncode == 255 and "Permission denied" in done.stderr, (done.returncode, done.stderr)
    return sshd.log.read_text()[seen:]


def test_sshd_refuses_an_expired_certificate(ca, sshd):
    pem, public = ephemeral()
    past = datetime.now(timezone.utc) - timedelta(minutes=10)
    assert "Certificate invalid: expired" in refused_by_sshd(sshd, pem, ca.sign(public, request(start=past, valid_s=60)))


def test_sshd_refuses_a_principal_of_another_action(ca, sshd):
    pem, public = ephemeral()
    logged = refused_by_sshd(sshd, pem, ca.sign(public, request(principal="firebreak-host.delete")))
    assert "does not contain an authorized principal" in logged


def test_sshd_refuses_a_certificate_of_another_ca(tmp_path: Path, sshd):
    other = SshCertificateAuthority(tmp_path / "other_ca")
    pem, public = ephemeral()
    logged = refused_by_sshd(sshd, pem, other.sign(public, request()))
    assert "Failed publickey for root" in logged and "Accepted" not in logged


def test_sshd_refuses_a_certificate_whose_grant_is_revoked_in_the_krl(ca, sshd):
    pem, public = ephemeral()
    req = request()
    certificate = ca.sign(public, req)
    assert run_with_certificate(sshd, "root", pem, certificate).returncode == 0
    now = datetime.now(timezone.utc)
    ca.revoke([req.key_id], until=req.not_after, now=now)
    assert f"revoked by file {ca.krl_file}" in refused_by_sshd(sshd, pem, certificate)


def test_the_ca_signs_only_short_single_line_certificates(ca):
    _, public = ephemeral()
    with pytest.raises(CertificateRefused, match="validity"):
        ca.sign(public, request(valid_s=3600))
    with pytest.raises(CertificateRefused, match="principal"):
        ca.sign(public, request(principal="a\nb"))
    with pytest.raises(CertificateRefused, match="public_key"):
        ca.sign("ssh-ed25519 not-a-key", request())


def test_the_ca_key_is_the_owners_alone(ca):
    assert (ca.key_file.stat().st_mode & 0o777) == 0o600
    assert "PRIVATE KEY" not in ca.public_key_line
