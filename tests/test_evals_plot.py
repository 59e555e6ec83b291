"""The plot command: accuracy versus compute from summary.json files."""

from __future__ import annotations

import json

from ttc.evals.plot import find_summaries, main


def write_summary(folder, label, n, tokens, accuracy):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(
        {"label": label, "strategy": label, "n": n, "mean_tokens": tokens, "mean_flops": tokens * 1e8,
         "accuracy": accuracy, "problems": 10, "dataset": "reasoning_gym/chain_sum"}))


def test_the_plot_command_writes_a_png_and_prints_the_points(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for job, (n, tokens, acc) in enumerate([(1, 100, 0.1), (2, 190, 0.15), (4, 370, 0.2)]):
        write_summary(sweep / str(job), "self_consistency", n, tokens, acc)
    write_summary(tmp_path / "greedy", "greedy", None, 90, 0.08)
    out = tmp_path / "plots" / "acc_vs_tokens.png"
    assert main([str(sweep), str(tmp_path / "greedy"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["label", "n", "mean_tokens", "accuracy"]
    assert [line.split()[0] for line in table[1:5]] == ["greedy"] + ["self_consistency"] * 3
    assert "0.2000" in table[4]


def test_a_folder_is_searched_once_even_when_named_twice(tmp_path):
    write_summary(tmp_path / "run", "greedy", None, 50, 0.1)
    assert len(find_summaries([tmp_path, tmp_path / "run", tmp_path / "run" / "summary.json"])) == 1


def test_the_plot_command_fails_with_a_message_when_there_is_nothing_to_plot(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_the_markdown_table_puts_tokens_next_to_greedys_and_the_largest_k_ceilings():
    from ttc.evals.plot import markdown_table

    greedy = {"label": "greedy", "strategy": "greedy", "mean_tokens": 100.0, "accuracy": 0.2, "correct": 2,
              "problems": 10, "pass@k": {"1": 0.2}, "maj@k": {"1": 0.2}, "strategy_config": {}}
    bon = {"label": "best_of_n+calculator", "strategy": "best_of_n", "mean_tokens": 1600.0, "accuracy": 0.5,
           "correct": 5, "problems": 10, "pass@k": {"1": 0.2, "16": 0.6}, "maj@k": {"1": 0.2, "16": 0.3},
           "strategy_config": {"n": 16, "weighted": True}}
    lines = markdown_table([bon, greedy]).splitlines()
    assert lines[2] == "| greedy | 0.20 (2/10) | 100 | - | 100 | 1.0 | - | - |"
    assert lines[3] == ("| best_of_n+calculator n=16 weighted=True | 0.50 (5/10) | 1600 | - | 1600 | 16.0 | 0.60 (k=16) "
                        "| 0.30 (k=16) |")


def test_a_runs_training_tokens_are_charged_to_its_problems_in_the_table_and_the_plotted_points(tmp_path, capsys):
    from ttc.evals.plot import markdown_table

    greedy = {"label": "greedy", "strategy": "greedy", "mean_tokens": 100.0, "accuracy": 0.2, "correct": 2,
              "problems": 10}
    fitted = {"label": "difficulty", "strategy": "self_consistency", "allocation": "difficulty", "budget_tokens": 300,
              "mean_tokens": 250.0, "accuracy": 0.3, "correct": 3, "problems": 10,
              "training": {"difficulty_table": {}, "total_tokens": 1000}}
    lines = markdown_table([fitted, greedy]).splitlines()
    assert lines[3] == "| difficulty budget 300/problem | 0.30 (3/10) | 250 | 1000 | 350 | 3.5 | - | - |"
    for name, s in (("greedy", greedy), ("difficulty", fitted)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(s))
    assert main([str(tmp_path), "--out", str(tmp_path / "a.png")]) == 0
    points = {line.split()[0]: float(line.split()[-4]) for line in capsys.readouterr().out.splitlines()[1:3]}
    assert points == {"difficulty": 350.0, "greedy": 100.0}
    assert main([str(tmp_path), "--out", str(tmp_path / "b.png"), "--without-training"]) == 0
    points = {line.split()[0]: float(line.split()[-4]) for line in capsys.readouterr().out.splitlines()[1:3]}
    assert points == {"difficulty": 250.0, "greedy": 100.0}
