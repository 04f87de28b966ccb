"""DiTStepContext.select: the rows of a batch of CFG branches that run the blocks."""

from __future__ import annotations

import torch

from sglang.multimodal_gen.runtime.models.base import take_rows
from sglang.multimodal_gen.runtime.models.wan import WanStepContext


def _context(batch: int) -> WanStepContext:
    rows = torch.arange(batch, dtype=torch.float32)
    return WanStepContext(
        timestep=rows.clone(), modulated_input=rows[:, None].expand(batch, 4).clone(),
        timestep_projection=rows[:, None].expand(batch, 24).clone(),
        encoder_hidden_states=rows[:, None, None].expand(batch, 3, 4).clone(),
        rotary_emb=(torch.ones(1, 6, 1, 8), torch.zeros(1, 6, 1, 8)), temb=rows[:, None].expand(batch, 4).clone(),
        latent_shape=(batch, 4, 2, 8, 6),
    )


def test_select_cuts_per_item_fields_and_shares_the_rest():
    ctx = _context(3)
    picked = ctx.select([2, 0])
    for name in ("timestep", "modulated_input", "timestep_projection", "encoder_hidden_states", "temb"):
        value = getattr(picked, name)
        assert value.shape[0] == 2 and value[0].eq(2).all() and value[1].eq(0).all(), name
    assert picked.rotary_emb is ctx.rotary_emb  # one table for every item
    assert picked.latent_shape == ctx.latent_shape
    one = ctx.select([1])
    assert one.temb.shape[0] == 1 and one.temb.eq(1).all()
    assert one.temb.data_ptr() == ctx.temb[1:2].data_ptr()  # a view: no copy for one row


def test_take_rows_of_every_row_is_the_tensor_itself():
    x = torch.randn(2, 5)
    assert take_rows(x, [0, 1]) is x
    assert torch.equal(take_rows(x, [1, 0]), x.flip(0))
