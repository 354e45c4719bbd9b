"""The blend's own attention for the recomputed tokens: how queries are grouped changes nothing it computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvmesh.blend import compute


def _scattered_positions(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    runs = torch.cat([torch.arange(start, start + 16) for start in (0, 700, 1300)])  # passage starts
    others = torch.randperm(count, generator=generator)[:300]
    return torch.cat((runs, others)).unique(sorted=True)


def test_query_groups_cover_every_query_once_in_order_within_their_bounds() -> None:
    positions = _scattered_positions(4000, seed=1)
    groups = compute._query_groups(positions)
    covered = [index for group in groups for index in range(group.start, group.stop)]
    assert covered == list(range(len(positions)))
    for group in groups:
        at = positions[group]
        assert 1 <= len(at) <= compute.QUERY_GROUP
        assert int(at[-1] - at[0]) < compute.QUERY_SPAN
    assert compute._query_groups(torch.zeros(0, dtype=torch.long)) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_attention_equals_each_query_over_exactly_the_keys_before_it(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    count, heads, kv_heads, dim = 2000, 6, 2, 32
    positions = _scattered_positions(count, seed=2)
    keys = torch.randn(count, kv_heads, dim, generator=generator).to(dtype)
    values = torch.randn(count, kv_heads, dim, generator=generator).to(dtype)
    queries = torch.randn(len(positions), heads, dim, generator=generator).to(dtype)
    grouped = compute.torch_attention(queries, positions, keys, values).reshape(len(positions), -1)
    for index in (0, 17, 100, len(positions) // 2, len(positions) - 1):  # one query at a time, no mask
        visible = int(positions[index]) + 1
        alone = F.scaled_dot_product_attention(
            queries[index:index + 1].float().transpose(0, 1).unsqueeze(0),
            keys[:visible].float().repeat_interleave(heads // kv_heads, 1).transpose(0, 1).unsqueeze(0),
            values[:visible].float().repeat_interleave(heads // kv_heads, 1).transpose(0, 1).unsqueeze(0))
        expected = alone[0].transpose(0, 1).reshape(1, -1)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(grouped[index:index + 1].float(), expected, atol=tolerance, rtol=tolerance)


def test_the_question_attends_most_to_the_key_it_matches_and_never_to_keys_after_it() -> None:
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(40, 2, 16, generator=generator) * 0.1
    queries = torch.randn(3, 4, 16, generator=generator) * 0.1
    keys[7] = queries[0, :2] * 50  # heads 0 and 1 share kv head 0: key 7 answers the first query's heads 0-1
    keys[7, 1] = queries[0, 2] * 50
    positions = torch.tensor([20, 21, 22])
    attention = compute.question_attention(queries, positions, keys)
    assert attention.shape == (23,)  # keys up to the last query's position only
    assert int(attention.argmax()) == 7
    assert torch.allclose(attention.sum(), torch.tensor(3 * 4.0))  # every query's every head sums to one
    lone = compute.question_attention(queries[:1], positions[:1], keys)
    assert lone.shape == (21,)  # a query at 20 sees keys 0..20 and no later one
