"""Client commands of `graddiag`: submit, sweep, status, watch and export (the per-layer records, or with
--time a recurrent run's gradient through time) against a running server, and tensorboard-export
(through the server, or straight from its database).

The server is `--url`, else `$GRADDIAG_URL`, else http://127.0.0.1:8000; a server that requires a
bearer token gets `--token`, else `$GRADDIAG_TOKEN`. Every call goes through
:class:`service.client.Client`. Results go to stdout, progress and errors to stderr.

Exit codes: 0 done (a waited run or sweep succeeded); 1 a run failed or was cancelled, or the server
refused the request (e.g. 404 unknown run, 409 not finished); 2 invalid input (a spec field, locally
or as the server's 422); 3 the server could not be reached; 130 interrupted while following a run
(the run itself goes on).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import IO, Any, Final

import httpx
from pydantic import ValidationError

from graddiag.models.spec import Spec
from graddiag.service.client import DEFAULT_URL, FINISHED, Client, GraddiagError, Json
from graddiag.service.engine.report import Report
from graddiag.service.flags import (
    EXIT_INVALID,
    add_model_flags,
    format_validation_error,
    given_values,
    load_spec,
    read_spec_file,
)
from graddiag.service.render import render_report
from graddiag.service.settings import Settings

URL_ENV: Final = "GRADDIAG_URL"
TOKEN_ENV: Final = "GRADDIAG_TOKEN"
EXIT_FAILED: Final = 1
EXIT_UNREACHABLE: Final = 3
EXIT_INTERRUPTED: Final = 130
BAR_WIDTH: Final = 30
# A sweep cell whose run has no verdict shows its status instead; a missing grid point shows this.
NO_CELL: Final = "—"
# How RUN_ID arguments are explained: the server takes any unique prefix of an id.
ID_HELP: Final = "the run id or a unique prefix of it (at least 6 characters, as the commands print it)"


class UsageError(Exception):
    """Input refused before anything was sent (exit 2)."""


Handler = Callable[[argparse.Namespace, Client], int]


# --- plumbing ----------------------------------------------------------------------------------------


def server_url(args: argparse.Namespace) -> str:
    """--url, else $GRADDIAG_URL, else the default local server."""
    return str(args.url or os.environ.get(URL_ENV) or DEFAULT_URL)


def server_token(args: argparse.Namespace) -> str | None:
    """--token, else $GRADDIAG_TOKEN, else none."""
    return args.token or os.environ.get(TOKEN_ENV) or None


def _describe_problem(error: GraddiagError) -> str:
    if not error.errors:
        return f"error: {error}"
    # The detail repeats the field errors; one line per field reads better.
    lines = [f"error: {error.status} {error.title}:"]
    for item in error.errors:
        loc = [str(part) for part in item.get("loc", [])]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        lines.append(f"  {'.'.join(loc) or 'request'}: {item.get('msg', '')}")
    return "\n".join(lines)


def _guarded(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Run `handler` with a Client; turn every expected failure into a message on stderr and an exit code."""

    def run(args: argparse.Namespace) -> int:
        url = server_url(args)
        try:
            with Client(url, timeout=args.http_timeout, token=server_token(args)) as client:
                return handler(args, client)
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_INVALID
        except ValidationError as exc:
            print(format_validation_error(exc), file=sys.stderr)
            return EXIT_INVALID
        except GraddiagError as exc:
            print(_describe_problem(exc), file=sys.stderr)
            return EXIT_INVALID if exc.status == 422 else EXIT_FAILED
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            print(
                f"error: cannot reach the graddiag server at {url} ({reason}); start one with `graddiag serve` "
                f"or point --url / ${URL_ENV} at it",
                file=sys.stderr,
            )
            return EXIT_UNREACHABLE
        except KeyboardInterrupt:
            print("\ninterrupted; runs already submitted go on", file=sys.stderr)
            return EXIT_INTERRUPTED

    return run


