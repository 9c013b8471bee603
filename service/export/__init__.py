"""Exports of finished reports to other tools' formats.

Each exporter is a pure layer over :class:`service.engine.report.Report`: it never touches the store
or the API. Importing this package loads no exporter, so exporters whose optional dependencies are
missing only fail when they are used:

- :mod:`service.export.tensorboard`: TensorBoard event files (the ``graddiag[tensorboard]`` extra);
- :mod:`service.export.archive`: a stored run's events as one tar.gz, read from the store for the
  API's download route and ``graddiag tensorboard-export --db``.
"""
