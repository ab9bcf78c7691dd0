"""The security receiver: where Alertmanager sends Firebreak's own security alerts.

Firebreak never remediates itself: its misuse and lifecycle alerts (``firebreak/security_rules.yml``)
are routed here, not to the intake. Each Alertmanager notification (webhook v4) is kept as received and
files a ticket per alert for a person to investigate:

```
STATE_DIR/security/
  token                         the bearer token Alertmanager presents (0600)
  notifications.jsonl           every notification, one JSON object a line (0600)
  tickets/SEC-<fingerprint>.md  one ticket per alert, updated from firing to resolved (0600)
```

``python -m firebreak.security_receiver --port 8370 --state-dir DIR`` (started by ``firebreak up``).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

MAX_BODY = 1 << 20
_FINGERPRINT = re.compile(r"^[0-9a-f]{1,64}$")


def security_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / "security"


def _private_write(path: Path, data: bytes, *, append: bool = False) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _fingerprint(alert: dict[str, Any]) -> str:
    given = str(alert.get("fingerprint", ""))
    if _FINGERPRINT.match(given):
        return given
    # Not from Alertmanager as we know it: derive one from the labels, never use the text as a file name.
    labels = json.dumps(alert.get("labels") or {}, sort_keys=True)
    return hashlib.sha256(labels.encode()).hexdigest()[:16]


def ticket_text(alert: dict[str, Any], received_at: str) -> str:
    labels: dict[str, str] = {str(k): str(v) for k, v in (alert.get("labels") or {}).items()}
    annotations: dict[str, str] = {str(k): str(v) for k, v in (alert.get("annotations") or {}).items()}
    status = str(alert.get("status", "firing"))
    name = labels.get("alertname", "unnamed alert")
    detail = f" ({labels['reason']})" if labels.get("reason") else ""
    lines = [
        f"# [{status}] {name}{detail}",
        "",
        "Security alert on Firebreak's own agent identity. Firebreak does not remediate itself:",
        "a person investigates (start with the broker's audit log, `firebreak audit verify`).",
        "",
        f"- status: {status}",
        f"- severity: {labels.get('severity', '-')}",
        f"- category: {labels.get('category', '-')}",
        f"- started: {alert.get('startsAt', '-')}",
        f"- ended: {alert.get('endsAt', '-') if status == 'resolved' else '-'}",
        f"- updated: {received_at}",
        f"- summary: {annotations.get('summary', '-')}",
        f"- description: {annotations.get('description', '-')}",
        "",
        "## Labels",
        "",
        *(f"- {k}: {v}" for k, v in sorted(labels.items())),
        "",
    ]
    return "\n".join(lines)


def create_app(state_dir: str | Path, token: str) -> FastAPI:
    base = security_dir(state_dir)
    tickets = base / "tickets"
    tickets.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = threading.Lock()
    app = FastAPI(title="Firebreak security receiver", docs_url=None, redoc_url=None, openapi_url=None)

    def authorized(request: Request) -> bool:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True}

    @app.post("/v1/security/alerts")
    async def alerts(request: Request) -> JSONResponse:
        if not authorized(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        raw = await request.body()
        if len(raw) > MAX_BODY:
            return JSONResponse({"error": "too_large"}, status_code=413)
        try:
            body = json.loads(raw)
        except ValueError:
            return JSONResponse({"error": "bad_request", "reason": "body is not JSON"}, status_code=400)
        if not isinstance(body, dict) or not isinstance(body.get("alerts"), list):
            return JSONResponse({"error": "bad_request", "reason": "alerts: a list is required"}, status_code=400)
        received_at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        filed = []
        with lock:
            record = {"received_at": received_at, "notification": body}
            _private_write(base / "notifications.jsonl", (json.dumps(record, sort_keys=True) + "\n").encode(),
                           append=True)
            for alert in body["alerts"]:
                if not isinstance(alert, dict):
                    continue
                name = f"SEC-{_fingerprint(alert)}.md"
                _private_write(tickets / name, ticket_text(alert, received_at).encode())
                filed.append(name)
        return JSONResponse({"tickets": filed})

    @app.get("/v1/security/tickets")
    def list_tickets(request: Request) -> JSONResponse:
        if not authorized(request):
            return JSONResponse({"error": "unauthorized"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        found = [{"ticket": p.name, "title": p.read_text().splitlines()[0].removeprefix("# ")}
                 for p in sorted(tickets.glob("SEC-*.md"))]
        return JSONResponse({"tickets": found})

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from firebreak.broker.state import read_or_create_secret

    parser = argparse.ArgumentParser(prog="python -m firebreak.security_receiver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8370)
    parser.add_argument("--state-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    token = read_or_create_secret(security_dir(args.state_dir) / "token")
    uvicorn.run(create_app(args.state_dir, token), host=args.host, port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
