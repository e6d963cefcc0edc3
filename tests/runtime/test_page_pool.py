import pytest

from fxforge.runtime.config import EngineConfig
from fxforge.runtime.page_pool import PagePool
from fxforge.runtime.sequence import Sequence

PAGE = 4


def _pool(num_pages: int, page_size: int = PAGE, bytes_per_token: int = 0) -> PagePool:
    return PagePool(EngineConfig(num_pages=num_pages, page_size=page_size), bytes_per_token)


def _state(pool: PagePool, *seqs: Sequence):
    return (pool.num_free_pages, list(pool._free_pages), [pool.ref_count(p) for p in range(pool.num_pages)],
            [list(s.page_ids) for s in seqs])


def test_size_is_the_configs():
    config = EngineConfig(num_pages=5, page_size=3)
    pool = PagePool(config)
    assert pool.config is config and (pool.num_pages, pool.page_size, pool.capacity_tokens) == (5, 3, 15)
    assert pool.num_free_pages == 5 and pool.pages_for(7) == 3


@pytest.mark.parametrize(
    "make, name",
    [(lambda: _pool(0), "EngineConfig.num_pages must be an int >= 1"),
     (lambda: _pool(4, page_size=0), "EngineConfig.page_size must be an int >= 1"),
     (lambda: _pool(4, bytes_per_token=-1), "bytes_per_token must be an int >= 0"),
     (lambda: _pool(2.0), "EngineConfig.num_pages"), (lambda: _pool(4, page_size=True), "EngineConfig.page_size")],
    ids=["no_pages", "zero_page_size", "negative_bytes", "float_pages", "bool_page_size"],
)
def test_bad_sizes_rejected(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize(
    "num_tokens, pages",
    [(1, 1), (PAGE - 1, 1), (PAGE, 1), (PAGE + 1, 2), (3 * PAGE, 3), (3 * PAGE + 1, 4)],
    ids=["1", "page-1", "page", "page+1", "3pages", "3pages+1"],
)
def test_allocation_at_page_boundaries(num_tokens, pages):
    pool = _pool(8)
    seq = Sequence(list(range(num_tokens)))
    assert pool.num_pages_needed(seq, num_tokens) == pages
    pool.allocate(seq, num_tokens)
    assert len(seq.page_ids) == pages and pool.num_used_pages == pages and pool.num_free_pages == 8 - pages
    # Growing inside the last page costs nothing; crossing into the next page costs exactly one.
    seq.num_computed_tokens = num_tokens
    slack = pages * PAGE - num_tokens
    assert pool.num_pages_needed(seq, slack) == 0
    assert pool.num_pages_needed(seq, slack + 1) == 1
    pool.allocate(seq, slack)
    assert len(seq.page_ids) == pages
    pool.allocate(seq, slack + 1)
    assert len(seq.page_ids) == pages + 1


def test_allocate_grows_incrementally_in_order_and_slots_follow_pages():
    pool = _pool(6, bytes_per_token=10)
    other = Sequence([0] * 5)
    pool.allocate(other, 5)  # takes pages 0, 1
    seq = Sequence(list(range(10)))
    pool.allocate(seq, 3)
    seq.num_computed_tokens = 3
    pool.allocate(seq, 7)
    assert seq.page_ids == [2, 3, 4]
    assert pool.kv_bytes_in_use() == 5 * PAGE * 10
    assert [pool.slot(seq, pos) for pos in (0, 3, 4, 9)] == [8, 11, 12, 17]
    assert pool.slots(seq, 2, 6) == [10, 11, 12, 13]
    assert pool.slots(seq, 5, 5) == []
    with pytest.raises(IndexError, match="position 12"):
        pool.slot(seq, 12)
    with pytest.raises(IndexError):
        pool.slot(seq, -1)
    with pytest.raises(IndexError):
        pool.slots(seq, 8, 13)


def test_failed_allocate_leaves_state_unchanged():
    pool = _pool(3)
    a, b = Sequence([1] * 9), Sequence([2] * 9)
    pool.allocate(a, 9)  # 3 pages: pool exhausted
    before = _state(pool, a, b)
    assert not pool.can_allocate(b, 1)
    with pytest.raises(RuntimeError, match=r"cannot allocate 3 KV pages for sequence .* only 0 of 3"):
        pool.allocate(b, 9)
    assert _state(pool, a, b) == before
    pool.free(a)
    assert pool.can_allocate(b, 9) and not pool.can_allocate(b, 13)
    with pytest.raises(ValueError, match="num_new_tokens"):
        pool.allocate(b, -1)


def test_free_returns_every_page():
    pool = _pool(10)
    seqs = [Sequence([1] * n) for n in (1, 4, 5, 13)]
    for s in seqs:
        pool.allocate(s, s.num_tokens)
    assert pool.num_used_pages == 1 + 1 + 2 + 4
    for s in seqs:
        pool.free(s)
        assert s.page_ids == []
    assert pool.num_free_pages == 10 and pool.kv_bytes_in_use() == 0
    assert sorted(pool._free_pages) == list(range(10))
    assert all(pool.ref_count(p) == 0 for p in range(10))


def test_fork_shares_full_pages_with_refcounts():
    pool = _pool(8)
    parent = Sequence(list(range(10)))
    pool.allocate(parent, 10)
    parent.num_computed_tokens = 10  # pages: 4 + 4 + 2 tokens
    child = Sequence(list(range(10)) + [99, 98])
    pool.fork(parent, child)
    assert child.page_ids == parent.page_ids[:2]  # the half-full third page is not shared
    assert child.num_computed_tokens == 2 * PAGE and child.num_uncomputed == 4
    assert [pool.ref_count(p) for p in parent.page_ids] == [2, 2, 1]
    assert pool.num_used_pages == 3
    pool.allocate(child, 4)  # child's own page for positions 8..11
    assert pool.num_used_pages == 4 and pool.slot(child, 8) != pool.slot(parent, 8)
    pool.free(parent)
    assert [pool.ref_count(p) for p in child.page_ids] == [1, 1, 1]
    assert pool.num_used_pages == 3  # shared pages survive their first owner
    pool.free(child)
    assert pool.num_free_pages == 8


def test_fork_keeps_last_child_token_uncomputed_and_checks_prefix():
    pool = _pool(8)
    parent = Sequence(list(range(8)))
    pool.allocate(parent, 8)
    parent.num_computed_tokens = 8
    same = Sequence(list(range(8)))
    pool.fork(parent, same)
    assert len(same.page_ids) == 1 and same.num_uncomputed == 4
    with pytest.raises(ValueError, match="already holds"):
        pool.fork(parent, same)
    different = Sequence([0, 1, 2, 7, 4, 5, 6, 7, 8])
    with pytest.raises(ValueError, match="prefix"):
        pool.fork(parent, different)
    assert different.page_ids == [] and pool.ref_count(parent.page_ids[1]) == 1