def parse_value(text: str) -> Any:
    """A command-line value as JSON when it parses (2 → int, 1e-3 → float, true, null), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _assignment(text: str, flag: str) -> tuple[str, str]:
    field, sep, value = text.partition("=")
    if not sep or not field.strip():
        raise UsageError(f"{flag} takes FIELD=VALUE, got {text!r}")
    return field.strip().replace("-", "_"), value


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`--grid depth=2,5,10` items → {"depth": [2, 5, 10]}."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        field, values = _assignment(item, "--grid")
        if field in grid:
            raise UsageError(f"--grid names {field} twice; list all its values in one --grid {field}=A,B,…")
        grid[field] = [parse_value(value.strip()) for value in values.split(",") if value.strip()]
    return grid


class _Progress:
    """One progress line on stderr: rewritten in place on a terminal, a new line per change otherwise."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._last = ""

    def show(self, line: str) -> None:
        if line == self._last:
            return
        if self._tty:
            self._stream.write("\r" + line.ljust(len(self._last)))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()
        self._last = line

    def close(self) -> None:
        if self._tty and self._last:
            self._stream.write("\n")
            self._stream.flush()


@contextmanager
def _progress() -> Iterator[_Progress]:
    progress = _Progress(sys.stderr)
    try:
        yield progress
    finally:
        progress.close()


def _bar(done: int, total: int) -> str:
    filled = round(BAR_WIDTH * done / total) if total else 0
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"


def run_progress_line(run: Json) -> str:
    """`run 1a2b3c4d running [#####.....] 40/100 loss 2.25 so far: healthy`."""
    head = f"run {run['id'][:8]} {run['status']}"
    progress = run.get("progress") or {}
    step, steps = progress.get("step"), progress.get("steps")
    if run["status"] != "running" or step is None or not steps:
        return head
    line = f"{head} {_bar(step, steps)} {step}/{steps}"
    if progress.get("loss") is not None:
        line += f" loss {progress['loss']:.3g}"
    if progress.get("label_so_far"):
        line += f" so far: {progress['label_so_far']}"
    return line


def follow_run(client: Client, run_id: str, poll: float) -> Json:
    """Poll the run until it finishes, showing its progress on stderr; the finished run."""
    with _progress() as progress:
        while True:
            run = client.get(run_id)
            progress.show(run_progress_line(run))
            if run["status"] in FINISHED:
                return run
            time.sleep(poll)


def print_outcome(run: Json, as_json: bool) -> int:
    """The finished run: its report (or JSON) on stdout when it succeeded; else why not, on stderr."""
    if as_json:
        print(json.dumps(run, indent=2))
    elif run["status"] == "succeeded":
        print(render_report(Report.model_validate(run["report"])))
    if run["status"] == "succeeded":
        return 0
    print(f"run {run['id']} {run['status']}: {run.get('error') or 'no verdict'}", file=sys.stderr)
    return EXIT_FAILED


# --- sweeps ------------------------------------------------------------------------------------------


def _config_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def _grid_value(value: Any) -> str:
    """A grid value as --grid takes it back: null for None (forget_bias's PyTorch default), else as is."""
    return "null" if value is None else str(value)


def _config_label(config: dict[str, Any]) -> str:
    return ", ".join(f"{field}={_grid_value(value)}" for field, value in config.items()) or "(base spec)"


