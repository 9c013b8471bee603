"""`graddiag probe --help` (and serve's) says, for every field, what it allows and its default."""

from __future__ import annotations

import re
from typing import get_args

import pytest

from graddiag.models.spec import Activation, Init, Spec
from graddiag.service.cli import main


def _help(capsys: pytest.CaptureFixture[str], *command: str) -> str:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    # argparse wraps the help: one line per flag is easier to read the entries from.
    return re.sub(r"\s+", " ", capsys.readouterr().out)


def _entry(text: str, flag: str) -> str:
    """The help of one flag: from the flag to the next option."""
    found = re.search(rf" {flag}[ ,]", text)
    assert found is not None, flag
    start = found.end()
    # The next flag's entry: a flag not of this one's --no- twin.
    following = re.search(r" --(?!no-)[a-z][a-z-]*[ ,]", text[start:])
    return text[start : start + (following.start() if following else len(text))]


def test_probe_help_lists_allowed_values_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "probe")
    defaults = Spec()
    for name in Spec.model_fields:
        if name == "tensorboard":
            continue  # a service-side option, not a probe flag
        flag = "--" + name.replace("_", "-")
        entry = _entry(text, flag)
        value = getattr(defaults, name)
        shown = "none" if value is None else ("yes" if value is True else "no" if value is False else str(value))
        assert f"Default: {shown}." in entry, entry
    activation = _entry(text, "--activation")
    assert "One of: " + ", ".join(get_args(Activation)) + "." in activation
    assert "One of: " + ", ".join(get_args(Init)) + "." in _entry(text, "--init")
    # Numbers give their interval (from the field's own constraints).
    assert "[1, 100]" in _entry(text, "--depth") and "[0, 2147483647]" in _entry(text, "--seed")
    assert "(0, 1000]" in _entry(text, "--lr")
    # Short choices are the flag's metavar too.
    assert "--optimizer {sgd,momentum,adam,adamw}" in text
    assert "--norm-position {pre,post}" in text and "--pooling {cls,mean}" in text
    # A field that takes a number or a name says both.
    assert "Allowed: a number, chrono or none." in _entry(text, "--forget-bias")
    assert "[1, 64]" in _entry(text, "--heads") and "[1, 8]" in _entry(text, "--mlp-ratio")


def test_serve_help_gives_defaults_too(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "serve")
    assert "Default: 8000." in _entry(text, "--port") and "[1, 65535]" in _entry(text, "--port")
    assert "Default: yes." in _entry(text, "--download-data")
