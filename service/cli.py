"""The `graddiag` command: probe a spec locally, or run the service (serve, worker, db).

Flags are generated from the pydantic models, so every spec field is a `probe` flag and every
setting a `serve`/`worker` flag, in kebab-case, with the models' own descriptions as help.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from models.spec import Spec
from service.settings import Settings

EXIT_INVALID = 2


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], skip: Sequence[str] = ()) -> None:
    """One string flag per field; pydantic does the parsing so errors name the field."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        if field.annotation is bool:
            parser.add_argument(
                _flag(name),
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=field.description,
            )
        else:
            parser.add_argument(_flag(name), dest=name, default=None, metavar="VALUE", help=field.description)


def _given(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    values = {name: getattr(args, name, None) for name in model.model_fields}
    return {
        k: (None if isinstance(v, str) and v.lower() in ("none", "null") else v)
        for k, v in values.items()
        if v is not None
    }


def format_validation_error(error: ValidationError) -> str:
    """One line per offending field: 'field: what is wrong'."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "spec"
        lines.append(f"  {where}: {item['msg']}")
    return "invalid spec:\n" + "\n".join(lines)


def load_spec(spec_file: str | None, overrides: dict[str, Any]) -> Spec:
    """A spec from an optional JSON file, with command-line values taking precedence."""
    base: dict[str, Any] = {}
    if spec_file:
        try:
            base = json.loads(Path(spec_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read spec file {spec_file}: {exc}") from exc
        if not isinstance(base, dict):
            raise ValueError(f"spec file {spec_file} must hold a JSON object")
    return Spec.model_validate({**base, **overrides})


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.3g}"


def render_report(report: Any) -> str:
    """The human-readable report: per-layer table at init and at the end, verdict, theory, advice."""
    by_step: dict[int, dict[int, Any]] = {}
    for record in report.records:
        by_step.setdefault(record.step, {})[record.layer] = record
    first, last = min(by_step), max(by_step)
    out = [
        f"{'#':>3} {'layer':<22} {'kind':<6} {'grad@init':>10} {'grad@end':>10} {'act∂@init':>10} "
        f"{'rel@init':>10} {'update':>10}"
    ]
    for layer in report.layers:
        a, b = by_step[first].get(layer.index), by_step[last].get(layer.index)
        out.append(
            f"{layer.index:>3} {layer.name:<22} {layer.kind:<6} "
            f"{_fmt(a and a.grad_norm):>10} {_fmt(b and b.grad_norm):>10} "
            f"{_fmt(a and a.act_grad_norm):>10} {_fmt(a and a.rel_grad):>10} {_fmt(b and b.update_ratio):>10}"
        )
    verdict = report.verdict
    out += [
        "",
        f"verdict: {verdict.label.upper()}  (at init: {verdict.at_init}, during training: {verdict.trained or '—'})",
    ]
    out += [f"  - {reason}" for reason in verdict.reasons]
    if verdict.theory.applicable:
        t = verdict.theory
        out.append(
            f"theory: χ₁ = {_fmt(t.chi1)}, q* = {_fmt(t.q_star)}, predicted {_fmt(t.predicted_decades_per_layer)} "
            f"decades/layer, measured {_fmt(t.measured_decades_per_layer)}"
        )
    else:
        out.append(f"theory: {verdict.theory.reason}")
    if verdict.advice:
        out.append("advice:")
        out += [f"  - {item}" for item in verdict.advice]
    e, t = report.eval, report.timing
    out.append(
        f"train loss {_fmt(e.train_loss)} acc {_fmt(e.train_accuracy)} | held-out loss {_fmt(e.loss)} "
        f"acc {_fmt(e.accuracy)} on {e.samples} | gap {_fmt(e.generalization_gap)}"
    )
    out.append(f"{t.steps_run} steps on {t.device}: {t.step_ms:.2f} ms/step, {t.total_s:.2f} s total")
    return "\n".join(out)


def cmd_probe(args: argparse.Namespace) -> int:
    """Run one probe in this process and print its report."""
    try:
        spec = load_spec(args.spec, _given(args, Spec))
    except ValidationError as exc:
        print(format_validation_error(exc), file=sys.stderr)
        return EXIT_INVALID
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    settings = Settings(**{k: v for k, v in (("data_dir", args.data_dir), ("cache_dir", args.cache_dir)) if v})

    from service.engine.data import DatasetCache, DataUnavailableError
    from service.engine.probe import run_probe

    try:
        data = DatasetCache(settings.data_dir, settings.cache_dir).get() if spec.dataset == "cifar10" else None
        report = run_probe(spec, data=data, eval_samples=settings.eval_samples)
    except (DataUnavailableError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.model_dump_json(indent=2) if args.json else render_report(report))
    return 0


def _settings_from(args: argparse.Namespace) -> Settings:
    try:
        return Settings(**_given(args, Settings))
    except ValidationError as exc:
        print(format_validation_error(exc).replace("invalid spec", "invalid settings"), file=sys.stderr)
        raise SystemExit(EXIT_INVALID) from exc


def cmd_serve(args: argparse.Namespace) -> int:
    """API + local workers until Ctrl-C / SIGTERM."""
    from service.serve import serve

    serve(_settings_from(args))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Standalone supervised workers (--workers of them) against --db, beside an API elsewhere."""
    from service.serve import worker_process

    worker_process(_settings_from(args))
    return 0


def cmd_dispatch(args: argparse.Namespace) -> int:
    """A dispatcher: runs from --db executed on the Ray cluster at --ray."""
    from service.dispatch.dispatcher import dispatch_main

    settings = _settings_from(args)
    dispatch_main(settings, settings.ray_address)
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """Alembic migrations: upgrade, downgrade, current."""
    from service.store import db

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
    # A local probe writes no event files: tensorboard is a service-side option.
    _add_model_flags(probe, Spec, skip=("tensorboard",))
    probe.set_defaults(handler=cmd_probe)

    for name, handler, text in (
        ("serve", cmd_serve, "run the API and local workers"),
        ("worker", cmd_worker, "run standalone workers (no API) against --db"),
        ("dispatch", cmd_dispatch, "execute queued runs on a Ray cluster (extra graddiag[dist])"),
    ):
        command = sub.add_parser(name, help=text)
        _add_model_flags(command, Settings)
        command.add_argument("--db", dest="db_url", metavar="URL", help="alias of --db-url")
        if name == "dispatch":
            command.add_argument("--ray", dest="ray_address", metavar="ADDRESS", help="alias of --ray-address")
        command.set_defaults(handler=handler)

    db = sub.add_parser("db", help="database migrations")
    db.add_argument("action", choices=("upgrade", "downgrade", "current"))
    db.add_argument("revision", nargs="?", help="target revision (upgrade: head, downgrade: -1)")
    db.add_argument("--db", dest="db_url", metavar="URL", help="SQLAlchemy URL (default: $GRADDIAG_DB_URL)")
    db.set_defaults(handler=cmd_db)

    from service import remote  # here, not at the top: remote imports this module's helpers

    remote.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `graddiag` console script."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
