"""The import graph runs one way: cli -> convert -> library core -> kernels. Only the
default-model builder (default.py), `python -m mlx_sharedllm` (__main__.py) and the
server package, which sit on top, may use convert or cli."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "mlx_sharedllm"
ABOVE_CONVERT = {"default.py", "__main__.py"}


def imported(path: Path, package: str) -> set[str]:
    """The mlx_sharedllm modules `path` imports (relative imports resolved against
    `package`, e.g. 'mlx_sharedllm' or 'mlx_sharedllm.convert')."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("mlx_sharedllm")}


def core_modules() -> list[Path]:
    return sorted(p for p in LIBRARY.glob("*.py") if p.name not in ABOVE_CONVERT)


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.name)
def test_the_library_core_never_imports_convert_or_cli(path):
    bad = {
        n
        for n in imported(path, "mlx_sharedllm")
        if n.startswith(("mlx_sharedllm.convert", "mlx_sharedllm.cli"))
    }
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sorted((ROOT / "convert").glob("*.py")), ids=lambda p: p.name)
def test_convert_never_imports_cli(path):
    bad = {n for n in imported(path, "mlx_sharedllm.convert") if n.startswith("mlx_sharedllm.cli")}
    assert not bad, f"convert/{path.name} imports {sorted(bad)}"


def test_the_checker_sees_relative_imports(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("from .convert.checkpoint import convert\nfrom ..cli import main\n")
    found = imported(sample, "mlx_sharedllm.convert")
    assert "mlx_sharedllm.convert.convert.checkpoint" in found
    assert "mlx_sharedllm.cli.main" in found
