"""The batch layout (tokenreward_service.model.right_pad) against the row-by-row reference."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenreward_service.model import right_pad


def reference(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(seq) for seq in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.lists(st.integers(min_value=0, max_value=2**40), min_size=1, max_size=40),
        min_size=1,
        max_size=12,
    )
)
def test_right_pad_lays_each_row_out_in_order_with_zeros_after_it(
    sequences: list[list[int]],
) -> None:
    ids, mask = right_pad(sequences)
    want_ids, want_mask = reference(sequences)
    assert ids.dtype == mask.dtype == torch.long
    assert torch.equal(ids, want_ids)
    assert torch.equal(mask, want_mask)


def test_right_pad_takes_any_sequence_of_ints() -> None:
    ids, mask = right_pad([(5, 6, 7), range(3, 5)])
    assert ids.tolist() == [[5, 6, 7], [3, 4, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
