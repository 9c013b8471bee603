"""Exports of finished reports to other tools' formats.

Each exporter is a pure layer over :class:`service.engine.report.Report`: it never touches the store
or the API, which call it. Importing this package loads no exporter, so exporters whose optional
dependencies are missing only fail when they are used:

- :mod:`service.export.tensorboard`: TensorBoard event files (the ``graddiag[tensorboard]`` extra).
"""
