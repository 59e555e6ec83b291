"""A search tree drawn as SVG, for notebooks (`Result._repr_html_`) and saved reports.

Layout: depth is the row, leaves take consecutive columns in depth-first order, and a parent sits above
the middle of its children, so edges never cross. Each node is a dot coloured by what became of it
(pruned, kept, final, chosen), with its score beside it and the first words of its step under it; the
path to the chosen node is drawn thick. The whole step text, its tokens and score are in the node's
tooltip (`<title>`), so a 30-node tree stays readable without printing whole steps.

Written here rather than with graphviz or networkx+matplotlib: both would be a dependency (graphviz a
system binary) for one fixed layout, and neither renders inline HTML with tooltips.
"""

from __future__ import annotations

import html

STATUS_COLOURS = {"root": "#555555", "open": "#8a8a8a", "kept": "#2f5fa8", "pruned": "#c0504d",
                  "final": "#2e8b57", "chosen": "#00a000", "stopped": "#d08a00"}
COLUMN_PX = 84  # one leaf's column; a label of LABEL_CHARS at 10 px fits in it
ROW_PX = 64
LABEL_CHARS = 15
HALO = "paint-order='stroke' stroke='#fff' stroke-width='3'"  # labels stay legible over edges
MAX_NODES = 400  # beyond this the SVG is summarised rather than drawn (a page, not a poster)


def layout(nodes: list[dict]) -> dict[int, tuple[float, int]]:
    """(column, row) of every node: leaves in depth-first order, parents over their children's middle."""
    children: dict[int | None, list[int]] = {}
    ids = {n["id"] for n in nodes}
    for n in nodes:
        parent = n["parent"] if n["parent"] in ids else None  # a parent never recorded: draw as a root
        children.setdefault(parent, []).append(n["id"])
    place: dict[int, tuple[float, int]] = {}
    next_column = 0

    def visit(node_id: int, row: int) -> float:
        nonlocal next_column
        kids = children.get(node_id, [])
        if not kids:
            column = float(next_column)
            next_column += 1
        else:
            columns = [visit(k, row + 1) for k in kids]
            column = (columns[0] + columns[-1]) / 2
        place[node_id] = (column, row)
        return column

    # An explicit stack would avoid Python's recursion limit; search trees here are at most a few
    # dozen levels deep (max_depth settings), far below it.
    for root in children.get(None, []):
        visit(root, 0)
    return place


def chosen_path(nodes: list[dict]) -> set[int]:
    """Ids on the path from a root to every node whose status is `chosen`."""
    parent = {n["id"]: n["parent"] for n in nodes}
    path: set[int] = set()
    for n in nodes:
        node_id = n["id"] if n["status"] == "chosen" else None
        while node_id is not None and node_id not in path:
            path.add(node_id)
            node_id = parent.get(node_id)
    return path


def _label(text: str) -> str:
    words = " ".join(text.split())
    return words if len(words) <= LABEL_CHARS else words[: LABEL_CHARS - 1] + "…"


def tree_svg(tree: dict) -> str:
    """The tree of a Result (`Result.tree`: {"nodes": [...]}) as an inline SVG element."""
    nodes = tree.get("nodes", [])
    if not nodes:
        return "<p><i>no tree recorded</i></p>"
    if len(nodes) > MAX_NODES:
        return f"<p><i>{len(nodes)} nodes: too many to draw ({MAX_NODES} at most)</i></p>"
    place = layout(nodes)
    path = chosen_path(nodes)
    by_id = {n["id"]: n for n in nodes}
    columns = max(c for c, _ in place.values()) + 1
    rows = max(r for _, r in place.values()) + 1
    width, height = int(columns * COLUMN_PX + 40), int(rows * ROW_PX + 40)

    def xy(node_id: int) -> tuple[float, float]:
        column, row = place[node_id]
        return 20 + column * COLUMN_PX + COLUMN_PX / 2, 24 + row * ROW_PX

    edges, dots = [], []
    for n in nodes:
        x, y = xy(n["id"])
        parent = n["parent"] if n["parent"] in by_id else None
        if parent is not None:
            px, py = xy(parent)
            thick = n["id"] in path and parent in path
            edges.append(f"<line x1='{px:.0f}' y1='{py:.0f}' x2='{x:.0f}' y2='{y:.0f}' "
                         f"stroke='{'#00a000' if thick else '#b8b8b8'}' stroke-width='{3 if thick else 1}'/>")
        colour = STATUS_COLOURS.get(n["status"], "#8a8a8a")
        score = "" if n.get("score") is None else f"{n['score']:.2f}"
        grade = {True: " \u2713", False: " \u2717"}.get(n.get("correct"), "")  # a graded solution (eval records)
        tip = html.escape(f"#{n['id']} {n['status']}, depth {n.get('depth')}, {n.get('tokens', 0)} tokens"
                          f"{', score ' + score if score else ''}\n{n.get('text', '').strip()}")
        extra = "".join(f", {k} {v}" for k, v in n.items() if k in ("visits", "value"))
        dots.append(f"<g><title>{tip}{html.escape(extra)}</title>"
                    f"<circle cx='{x:.0f}' cy='{y:.0f}' r='8' fill='{colour}' stroke='#222' stroke-width='0.6'/>"
                    + (f"<text x='{x + 10:.0f}' y='{y - 6:.0f}' font-size='10' fill='#222' {HALO}>{score}{grade}</text>"
                       if score or grade else "")
                    + f"<text x='{x:.0f}' y='{y + 20:.0f}' font-size='10' fill='#444' text-anchor='middle' {HALO}>"
                      f"{html.escape(_label(n.get('text', '')))}</text></g>")
    legend = " ".join(f"<span style='color:{c}'>&#9679; {s}</span>" for s, c in STATUS_COLOURS.items()
                      if any(n["status"] == s for n in nodes))
    return (f"<div style='overflow-x:auto'><svg xmlns='http://www.w3.org/2000/svg' width='{width}' "
            f"height='{height}' style='font-family:sans-serif;background:#fff'>{''.join(edges)}{''.join(dots)}"
            f"</svg><div style='font-size:11px'>{legend} &middot; hover a node for its step</div></div>")
