"""runtime/skip_pages.py: skippable layers grouped by horizon, a sequence gets group pages only for the
positions those layers run, every scheduler check covers every group, pages return when freed."""

import pytest

from fxforge.runtime.config import EngineConfig
from fxforge.runtime.sequence import SamplingParams, Sequence
from fxforge.runtime.skip_pages import LayeredPagePool, layer_groups

# 6 layers, 1 warm-up layer, a(t) = 4, 4, 3, 2, 1 (then 1): layer 5 always runs; layers 1..4 are skippable
TOP = (4, 4, 3, 2, 1)


def test_groups_by_horizon():
    groups = layer_groups(6, 1, TOP, num_pages=10, fraction=0.5)
    assert [(g.layers, g.horizon, g.num_pages) for g in groups] == [((1,), 0, 5), ((2,), 2, 5), ((3,), 3, 5),
                                                                   ((4,), 4, 5)]
    assert layer_groups(6, 0, (6, 6), 10, 1.0) == []  # nothing skips: no groups


def pool(num_pages=8, fraction=1.0) -> LayeredPagePool:
    config = EngineConfig(num_pages=num_pages, page_size=2, max_model_len=64)
    return LayeredPagePool(config, 0, layer_groups(6, 1, TOP, num_pages, fraction))


def test_group_pages_stop_at_the_horizon():
    p, seq = pool(), Sequence([1, 2, 3], SamplingParams(max_new_tokens=20))
    p.allocate(seq, 3)  # the prompt: every group holds it
    assert len(seq.page_ids) == 2 and [len(p.group_pages(seq, g)) for g in range(4)] == [2, 2, 2, 2]
    seq.num_computed_tokens = 3
    p.allocate(seq, 6)  # positions up to 8: the main pool holds them all, each group up to prompt + horizon
    assert len(seq.page_ids) == 5
    assert [len(p.group_pages(seq, g)) for g in range(4)] == [2, 3, 3, 4]  # 3, 5, 6, 7 positions
    assert p.num_used_pages == 5 and p.group_used_pages() == [2, 3, 3, 4]
    p.free(seq)
    assert p.num_used_pages == 0 and p.group_used_pages() == [0, 0, 0, 0] and not seq.page_ids


def test_a_full_group_blocks_like_a_full_pool():
    p = pool(num_pages=8, fraction=0.25)  # 2 pages per group
    first = Sequence([1, 2, 3], SamplingParams(max_new_tokens=4))
    second = Sequence([4, 5], SamplingParams(max_new_tokens=4))
    assert p.can_allocate(first, 3)
    p.allocate(first, 3)
    assert p.num_free_pages == 6 and not p.can_allocate(second, 2)  # main has room, the groups do not
    assert not p.can_allocate_all([(second, 1)]) and p.max_new_tokens(second) == 0
    with pytest.raises(RuntimeError, match="layer group's pool is full"):
        p.allocate(second, 1)
    assert p.fits(second, 4) and not p.fits(Sequence([1] * 9), 9)  # a prompt of 9 needs 5 pages in every group
    with pytest.raises(ValueError, match="not supported"):
        p.fork(first, second)
