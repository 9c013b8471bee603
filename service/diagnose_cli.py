"""`graddiag diagnose path/to/script.py:make_model`: diagnose a model of your own from the command line.

The script is run as a module and the named function is called without arguments; it returns the model
(any ``torch.nn.Module`` taking a batch of 3×32×32 images and giving class logits for 10 classes). The
model trains on CIFAR-10 (``--data cifar10``, normalised as the probe's batches are) or on N(0, 1) inputs
with random labels (``--data synthetic``) with SGD at ``--lr``, and the report table is the one
``graddiag probe`` prints. ``--upload URL`` stores the report on a graddiag server as an external run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from graddiag.service.flags import EXIT_INVALID
from graddiag.service.render import render_report
from graddiag.service.settings import Settings


class CommandError(Exception):
    """A problem with the command's input, printed as one line; exit status EXIT_INVALID."""


def load_factory(target: str) -> Any:
    """The function named by ``path/to/script.py:function`` (imported from that file)."""
    path_text, sep, name = target.rpartition(":")
    if not sep or not path_text or not name:
        raise CommandError(f"{target!r}: give the script and the function as path/to/script.py:make_model")
    path = Path(path_text)
    if not path.is_file():
        raise CommandError(f"{path}: no such file")
    spec = importlib.util.spec_from_file_location(f"graddiag_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise CommandError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    # The script's own folder first, so its sibling imports work as they do when it is run directly.
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise CommandError(f"{path} has no function {name!r}")
    return factory


class _Batches:
    """`steps` training batches of the chosen data, made step by step (re-iterable, nothing kept)."""

    def __init__(self, source: Any, steps: int) -> None:
        self.source = source
        self.steps = steps

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return (self.source.batch(step) for step in range(self.steps))


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Build the user's model, diagnose it here, print the report and optionally upload it."""
    import torch
    from torch import nn

    from graddiag.service.engine.data import (
        DatasetCache,
        DataUnavailableError,
        ImageBatchSource,
        SyntheticBatchSource,
    )
    from graddiag.service.engine.diagnose import diagnose
    from graddiag.service.engine.probe import resolve_device

    try:
        if args.steps < 1 or args.record_every < 1 or args.batch_size < 1 or not args.lr > 0:
            raise CommandError("--steps, --record-every and --batch-size must be at least 1 and --lr above 0")
        factory = load_factory(args.target)
        torch.manual_seed(args.seed)  # the model's initial weights follow --seed too
        model = factory()
        if not isinstance(model, nn.Module):
            raise CommandError(f"{args.target} returned {type(model).__name__}, not a torch.nn.Module")
        device = resolve_device(args.device)
    except (CommandError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID

    if args.data == "cifar10":
        given = (("data_dir", args.data_dir), ("cache_dir", args.cache_dir))
        settings = Settings(**{k: v for k, v in given if v is not None})
        try:
            train, test = DatasetCache(settings.data_dir, settings.cache_dir).get()
        except DataUnavailableError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        source: Any = ImageBatchSource(
            train, test, seed=args.seed, batch_size=args.batch_size, device=device, eval_samples=1
        )
    else:
        source = SyntheticBatchSource(seed=args.seed, batch_size=args.batch_size, device=device, eval_samples=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    report = diagnose(
        model,
        _Batches(source, args.steps),
        optimizer=optimizer,
        steps=args.steps,
        record_every=args.record_every,
        device=str(device),
        copy=False,  # the model was built for this command alone
    )
    print(report.model_dump_json(indent=2) if args.json else render_report(report))
    if args.upload:
        from graddiag.service.client import Client, GraddiagError

        try:
            token = args.token or os.environ.get("GRADDIAG_TOKEN")
            with Client(args.upload, token=token, timeout=60) as client:
                run = client.upload(report, name=args.name, tags=args.tag)
        except GraddiagError as exc:
            print(f"error: upload refused: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"error: cannot reach {args.upload}: {exc}", file=sys.stderr)
            return 1
        print(f"uploaded: run {run['id']} ({args.upload.rstrip('/')}/runs/{run['id']})", file=sys.stderr)
    return 0


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `graddiag diagnose` on the `graddiag` parser."""
    command = sub.add_parser(
        "diagnose",
        help="train a model of your own briefly here and judge its gradients",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    command.add_argument("target", metavar="SCRIPT.py:FUNCTION", help="a function that returns the model")
    command.add_argument("--data", choices=("cifar10", "synthetic"), default="cifar10", help="default: cifar10")
    command.add_argument("--steps", type=int, default=50, help="training steps (default: 50)")
    command.add_argument("--record-every", type=int, default=5, help="record every N steps and the last (default: 5)")
    command.add_argument("--batch-size", type=int, default=64, help="default: 64")
    command.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    command.add_argument("--seed", type=int, default=0, help="seed of the batches and the model's init (default: 0)")
    command.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: auto")
    command.add_argument("--json", action="store_true", help="print the full JSON report")
    command.add_argument("--data-dir", help="CIFAR-10 directory (default: $GRADDIAG_DATA_DIR)")
    command.add_argument("--cache-dir", help="decoded data-set cache (default: ~/.cache/graddiag)")
    command.add_argument("--upload", metavar="URL", help="store the report on this graddiag server")
    command.add_argument("--name", help="the uploaded run's name")
    command.add_argument("--tag", action="append", default=[], help="a tag of the uploaded run (repeatable)")
    command.add_argument("--token", help="bearer token of the server (default: $GRADDIAG_TOKEN)")
    command.set_defaults(handler=cmd_diagnose)
