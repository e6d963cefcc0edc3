import pytest

from fxforge.runtime.block_manager import BlockManager
from fxforge.runtime.sequence import Sequence

PAGE = 4


def _state(bm: BlockManager, *seqs: Sequence):
    return (bm.num_free_pages, list(bm._free_pages), [bm.ref_count(p) for p in range(bm.num_pages)],
            [list(s.page_ids) for s in seqs])


@pytest.mark.parametrize(
    "args, name",
    [((0, 4), "num_pages"), ((4, 0), "page_size"), ((4, 4, -1), "bytes_per_token"), ((2.0, 4), "num_pages"),
     ((4, True), "page_size")],
    ids=["no_pages", "zero_page_size", "negative_bytes", "float_pages", "bool_page_size"],
)
def test_constructor_rejects_bad_args(args, name):
    with pytest.raises(ValueError, match=name):
        BlockManager(*args)


@pytest.mark.parametrize(
    "num_tokens, pages",
    [(1, 1), (PAGE - 1, 1), (PAGE, 1), (PAGE + 1, 2), (3 * PAGE, 3), (3 * PAGE + 1, 4)],
    ids=["1", "page-1", "page", "page+1", "3pages", "3pages+1"],
)
def test_allocation_at_page_boundaries(num_tokens, pages):
    bm = BlockManager(num_pages=8, page_size=PAGE)
    seq = Sequence(list(range(num_tokens)))
    assert bm.num_pages_needed(seq, num_tokens) == pages
    bm.allocate(seq, num_tokens)
    assert len(seq.page_ids) == pages and bm.num_used_pages == pages and bm.num_free_pages == 8 - pages
    # Growing inside the last page costs nothing; crossing into the next page costs exactly one.
    seq.num_computed_tokens = num_tokens
    slack = pages * PAGE - num_tokens
    assert bm.num_pages_needed(seq, slack) == 0
    assert bm.num_pages_needed(seq, slack + 1) == 1
    bm.allocate(seq, slack)
    assert len(seq.page_ids) == pages
    bm.allocate(seq, slack + 1)
    assert len(seq.page_ids) == pages + 1


def test_allocate_grows_incrementally_in_order_and_slots_follow_pages():
    bm = BlockManager(num_pages=6, page_size=PAGE, bytes_per_token=10)
    other = Sequence([0] * 5)
    bm.allocate(other, 5)  # takes pages 0, 1
    seq = Sequence(list(range(10)))
    bm.allocate(seq, 3)
    seq.num_computed_tokens = 3
    bm.allocate(seq, 7)
    assert seq.page_ids == [2, 3, 4]
    assert bm.kv_bytes_in_use() == 5 * PAGE * 10
    assert [bm.slot(seq, pos) for pos in (0, 3, 4, 9)] == [8, 11, 12, 17]
    assert bm.slots(seq, 2, 6) == [10, 11, 12, 13]
    assert bm.slots(seq, 5, 5) == []
    with pytest.raises(IndexError, match="position 12"):
        bm.slot(seq, 12)
    with pytest.raises(IndexError):
        bm.slot(seq, -1)
    with pytest.raises(IndexError):
        bm.slots(seq, 8, 13)


def test_failed_allocate_leaves_state_unchanged():
    bm = BlockManager(num_pages=3, page_size=PAGE)
    a, b = Sequence([1] * 9), Sequence([2] * 9)
    bm.allocate(a, 9)  # 3 pages: pool exhausted
    before = _state(bm, a, b)
    assert not bm.can_allocate(b, 1)
    with pytest.raises(RuntimeError, match=r"cannot allocate 3 KV pages for sequence .* only 0 of 3"):
        bm.allocate(b, 9)
    assert _state(bm, a, b) == before
    bm.free(a)
    assert bm.can_allocate(b, 9) and not bm.can_allocate(b, 13)
    with pytest.raises(ValueError, match="num_new_tokens"):
        bm.allocate(b, -1)


def test_free_returns_every_page():
    bm = BlockManager(num_pages=10, page_size=PAGE)
    seqs = [Sequence([1] * n) for n in (1, 4, 5, 13)]
    for s in seqs:
        bm.allocate(s, s.num_tokens)
    assert bm.num_used_pages == 1 + 1 + 2 + 4
    for s in seqs:
        bm.free(s)
        assert s.page_ids == []
    assert bm.num_free_pages == 10 and bm.kv_bytes_in_use() == 0
    assert sorted(bm._free_pages) == list(range(10))
    assert all(bm.ref_count(p) == 0 for p in range(10))


def test_fork_shares_full_pages_with_refcounts():
    bm = BlockManager(num_pages=8, page_size=PAGE)
    parent = Sequence(list(range(10)))
    bm.allocate(parent, 10)
    parent.num_computed_tokens = 10  # pages: 4 + 4 + 2 tokens
    child = Sequence(list(range(10)) + [99, 98])
    bm.fork(parent, child)
    assert child.page_ids == parent.page_ids[:2]  # the half-full third page is not shared
    assert child.num_computed_tokens == 2 * PAGE and child.num_uncomputed == 4
    assert [bm.ref_count(p) for p in parent.page_ids] == [2, 2, 1]
    assert bm.num_used_pages == 3
    bm.allocate(child, 4)  # child's own page for positions 8..11
    assert bm.num_used_pages == 4 and bm.slot(child, 8) != bm.slot(parent, 8)
    bm.free(parent)
    assert [bm.ref_count(p) for p in child.page_ids] == [1, 1, 1]
    assert bm.num_used_pages == 3  # shared pages survive their first owner
    bm.free(child)
    assert bm.num_free_pages == 8


def test_fork_keeps_last_child_token_uncomputed_and_checks_prefix():
    bm = BlockManager(num_pages=8, page_size=PAGE)
    parent = Sequence(list(range(8)))
    bm.allocate(parent, 8)
    parent.num_computed_tokens = 8
    same = Sequence(list(range(8)))
    bm.fork(parent, same)
    assert len(same.page_ids) == 1 and same.num_uncomputed == 4
    with pytest.raises(ValueError, match="already holds"):
        bm.fork(parent, same)
    different = Sequence([0, 1, 2, 7, 4, 5, 6, 7, 8])
    with pytest.raises(ValueError, match="prefix"):
        bm.fork(parent, different)
    assert different.page_ids == [] and bm.ref_count(parent.page_ids[1]) == 1
