"""Run the registered benchmarks: ``python -m bench.run_all [--only NAME[,NAME]] [--list] [flags...]``.

The registry is a list of (name, module) pairs; each module exposes ``main(argv)`` returning an exit
status (``None`` counts as 0). Flags this
runner does not know are passed on to every selected benchmark, so pair them with ``--only``
(``python -m bench.run_all --only engine --steps 50``). The exit status is the worst of the
benchmarks' statuses.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import cast

# name -> module with a main(argv: list[str] | None) -> int | None. Add new benchmarks here.
BENCHMARKS: list[tuple[str, str]] = [
    ("engine", "bench.engine"),
    ("recording", "bench.recording"),
    ("service", "bench.service"),
    ("theory", "bench.theory"),
    ("transformer", "bench.transformer"),
    ("recurrent", "bench.recurrent"),
    ("load", "bench.load"),
    ("memory", "bench.memory"),
    ("dispatch", "bench.dispatch"),
    ("watch", "bench.watch"),
]


def _load(module_name: str) -> Callable[[list[str] | None], int | None]:
    module = importlib.import_module(module_name)
    return cast(Callable[[list[str] | None], int | None], module.main)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="benchmark name(s), comma-separated; repeatable")
    parser.add_argument("--list", action="store_true", help="list the registered benchmarks and exit")
    args, rest = parser.parse_known_args(list(argv) if argv is not None else None)

    names = [name for name, _ in BENCHMARKS]
    if args.list:
        print("\n".join(names))
        return 0
    wanted = [n for chunk in args.only for n in chunk.split(",") if n]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; registered: {names}")
    selected = [(n, m) for n, m in BENCHMARKS if not wanted or n in wanted]

    status = 0
    for name, module_name in selected:
        started = time.perf_counter()
        print(f"== bench {name} ({module_name})", flush=True)
        code = _load(module_name)(rest) or 0
        print(f"== bench {name}: exit {code} after {time.perf_counter() - started:.0f} s", flush=True)
        status = max(status, code)
    return status


if __name__ == "__main__":
    sys.exit(main())
