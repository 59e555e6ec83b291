"""Save one search's tree view as HTML, and as a PNG through headless Chromium when it is installed.

    python examples/render_tree.py --out docs/images/tree_view          # writes tree_view.html (+ .png)

The view is the one a notebook shows (`Result._repr_html_`, `ttc/tree_view.py`). A beam of width 3 that
proposes 3 children per beam for 3 rounds makes a tree of about 30 nodes: the size at which a view that
prints whole steps stops being readable. Chromium: Debian's `chromium` package (`apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import ttc
from ttc.evals.datasets import load_reasoning_gym
from ttc.search.beam import Beam
from ttc.verifiers.arithmetic import ArithmeticVerifier


def screenshot(html: Path, png: Path, width: int, height: int) -> bool:
    """A PNG of the page through headless Chromium; False when no Chromium is installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        return False
    # --no-sandbox: Chromium refuses to start its own sandbox as root (CI containers); the page is our own file
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},{height}",
                    f"--screenshot={png}", html.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    return png.is_file()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tree_view", help="path without suffix: writes .html and .png")
    parser.add_argument("--seed", type=int, default=4242, help="chain_sum problem seed (4242: the notebook's)")
    args = parser.parse_args()
    problem = load_reasoning_gym("chain_sum", seed=args.seed, size=1,
                                 options={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2})
    model = ttc.load("smollm2-135m")
    result = ttc.solve(problem.problems[0], Beam(n=3, expand=3, max_depth=3), model=model,
                       verifier=ArithmeticVerifier(), budget=4000, seed=0, answer_fn=problem.extract,
                       max_tokens=128, max_step_tokens=48)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    html = out.with_suffix(".html")
    html.write_text(f"<html><body style='background:#fff'>{result._repr_html_()}</body></html>")
    nodes = len(result.tree["nodes"])
    shot = screenshot(html, out.with_suffix(".png"), width=1800, height=420)
    print(f"{nodes} nodes: {html}" + (f" and {out.with_suffix('.png')}" if shot else " (no Chromium: no PNG)"))


if __name__ == "__main__":
    main()