def render_sweep(status: Json, summary: Json) -> str:
    """The verdict matrix (a row per non-depth combination, a column per depth), each row's critical depth and
    the shallowest depth of each of its findings.

    A cell without a verdict shows its run's status (queued, running, failed, cancelled).
    """
    statuses: dict[tuple[str, int | None], str] = {}
    for run in status["runs"]:
        config = {field: value for field, value in run["grid"].items() if field != "depth"}
        statuses[(_config_key(config), run["grid"].get("depth"))] = run["status"]
    depths = sorted({depth for config in summary["configs"] for depth in config["depths"]})
    rows = []
    for config in summary["configs"]:
        key = _config_key(config["config"])
        cells = dict.fromkeys(depths, NO_CELL)
        for depth, verdict in zip(config["depths"], config["verdicts"], strict=True):
            cells[depth] = verdict or statuses.get((key, depth)) or statuses.get((key, None)) or NO_CELL
        critical = config["critical_depth"]
        rows.append([_config_label(config["config"]), *cells.values(), NO_CELL if critical is None else str(critical)])
    header = ["depth →", *map(str, depths), "critical depth"]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    done = ", ".join(f"{count} {name}" for name, count in status["counts"].items() if count)
    lines += ["", f"sweep {status['id']}: {status['total']} runs ({done})"]
    lines.append("critical depth: the shallowest depth whose verdict is not healthy (— = healthy at every depth)")
    # Where each finding first appears along depth, per row (`.get`: a server from before findings has none).
    firsts = [
        f"  {_config_label(config['config'])}: "
        + ", ".join(
            f"{kind} from depth {depth}" for kind, depth in sorted(found.items(), key=lambda kv: (kv[1], kv[0]))
        )
        for config in summary["configs"]
        if (found := config.get("finding_depths"))
    ]
    if firsts:
        lines += ["findings, by the shallowest depth where each appears:", *firsts]
    return "\n".join(lines + _sequence_lines(summary))


def _steps(length: float | None) -> str:
    return NO_CELL if length is None else f"{length:.0f}"


def _sequence_lines(summary: Json) -> list[str]:
    """Recurrent runs' critical sequence lengths: per row by depth, then the shortest per arch (`.get`: a
    server from before recurrent nets has none)."""
    per_arch = summary.get("sequence_lengths") or []
    if not per_arch:
        return []
    lines = [
        "critical sequence length: time steps for the gradient through time to change 2 decades at init "
        f"({NO_CELL} = level or not yet)"
    ]
    for config in summary["configs"]:
        lengths = config.get("critical_sequence_length") or []
        slopes = config.get("time_decades_per_step") or []
        if any(slope is not None for slope in slopes):
            cells = ", ".join(
                f"{_steps(length)} at depth {depth}" for depth, length in zip(config["depths"], lengths, strict=True)
            )
            lines.append(f"  {_config_label(config['config'])}: {cells}")
    shortest = [
        f"{item['arch']} {_steps(item['critical_sequence_length'])}"
        + (f" ({_config_label(item['grid'])})" if item["grid"] is not None else "")
        for item in per_arch
    ]
    lines.append("shortest per arch: " + "; ".join(shortest))
    return lines


def sweep_progress_line(status: Json) -> str:
    """`sweep 1a2b3c4d [#####.....] 4/10 finished (3 succeeded, 1 failed)`."""
    counts = status["counts"]
    finished = sum(counts.get(name, 0) for name in FINISHED)
    detail = ", ".join(f"{counts[name]} {name}" for name in sorted(FINISHED) if counts.get(name))
    return f"sweep {status['id'][:8]} {_bar(finished, status['total'])} {finished}/{status['total']} finished" + (
        f" ({detail})" if detail else ""
    )


def follow_sweep(client: Client, sweep_id: str, poll: float) -> Json:
    """Poll the sweep until every run finished, showing progress on stderr; its final status."""
    with _progress() as progress:
        while True:
            status = client.sweep_status(sweep_id)
            progress.show(sweep_progress_line(status))
            if status["done"]:
                return status
            time.sleep(poll)


def _print_sweep(client: Client, status: Json, as_json: bool) -> None:
    summary = client.sweep_summary(status["id"])
    print(json.dumps({"status": status, "summary": summary}, indent=2) if as_json else render_sweep(status, summary))


# --- commands ----------------------------------------------------------------------------------------


