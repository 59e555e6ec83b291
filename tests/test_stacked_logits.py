"""GenerationBatch's logits: the forward's own rows as a view where they are consecutive, else a copy."""

from types import SimpleNamespace

import torch

from ttc.decoder.batch import stacked_logits


def seqs_of(rows):
    return [SimpleNamespace(logits=r) for r in rows]


def test_consecutive_rows_of_one_forward_output_come_back_as_a_view_without_a_copy():
    out = torch.randn(5, 7)
    got = stacked_logits(seqs_of([out[1], out[2], out[3]]))
    assert torch.equal(got, out[1:4]) and got.data_ptr() == out[1].data_ptr()


def test_rows_out_of_order_or_from_two_outputs_or_repeated_are_stacked_as_a_copy():
    a, b = torch.randn(4, 7), torch.randn(4, 7)
    for rows in ([a[2], a[1]], [a[0], b[1]], [a[1], a[1]], [a[0], a[2]]):
        got = stacked_logits(seqs_of(rows))
        assert torch.equal(got, torch.stack(rows))
        assert all(got.data_ptr() != r.data_ptr() for r in rows)


def test_the_view_is_taken_under_inference_mode_too_where_rows_carry_no_base():
    with torch.inference_mode():
        out = torch.randn(3, 7)
        rows = [out[0], out[1], out[2]]
        got = stacked_logits(seqs_of(rows))
        assert torch.equal(got, out) and got.data_ptr() == out.data_ptr()
