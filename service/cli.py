"""The `graddiag` command: probe a spec locally, or run the service (serve, worker, db).

Flags are generated from the pydantic models, so every spec field is a `probe` flag and every
setting a `serve`/`worker` flag, in kebab-case, with the models' own descriptions as help.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from graddiag.models.spec import Spec
from graddiag.service import diagnose_cli, remote
from graddiag.service.flags import EXIT_INVALID, add_model_flags, format_validation_error, given_values, load_spec
from graddiag.service.render import render_report
from graddiag.service.settings import Settings


def cmd_probe(args: argparse.Namespace) -> int:
    """Run one probe in this process and print its report."""
    try:
        spec = load_spec(args.spec, given_values(args, Spec))
    except ValidationError as exc:
        print(format_validation_error(exc), file=sys.stderr)
        return EXIT_INVALID
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    given = (("data_dir", args.data_dir), ("cache_dir", args.cache_dir), ("download_data", args.download))
    settings = Settings(**{k: v for k, v in given if v is not None})

    from graddiag.service.engine.data import DataUnavailableError
    from graddiag.service.local import probe

    try:
        report = probe(spec, settings=settings)
    except (DataUnavailableError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.model_dump_json(indent=2) if args.json else render_report(report))
    return 0


def _settings_from(args: argparse.Namespace) -> Settings:
    try:
        return Settings(**given_values(args, Settings))
    except ValidationError as exc:
        print(format_validation_error(exc, "settings"), file=sys.stderr)
        raise SystemExit(EXIT_INVALID) from exc


def cmd_serve(args: argparse.Namespace) -> int:
    """API + local workers until Ctrl-C / SIGTERM."""
    from graddiag.service.serve import serve

    serve(_settings_from(args))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Standalone supervised workers (--workers of them) against --db, beside an API elsewhere."""
    from graddiag.service.serve import worker_process

    worker_process(_settings_from(args))
    return 0


def cmd_dispatch(args: argparse.Namespace) -> int:
    """A dispatcher: runs from --db executed on the Ray cluster at --ray."""
    from graddiag.service.dispatch.dispatcher import dispatch_main

    settings = _settings_from(args)
    dispatch_main(settings, settings.ray_address)
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """Alembic migrations: upgrade, downgrade, current."""
    from graddiag.service.store import db

    url = _settings_from(args).db_url
    if args.action == "upgrade":
        db.upgrade(url, args.revision or "head")
    elif args.action == "downgrade":
        db.downgrade(url, args.revision or "-1")
    print(db.current(url) or "(empty database)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full command-line interface."""
    parser = argparse.ArgumentParser(prog="graddiag", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    probe = sub.add_parser("probe", help="train a spec briefly here and judge its gradients")
    probe.add_argument("--spec", metavar="FILE", help="JSON file with spec fields; flags override it")
    probe.add_argument("--json", action="store_true", help="print the full JSON report")
    probe.add_argument("--data-dir", help="CIFAR-10 directory (default: $GRADDIAG_DATA_DIR)")
    probe.add_argument("--cache-dir", help="decoded data-set cache (default: ~/.cache/graddiag)")
    probe.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="download CIFAR-10 when no copy is found (default: $GRADDIAG_DOWNLOAD_DATA, else yes)",
    )
    # A local probe writes no event files: tensorboard is a service-side option.
    add_model_flags(probe, Spec, skip=("tensorboard",))
    probe.set_defaults(handler=cmd_probe)

    for name, handler, text in (
        ("serve", cmd_serve, "run the API and local workers"),
        ("worker", cmd_worker, "run standalone workers (no API) against --db"),
        ("dispatch", cmd_dispatch, "execute queued runs on a Ray cluster (extra graddiag[dist])"),
    ):
        command = sub.add_parser(name, help=text)
        add_model_flags(command, Settings)
        command.add_argument("--db", dest="db_url", metavar="URL", help="alias of --db-url")
        if name == "dispatch":
            command.add_argument("--ray", dest="ray_address", metavar="ADDRESS", help="alias of --ray-address")
        command.set_defaults(handler=handler)

    db = sub.add_parser("db", help="database migrations")
    db.add_argument("action", choices=("upgrade", "downgrade", "current"))
    db.add_argument("revision", nargs="?", help="target revision (upgrade: head, downgrade: -1)")
    db.add_argument("--db", dest="db_url", metavar="URL", help="SQLAlchemy URL (default: $GRADDIAG_DB_URL)")
    db.set_defaults(handler=cmd_db)

    remote.add_commands(sub)
    diagnose_cli.add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `graddiag` console script."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
