"""One way to reach Temporal: the same data converter everywhere.

Clients, workers, test environments and the replayer all use :func:`data_converter` of the same
settings, so a payload written by one is read by all: :data:`DATA_CONVERTER` plus the payload
authentication codec (``payload_key_file``, the default stack) or the encryption codec.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from temporalio.client import Client, Interceptor
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.service import TLSConfig

from firebreak.config import TemporalSettings

# No codec: what payloads look like on the wire without a key, and how tests/histories were recorded.
# Failure messages stay readable in the UI; only with encryption do they go through the codec.
DATA_CONVERTER: DataConverter = pydantic_data_converter

PHASE = SearchAttributeKey.for_keyword("FirebreakPhase")
SERVICE = SearchAttributeKey.for_keyword("FirebreakService")
SEVERITY = SearchAttributeKey.for_keyword("FirebreakSeverity")
RUNBOOK = SearchAttributeKey.for_keyword("FirebreakRunbook")
SEARCH_ATTRIBUTES = (PHASE, SERVICE, SEVERITY, RUNBOOK)


def data_converter(settings: TemporalSettings | None = None) -> DataConverter:
    """The shared converter: encrypting when an encryption key is set (AES-GCM authenticates too),
    else authenticating when a payload key is set, else plain."""
    if settings is None:
        return DATA_CONVERTER
    from firebreak.codec import BoundPayloadConverter, EncryptionCodec

    if settings.encrypt_key or settings.encrypt_key_file:
        if settings.encrypt_key and settings.encrypt_key_file:
            raise ValueError("set encrypt_key or encrypt_key_file, not both")
        codec = (EncryptionCodec.from_key_file(Path(settings.encrypt_key_file)) if settings.encrypt_key_file
                 else EncryptionCodec.from_b64(settings.encrypt_key or ""))
        # Failure messages and stack traces go through the codec too, not in clear text.
        return dataclasses.replace(DATA_CONVERTER, payload_codec=codec, payload_converter_class=BoundPayloadConverter,
                                   failure_converter_class=DefaultFailureConverterWithEncodedAttributes)
    if settings.payload_key_file:
        return authenticated_converter(settings.payload_key_file)
    return DATA_CONVERTER


def authenticated_converter(payload_key_file: str | Path) -> DataConverter:
    """DATA_CONVERTER that signs every payload and refuses unsigned ones (see firebreak.codec)."""
    from firebreak.codec import BoundPayloadConverter, PayloadAuthCodec

    # The codec hands a workflow its messages in an envelope saying where they were bound; the converter reads it.
    return dataclasses.replace(DATA_CONVERTER, payload_codec=PayloadAuthCodec.from_key_file(Path(payload_key_file)),
                               payload_converter_class=BoundPayloadConverter)


def with_binding(converter: DataConverter, interceptors: Sequence[Interceptor] = ()) -> list[Interceptor]:
    """``interceptors`` plus, with a payload codec, the one that binds each payload to its place.

    Every client with a codec needs it: its messages must say which message and run they are for, or
    workflows refuse them (see :mod:`firebreak.binding`). Workers built from the client inherit it.
    """
    from firebreak.binding import PayloadBinding

    if converter.payload_codec is None or any(isinstance(i, PayloadBinding) for i in interceptors):
        return list(interceptors)
    return [*interceptors, PayloadBinding(converter.payload_converter)]


async def connect(settings: TemporalSettings, interceptors: Sequence[Interceptor] = ()) -> Client:
    """A client for the embedded dev server, a self-hosted cluster or Temporal Cloud.

    ``interceptors``: e.g. :func:`firebreak.telemetry.temporal_interceptors` for the services (a
    worker built from the client inherits them). Payload binding is added (:func:`with_binding`).
    """
    tls: bool | TLSConfig = False
    if settings.tls_cert or settings.tls_ca:
        tls = TLSConfig(
            client_cert=Path(settings.tls_cert).read_bytes() if settings.tls_cert else None,
            client_private_key=Path(settings.tls_key).read_bytes() if settings.tls_key else None,
            server_root_ca_cert=Path(settings.tls_ca).read_bytes() if settings.tls_ca else None,
        )
    elif settings.api_key:
        tls = True  # Temporal Cloud API keys always go over TLS
    converter = data_converter(settings)
    return await Client.connect(
        settings.address,
        namespace=settings.namespace,
        tls=tls,
        api_key=settings.api_key,
        data_converter=converter,
        interceptors=with_binding(converter, interceptors),
    )