def _load_spec(spec_file: str | None, overrides: dict[str, Any]) -> Spec:
    # An unreadable file is a usage error; a ValidationError goes through to name the fields.
    try:
        return load_spec(spec_file, overrides)
    except ValidationError:
        raise
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def cmd_submit(args: argparse.Namespace, client: Client) -> int:
    """Queue a spec; print its run id, or with --wait follow it and print the verdict table."""
    spec = _load_spec(args.spec, given_values(args, Spec))
    run = client.submit(spec, idempotency_key=args.idempotency_key, name=args.name, tags=args.tag)
    if not args.wait:
        print(json.dumps(run, indent=2) if args.json else run["id"])
        return 0
    if not args.json:
        # The id first, on stdout (`graddiag submit --wait … | head -1`), as soon as the run is queued:
        # the verdict table below may be minutes away. With --json the run's JSON carries it.
        print(run["id"], flush=True)
    print(f"run {run['id']} submitted", file=sys.stderr)
    return print_outcome(follow_run(client, run["id"], args.poll), args.json)


def sweep_base(spec_file: str | None, assignments: list[str]) -> dict[str, Any]:
    """The fields every grid point shares, as given (the file's, then each --set FIELD=VALUE).

    Each value is checked here on its own (an unknown field or a depth of 0 is refused before anything is
    sent); whether they combine is judged by the server per grid point, since a grid axis may be what makes
    them valid (`--set heads=8 --grid arch=transformer`: the base alone is an mlp, which has no heads).
    """
    try:
        base = read_spec_file(spec_file)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    base.update((field, parse_value(value)) for field, value in (_assignment(item, "--set") for item in assignments))
    try:
        Spec.model_validate(base)
    except ValidationError as exc:
        # Fields are validated before their combinations: errors with a location are about a value itself.
        if any(error["loc"] for error in exc.errors()):
            raise
    return base


def cmd_sweep(args: argparse.Namespace, client: Client) -> int:
    """Queue one run per grid point; print the sweep id, or with --wait the verdict matrix."""
    base = sweep_base(args.base_spec, args.set)
    grid = parse_grid(args.grid)
    if not grid:
        raise UsageError("name at least one --grid FIELD=V1,V2,…")
    # Only the fields given: the server fills the defaults and validates every point against its caps.
    status = client.sweep(base, grid, name=args.name, tags=args.tag)
    if not args.wait:
        print(json.dumps(status, indent=2) if args.json else status["id"])
        return 0
    print(f"sweep {status['id']} submitted: {status['total']} runs", file=sys.stderr)
    status = follow_sweep(client, status["id"], args.poll)
    _print_sweep(client, status, args.json)
    return 0 if status["counts"].get("succeeded", 0) == status["total"] else EXIT_FAILED


def _arch_fields(spec: Json) -> str:
    """The fields only the spec's architecture has, as ` field=value` (`.get`: older servers lack them)."""
    names = {"lstm": ("forget_bias",), "transformer": ("heads", "norm_position", "mlp_ratio", "pooling")}
    return "".join(f" {name}={_grid_value(spec[name])}" for name in names.get(spec["arch"], ()) if name in spec)


def _run_lines(run: Json) -> list[str]:
    spec, model = run["spec"], run.get("model")
    if spec is None and model is not None:  # an uploaded report of a model graddiag did not build
        origin = (
            f"  model: {model['class_name']} ({model['params']:,} parameters), {model['optimizer']} lr={model['lr']:g}"
            + (f", name {run['name']}" if run.get("name") else "")
        )
    else:
        origin = (
            f"  spec: {spec['arch']} depth={spec['depth']} width={spec['width']} activation={spec['activation']} "
            f"init={spec['init']} norm={spec['norm']}{_arch_fields(spec)} steps={spec['steps']} "
            f"dataset={spec['dataset']}"
        )
    lines = [
        f"run {run['id']}: {run['status']}" + (f", verdict {run['verdict']}" if run.get("verdict") else ""),
        origin,
        f"  created {run['created_at']}, attempt {run['attempt']}"
        + (f", worker {run['worker']}" if run.get("worker") else ""),
    ]
    if run["status"] == "running":
        lines.append("  " + run_progress_line(run))
    if run.get("error"):
        lines.append(f"  error: {run['error']}")
    if run.get("report"):
        lines += [f"  - {reason}" for reason in run["report"]["verdict"]["reasons"]]
    return lines


