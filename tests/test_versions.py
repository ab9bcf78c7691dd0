"""The patch lifecycle's table (workflows/versions.py) matches the workflow code and the recorded histories."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from workflows.versions import PATCHES, live, patch

ROOT = Path(__file__).resolve().parents[1]
HISTORIES = ROOT / "tests" / "histories"


def patch_calls() -> dict[str, set[str]]:
    """patched / deprecate_patch ids in the workflow code, by call."""
    found: dict[str, set[str]] = {"patched": set(), "deprecate_patch": set()}
    for source in (ROOT / "workflows").glob("*.py"):
        if source.name == "versions.py":
            continue  # the table itself, whose docstring shows the calls
        text = source.read_text()
        constants = dict(re.findall(r"^([A-Z][A-Z0-9_]*) = \"([^\"]+)\"", text, re.M))
        for call, literal, name in re.findall(
                r"workflow\.(patched|deprecate_patch)\(\s*(?:\"([^\"]+)\"|([A-Z][A-Z0-9_]*))\s*\)", text):
            assert literal or name in constants, f"{source.name}: {name} is not a string constant of the module"
            found[call].add(literal or constants[name])
    return found


def markers(history: Path) -> set[str]:
    ids = set()
    for event in json.loads(history.read_text())["events"]:
        marker = event.get("markerRecordedEventAttributes")
        if marker and marker.get("markerName") == "core_patch":
            for payload in marker["details"]["patch-data"]["payloads"]:
                ids.add(json.loads(base64.b64decode(payload["data"]))["id"])
    return ids


def test_every_patch_in_the_workflow_is_in_the_table_at_its_stage():
    calls = patch_calls()
    assert calls["patched"] == {p.id for p in PATCHES if p.stage == "patched"}
    assert calls["deprecate_patch"] == {p.id for p in PATCHES if p.stage == "deprecated"}
    assert not {p.id for p in PATCHES if p.stage == "removed"} & (calls["patched"] | calls["deprecate_patch"])
    assert len({p.id for p in PATCHES}) == len(PATCHES)


def test_the_table_names_exactly_the_recorded_histories_each_patch_keeps():
    recorded = {path.name: markers(path) for path in HISTORIES.glob("*.json")}
    for p in PATCHES:
        without = {name for name, ids in recorded.items() if p.id not in ids}
        if p.stage == "patched":
            # Every history without the marker replays through the old branch (or never reaches the patch).
            assert set(p.histories) == without, p.id
        else:
            # A deprecated patch's histories retired with it: gone from the tree and from SHA256SUMS.
            assert p.retired and not set(p.histories) & set(recorded), p.id
    sums = (HISTORIES / "SHA256SUMS").read_text()
    assert all(name in sums for name in recorded)


def test_live_patches_and_lookup():
    assert [p.id for p in live()] == [p.id for p in PATCHES if p.stage == "patched"]
    assert patch("lifecycle-v2").added
    try:
        patch("no-such-patch")
    except KeyError as exc:
        assert "workflows/versions.py" in str(exc)
    else:
        raise AssertionError("an unknown patch id must be refused")
