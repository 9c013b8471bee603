"""The REST API (v1): see :func:`service.api.app.create_app`."""

from graddiag.service.api.app import create_app

__all__ = ["create_app"]
