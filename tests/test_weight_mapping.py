"""The view solver on hand-made copies: a whole tensor, a tensor-parallel rank's part of one
(column- and row-parallel, a fused tensor split per block), and copies that are no single view."""

from __future__ import annotations

import pytest
import torch

from hogwild.plugin.model_runner.view_solver import NotAView, Piece, solve_view


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


def test_a_fused_tensor_split_per_block_is_its_blocks_parts_stacked():
    # gate_up [2I, H] with gate and up each split across ranks: rank 1 of 2 holds rows 2-3
    # (its part of gate) and 6-7 (of up), stacked in its own tensor as vLLM's w13 shard is.
    hf = torch.arange(32.0).view(8, 4)
    param = torch.cat([hf[2:4], hf[6:8]])
    pieces = [Piece("w13", narrow(0, 2, 2), 0, (2, 4), (4, 1)), Piece("w13", narrow(0, 6, 2), 8, (2, 4), (4, 1))]
    offset, stride, shard = solve_view((8, 4), torch.float32, pieces, param.numel(), shards=True)
    assert shard == ((0, 2, 2, 2),)
    assert torch.equal(held(param, offset, (4, 4), stride), param)
    with pytest.raises(NotAView, match="cover 16 of its 32"):
        solve_view((8, 4), torch.float32, pieces, param.numel())


def test_parts_of_unequal_blocks_are_not_a_view():
    # Phi-3's qkv_proj with grouped-query attention (q 4 rows, k 2, v 2) under TP 2: rank 0
    # holds rows 0-1, 4 and 6, which is neither one box nor one part of equal blocks.
    pieces = [Piece("p", narrow(0, 0, 2), 0, (2, 4), (4, 1)), Piece("p", narrow(0, 4, 1), 8, (1, 4), (4, 1)),
              Piece("p", narrow(0, 6, 1), 12, (1, 4), (4, 1))]
    with pytest.raises(NotAView, match="one box"):
        solve_view((8, 4), torch.float32, pieces, 16, shards=True)