def cmd_status(args: argparse.Namespace, client: Client) -> int:
    """Where a run (or with --sweep, a sweep) stands now."""
    if args.sweep and args.run_id:
        raise UsageError("give a RUN_ID or --sweep SWEEP_ID, not both")
    if args.sweep:
        status = client.sweep_status(args.sweep)
        _print_sweep(client, status, args.json)
        return 0
    if not args.run_id:
        raise UsageError("give a RUN_ID or --sweep SWEEP_ID")
    run = client.get(args.run_id)
    print(json.dumps(run, indent=2) if args.json else "\n".join(_run_lines(run)))
    return 0


def cmd_watch(args: argparse.Namespace, client: Client) -> int:
    """Follow a run's progress until it finishes, then print its verdict table."""
    return print_outcome(follow_run(client, args.run_id, args.poll), args.json)


def cmd_export(args: argparse.Namespace, client: Client) -> int:
    """A run's per-step, per-layer gradient records (with --time, a recurrent run's records per time step) as
    CSV or JSON, to stdout or -o FILE."""
    if args.time and (args.step_from is not None or args.step_to is not None):
        raise UsageError("--time takes --step STEP (one recorded step), not --step-from / --step-to")
    if not args.time and args.step is not None:
        raise UsageError("--step goes with --time; the per-layer records take --step-from / --step-to")
    if args.format == "csv":
        content = (
            client.time(args.run_id, fmt="csv", layer=args.layer, step=args.step)
            if args.time
            else client.gradients(
                args.run_id, fmt="csv", layer=args.layer, step_from=args.step_from, step_to=args.step_to
            )
        )
        rows = max(0, content.count("\n") - 1)
    else:
        records = (
            client.time(args.run_id, layer=args.layer, step=args.step)
            if args.time
            else client.gradients(args.run_id, layer=args.layer, step_from=args.step_from, step_to=args.step_to)
        )
        content, rows = json.dumps(records, indent=None) + "\n", len(records)
    if args.output in (None, "-"):
        sys.stdout.write(content)
    else:
        Path(args.output).write_text(content, newline="")  # as served: the CSV's own \r\n line ends
        print(f"wrote {rows} records of run {args.run_id} to {args.output}", file=sys.stderr)
    return 0


def unpack_events(data: bytes, out_dir: Path) -> Path:
    """Unpack a run's events archive (one `<run id>/` folder) into `out_dir`; that folder's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=BytesIO(data), mode="r:gz") as tar:
        roots = {Path(name).parts[0] for name in tar.getnames()}
        if len(roots) != 1:
            raise ValueError(f"expected one run folder in the archive, found {sorted(roots)}")
        # The "data" filter refuses absolute paths, "..", links out of out_dir and device files.
        tar.extractall(out_dir, filter="data")
    return out_dir / roots.pop()


def cmd_tensorboard_export(args: argparse.Namespace) -> int:
    """Write a succeeded run's TensorBoard events into DIR/<run id>, from --db or from the server."""
    if args.db and args.url:
        print("error: give --db (read the store) or --url (ask a server), not both", file=sys.stderr)
        return EXIT_INVALID
    if args.db:
        return _export_from_db(args)

    def from_server(args: argparse.Namespace, client: Client) -> int:
        return _report_export(unpack_events(client.tensorboard(args.run_id), Path(args.dir)), Path(args.dir))

    return _guarded(from_server)(args)


