"""Evaluation: datasets and graders, metrics (pass@k, maj@k, coverage), the resumable runner
(`ttc-eval`, `python -m ttc.evals`), probe training and accuracy-versus-compute plots."""
