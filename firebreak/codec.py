"""Payload encryption: AES-256-GCM over every payload, failing closed on decode.

The Temporal server never sees plaintext: workflow inputs, results, signals,
updates, memos, summaries and (with ``DefaultFailureConverterWithEncodedAttributes``)
failure messages all pass through :class:`EncryptionCodec`. Search attributes,
ids, workflow and activity type names and headers do not: keep secrets out of them.

Unlike Temporal's sample codec, decode refuses a payload that is not encrypted:
otherwise anyone who can reach the server could inject plaintext signals or
updates that the workflow would accept as if they came from a key holder.

Encrypted payload layout::

    metadata: {"encoding": "binary/encrypted", "encryption-key-id": "<key id>"}
    data:     nonce (12 bytes) || AES-GCM(ciphertext || tag) of Payload.SerializeToString()

The key id is also bound into the ciphertext as associated data, so a payload
cannot be relabelled with another key id without failing authentication.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
KEY_BYTES = 32  # AES-256
# GCM's standard nonce, random per payload. NIST caps random nonces at 2^32 messages per key: rotate well before.
NONCE_BYTES = 12
TAG_BYTES = 16
_AAD_PREFIX = b"firebreak/payload/v1\x00"
_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class EncryptionError(ValueError):
    """A key or key set that cannot be used. Messages never contain key material."""


class DecryptionError(ValueError):
    """A payload this codec refuses to decode: not encrypted, unknown key, tampered or wrong key."""


def key_id_for(key: bytes) -> str:
    """A stable id for a key, so every process names it alike without extra configuration.

    A truncated SHA-256 under a domain tag: one-way, so it reveals nothing usable about the key.
    """
    return "fb-" + hashlib.sha256(b"firebreak-encryption-key-id\x00" + key).hexdigest()[:16]


def _decode_key(key_b64: str) -> bytes:
    # Standard or URL-safe alphabet, strictly: a stray character is a broken key, not noise to skip.
    text = key_b64.strip().translate(str.maketrans("-_", "+/"))
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EncryptionError("encryption key is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise EncryptionError(f"encryption key must be {KEY_BYTES} bytes (AES-256), got {len(key)}")
    return key


class EncryptionCodec(PayloadCodec):
    """Encrypts with the current key; decrypts with any known key, chosen by the payload's key id.

    Rotation, in two steps so no running process meets a key it does not know:
    1. append the new key (``OLD,NEW``) everywhere and restart: all decode it, none writes it yet;
    2. move it first (``NEW,OLD``) and restart: it encodes from now on.
    Drop ``OLD`` only once no open workflow (and no history you still want to read) holds payloads under it.
    """

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if current not in keys:
            raise EncryptionError(f"current key id {current!r} is not among the keys")
        self._ciphers: dict[str, AESGCM] = {}
        for key_id, key in keys.items():
            if not _KEY_ID.match(key_id):
                raise EncryptionError(f"bad key id {key_id!r}: 1-64 of A-Z a-z 0-9 . _ -")
            if len(key) != KEY_BYTES:
                raise EncryptionError(f"key {key_id!r} must be {KEY_BYTES} bytes (AES-256), got {len(key)}")
            self._ciphers[key_id] = AESGCM(bytes(key))
        self.current = current

    @classmethod
    def from_b64(cls, key_b64: str) -> EncryptionCodec:
        """One base64 key, or several separated by commas or whitespace: the first encodes, all decode.

        The comma form lets ``FIREBREAK_ENCRYPT_KEY=NEW,OLD`` rotate keys without another setting.
        Key ids are derived from the keys (:func:`key_id_for`).
        """
        parts = [p for p in re.split(r"[,\s]+", key_b64) if p]
        if not parts:
            raise EncryptionError("no encryption key given")
        keys = [_decode_key(p) for p in parts]
        ids = [key_id_for(k) for k in keys]
        return cls(dict(zip(ids, keys)), current=ids[0])

    @classmethod
    def from_key_file(cls, path: str | Path) -> EncryptionCodec:
        """A file of base64 keys, one a line, the current one first (as written by :func:`write_key_file`)."""
        lines = [line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines()]
        return cls.from_b64(",".join(line for line in lines if line))

    @staticmethod
    def generate_key_b64() -> str:
        return base64.b64encode(AESGCM.generate_key(bit_length=KEY_BYTES * 8)).decode("ascii")

    @property
    def key_ids(self) -> list[str]:
        return list(self._ciphers)

    def __repr__(self) -> str:  # never the keys
        return f"EncryptionCodec(current={self.current!r}, key_ids={self.key_ids!r})"

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        # Every payload, whatever its encoding: nothing leaves this process in clear.
        return [self.encrypt(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(p) for p in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        key_id = self.current
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[key_id].encrypt(nonce, payload.SerializeToString(), _aad(key_id))
        return Payload(
            metadata={"encoding": ENCODING, KEY_ID_METADATA: key_id.encode("ascii")},
            data=nonce + sealed,
        )

    def decrypt(self, payload: Payload) -> Payload:
        encoding = payload.metadata.get("encoding", b"")
        if encoding != ENCODING:
            # Fail closed: plaintext here was written by someone without the key.
            shown = encoding[:40].decode("ascii", "replace") or "none"
            raise DecryptionError(f"refusing a payload that is not encrypted (encoding {shown!r})")
        key_id = payload.metadata.get(KEY_ID_METADATA, b"").decode("ascii", "replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise DecryptionError(f"payload encrypted with an unknown key id {key_id[:64]!r}")
        if len(payload.data) < NONCE_BYTES + TAG_BYTES:
            raise DecryptionError("encrypted payload is truncated")
        nonce, sealed = payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:]
        try:
            plain = cipher.decrypt(nonce, sealed, _aad(key_id))
        except InvalidTag:
            raise DecryptionError(f"payload failed authentication under key {key_id!r}: tampered or wrong key") from None
        try:
            return Payload.FromString(plain)
        except DecodeError:  # authentic but not a payload: a bug, never accept it
            raise DecryptionError("decrypted data is not a payload") from None


def _aad(key_id: str) -> bytes:
    return _AAD_PREFIX + key_id.encode("ascii")


def write_key_file(path: str | Path, keys_b64: Sequence[str]) -> Path:
    """Write keys (current first), readable by the owner only. Refuses to replace an existing file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("".join(f"{k}\n" for k in keys_b64))
    return path


def ensure_key_file(path: str | Path) -> Path:
    """The key file at ``path``, created with a fresh key the first time (``firebreak up --encrypt``)."""
    path = Path(path)
    if not path.exists():
        write_key_file(path, [EncryptionCodec.generate_key_b64()])
    EncryptionCodec.from_key_file(path)  # fail now, not at the first payload
    return path
