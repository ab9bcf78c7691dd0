"""The security receiver: where Alertmanager sends Firebreak's own security alerts.

Firebreak never remediates itself: its misuse and lifecycle alerts (``firebreak/security_rules.yml``)
are routed here, not to the intake. Each Alertmanager notification (webhook v4) is kept as received and
files a ticket per alert for a person to investigate:

```
STATE_DIR/security/
  token                              the bearer token Alertmanager presents (0600)
  notifications.jsonl                every notification, one JSON object a line (0600)
  tickets/SEC-<fingerprint>.md       one ticket per alert, appended to as it changes (0600)
  tickets/SEC-silence-<id>.md        one ticket per Alertmanager silence that mutes a security alert
```

The watchers must be hard to blind:

- A ticket is keyed by the alert's fingerprint, recomputed from its labels the way Alertmanager does,
  and only ever appended to: a later "resolved" (or a spoofed one) adds an update, the record of the
  firing stays.
- At most ``max_per_notification`` tickets are filed or updated per notification and
  ``max_per_minute`` per rolling minute. The excess is counted
  (``firebreak_security_alerts_dropped_total{cap}`` on ``/metrics``), which fires
  ``FirebreakSecurityAlertsDropped``; the receiver's own alerts are never capped.
- With ``--alertmanager-url``, the receiver polls Alertmanager's silences (with its API credentials)
  and files a ticket for each silence that would mute a security alert. This does not go through
  Alertmanager's notifications, which the silence itself would mute.

``python -m firebreak.security_receiver --port 8370 --state-dir DIR`` (started by ``firebreak up``).
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import logging
import os
import re
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

log = logging.getLogger("firebreak.security_receiver")

# Room for a storm (2,000 alerts is about 1 MB): a body refused whole files nothing, so it is counted too.
MAX_BODY = 16 << 20
MAX_PER_NOTIFICATION = 50
MAX_PER_MINUTE = 200
SILENCE_POLL_S = 2.0
SECURITY_RULES = Path(__file__).resolve().parent / "security_rules.yml"
# The receiver's own alerts are what report a flood or a silence: never capped (one ticket each).
UNCAPPED = frozenset({"FirebreakSecurityAlertsDropped", "FirebreakSecuritySilenced", "FirebreakSilenceWatchFailing"})
# Labels the demo's remediation alerts are keyed on, which security alerts never carry: a silence on one
# of them cannot mute a security alert. Any other label a rule does not set may carry any value.
ABSENT_LABELS = frozenset({"namespace", "service"})
_SILENCE_ID = re.compile(r"^[0-9A-Za-z-]{1,64}$")
_STATE_MARK = re.compile(r"^<!-- state: (.*) -->$", re.MULTILINE)


def security_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "security"


def _private_write(path: Path, data: bytes, *, append: bool = False) -> None:
    """Append, or create whole: a new file appears complete (written aside, then renamed), so a reader
    never sees an empty or half-written ticket."""
    target = path if append else path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(target, flags, 0o600)
    try:
        view = memoryview(data)
        while view:  # a short write is continued, never left torn
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    if not append:
        os.replace(target, path)


def alert_fingerprint(labels: dict[str, str]) -> str:
    """Alertmanager's fingerprint of a label set (Prometheus model: FNV-1a 64 over the sorted names and
    values, each followed by a 0xff byte), as 16 hex digits."""
    value = 14695981039346656037
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in part.encode() + b"\xff":
                value = ((value ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return f"{value:016x}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _labels(alert: dict[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in (alert.get("labels") or {}).items()}


def _line(value: Any) -> str:
    """Free text (a label, an annotation, a silence's comment) on one line of a ticket: it cannot
    add a heading or a state mark of its own."""
    return " ".join(str(value).split()).replace("<!--", "< !--")


def ticket_text(alert: dict[str, Any], received_at: str) -> str:
    labels = _labels(alert)
    status = str(alert.get("status", "firing"))
    name = labels.get("alertname", "unnamed alert")
    detail = f" ({_line(labels['reason'])})" if labels.get("reason") else ""
    if labels.get("category") == "availability":
        intro = ["Availability alert: a dependency of the credential broker's checks did not answer, so it",
                 "refused what it could not check. Nobody misbehaved; restore the dependency."]
    else:
        intro = ["Security alert on Firebreak's own agent identity. Firebreak does not remediate itself:",
                 "a person investigates (start with the broker's audit log, `firebreak audit verify`)."]
    lines = [
        f"# [{_line(status)}] {_line(name)}{detail}",
        "",
        *intro,
        "",
        f"- severity: {_line(labels.get('severity', '-'))}",
        f"- category: {_line(labels.get('category', '-'))}",
        "",
        "## Labels",
        "",
        *(f"- {_line(k)}: {_line(v)}" for k, v in sorted(labels.items())),
        "",
    ]
    return "\n".join(lines) + update_text(alert, received_at)


def update_text(alert: dict[str, Any], received_at: str) -> str:
    """One entry of a ticket's history: what a notification said about the alert, when."""
    annotations = {str(k): str(v) for k, v in (alert.get("annotations") or {}).items()}
    status = str(alert.get("status", "firing"))
    return "\n".join([
        f"## {received_at}: {_line(status)}",
        "",
        f"- status: {_line(status)}",
        f"- started: {_line(alert.get('startsAt', '-'))}",
        f"- ended: {_line(alert.get('endsAt', '-')) if status == 'resolved' else '-'}",
        f"- summary: {_line(annotations.get('summary', '-'))}",
        f"- description: {_line(annotations.get('description', '-'))}",
        "",
        f"<!-- state: {_state(alert)} -->",
        "",
    ])


def _state(alert: dict[str, Any]) -> str:
    status = str(alert.get("status", "firing"))
    ended = alert.get("endsAt", "") if status == "resolved" else ""
    return json.dumps([status, str(alert.get("startsAt", "")), str(ended)])


class Caps:
    """Ticket writes allowed per notification and per rolling minute; what is refused is counted."""

    def __init__(self, per_notification: int, per_minute: int) -> None:
        self.per_notification = per_notification
        self.per_minute = per_minute
        self.recent: deque[float] = deque()
        self.dropped: Counter[str] = Counter({"notification": 0, "minute": 0, "body": 0})

    def take(self, used_in_notification: int) -> str | None:
        """None if one more write is allowed (and takes it), else the cap that refuses it."""
        if used_in_notification >= self.per_notification:
            return "notification"
        now = time.monotonic()
        while self.recent and now - self.recent[0] > 60:
            self.recent.popleft()
        if len(self.recent) >= self.per_minute:
            return "minute"
        self.recent.append(now)
        return None


class Tickets:
    """One ticket per key, created once and then only appended to."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._last: dict[str, str] = {}

    def last_state(self, name: str) -> str | None:
        if name not in self._last:
            try:
                marks = _STATE_MARK.findall((self.dir / name).read_text())
            except FileNotFoundError:
                return None
            if marks:
                self._last[name] = marks[-1]
        return self._last.get(name)

    def changed(self, name: str, state: str) -> bool:
        return self.last_state(name) != state

    def write(self, name: str, state: str, first: str, update: str) -> None:
        path = self.dir / name
        if path.exists():
            _private_write(path, ("\n" + update).encode(), append=True)
        else:
            _private_write(path, first.encode())
        self._last[name] = state


# -- silences ------------------------------------------------------------------------------------------


def watched_label_sets(rules_file: Path = SECURITY_RULES) -> list[dict[str, str]]:
    """The labels each security rule sets (with its name): what a silence must not match. Availability
    alerts are left out: silencing an outage being worked on is no attack on the watchers."""
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    found = []
    for group in groups:
        for rule in group.get("rules", []):
            if "alert" not in rule:
                continue
            labels = {str(k): str(v) for k, v in (rule.get("labels") or {}).items()}
            if labels.get("category") == "availability":
                continue
            found.append({"alertname": str(rule["alert"]), **labels})
    return found


def _matcher_matches(matcher: dict[str, Any], value: str) -> bool:
    pattern = str(matcher.get("value", ""))
    if matcher.get("isRegex"):
        try:
            hit = re.fullmatch(pattern, value) is not None
        except re.error:
            hit = True  # a pattern Python cannot read may well match: count it as muting
    else:
        hit = pattern == value
    return hit if matcher.get("isEqual", True) else not hit


def muted_rules(silence: dict[str, Any], label_sets: Iterable[dict[str, str]]) -> list[str]:
    """The security alerts this silence could mute. A label a rule does not set may hold any value
    (the expression or Prometheus's external labels add it), so a matcher on it may match; the demo's
    incident labels (namespace, service) are never on a security alert."""
    matchers = [m for m in silence.get("matchers") or [] if isinstance(m, dict)]
    if not matchers:
        return []  # Alertmanager refuses a silence without matchers
    muted = []
    for labels in label_sets:
        if all(_matcher_matches(m, labels[str(m.get("name"))]) if str(m.get("name")) in labels
               else _matcher_matches(m, "") if str(m.get("name")) in ABSENT_LABELS
               else True
               for m in matchers):
            muted.append(labels["alertname"])
    return muted


def silence_ticket(silence: dict[str, Any], muted: list[str], seen_at: str) -> str:
    matchers = ", ".join(f"{m.get('name')}{'' if m.get('isEqual', True) else '!'}{'=~' if m.get('isRegex') else '='}"
                         f"{json.dumps(str(m.get('value', '')))}" for m in silence.get("matchers") or [])
    return "\n".join([
        f"# [firing] FirebreakSecuritySilenced ({silence.get('id')})",
        "",
        "An Alertmanager silence mutes Firebreak's security alerts: while it lasts, misuse of the agent",
        "identity pages nobody. Find out who made it and why; expire it if nobody can say.",
        "",
        "- severity: critical",
        "- category: misuse",
        f"- silence: {silence.get('id')}",
        f"- created by: {_line(silence.get('createdBy', '-'))}",
        f"- comment: {_line(silence.get('comment', '-'))}",
        f"- matchers: {_line(matchers)}",
        f"- mutes: {', '.join(muted)}",
        "",
        f"## {seen_at}: {_line((silence.get('status') or {}).get('state', '-'))}",
        "",
        f"- starts: {_line(silence.get('startsAt', '-'))}",
        f"- ends: {_line(silence.get('endsAt', '-'))}",
        "",
        "<!-- state: muting -->",
        "",
    ])


class SilenceWatch:
    """Polls Alertmanager's silences; files a ticket per silence that mutes a security alert, and an
    update when it stops muting (expired, deleted)."""

    def __init__(self, url: str, auth: tuple[str, str] | None, receiver: Receiver, interval: float) -> None:
        self.url = url.rstrip("/")
        self.auth = auth
        self.receiver = receiver
        self.interval = interval
        self.label_sets = watched_label_sets()
        self.up = 0
        self.muting: dict[str, list[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="silence-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        with httpx.Client(timeout=5.0, auth=self.auth) as client:
            while not self._stop.is_set():
                try:
                    response = client.get(f"{self.url}/api/v2/silences")
                    response.raise_for_status()
                    self.poll(response.json())
                    self.up = 1
                except (httpx.HTTPError, ValueError) as exc:
                    self.up = 0
                    log.warning("cannot read Alertmanager's silences: %s", exc)
                self._stop.wait(self.interval)

    def poll(self, silences: list[dict[str, Any]]) -> None:
        seen_at = _now()
        now_muting: dict[str, list[str]] = {}
        for silence in silences:
            sid = str(silence.get("id", ""))
            if not _SILENCE_ID.match(sid) or (silence.get("status") or {}).get("state") not in ("active", "pending"):
                continue
            muted = muted_rules(silence, self.label_sets)
            if muted:
                now_muting[sid] = muted
                self.receiver.file_silence(sid, silence, muted, seen_at)
        for sid in set(self.muting) - set(now_muting):
            self.receiver.end_silence(sid, seen_at)
        self.muting = now_muting


# -- the receiver --------------------------------------------------------------------------------------


class Receiver:
    def __init__(self, state_dir: str | Path, per_notification: int, per_minute: int) -> None:
        self.base = security_dir(state_dir)
        self.tickets = Tickets(self.base / "tickets")
        self.caps = Caps(per_notification, per_minute)
        self.lock = threading.Lock()
        self.filed_total = 0
        self.silences_seen = 0
        self.watch: SilenceWatch | None = None

    def notification(self, body: dict[str, Any], received_at: str) -> dict[str, Any]:
        filed: list[str] = []
        dropped: Counter[str] = Counter()
        with self.lock:
            record = {"received_at": received_at, "notification": body}
            _private_write(self.base / "notifications.jsonl", (json.dumps(record, sort_keys=True) + "\n").encode(),
                           append=True)
            used = 0
            for alert in body["alerts"]:
                if not isinstance(alert, dict):
                    continue
                labels = _labels(alert)
                # Recomputed, never taken from the body: a notification cannot write into another alert's ticket.
                name = f"SEC-{alert_fingerprint(labels)}.md"
                state = _state(alert)
                if not self.tickets.changed(name, state):
                    continue  # the same news again (a group re-sent): nothing to add
                if labels.get("alertname") not in UNCAPPED:
                    refused = self.caps.take(used)
                    if refused:
                        dropped[refused] += 1
                        continue
                    used += 1
                self.tickets.write(name, state, ticket_text(alert, received_at), update_text(alert, received_at))
                self.filed_total += 1
                filed.append(name)
            self.caps.dropped.update(dropped)
        if dropped:
            log.warning("security receiver caps: %s alert(s) not filed (%s)", sum(dropped.values()), dict(dropped))
        return {"tickets": filed, "dropped": sum(dropped.values())}

    def refused_whole(self) -> None:
        """A notification too large to read: its alerts are unknown, so it counts once, as ``cap="body"``."""
        with self.lock:
            self.caps.dropped["body"] += 1

    def file_silence(self, sid: str, silence: dict[str, Any], muted: list[str], seen_at: str) -> None:
        name = f"SEC-silence-{sid}.md"
        with self.lock:
            if not self.tickets.changed(name, "muting"):
                return
            refused = self.caps.take(0)
            if refused:
                self.caps.dropped[refused] += 1
                return
            self.silences_seen += 1
            update = f"## {seen_at}: muting again\n\n- ends: {_line(silence.get('endsAt', '-'))}\n\n<!-- state: muting -->\n"
            self.tickets.write(name, "muting", silence_ticket(silence, muted, seen_at), update)

    def end_silence(self, sid: str, seen_at: str) -> None:
        name = f"SEC-silence-{sid}.md"
        with self.lock:
            if self.tickets.last_state(name) == "muting":
                self.tickets.write(name, "ended", "", f"## {seen_at}: ended (expired or deleted)\n\n"
                                                      "<!-- state: ended -->\n")

    def metrics(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[tuple[str, Any]]) -> None:
            out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
            out.extend(f"{name}{labels} {value}" for labels, value in samples)

        with self.lock:
            family("firebreak_security_alerts_dropped_total", "counter",
                   "Alerts not filed as tickets because a cap (per notification, per minute) was reached.",
                   [(f'{{cap="{cap}"}}', n) for cap, n in sorted(self.caps.dropped.items())])
            family("firebreak_security_tickets_written_total", "counter", "Tickets filed or appended to.",
                   [("", self.filed_total)])
            if self.watch is not None:
                family("firebreak_security_silences_muting", "gauge",
                       "Alertmanager silences, active or pending, that would mute a security alert.",
                       [("", len(self.watch.muting))])
                family("firebreak_security_silence_watch_up", "gauge",
                       "1 while the receiver can read Alertmanager's silences.", [("", self.watch.up)])
        return "\n".join(out) + "\n"


def create_app(state_dir: str | Path, token: str, *, max_per_notification: int = MAX_PER_NOTIFICATION,
               max_per_minute: int = MAX_PER_MINUTE, alertmanager_url: str | None = None,
               alertmanager_auth: tuple[str, str] | None = None, silence_poll_s: float = SILENCE_POLL_S) -> FastAPI:
    receiver = Receiver(state_dir, max_per_notification, max_per_minute)
    if alertmanager_url:
        receiver.watch = SilenceWatch(alertmanager_url, alertmanager_auth, receiver, silence_poll_s)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if receiver.watch is not None:
            receiver.watch.start()
        try:
            yield
        finally:
            if receiver.watch is not None:
                receiver.watch.stop()

    app = FastAPI(title="Firebreak security receiver", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.receiver = receiver
    tickets = receiver.tickets.dir

    def authorized(request: Request) -> bool:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        # Counts only, like the broker's /metrics: what Prometheus alerts on.
        return PlainTextResponse(receiver.metrics(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/security/alerts")
    async def alerts(request: Request) -> JSONResponse:
        if not authorized(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        raw = await request.body()
        if len(raw) > MAX_BODY:
            receiver.refused_whole()
            return JSONResponse({"error": "too_large"}, status_code=413)
        try:
            body = json.loads(raw)
        except ValueError:
            return JSONResponse({"error": "bad_request", "reason": "body is not JSON"}, status_code=400)
        if not isinstance(body, dict) or not isinstance(body.get("alerts"), list):
            return JSONResponse({"error": "bad_request", "reason": "alerts: a list is required"}, status_code=400)
        return JSONResponse(receiver.notification(body, _now()))

    @app.get("/v1/security/tickets")
    def list_tickets(request: Request) -> JSONResponse:
        if not authorized(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        found = []
        for path in sorted(tickets.glob("SEC-*.md")):
            text = path.read_text()
            updates = re.findall(r"^## \S+: (.+)$", text, re.MULTILINE)
            found.append({"ticket": path.name, "title": text.splitlines()[0].removeprefix("# "),
                          "latest": updates[-1] if updates else None, "updates": len(updates)})
        return JSONResponse({"tickets": found})

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from firebreak.broker.state import read_or_create_secret

    parser = argparse.ArgumentParser(prog="python -m firebreak.security_receiver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8370)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--max-per-notification", type=int, default=MAX_PER_NOTIFICATION)
    parser.add_argument("--max-per-minute", type=int, default=MAX_PER_MINUTE)
    parser.add_argument("--alertmanager-url", help="watch this Alertmanager's silences")
    parser.add_argument("--alertmanager-user", default="firebreak")
    parser.add_argument("--alertmanager-password-file", type=Path,
                        help="the password of Alertmanager's API (its --web.config.file basic auth)")
    parser.add_argument("--silence-poll-s", type=float, default=SILENCE_POLL_S)
    args = parser.parse_args(argv)
    token = read_or_create_secret(security_dir(args.state_dir) / "token")
    auth = ((args.alertmanager_user, args.alertmanager_password_file.read_text().strip())
            if args.alertmanager_password_file else None)
    app = create_app(args.state_dir, token, max_per_notification=args.max_per_notification,
                     max_per_minute=args.max_per_minute, alertmanager_url=args.alertmanager_url,
                     alertmanager_auth=auth, silence_poll_s=args.silence_poll_s)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
