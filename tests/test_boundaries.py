"""The architecture's boundaries, checked on the source: spec → network → engine → report → store → API.

Every module of `graddiag.models` and `graddiag.service` belongs to one layer, and imports (at module
level or inside a function alike) only from the layers beneath it, or its own. The engine and the
network builders stay free of SQL and HTTP libraries; importing the package, the API and the clients
does not import torch; and `import graddiag` exports exactly its documented names.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

import graddiag
from tests.support import REPO

# Each layer, by the module prefixes in it (the longest matching prefix decides).
LAYERS: Final[dict[str, tuple[str, ...]]] = {
    "models": ("graddiag.models",),  # the spec, the network builders and their torch-free facts
    "engine": ("graddiag.service.engine",),  # data, recording, training, theory, verdict, the report
    "report views": ("graddiag.service.export.tensorboard", "graddiag.service.render"),  # a Report, elsewhere
    "settings": ("graddiag.service.settings",),
    "store": ("graddiag.service.store",),
    "execution": ("graddiag.service.worker", "graddiag.service.dispatch", "graddiag.service.local"),
    "archive": ("graddiag.service.export.archive",),  # a stored run's events, for the API and the CLI
    "api": ("graddiag.service.api",),
    "client": ("graddiag.service.client",),  # HTTP only: knows the spec, nothing of the server's insides
    "entry points": (
        "graddiag.service.serve",
        "graddiag.service.cli",
        "graddiag.service.diagnose_cli",
        "graddiag.service.remote",
        "graddiag.service.flags",
    ),
    "packages": ("graddiag.service", "graddiag.service.export"),  # empty packages: any layer may name them
}
# The layers each layer may import from, besides its own.
BENEATH: Final[dict[str, frozenset[str]]] = {
    "models": frozenset(),
    "engine": frozenset({"models"}),
    "report views": frozenset({"models", "engine"}),
    "settings": frozenset({"models"}),
    "store": frozenset({"models", "engine"}),
    "execution": frozenset({"models", "engine", "report views", "settings", "store"}),
    "archive": frozenset({"models", "engine", "report views", "settings", "store"}),
    # The API serves the store and never runs anything itself: no worker, dispatcher or probe.
    "api": frozenset({"models", "engine", "report views", "settings", "store", "archive"}),
    "client": frozenset({"models"}),
    "entry points": frozenset(set(LAYERS) - {"entry points", "packages"}),
    "packages": frozenset(),
}
# Libraries of the outer layers that the engine and the network builders must never need.
SERVICE_LIBRARIES: Final = ("sqlalchemy", "fastapi", "starlette", "alembic", "uvicorn", "httpx", "ray")


def _modules() -> Iterator[tuple[str, Path]]:
    """(dotted name, file) of every module of graddiag.models and graddiag.service."""
    for folder in ("models", "service"):
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            yield ".".join(("graddiag", *(p for p in parts if p != "__init__"))), path


MODULES: Final = dict(_modules())


def _imports(path: Path) -> set[str]:
    """Every absolute module a file imports, anywhere in it (`from a import b` counts as a and a.b)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            assert node.level == 0, f"{path}: relative import of {node.module}"
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _layer(module: str) -> str:
    best = max(
        ((prefix, name) for name, prefixes in LAYERS.items() for prefix in prefixes if _within(module, prefix)),
        key=lambda match: len(match[0]),
        default=None,
    )
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best[1]


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _graddiag_module(name: str) -> str | None:
    """The graddiag module an import names (`a.b.C` → `a.b`), or None outside graddiag's own modules."""
    while name not in MODULES:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name


def test_the_layers_are_found() -> None:
    # The walk over the sources reaches every layer: an empty one would pass every check below unread.
    found = {_layer(module) for module in MODULES}
    assert found == set(LAYERS), set(LAYERS) - found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_from_a_layer_above_its_own(module: str) -> None:
    layer = _layer(module)
    allowed = BENEATH[layer] | {layer, "packages"}
    upward = sorted(
        f"{imported} ({_layer(imported)})"
        for name in _imports(MODULES[module])
        if (imported := _graddiag_module(name)) is not None and _layer(imported) not in allowed
    )
    assert not upward, f"{module} ({layer}) imports from above it: {upward}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) in ("models", "engine", "report views")))
def test_models_and_engine_need_neither_sql_nor_http(module: str) -> None:
    libraries = sorted(
        name for name in _imports(MODULES[module]) if any(_within(name, lib) for lib in SERVICE_LIBRARIES)
    )
    assert not libraries, f"{module} imports {libraries}"


def test_the_import_check_sees_lazy_and_from_imports(tmp_path: Path) -> None:
    # The checks above are only as good as _imports: it must see imports inside functions too.
    source = tmp_path / "sample.py"
    source.write_text(
        "import torch\nfrom graddiag.service.store import db\n\ndef f():\n    from fastapi import APIRouter\n"
    )
    assert _imports(source) == {
        "torch",
        "graddiag.service.store",
        "graddiag.service.store.db",
        "fastapi",
        "fastapi.APIRouter",
    }


def _imported_by(*modules: str) -> set[str]:
    """The top-level packages in sys.modules after importing `modules` in a fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


API_MODULES: Final = sorted(m for m in MODULES if _layer(m) == "api")


def test_importing_the_package_the_api_and_the_clients_does_not_import_torch() -> None:
    imported = _imported_by("graddiag", "graddiag.service.client", *API_MODULES)
    assert "fastapi" in imported  # the check sees what the imports pulled in
    assert "torch" not in imported


def test_graddiag_exports_exactly_its_documented_names() -> None:
    exported = set(graddiag.__all__)
    assert {"probe", "run_probe", "Spec", "Report", "Client", "AsyncClient"} <= exported
    assert len(graddiag.__all__) == len(exported)
    # Every name in __all__ resolves to graddiag's own object, and is named in the module's docstring.
    assert graddiag.__doc__ is not None
    for name in graddiag.__all__:
        value = getattr(graddiag, name)
        assert value.__module__.startswith("graddiag."), name
        assert value.__name__ == name
        assert f"{name}`" in graddiag.__doc__, f"{name} is exported but not documented"
    # Nothing else public: what a star import gives is __all__, and other names are not attributes.
    namespace: dict[str, object] = {}
    exec("from graddiag import *", namespace)
    assert set(namespace) - {"__builtins__"} == exported
    with pytest.raises(AttributeError, match="no attribute 'Worker'"):
        _ = graddiag.Worker
    lazy = set(graddiag._EXPORTS)
    assert lazy == exported, f"lazily exported but not in __all__: {lazy - exported}; the reverse: {exported - lazy}"
