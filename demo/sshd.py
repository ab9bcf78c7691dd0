"""A real OpenSSH server (Debian's ``openssh-server``) on loopback, trusting Firebreak's SSH CA.

It is configured the way ``firebreak ssh host-config`` tells a host to be: certificates signed by
the CA (``TrustedUserCAKeys``), principals mapped per account (``AuthorizedPrincipalsFile``), the
CA's KRL (``RevokedKeys``), no passwords and no authorized_keys. Everything lives in the caller's
directory, on a port of its own; sshd enforces each certificate itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

from demo.prom import free_port

SSHD = "/usr/sbin/sshd"


def sshd_installed() -> bool:
    return Path(SSHD).exists() and shutil.which("ssh") is not None and shutil.which("ssh-keygen") is not None


class SshdProcess:
    """sshd on 127.0.0.1:``port``; ``principals`` maps a login account to the principals it accepts."""

    def __init__(self, directory: Path, ca_public_key_line: str, krl_file: Path,
                 principals: dict[str, list[str]], *, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.ca_public_key_line = ca_public_key_line
        self.krl_file = krl_file
        self.principals = principals
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.directory / "sshd.log"

    def config(self) -> str:
        d = self.directory
        return "\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1",
            f"HostKey {d / 'host_ed25519'}", f"PidFile {d / 'sshd.pid'}",
            f"TrustedUserCAKeys {d / 'ca.pub'}",
            f"AuthorizedPrincipalsFile {d / 'principals'}/%u",
            f"RevokedKeys {self.krl_file}",
            "AuthorizedKeysFile none", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes", "UsePAM no",
            # Root only runs what a certificate forces; tests log in as root, a host as a service account.
            "PermitRootLogin forced-commands-only",
            "AllowTcpForwarding no", "X11Forwarding no", "AllowAgentForwarding no", "PermitTunnel no",
            "StrictModes no",  # the test's directories sit under /tmp
            "LogLevel VERBOSE", "",
        ])

    def start(self, timeout: float = 15.0) -> Self:
        if not sshd_installed():
            raise FileNotFoundError("openssh-server is not installed (bash scripts/setup installs it)")
        d = self.directory
        (d / "principals").mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_ed25519")],
                       check=True, capture_output=True)
        (d / "ca.pub").write_text(self.ca_public_key_line + "\n")
        for account, names in self.principals.items():
            (d / "principals" / account).write_text("".join(f"{name}\n" for name in names))
        (d / "sshd_config").write_text(self.config())
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.process.returncode}: {self.log.read_text()[-800:]}")
            if "Server listening" in self.log.read_text(errors="replace"):
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"sshd did not listen on {self.port} within {timeout:.0f}s")

    def known_hosts_line(self) -> str:
        key = (self.directory / "host_ed25519.pub").read_text().split()
        return f"[127.0.0.1]:{self.port} {key[0]} {key[1]}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_with_certificate(sshd: SshdProcess, account: str, private_key_pem: bytes, certificate: str,
                         command: str = "", timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """OpenSSH's own client, with a key and certificate that live in a private directory only while it runs."""
    workdir = Path(tempfile.mkdtemp(prefix="firebreak-ssh-"))
    try:
        key = workdir / "id"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(private_key_pem)
        (workdir / "id-cert.pub").write_text(certificate + "\n")
        (workdir / "known_hosts").write_text(sshd.known_hosts_line() + "\n")
        argv = ["ssh", "-F", "none", "-i", str(key), "-o", f"CertificateFile={workdir / 'id-cert.pub'}",
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={workdir / 'known_hosts'}",
                "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10", "-T",
                "-p", str(sshd.port), f"{account}@127.0.0.1", *([command] if command else [])]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

