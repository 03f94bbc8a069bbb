import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import mlx_sharedllm  # noqa: F401  (preloads OpenBLAS before mlx is imported)
from mlx_sharedllm.cli.main import cli

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "case.json").exists())


def assert_close(actual, expected, atol: float, name: str = "") -> float:
    """Assert max |actual - expected| <= atol; print the max and mean differences."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    diff = np.abs(actual - expected)
    print(f"{name}: max diff {diff.max():.3g}, mean diff {diff.mean():.3g}")
    assert diff.max() <= atol, f"{name}: max diff {diff.max():.3g} > {atol}"
    return float(diff.max())


def run_cli(*args: str):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


def convert_case(case: str, out: Path, *extra: str) -> Path:
    result = run_cli("convert", str(FIXTURES / case / "checkpoint"), str(out), *extra)
    assert result.exit_code == 0, result.output
    return out


def case_knobs(case: str) -> dict:
    return json.loads((FIXTURES / case / "case.json").read_text())["knobs"]


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """Each fixture case converted once with --dtype float32."""
    root = tmp_path_factory.mktemp("converted")
    return {case: convert_case(case, root / case, "--dtype", "float32") for case in CASES}
