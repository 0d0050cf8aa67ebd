"""The view solver on hand-made copies: a whole tensor, a tensor-parallel rank's part of one
(column- and row-parallel), and copies that are no single view."""

from __future__ import annotations

import pytest
import torch

from hogwild.plugin.model_runner.weight_mapping import NotAView, Piece, solve_view


def narrow(dim: int, start: int, length: int) -> tuple:
    return (("narrow", (dim, start, length), ()),)


def held(param: torch.Tensor, offset: int, shape, stride) -> torch.Tensor:
    return param.as_strided(shape, stride, param.storage_offset() + offset)


def test_a_column_parallel_rank_holds_rows_of_the_tensor():
    hf = torch.arange(32.0).view(8, 4)
    param = torch.zeros(6, 4)  # rows 0-1 another tensor's, rows 2-5 this rank's half of hf
    param[2:6] = hf.narrow(0, 4, 4)
    pieces = [Piece("qkv", narrow(0, 4, 4), 8, (4, 4), (4, 1))]
    offset, stride, shard = solve_view((8, 4), torch.float32, pieces, param.numel(), shards=True)
    assert shard == ((0, 4, 4),)
    assert torch.equal(held(param, offset, (4, 4), stride), hf.narrow(0, 4, 4))
    with pytest.raises(NotAView, match="cover 16 of its 32"):  # a rank 1 server never maps a part
        solve_view((8, 4), torch.float32, pieces, param.numel())


def test_a_row_parallel_rank_holds_columns_of_the_tensor():
    hf = torch.arange(32.0).view(4, 8)
    param = hf.narrow(1, 4, 4).contiguous()
    offset, stride, shard = solve_view((4, 8), torch.float32, [Piece("o", narrow(1, 4, 4), 0, (4, 4), (4, 1))],
                                       param.numel(), shards=True)
    assert (offset, stride, shard) == (0, (4, 1), ((1, 4, 4),))
    assert torch.equal(held(param, offset, (4, 4), stride), hf.narrow(1, 4, 4))


def test_a_whole_tensor_is_no_shard():
    hf = torch.arange(12.0).view(3, 4)
    param = torch.zeros(5, 4)
    param[1:4] = hf
    offset, stride, shard = solve_view((3, 4), torch.float32, [Piece("p", (), 4, (3, 4), (4, 1))], param.numel(), shards=True)
    assert shard == () and torch.equal(held(param, offset, (3, 4), stride), hf)


def test_parts_that_are_not_one_box_are_not_a_view():
    # A fused tensor whose two parts are each split across ranks (Phi-3's qkv_proj under TP):
    # rank 0 holds rows 0-1 and 4-5 of it, which is not one box of the tensor.
    pieces = [Piece("p", narrow(0, 0, 2), 0, (2, 4), (4, 1)), Piece("p", narrow(0, 4, 2), 8, (2, 4), (4, 1))]
    with pytest.raises(NotAView, match="one box"):
        solve_view((8, 4), torch.float32, pieces, 16, shards=True)
