"""The roster: who may approve, in which groups, with which public key."""

from __future__ import annotations

from pathlib import Path

import pytest

from firebreak import signing
from firebreak.roster import Roster, RosterError, entry_yaml


def pem() -> str:
    return signing.public_pem(signing.generate_key())


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "roster.yaml"
    path.write_text(text)
    return path


def test_load_and_get(tmp_path: Path) -> None:
    text = "people:\n" + entry_yaml("alice", ["oncall-checkout", "sre-leads"], pem()) + entry_yaml("bob", [], pem())
    roster = Roster.load(write(tmp_path, text))
    alice = roster.get("alice")
    assert alice is not None and alice.groups == ["oncall-checkout", "sre-leads"]
    assert isinstance(alice.key, signing.Ed25519PublicKey)
    assert roster.get("mallory") is None
    assert roster.names() == ["alice", "bob"]


def test_empty_roster_is_valid(tmp_path: Path) -> None:
    assert Roster.load(write(tmp_path, "people: []\n")).people == []


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("  - name: carol\n    groups: [oncall]\n    public_key: nonsense\n", "people[1] (carol): public_key"),
        ("  - name: carol\n    groups: [oncall]\n", "people[1] (carol): public_key: Field required"),
        ("  - name: carol\n    grups: [oncall]\n    public_key: x\n", "people[1] (carol)"),
        ("  - name: ../carol\n    public_key: x\n", "people[1] (../carol): name"),
    ],
)
def test_errors_name_file_and_entry(tmp_path: Path, entry: str, expected: str) -> None:
    path = write(tmp_path, "people:\n" + entry_yaml("alice", ["oncall"], pem()) + entry)
    with pytest.raises(RosterError) as info:
        Roster.load(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_unknown_field_is_called_a_typo(tmp_path: Path) -> None:
    path = write(tmp_path, "people:\n" + entry_yaml("alice", [], pem()).replace("groups:", "grups:"))
    with pytest.raises(RosterError, match=r"people\[0\] \(alice\): grups: unknown field"):
        Roster.load(path)


def test_duplicate_names_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "people:\n" + entry_yaml("alice", [], pem()) + entry_yaml("alice", [], pem()))
    with pytest.raises(RosterError, match=r"people\[1\] \(alice\): duplicate name"):
        Roster.load(path)


def test_rsa_or_ec_key_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    path = write(tmp_path, "people:\n" + entry_yaml("alice", [], ec_pem))
    with pytest.raises(RosterError, match="not an Ed25519 public key"):
        Roster.load(path)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(RosterError, match="cannot read roster"):
        Roster.load(tmp_path / "nope.yaml")
    with pytest.raises(RosterError, match="not valid YAML"):
        Roster.load(write(tmp_path, "people: [\n"))
    with pytest.raises(RosterError, match="unknown top-level"):
        Roster.load(write(tmp_path, "people: []\nadmins: []\n"))


def test_cli_keys_new_writes_0600_key_and_prints_its_roster_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from firebreak.broker import cli

    out = tmp_path / "keys"
    argv = ["keys", "new", "--name", "dana", "--group", "oncall", "--group", "sre-leads", "--out", str(out)]
    assert cli.main(argv) == 0
    key_path = out / "dana.pem"
    assert key_path.stat().st_mode & 0o777 == 0o600
    printed = capsys.readouterr().out
    roster = Roster.parse("people:\n" + printed)
    dana = roster.get("dana")
    assert dana is not None and dana.groups == ["oncall", "sre-leads"]
    assert dana.public_key.strip() == signing.public_pem(signing.load_private_key(key_path)).strip()
    # never overwrites, and a name cannot be a path
    assert cli.main(["keys", "new", "--name", "dana", "--out", str(out)]) == 1
    assert cli.main(["keys", "new", "--name", "../evil", "--out", str(out)]) == 2


def test_adding_a_person_the_documented_way_keeps_the_roster_readable(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`firebreak keys new --name erin --group oncall >> STATE/roster.yaml` adds erin, and breaks nobody."""
    from firebreak.cli import main
    from firebreak.stack import ensure_demo_roster

    roster = ensure_demo_roster(tmp_path)
    assert main(["keys", "new", "--name", "erin", "--group", "oncall", "--state-dir", str(tmp_path)]) == 0
    with roster.open("a") as out:
        out.write(capsys.readouterr().out)
    loaded = Roster.load(roster)
    assert loaded.names() == ["alice", "bob", "carol", "erin"]
    assert loaded.get("erin").groups == ["oncall"]
