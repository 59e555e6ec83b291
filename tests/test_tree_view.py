"""The SVG tree view: layout, the chosen path, and escaping."""

from ttc.tree_view import MAX_NODES, chosen_path, layout, tree_svg


def node(id, parent, status="open", text="", score=None, depth=0):
    return {"id": id, "parent": parent, "status": status, "text": text, "score": score, "depth": depth, "tokens": 1}


TREE = [node(0, None, "root"), node(1, 0, "kept"), node(2, 0, "pruned"), node(3, 1, "final"), node(4, 1, "chosen")]


def test_leaves_take_columns_in_depth_first_order_and_parents_sit_over_their_middle():
    place = layout(TREE)
    assert place == {3: (0.0, 2), 4: (1.0, 2), 1: (0.5, 1), 2: (2.0, 1), 0: (1.25, 0)}


def test_a_node_whose_parent_was_never_recorded_is_drawn_as_a_root():
    place = layout([node(5, 99), node(6, 5)])
    assert place == {6: (0.0, 1), 5: (0.0, 0)}


def test_the_chosen_path_runs_from_the_root_to_the_chosen_node():
    assert chosen_path(TREE) == {0, 1, 4}


def test_the_svg_draws_one_dot_per_node_and_escapes_step_text():
    svg = tree_svg({"nodes": TREE[:-1] + [node(4, 1, "chosen", text="<script>x</script> & more", score=0.5)]})
    assert svg.count("<circle") == len(TREE)
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    assert "0.50" in svg and svg.count("stroke-width='3'/>") == 2  # two thick edges: root-1 and 1-4


def test_an_empty_or_huge_tree_is_summarised_not_drawn():
    assert "no tree" in tree_svg({"nodes": []})
    huge = [node(0, None)] + [node(i, 0) for i in range(1, MAX_NODES + 1)]
    assert "<svg" not in tree_svg({"nodes": huge}) and str(MAX_NODES + 1) in tree_svg({"nodes": huge})
