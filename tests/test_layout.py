"""The layout's rules (docs/design.md, "Where each concern lives"), read from the source itself."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("service", "workers", "tests", "migrations")


def python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def imported_modules(path: Path) -> list[str]:
    """Every absolute module an import statement in the file names, at any depth (imports inside
    functions count too)."""
    modules = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.append(node.module)
            if node.module in PROJECT_PACKAGES:  # `from service import x` imports service.x
                modules += [f"{node.module}.{alias.name}" for alias in node.names]
    return modules


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_engine_imports_nothing_else_of_the_project():
    offenders = [(relative(path), module) for path in python_files("workers/engine")
                 for module in imported_modules(path)
                 if module.split(".")[0] in PROJECT_PACKAGES and not module.startswith("workers.engine")
                 and module != "workers"]
    assert offenders == []


def test_only_the_command_line_of_the_service_imports_the_workers():
    offenders = [(relative(path), module) for path in python_files("service")
                 if not relative(path).startswith("service/cli/")
                 for module in imported_modules(path) if module.split(".")[0] == "workers"]
    assert offenders == []


def test_the_api_process_loads_neither_torch_nor_worker_code(tmp_path):
    program = (
        "import sys\n"
        "from service.api.app import create_app\n"
        "from service.core.settings import Settings\n"
        f"create_app(Settings(data_dir={str(tmp_path)!r}, _env_file=None))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'numpy', 'sklearn',"
        " 'workers', 'celery')))\n"
    )
    result = subprocess.run([sys.executable, "-c", program], check=False, capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


SESSION_QUERIES = {"execute", "scalars", "scalar", "get", "query"}
SQL_CONSTRUCTS = {"select", "insert", "update", "delete", "func", "text", "and_", "or_", "not_", "tuple_", "bindparam",
                  "exists", "case", "literal", "column", "table"}


def test_routes_hold_no_sql():
    """A route calls query functions; it may still commit, roll back and catch the database's errors."""
    offenders = []
    for path in python_files("service/api/routes"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlalchemy"):
                offenders += [(relative(path), f"imports {alias.name}") for alias in node.names
                              if alias.name in SQL_CONSTRUCTS or node.module.startswith("sqlalchemy.sql")]
            elif isinstance(node, ast.Import):
                offenders += [(relative(path), alias.name) for alias in node.names
                              if alias.name.startswith("sqlalchemy")]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in SESSION_QUERIES and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "session"):
                offenders.append((relative(path), f"line {node.lineno}: session.{node.func.attr}"))
    assert offenders == []


def status_changes(path: Path) -> list[str]:
    """Where the file sets a status to a RequestStatus or BatchStatus member: `x.status = ...`,
    or `status=...` as a keyword (an insert, an update's values, a constructor)."""
    def is_status_member(value) -> bool:
        return (isinstance(value, ast.Attribute) and isinstance(value.value, ast.Name)
                and value.value.id in ("RequestStatus", "BatchStatus"))

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and is_status_member(node.value):
            if any(isinstance(target, ast.Attribute) and target.attr == "status" for target in node.targets):
                found.append(f"{relative(path)}:{node.lineno}")
        elif isinstance(node, ast.keyword) and node.arg == "status" and is_status_member(node.value):
            found.append(f"{relative(path)}:{node.value.lineno}")
    return found


def test_only_the_lifecycle_changes_a_request_or_batch_status():
    lifecycle = ROOT / "service/requests/lifecycle.py"
    assert status_changes(lifecycle), "the check must find the lifecycle's own transitions"
    offenders = [change for folder in ("service", "workers") for path in python_files(folder)
                 if path != lifecycle for change in status_changes(path)]
    assert offenders == []


@pytest.mark.parametrize("folder", ["service", "workers", "migrations", "tests", "docker", "bin"])
def test_code_cites_the_repository_not_history(folder):
    """Comments cite docs/design.md, never a document outside the repository or an issue number."""
    pattern = re.compile(r"DESIGN\.md|\b[Ii]ssues? #?\d+")
    offenders = [f"{relative(path)}:{number}" for path in sorted((ROOT / folder).rglob("*"))
                 if path.is_file() and path.suffix in ("", ".py", ".sh", ".yml", ".yaml", ".html", ".js", ".css")
                 and path != Path(__file__)
                 for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
                 if pattern.search(line)]
    assert offenders == []
