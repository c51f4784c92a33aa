"""The packages' boundaries: lqf_core is a plain library, state is shared by app and
worker, and app never reaches into the worker (nor the worker into app)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> top-level modules it may not import, anywhere (function bodies included)
FORBIDDEN = {
    "lqf_core": {"app", "worker", "state", "fastapi", "celery", "redis", "pydantic_settings"},
    "state": {"app", "worker", "lqf_core", "torch", "fastapi"},
    "app": {"worker"},
    "worker": {"app", "fastapi"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_crosses_a_boundary(package):
    crossings = []
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, package
    for path in files:
        for name in imported_modules(path):
            if name.split(".")[0] in FORBIDDEN[package]:
                crossings.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not crossings, crossings


def test_the_api_loads_no_worker_or_training_module():
    """At run time too: the app, its routes and the launcher load without any worker
    module, and serving a model does not pull in the training stack."""
    probe = ("import sys, app.main, app.embedded; "
             "bad = sorted(m for m in sys.modules if m == 'worker' or m.startswith('worker.') "
             "or m in ('lqf_core.train', 'lqf_core.unlearn', 'lqf_core.crossfit')); "
             "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == ""
