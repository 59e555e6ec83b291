"""benchmarks/step_planning.py and step_host.py print one row per case, with another revision's beside today's."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_step_planning_benchmark_prints_every_case_with_a_ratio_to_the_revision_given(capsys):
    module = _benchmark("step_planning")
    module.main(["--before", "HEAD", "--reps", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(module.CASES)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[3]) > 0 and cells[5].endswith("x") and float(cells[5][:-1]) > 0


def test_the_host_step_benchmark_prints_every_case_and_path_with_a_ratio_to_the_revision_given(capsys):
    """The revision's engine runs in a child process from a `git archive` of it (here HEAD)."""
    module = _benchmark("step_host")
    module.main(["--before", "HEAD", "--steps", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isalpha()]
    rows = [r for r in rows if not r.startswith("| path")]
    assert len(rows) == len(module.CASES) * len(module.PATHS)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] in module.PATHS and float(cells[4]) > 0 and float(cells[5]) > 0 and cells[6].endswith("x")
