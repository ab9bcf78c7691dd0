"""The broker as an OpenSSH user certificate authority: a host's native credential for one step.

For a step on an ``ssh`` target the broker signs the activity's ephemeral public key into a user
certificate that says exactly what the step may do, and sshd enforces it with nothing added:

- valid for the step's credential lifetime (at most :data:`MAX_VALIDITY_S`), from a minute ago to
  allow for clock skew between broker and host;
- one principal, derived from the action, which the host's ``AuthorizedPrincipalsFile`` maps to
  the account that may run it;
- ``force-command``: the catalog action's exact command, whatever the client asks to run;
- no extensions, so no pty and no port, agent or X11 forwarding; ``source-address`` when configured;
- the key id is the grant's jti, so sshd's log names the grant, and revocation by key id goes into a
  KRL (``RevokedKeys``) that sshd reads on every authentication.

The CA key never leaves this module's file (0600, in the broker's state dir).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import SSHCertificateBuilder, SSHCertificateType

MAX_VALIDITY_S = 300
CLOCK_SKEW = timedelta(seconds=60)


class CertificateRefused(ValueError):
    """What was asked of the CA is not a certificate it signs (the reason names the field)."""


@dataclass(frozen=True)
class SshCertificateRequest:
    """Everything a certificate says; the broker derives each field from its runbook and the grant."""

    key_id: str  # the grant's jti
    principal: str
    command: str
    not_before: datetime
    not_after: datetime
    serial: int = 0
    source_address: str | None = None


class SshCertificateAuthority:
    """Loads (or creates, 0600) the CA's Ed25519 key at ``key_file`` and keeps the host KRL beside it."""

    def __init__(self, key_file: Path) -> None:
        self.key_file = key_file
        self.krl_file = key_file.with_name(key_file.stem + ".krl")
        self._lock = threading.Lock()
        if key_file.exists():
            key = serialization.load_ssh_private_key(key_file.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise CertificateRefused(f"{key_file}: the CA key must be Ed25519")
            self._key = key
        else:
            self._key = Ed25519PrivateKey.generate()
            key_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()))
        self.public_key_line = self._key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + " firebreak-ssh-ca"
        self._revoked: dict[str, datetime] = {}
        if not self.krl_file.exists():
            self._write_krl()  # sshd refuses every key while its RevokedKeys file cannot be read

    def sign(self, public_key: str, request: SshCertificateRequest) -> str:
        """The OpenSSH certificate (one line) for ``public_key``, or CertificateRefused naming the field."""
        lifetime = (request.not_after - request.not_before).total_seconds()
        if not 0 < lifetime <= MAX_VALIDITY_S:
            raise CertificateRefused(f"validity: {lifetime:.0f}s, the CA signs 1 to {MAX_VALIDITY_S}s")
        for field, value in (("key_id", request.key_id), ("principal", request.principal),
                             ("command", request.command)):
            if not value or "\n" in value or "\x00" in value:
                raise CertificateRefused(f"{field}: empty or not one line")
        try:
            subject = serialization.load_ssh_public_key(public_key.strip().encode())
        except (ValueError, TypeError) as exc:
            raise CertificateRefused(f"public_key: not an OpenSSH public key ({exc})") from None
        if not isinstance(subject, type(self._key.public_key())):
            raise CertificateRefused("public_key: the CA signs Ed25519 keys only")
        builder = (
            SSHCertificateBuilder()
            .public_key(subject)
            .type(SSHCertificateType.USER)
            .serial(request.serial)
            .key_id(request.key_id.encode())
            .valid_principals([request.principal.encode()])
            .valid_after(int((request.not_before - CLOCK_SKEW).timestamp()))
            .valid_before(int(request.not_after.timestamp()))
            .add_critical_option(b"force-command", request.command.encode())
        )
        if request.source_address:
            builder = builder.add_critical_option(b"source-address", request.source_address.encode())
        # No extensions: no permit-pty, no port, agent or X11 forwarding, no user rc.
        certificate = builder.sign(self._key)
        return certificate.public_bytes().decode()

    def revoke(self, key_ids: Iterable[str], until: datetime, now: datetime) -> None:
        """Add ``key_ids`` to the KRL, kept there until ``until`` (when their certificates have expired)."""
        with self._lock:
            for key_id in key_ids:
                self._revoked[key_id] = max(until, self._revoked.get(key_id, until))
            self._revoked = {k: v for k, v in self._revoked.items() if v > now}
            self._write_krl()

    def _write_krl(self) -> None:
        """Regenerate the KRL whole with ssh-keygen, then rename it into place: sshd never reads half a file."""
        directory = self.krl_file.parent
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            ca_pub = Path(tmp) / "ca.pub"
            ca_pub.write_text(self.public_key_line + "\n")
            spec = Path(tmp) / "spec"
            spec.write_text("".join(f"id: {key_id}\n" for key_id in sorted(self._revoked)))
            krl = Path(tmp) / "krl"
            done = subprocess.run(["ssh-keygen", "-q", "-k", "-f", str(krl), "-s", str(ca_pub), str(spec)],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"ssh-keygen -k failed: {done.stderr.strip()[-300:]}")
            os.chmod(krl, 0o644)  # sshd reads it; it holds key ids only
            os.replace(krl, self.krl_file)


def host_config(ca_public_key_line: str, principals_file: str, krl_file: str) -> str:
    """What a host needs in sshd_config to trust the broker's certificates (``firebreak ssh host-config``)."""
    return (f"TrustedUserCAKeys /etc/ssh/firebreak_ca.pub\n"
            f"AuthorizedPrincipalsFile {principals_file}\n"
            f"RevokedKeys {krl_file}\n"
            f"# /etc/ssh/firebreak_ca.pub:\n# {ca_public_key_line}\n")
