"""Search trees kept in eval records (record_trees=true), graded, and summarized by ttc.evals.tree_report."""

from __future__ import annotations

import json
import math

import pytest

from ttc.evals import tree_report
from ttc.evals.runner import run_eval
from test_evals_runner import eval_config, read_records, tiny_overrides


def _record(pid: str, correct: bool, nodes: list[dict]) -> dict:
    return {"id": pid, "correct": correct, "prefill_tokens": 10, "generated_tokens": 90, "verifier_tokens": 0,
            "tree": {"kind": "tree", "nodes": nodes}}


def _node(i, parent, depth, tokens, status="open", solution=None, correct=None, score=None) -> dict:
    node = {"id": i, "parent": parent, "depth": depth, "text": "", "tokens": tokens, "score": score, "status": status}
    if solution is not None:
        node.update(solution=solution, correct=correct)
    return node


def test_tree_stats_count_found_picked_pruned_and_the_leaf_auc_exactly():
    records = [
        _record("a", True, [_node(0, None, 0, 0, "root"), _node(1, 0, 1, 30, "pruned"),
                            _node(2, 0, 1, 10, "kept"),
                            _node(3, 2, 2, 20, "final", "x = 5", True, 0.9),
                            _node(4, 2, 2, 40, "pruned", "x = 4", False, 0.2)]),
        # the tree found a right solution and the answer given is another one
        _record("b", False, [_node(0, None, 0, 0, "root"), _node(1, 0, 1, 20, "final", "3", True, 0.3),
                             _node(2, 0, 1, 20, "chosen", "7", False, 0.6)]),
        _record("c", False, [_node(0, None, 0, 0, "root")]),
    ]
    stats = tree_report.tree_stats(records)
    assert stats["problems"] == 3 and stats["correct"] == 1
    assert stats["tokens"] == 100
    assert stats["nodes"] == pytest.approx(9 / 3) and stats["solutions"] == pytest.approx(4 / 3)
    assert stats["depth"] == pytest.approx((2 + 2 + 1 + 1) / 4)
    assert stats["found"] == pytest.approx(2 / 3) and stats["picked"] == 0.5
    assert stats["pruned"] == pytest.approx(70 / 140)
    # right scores 0.9, 0.3; wrong 0.2, 0.6: of 4 right-wrong pairs, 3 are ordered right
    assert stats["auc"] == pytest.approx(0.75)
    # within a problem: "a" orders its pair right (1), "b" wrong (0)
    assert stats["auc_within"] == pytest.approx(0.5)
    assert stats["best_scored"] == pytest.approx(1 / 3)  # a's best (0.9) is right; b's best (0.6) is wrong


def test_the_vote_column_takes_the_majority_answer_of_each_trees_solutions():
    def solution(i, answer, correct):
        return {**_node(i, 0, 1, 10, "final", f"The answer is {answer}.", correct, 0.5), "answer": answer}

    records = [_record("a", False, [_node(0, None, 0, 0, "root"), solution(1, "4", False), solution(2, "5", True),
                                    solution(3, "5", True)]),
               _record("b", False, [_node(0, None, 0, 0, "root"), solution(1, "4", False), solution(2, "5", True)])]
    assert tree_report.tree_stats(records)["vote"] == 0.5  # a: 5 wins 2-1; b: a tie goes to the first, 4
    unanswered = [_record("a", False, [_node(0, None, 0, 0, "root"), _node(1, 0, 1, 10, "final", "x 5", True)])]
    assert math.isnan(tree_report.tree_stats(unanswered)["vote"])  # no recorded answer, no extraction given
    assert tree_report.tree_stats(unanswered, extract=lambda text: text.split()[-1])["vote"] == 1.0


def test_a_tree_without_solutions_has_no_auc_and_no_picked_share():
    stats = tree_report.tree_stats([_record("c", False, [_node(0, None, 0, 0, "root")])])
    assert stats["found"] == 0 and math.isnan(stats["picked"]) and math.isnan(stats["auc"])
    assert math.isnan(stats["auc_within"]) and stats["best_scored"] == 0


def test_a_run_without_trees_is_refused_in_one_line(tmp_path):
    (tmp_path / "results.jsonl").write_text(json.dumps({"id": "a", "correct": True}) + "\n")
    with pytest.raises(SystemExit, match="record_trees=true"):
        tree_report.load_trees(tmp_path)


def test_record_trees_keeps_each_graded_tree_and_the_report_compares_runs(tiny_llama_dir, tmp_path):
    runs = {}
    for name, strategy in [("beam", ("strategy=beam", "strategy.n=2", "strategy.expand=2", "strategy.max_depth=2")),
                           ("rebase", ("strategy=rebase", "strategy.n=2", "strategy.max_depth=2"))]:
        cfg = eval_config(*tiny_overrides(tiny_llama_dir, strategy), "record_trees=true")
        run_eval(cfg, tmp_path / name)
        runs[name] = read_records(tmp_path / name)
    for records in runs.values():
        assert len(records) == 3
        for r in records:
            solutions = [n for n in r["tree"]["nodes"] if "solution" in n]
            assert solutions and all(isinstance(n["correct"], bool) and "answer" in n for n in solutions)
    table = tree_report.report([str(tmp_path / "beam"), str(tmp_path / "rebase")]).splitlines()
    assert len(table) == 4 and table[2].startswith("| beam (beam)") and "+0 (+0 to +0)" in table[2]
    assert table == tree_report.report([str(tmp_path / "beam"), str(tmp_path / "rebase")],
                                       extract_answers=True).splitlines()  # answers were recorded: the same
    assert table[3].startswith("| rebase (rebase)")


def test_records_keep_no_tree_by_default(tiny_llama_dir, tmp_path):
    run_eval(eval_config(*tiny_overrides(tiny_llama_dir)), tmp_path)
    assert all("tree" not in r for r in read_records(tmp_path))


def test_a_drawn_tree_marks_each_graded_solution_right_or_wrong(tmp_path):
    run = tmp_path / "beam"
    run.mkdir()
    record = _record("a", True, [_node(0, None, 0, 0, "root"), _node(3, 0, 1, 20, "chosen", "5", True, 0.9),
                                 _node(4, 0, 1, 40, "pruned", "4", False, 0.2)])
    (run / "results.jsonl").write_text(json.dumps(record) + "\n")
    [page] = tree_report.draw([str(run)], "a", tmp_path / "drawn")
    text = page.read_text()
    assert page.name == "beam-a.html" and "0.90 \u2713" in text and "0.20 \u2717" in text
    with pytest.raises(SystemExit, match="no record of problem b"):
        tree_report.draw([str(run)], "b", tmp_path / "drawn")
