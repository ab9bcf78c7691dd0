"""The credential broker: service, client, audit log and CLI.

Import the pieces from their modules (``firebreak.broker.client`` in the
worker, ``firebreak.broker.app`` / ``.server`` for the service) so that the
worker does not import FastAPI or uvicorn.
"""