def _export_from_db(args: argparse.Namespace) -> int:
    # Imported here: the other client commands need neither the store nor the API.
    from graddiag.service.export.archive import RunNotSucceeded, TensorBoardUnavailable, events_archive
    from graddiag.service.store.db import make_engine, make_sessionmaker
    from graddiag.service.store.ids import AmbiguousId, resolve_run_id
    from graddiag.service.store.runs import RunNotFound

    settings = Settings(db_url=args.db)
    database = settings.sqlite_file()
    if database is not None and not database.is_file():
        # make_engine would create an empty database there.
        print(f"error: no graddiag store at {database}", file=sys.stderr)
        return EXIT_FAILED
    engine = make_engine(settings.db_url)
    try:
        with make_sessionmaker(engine)() as session:
            archive = events_archive(session, settings, resolve_run_id(session, args.run_id))
    except (RunNotFound, AmbiguousId, RunNotSucceeded, TensorBoardUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        engine.dispose()
    return _report_export(unpack_events(archive.data, Path(args.dir)), Path(args.dir))


def _report_export(run_dir: Path, root: Path) -> int:
    print(run_dir)
    print(f"view it with: tensorboard --logdir {root}", file=sys.stderr)
    return 0


# --- parser ------------------------------------------------------------------------------------------


def _label_flags(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--name", metavar="NAME", help=f"a name for the {what} (editable later)")
    parser.add_argument("--tag", action="append", default=[], metavar="TAG", help=f"a tag for the {what} (repeatable)")


def render_sweeps(listing: Json) -> str:
    """The sweeps as a table: short id, name, tags, progress, grid and critical depths."""
    rows = []
    for item in listing["items"]:
        finished = sum(item["counts"].get(name, 0) for name in FINISHED)
        critical = "; ".join(
            f"{_config_label(c['config'])}: {NO_CELL if c['critical_depth'] is None else c['critical_depth']}"
            for c in item["critical_depths"]
        )
        grid = " ".join(f"{field}={','.join(map(_grid_value, values))}" for field, values in item["grid"].items())
        tags = ",".join(item["tags"])
        rows.append(
            [item["id"][:8], item["name"] or NO_CELL, tags or NO_CELL, f"{finished}/{item['size']}", grid, critical]
        )
    header = ["sweep", "name", "tags", "done", "grid", "critical depth"]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.append(
        f"{listing['total']} sweep(s)" + (f", the newest {len(rows)} shown" if listing["total"] > len(rows) else "")
    )
    return "\n".join(lines)


def _number(value: Any) -> str:
    return NO_CELL if value is None else f"{value:.3g}"


def render_runs(listing: Json) -> str:
    """Runs as a table: short id, name, the spec's arch and shape, status, verdict and the key result numbers."""
    header = [
        "run",
        "name",
        "arch",
        "activation",
        "depth",
        "width",
        "steps",
        "lr",
        "status",
        "verdict",
        "dec/layer",
        "acc",
        "time",
    ]
    rows = []
    for run in listing["items"]:
        spec = run.get("spec") or {}
        metrics = run.get("metrics") or {}
        seconds = metrics.get("total_s")
        rows.append(
            [
                run["id"][:8],
                run.get("name") or NO_CELL,
                *(str(spec.get(field, NO_CELL)) for field in ("arch", "activation", "depth", "width", "steps", "lr")),
                run["status"],
                run.get("verdict") or NO_CELL,
                _number(metrics.get("decades_per_layer")),
                _number(metrics.get("eval_accuracy")),
                NO_CELL if seconds is None else f"{seconds:.3g} s",
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    shown = len(rows)
    lines.append(
        f"{listing['total']} run(s)"
        + (f", {shown} shown from {listing['offset'] + 1}" if listing["total"] > shown else "")
    )
    return "\n".join(lines)


def cmd_runs(args: argparse.Namespace, client: Client) -> int:
    """The runs matching the filters, in the order asked (any spec field or result metric)."""
    filters = {
        "filter": args.filter,
        "sort": args.sort,
        "name": args.name,
        "tag": args.tag or None,
        "sweep_id": args.sweep,
        "status": args.status,
        "verdict": args.verdict,
        "limit": args.limit,
        "offset": args.offset,
    }
    listing = client.runs(**{key: value for key, value in filters.items() if value is not None})
    print(json.dumps(listing, indent=2) if args.json else render_runs(listing))
    return 0


def cmd_sweeps(args: argparse.Namespace, client: Client) -> int:
    """The sweeps, newest first (filtered by --name and --tag)."""
    listing = client.sweeps(name=args.name, tag=args.tag or None, limit=args.limit)
    print(json.dumps(listing, indent=2) if args.json else render_sweeps(listing))
    return 0


def cmd_label(args: argparse.Namespace, client: Client) -> int:
    """Name or tag a run (or with --sweep, a sweep)."""
    labels: dict[str, Any] = {}
    if args.name is not None:
        labels["name"] = args.name
    if args.tag or args.clear_tags:
        labels["tags"] = args.tag
    if not labels:
        raise UsageError("give --name, --tag or --clear-tags")
    answer = client.label_sweep(args.id, **labels) if args.sweep else client.label(args.id, **labels)
    print(
        json.dumps(answer, indent=2)
        if args.json
        else f"{answer['id']}: {answer.get('name') or NO_CELL} [{', '.join(answer.get('tags') or [])}]"
    )
    return 0


def _connection_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--url", help=f"graddiag server (default: ${URL_ENV}, else {DEFAULT_URL})")
    flags.add_argument("--token", help=f"bearer token, if the server requires one (default: ${TOKEN_ENV})")
    flags.add_argument(
        "--http-timeout", type=float, default=30.0, metavar="SECONDS", help="per-request timeout (default 30)"
    )
    return flags


def _follow_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--poll", type=float, default=0.5, metavar="SECONDS", help="progress polling interval")
    flags.add_argument("--json", action="store_true", help="print the server's JSON instead of tables")
    return flags


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register submit, sweep, runs, sweeps, label, status, watch, export and tensorboard-export on the parser."""
    connection, follow = _connection_flags(), _follow_flags()

    submit = sub.add_parser("submit", parents=[connection, follow], help="queue a spec on a graddiag server")
    submit.add_argument("--spec", metavar="FILE", help="JSON file with spec fields; flags override it")
    submit.add_argument("--wait", action="store_true", help="follow the run and print its verdict table")
    submit.add_argument("--idempotency-key", metavar="KEY", help="retries with the same key return the same run")
    _label_flags(submit, "run")
    add_model_flags(submit, Spec)
    submit.set_defaults(handler=_guarded(cmd_submit))

    sweep = sub.add_parser("sweep", parents=[connection, follow], help="queue one run per grid point")
    sweep.add_argument("--base-spec", metavar="FILE", help="JSON file with the spec fields every point shares")
    sweep.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,…", help="a grid axis (repeatable)")
    sweep.add_argument(
        "--set", action="append", default=[], metavar="FIELD=VALUE", help="a base spec field (repeatable)"
    )
    sweep.add_argument("--wait", action="store_true", help="follow the sweep and print the verdict matrix")
    _label_flags(sweep, "sweep")
    sweep.set_defaults(handler=_guarded(cmd_sweep))

    runs = sub.add_parser("runs", parents=[connection], help="list runs: filter and sort on spec fields and results")
    runs.add_argument("--filter", metavar="EXPR", help="e.g. \"verdict = 'vanishing' and decades_per_layer < -0.3\"")
    runs.add_argument(
        "--sort", metavar="FIELD", help="a spec field or result metric, '-' first for descending (default -created_at)"
    )
    runs.add_argument("--name", help="only runs whose name contains this")
    runs.add_argument("--tag", action="append", default=[], help="only runs with this tag (repeatable)")
    runs.add_argument("--sweep", metavar="SWEEP_ID", help="only the runs of this sweep (id or unique prefix)")
    runs.add_argument("--status", help="queued, running, succeeded, failed or cancelled")
    runs.add_argument("--verdict", help="healthy, vanishing or exploding")
    runs.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    runs.add_argument("--offset", type=int, default=0, help="skip this many")
    runs.add_argument("--json", action="store_true", help="print the server's JSON")
    runs.set_defaults(handler=_guarded(cmd_runs))

    sweeps = sub.add_parser("sweeps", parents=[connection], help="list the sweeps, newest first")
    sweeps.add_argument("--name", help="only sweeps whose name contains this")
    sweeps.add_argument("--tag", action="append", default=[], help="only sweeps with this tag (repeatable)")
    sweeps.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    sweeps.add_argument("--json", action="store_true", help="print the server's JSON")
    sweeps.set_defaults(handler=_guarded(cmd_sweeps))

    label = sub.add_parser("label", parents=[connection], help="name or tag a run (or a sweep)")
    label.add_argument("id", metavar="ID", help="the run's (or with --sweep, the sweep's) id or unique prefix")
    label.add_argument("--sweep", action="store_true", help="ID names a sweep")
    label.add_argument("--name", help="the new name ('' clears it)")
    label.add_argument("--tag", action="append", default=[], help="the tags (repeatable; they replace the old ones)")
    label.add_argument("--clear-tags", action="store_true", help="remove every tag")
    label.add_argument("--json", action="store_true", help="print the server's JSON")
    label.set_defaults(handler=_guarded(cmd_label))

    status = sub.add_parser("status", parents=[connection], help="a run's or a sweep's state now")
    status.add_argument("run_id", nargs="?", metavar="RUN_ID", help=ID_HELP)
    status.add_argument("--sweep", metavar="SWEEP_ID", help="a sweep (id or unique prefix) instead of a run")
    status.add_argument("--json", action="store_true", help="print the server's JSON")
    status.set_defaults(handler=_guarded(cmd_status))

    watch = sub.add_parser("watch", parents=[connection, follow], help="follow a run until it finishes")
    watch.add_argument("run_id", metavar="RUN_ID", help=ID_HELP)
    watch.set_defaults(handler=_guarded(cmd_watch))

    export = sub.add_parser("export", parents=[connection], help="a run's gradient records as CSV or JSON")
    export.add_argument("run_id", metavar="RUN_ID", help=ID_HELP)
    export.add_argument("--format", choices=("csv", "json"), default="csv", help="csv (default) or json")
    export.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    export.add_argument(
        "--time",
        action="store_true",
        help="a recurrent run's gradient through time (step, layer, t, grad_norm, cell_grad_norm, state_rms, "
        "gate_mean, saturation_frac) instead of the per-layer records",
    )
    export.add_argument("--layer", type=int, help="only this layer index (with --time: a recurrent layer's)")
    export.add_argument("--step-from", type=int, help="first step, inclusive")
    export.add_argument("--step-to", type=int, help="last step, inclusive")
    export.add_argument("--step", type=int, help="with --time: only this recorded step")
    export.set_defaults(handler=_guarded(cmd_export))

    tensorboard = sub.add_parser(
        "tensorboard-export",
        parents=[connection],
        help="write a succeeded run's TensorBoard events into DIR/<run id>",
        description="From the server (--url, the default) or straight from the database (--db). The worker's "
        "events with gradient histograms when it wrote them, else events built from the stored records.",
    )
    tensorboard.add_argument("run_id", metavar="RUN_ID", help=ID_HELP)
    tensorboard.add_argument("dir", metavar="DIR", help="TensorBoard log root (created if missing)")
    tensorboard.add_argument("--db", metavar="URL", help="read the store at this SQLAlchemy URL instead of a server")
    tensorboard.set_defaults(handler=cmd_tensorboard_export)
