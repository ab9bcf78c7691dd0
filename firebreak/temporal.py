"""One way to reach Temporal: the same data converter everywhere.

Clients, workers, test environments and the replayer all use
:data:`DATA_CONVERTER`, so a payload written by one is read by all.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes
from temporalio.service import TLSConfig

from firebreak.config import TemporalSettings

# Failure messages and stack traces go through the codec too, not in clear text.
DATA_CONVERTER: DataConverter = dataclasses.replace(
    pydantic_data_converter, failure_converter_class=DefaultFailureConverterWithEncodedAttributes
)

PHASE = SearchAttributeKey.for_keyword("FirebreakPhase")
SERVICE = SearchAttributeKey.for_keyword("FirebreakService")
SEVERITY = SearchAttributeKey.for_keyword("FirebreakSeverity")
RUNBOOK = SearchAttributeKey.for_keyword("FirebreakRunbook")
SEARCH_ATTRIBUTES = (PHASE, SERVICE, SEVERITY, RUNBOOK)


def data_converter(settings: TemporalSettings | None = None) -> DataConverter:
    """The shared converter, with the encryption codec when a key is configured."""
    if settings is None or not (settings.encrypt_key or settings.encrypt_key_file):
        return DATA_CONVERTER
    from firebreak.codec import EncryptionCodec  # only with encryption on

    if settings.encrypt_key and settings.encrypt_key_file:
        raise ValueError("set encrypt_key or encrypt_key_file, not both")
    codec = (EncryptionCodec.from_key_file(Path(settings.encrypt_key_file)) if settings.encrypt_key_file
             else EncryptionCodec.from_b64(settings.encrypt_key or ""))
    return dataclasses.replace(DATA_CONVERTER, payload_codec=codec)


async def connect(settings: TemporalSettings) -> Client:
    """A client for the embedded dev server, a self-hosted cluster or Temporal Cloud."""
    tls: bool | TLSConfig = False
    if settings.tls_cert or settings.tls_ca:
        tls = TLSConfig(
            client_cert=Path(settings.tls_cert).read_bytes() if settings.tls_cert else None,
            client_private_key=Path(settings.tls_key).read_bytes() if settings.tls_key else None,
            server_root_ca_cert=Path(settings.tls_ca).read_bytes() if settings.tls_ca else None,
        )
    elif settings.api_key:
        tls = True  # Temporal Cloud API keys always go over TLS
    return await Client.connect(
        settings.address,
        namespace=settings.namespace,
        tls=tls,
        api_key=settings.api_key,
        data_converter=data_converter(settings),
    )
