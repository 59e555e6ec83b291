"""benchmarks/step_planning.py prints one row per case, with the plan at another revision beside today's."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_step_planning_benchmark_prints_every_case_with_a_ratio_to_the_revision_given(capsys):
    spec = importlib.util.spec_from_file_location("step_planning", ROOT / "benchmarks" / "step_planning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--before", "HEAD", "--reps", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(module.CASES)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[2]) > 0 and cells[4].endswith("x") and float(cells[4][:-1]) > 0
