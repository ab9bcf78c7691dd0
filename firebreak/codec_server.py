"""A decode-only codec server, so the Temporal UI and CLI can show encrypted payloads to those allowed.

    python -m firebreak.codec_server --port 8360 --key-file PATH --token-file PATH \\
        --ui-origin http://127.0.0.1:8233 --namespace default

The protocol is Temporal's remote codec protocol: ``POST <endpoint>/decode`` with
``{"payloads": [...]}`` in protobuf JSON (metadata values and data base64),
answered in the same shape, decoded.

Unlike Temporal's sample server:

- there is no ``/encode``: whoever could call it could forge payloads that workers accept;
- every request needs ``Authorization: Bearer <token>`` (compared in constant time);
- ``X-Namespace`` must be the configured namespace: the key belongs to one namespace;
- CORS admits the configured UI origins only, never ``*``;
- a payload the codec cannot decrypt is answered as the refusal marker
  (``{"firebreak_unauthenticated": reason}``): garbage is never passed through as if genuine;
- a payload's binding (``firebreak-bind``: the workflow, run and message it was made for) is shown as
  written: decoding for a person, the server has no place to check it against (workers do).
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from google.protobuf import json_format
from starlette.middleware.cors import CORSMiddleware
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.converter import PayloadCodec

from firebreak.codec import DecryptionError, EncryptionCodec, unauthenticated_marker
from firebreak.serving import ThreadedServer

# Exactly what the Temporal UI sends: it adds Authorization only when told to pass a token.
ALLOWED_HEADERS = ["Authorization", "Content-Type", "X-Namespace"]
# A history page's payloads; Temporal's own per-payload limit is 2 MiB.
MAX_BODY_BYTES = 16 * 1024 * 1024
MIN_TOKEN_CHARS = 16
DEFAULT_PORT = 8360


def _error(status: int, error: str, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # Errors name the problem, never echo a header or payload back.
    return JSONResponse({"error": error, "reason": reason}, status_code=status, headers=headers)


def create_app(
    codec: PayloadCodec,
    *,
    bearer_token: str,
    allowed_origins: list[str],
    namespace: str = "default",
) -> FastAPI:
    """The codec server app: ``POST /decode`` and nothing else."""
    if len(bearer_token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the codec server's bearer token must be at least {MIN_TOKEN_CHARS} characters")
    if any(origin.strip() in ("*", "", "null") for origin in allowed_origins):
        # A wildcard with credentials would let any web page a token holder visits read plaintext.
        raise ValueError("allowed origins must be explicit (scheme://host:port), never '*', 'null' or empty")
    expected = bearer_token.encode()
    app = FastAPI(title="Firebreak codec server", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=[origin.rstrip("/") for origin in allowed_origins],
        allow_methods=["POST"],
        allow_headers=ALLOWED_HEADERS,
        allow_credentials=True,
        max_age=600,
    )

    @app.post("/decode")
    async def decode(request: Request) -> JSONResponse:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), expected):
            return _error(401, "unauthorized", "missing or bad bearer token", {"WWW-Authenticate": "Bearer"})
        asked = request.headers.get("x-namespace")
        if asked is None:
            return _error(403, "forbidden", "X-Namespace header required")
        if asked != namespace:
            return _error(403, "forbidden", "this codec server does not decode for that namespace")
        if not request.headers.get("content-type", "").lower().startswith("application/json"):
            return _error(415, "unsupported_media_type", "send application/json")
        body = await _read_limited(request)
        if body is None:
            return _error(413, "too_large", f"at most {MAX_BODY_BYTES} bytes")
        try:
            document = json.loads(body)
            if not isinstance(document, dict) or not isinstance(document.get("payloads", []), list):
                raise ValueError("expected an object with a payloads list")
            message = json_format.ParseDict({"payloads": document.get("payloads", [])}, Payloads())
        except (ValueError, RecursionError, json_format.ParseError):
            return _error(400, "bad_request", "body must be {\"payloads\": [...]} in protobuf JSON")
        # One payload at a time: one that cannot be authenticated (an outsider's, or the patch markers
        # the SDK writes without the codec) is shown as the refusal marker, never as if it were genuine,
        # and does not hide the rest of the history.
        decoded = []
        for payload in message.payloads:
            try:
                decoded.extend(await codec.decode([payload]))
            except DecryptionError as exc:
                decoded.append(unauthenticated_marker(str(exc)))
        return JSONResponse(
            {"payloads": [_payload_json(p) for p in decoded]},
            # Plaintext: keep it out of browser and proxy caches.
            headers={"Cache-Control": "no-store"},
        )

    return app


async def _read_limited(request: Request) -> bytes | None:
    """The body, or None past MAX_BODY_BYTES: stop reading there rather than buffer whatever is sent."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _payload_json(payload: Payload) -> dict[str, object]:
    # Proto JSON, as the UI and the CLI parse it: bytes as base64, camelCase names.
    return json_format.MessageToDict(payload)


class CodecServer(ThreadedServer):
    """The real codec server over real HTTP on a free port, in a background thread (for tests)."""

    def __init__(
        self,
        codec: PayloadCodec,
        *,
        bearer_token: str,
        allowed_origins: list[str],
        namespace: str = "default",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        app = create_app(codec, bearer_token=bearer_token, allowed_origins=allowed_origins, namespace=namespace)
        super().__init__(app, host=host, port=port, name="firebreak-codec")


def _read_secret_file(path: Path, what: str) -> str:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        print(f"warning: {what} file {path} is readable by others; chmod 600 it", file=sys.stderr)
    return path.read_text().strip()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m firebreak.codec_server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--key-file", type=Path, default=None,
                        help="base64 AES-256 keys, one a line, current first (default: $FIREBREAK_ENCRYPT_KEY)")
    parser.add_argument("--token-file", type=Path, required=True, help="the bearer token clients must present")
    parser.add_argument("--ui-origin", action="append", default=[],
                        help="a Temporal UI origin allowed by CORS (repeatable), e.g. http://127.0.0.1:8233")
    parser.add_argument("--namespace", default="default")
    args = parser.parse_args(argv)

    if args.key_file is not None:
        _read_secret_file(args.key_file, "key")  # the permission warning
        codec = EncryptionCodec.from_key_file(args.key_file)
    elif os.environ.get("FIREBREAK_ENCRYPT_KEY"):
        codec = EncryptionCodec.from_b64(os.environ["FIREBREAK_ENCRYPT_KEY"])
    else:
        parser.error("give --key-file or set FIREBREAK_ENCRYPT_KEY")
    token = _read_secret_file(args.token_file, "token")
    app = create_app(codec, bearer_token=token, allowed_origins=args.ui_origin, namespace=args.namespace)
    # Key ids and origins are not secret; the keys and the token are never printed.
    print(f"firebreak codec server on http://{args.host}:{args.port}/decode  namespace {args.namespace}  "
          f"key ids {codec.key_ids} (current {codec.current})  ui origins {args.ui_origin}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)


if __name__ == "__main__":
    main()
