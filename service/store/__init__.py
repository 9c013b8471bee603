"""Persistence: the SQLAlchemy schema, migrations glue, and plain functions over runs and sweeps."""
