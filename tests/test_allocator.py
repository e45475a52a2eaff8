"""Tests for the caching allocator model against hand-worked sequences.

Each expected number follows from the rules in the module docstring of
lisa_tune/memory/allocator.py. The comments show the arithmetic.
"""

from __future__ import annotations

import random
import time

import pytest

from lisa_tune.memory.allocator import (
    CachingAllocatorModel,
    round_request,
    segment_size,
)

KiB = 1 << 10
MiB = 1 << 20


# Rounding and segment sizes


@pytest.mark.parametrize(
    ("nbytes", "expected"),
    [
        (0, 0),
        (1, 512),
        (100, 512),
        (511, 512),
        (512, 512),
        (513, 1024),
        (1000, 1024),
        (MiB, MiB),
        (MiB + 1, MiB + 512),
    ],
)
def test_round_request(nbytes: int, expected: int) -> None:
    assert round_request(nbytes) == expected


def test_round_request_negative_raises() -> None:
    with pytest.raises(ValueError, match="-1"):
        round_request(-1)


@pytest.mark.parametrize(
    ("rounded", "expected"),
    [
        (512, 2 * MiB),
        (MiB, 2 * MiB),
        (MiB + 512, 20 * MiB),
        (3 * MiB, 20 * MiB),
        (10 * MiB - 512, 20 * MiB),
        (10 * MiB, 10 * MiB),
        (11 * MiB + 512 * KiB, 12 * MiB),
        (12 * MiB, 12 * MiB),
        (12 * MiB + 512, 14 * MiB),
    ],
)
def test_segment_size(rounded: int, expected: int) -> None:
    assert segment_size(rounded) == expected


# Single requests


def test_tiny_request_gets_small_segment() -> None:
    model = CachingAllocatorModel()
    model.malloc(100)
    assert model.allocated_bytes == 512
    assert model.reserved_bytes == 2 * MiB


def test_zero_byte_request_allocates_nothing() -> None:
    model = CachingAllocatorModel()
    handle = model.malloc(0)
    assert handle == 0
    assert model.allocated_bytes == 0
    assert model.reserved_bytes == 0
    model.free(handle)
    assert model.allocated_bytes == 0


def test_one_mib_request_uses_small_pool() -> None:
    model = CachingAllocatorModel()
    model.malloc(MiB)
    assert model.allocated_bytes == MiB
    assert model.reserved_bytes == 2 * MiB


def test_request_above_one_mib_uses_large_segment() -> None:
    model = CachingAllocatorModel()
    model.malloc(MiB + 1)
    assert model.allocated_bytes == MiB + 512
    assert model.reserved_bytes == 20 * MiB


def test_three_mib_request_gets_20_mib_segment() -> None:
    model = CachingAllocatorModel()
    model.malloc(3 * MiB)
    assert model.allocated_bytes == 3 * MiB
    assert model.reserved_bytes == 20 * MiB


def test_twelve_mib_request_gets_exact_segment() -> None:
    model = CachingAllocatorModel()
    model.malloc(12 * MiB)
    assert model.allocated_bytes == 12 * MiB
    assert model.reserved_bytes == 12 * MiB


def test_ten_mib_request_gets_exact_segment() -> None:
    # 10 MiB is not below kMinLargeAlloc, so it is rounded to 2 MiB, not given 20 MiB.
    model = CachingAllocatorModel()
    model.malloc(10 * MiB)
    assert model.allocated_bytes == 10 * MiB
    assert model.reserved_bytes == 10 * MiB


def test_unsplit_remainder_counts_as_allocated() -> None:
    # 11.5 MiB gets a 12 MiB segment. The 0.5 MiB remainder is not more than
    # 1 MiB, so the block is not split and all 12 MiB count as allocated.
    model = CachingAllocatorModel()
    model.malloc(11 * MiB + 512 * KiB)
    assert model.allocated_bytes == 12 * MiB
    assert model.reserved_bytes == 12 * MiB


def test_huge_request_raises_memory_error() -> None:
    model = CachingAllocatorModel()
    with pytest.raises(MemoryError):
        model.malloc(1 << 60)


def test_negative_request_raises() -> None:
    model = CachingAllocatorModel()
    with pytest.raises(ValueError, match="-5"):
        model.malloc(-5)


# Small pool packing and splitting


def test_small_requests_share_segment() -> None:
    # Four 512 KiB blocks fill one 2 MiB segment, and the fifth needs a second one.
    model = CachingAllocatorModel()
    for _ in range(4):
        model.malloc(512 * KiB)
    assert model.allocated_bytes == 2 * MiB
    assert model.reserved_bytes == 2 * MiB

    model.malloc(512 * KiB)
    assert model.allocated_bytes == 2 * MiB + 512 * KiB
    assert model.reserved_bytes == 4 * MiB


def test_small_block_split_on_reuse() -> None:
    # In the small pool a remainder of 512 bytes is enough to split.
    # Layout: a [0, 1024), b [1024, 1536), free [1536, 2 MiB).
    model = CachingAllocatorModel()
    a = model.malloc(1024)
    model.malloc(512)
    model.free(a)
    assert model.allocated_bytes == 512

    # Best fit is the freed 1024-byte block, split into 512 + 512.
    model.malloc(512)
    assert model.allocated_bytes == 1024
    assert model.reserved_bytes == 2 * MiB

    # The split-off 512 bytes at [512, 1024) serve the next request.
    model.malloc(512)
    assert model.allocated_bytes == 1536
    assert model.reserved_bytes == 2 * MiB


# Large pool splitting


def test_large_remainder_of_one_mib_not_split() -> None:
    # 19 MiB gets a 20 MiB segment. The remainder is exactly 1 MiB, which is
    # not more than kSmallSize, so the whole segment is allocated.
    model = CachingAllocatorModel()
    model.malloc(19 * MiB)
    assert model.allocated_bytes == 20 * MiB
    assert model.reserved_bytes == 20 * MiB

    # Nothing is left to cache, so even a 2 MiB request needs a new segment.
    model.malloc(2 * MiB)
    assert model.reserved_bytes == 40 * MiB


def test_large_remainder_above_one_mib_split() -> None:
    # 19 MiB - 512 leaves 1 MiB + 512 in the 20 MiB segment, which is split off.
    model = CachingAllocatorModel()
    model.malloc(19 * MiB - 512)
    assert model.allocated_bytes == 19 * MiB - 512
    assert model.reserved_bytes == 20 * MiB

    # The remainder serves a large request of exactly its size.
    model.malloc(MiB + 512)
    assert model.allocated_bytes == 20 * MiB
    assert model.reserved_bytes == 20 * MiB


def test_large_requests_share_20_mib_segment() -> None:
    # Three 6 MiB requests fit in one 20 MiB segment.
    model = CachingAllocatorModel()
    for _ in range(3):
        model.malloc(6 * MiB)
    assert model.allocated_bytes == 18 * MiB
    assert model.reserved_bytes == 20 * MiB


# Reuse and best fit


def test_freed_block_reused_for_same_size() -> None:
    model = CachingAllocatorModel()
    a = model.malloc(12 * MiB)
    model.free(a)
    assert model.allocated_bytes == 0
    assert model.reserved_bytes == 12 * MiB

    model.malloc(12 * MiB)
    assert model.allocated_bytes == 12 * MiB
    assert model.reserved_bytes == 12 * MiB


def test_freed_block_reused_unsplit_for_slightly_smaller() -> None:
    # 11.5 MiB fits the cached 12 MiB block with 0.5 MiB to spare, so the
    # block is handed out whole.
    model = CachingAllocatorModel()
    model.free(model.malloc(12 * MiB))
    model.malloc(11 * MiB + 512 * KiB)
    assert model.allocated_bytes == 12 * MiB
    assert model.reserved_bytes == 12 * MiB


def test_freed_large_block_split_for_smaller() -> None:
    # A 3 MiB request takes 3 MiB of the cached 12 MiB block instead of a new
    # 20 MiB segment, and the remaining 9 MiB stay cached.
    model = CachingAllocatorModel()
    model.free(model.malloc(12 * MiB))
    model.malloc(3 * MiB)
    assert model.allocated_bytes == 3 * MiB
    assert model.reserved_bytes == 12 * MiB

    model.malloc(9 * MiB)
    assert model.allocated_bytes == 12 * MiB
    assert model.reserved_bytes == 12 * MiB


def test_best_fit_picks_smallest_block() -> None:
    # Cached: 16 MiB at the lower address, 12 MiB above it. The 12 MiB request
    # takes the 12 MiB block, which leaves the 16 MiB block for the second
    # request. First fit by address would split the 16 MiB block and reserve
    # another segment.
    model = CachingAllocatorModel()
    a = model.malloc(16 * MiB)
    b = model.malloc(12 * MiB)
    model.free(a)
    model.free(b)

    model.malloc(12 * MiB)
    model.malloc(16 * MiB)
    assert model.allocated_bytes == 28 * MiB
    assert model.reserved_bytes == 28 * MiB


def test_small_block_not_used_for_large_request() -> None:
    model = CachingAllocatorModel()
    model.free(model.malloc(MiB))
    model.malloc(MiB + 512)
    assert model.allocated_bytes == MiB + 512
    assert model.reserved_bytes == 22 * MiB


def test_large_block_not_used_for_small_request() -> None:
    model = CachingAllocatorModel()
    model.free(model.malloc(12 * MiB))
    model.malloc(100)
    assert model.allocated_bytes == 512
    assert model.reserved_bytes == 14 * MiB


# Coalescing


def test_coalescing_restores_whole_segment() -> None:
    # a [0, 3), b [3, 6), c [6, 9) and a free remainder [9, 20), in MiB.
    model = CachingAllocatorModel()
    a = model.malloc(3 * MiB)
    b = model.malloc(3 * MiB)
    c = model.malloc(3 * MiB)
    assert model.allocated_bytes == 9 * MiB
    assert model.reserved_bytes == 20 * MiB

    # b has no free neighbour. a merges with b (next), and c merges with
    # a + b (prev) and the remainder (next) into one 20 MiB block.
    model.free(b)
    model.free(a)
    model.free(c)
    assert model.allocated_bytes == 0

    # 19 MiB fits only if the whole segment is one free block again.
    model.malloc(19 * MiB)
    assert model.allocated_bytes == 20 * MiB
    assert model.reserved_bytes == 20 * MiB


def test_coalescing_with_previous_block_only() -> None:
    # a [0, 6), b [6, 12), c [12, 18), free [18, 20), in MiB.
    # Freeing a and then b merges b into a, which leaves one free 12 MiB block at 0.
    model = CachingAllocatorModel()
    a = model.malloc(6 * MiB)
    b = model.malloc(6 * MiB)
    model.malloc(6 * MiB)
    model.free(a)
    model.free(b)

    model.malloc(12 * MiB)
    assert model.allocated_bytes == 18 * MiB
    assert model.reserved_bytes == 20 * MiB


def test_small_pool_coalescing() -> None:
    model = CachingAllocatorModel()
    handles = [model.malloc(512 * KiB) for _ in range(4)]
    for handle in handles:
        model.free(handle)

    model.malloc(MiB)
    model.malloc(MiB)
    assert model.allocated_bytes == 2 * MiB
    assert model.reserved_bytes == 2 * MiB


def test_blocks_of_different_segments_not_merged() -> None:
    # Two 12 MiB segments, both free, do not form a 24 MiB block.
    model = CachingAllocatorModel()
    a = model.malloc(12 * MiB)
    b = model.malloc(12 * MiB)
    model.free(a)
    model.free(b)

    model.malloc(24 * MiB)
    assert model.allocated_bytes == 24 * MiB
    assert model.reserved_bytes == 48 * MiB


# Fragmentation and peaks


def test_fragmentation_grows_reserved() -> None:
    # a [0, 6), b [6, 12), c [12, 18) in one 20 MiB segment, in MiB.
    model = CachingAllocatorModel()
    a = model.malloc(6 * MiB)
    model.malloc(6 * MiB)
    c = model.malloc(6 * MiB)
    assert model.peak_allocated_bytes == 18 * MiB

    # Freeing a and c leaves free blocks of 6 MiB and 8 MiB, because c merges
    # with the 2 MiB remainder. Neither fits 9 MiB, so a new segment is reserved.
    model.free(a)
    model.free(c)
    model.malloc(9 * MiB)
    assert model.allocated_bytes == 15 * MiB
    assert model.peak_allocated_bytes == 18 * MiB
    assert model.reserved_bytes == 40 * MiB
    assert model.peak_reserved_bytes == 40 * MiB


def test_peaks_track_maximum_and_reset() -> None:
    model = CachingAllocatorModel()
    a = model.malloc(12 * MiB)
    b = model.malloc(12 * MiB)
    model.free(a)
    model.free(b)
    assert model.allocated_bytes == 0
    assert model.peak_allocated_bytes == 24 * MiB
    assert model.reserved_bytes == 24 * MiB
    assert model.peak_reserved_bytes == 24 * MiB

    model.reset_peaks()
    assert model.peak_allocated_bytes == 0
    assert model.peak_reserved_bytes == 24 * MiB

    model.malloc(12 * MiB)
    assert model.peak_allocated_bytes == 12 * MiB
    assert model.peak_reserved_bytes == 24 * MiB


# Handles


def test_free_unknown_handle_raises() -> None:
    model = CachingAllocatorModel()
    with pytest.raises(ValueError, match="invalid handle 7"):
        model.free(7)


def test_double_free_raises() -> None:
    model = CachingAllocatorModel()
    handle = model.malloc(100)
    model.free(handle)
    with pytest.raises(ValueError, match="already freed"):
        model.free(handle)


def test_handles_are_unique() -> None:
    model = CachingAllocatorModel()
    first = model.malloc(100)
    model.free(first)
    second = model.malloc(100)
    assert second != first


# Long replays


def _random_events(count: int, seed: int) -> list[tuple[bool, int]]:
    """Build `count` events as (is_malloc, size or index into the live list).

    Sizes are log-uniform from 1 byte to 64 MiB. Every allocation is freed by
    the end, and frees pick a random live allocation.
    """
    rng = random.Random(seed)
    events: list[tuple[bool, int]] = []
    live = 0
    mallocs_left = count // 2
    while len(events) < count:
        if mallocs_left > 0 and (live == 0 or rng.random() < 0.55):
            events.append((True, int(2 ** rng.uniform(0, 26))))
            live += 1
            mallocs_left -= 1
        else:
            events.append((False, rng.randrange(live)))
            live -= 1
    return events


def _replay(model: CachingAllocatorModel, events: list[tuple[bool, int]]) -> None:
    live: list[int] = []
    for is_malloc, value in events:
        if is_malloc:
            live.append(model.malloc(value))
        else:
            # Swap the chosen handle to the end so the removal is O(1).
            live[value], live[-1] = live[-1], live[value]
            model.free(live.pop())


def test_replay_frees_everything() -> None:
    model = CachingAllocatorModel()
    _replay(model, _random_events(20_000, seed=1))
    assert model.allocated_bytes == 0
    assert model.reserved_bytes >= model.peak_allocated_bytes
    assert model.peak_reserved_bytes == model.reserved_bytes


def test_replay_200k_events_under_one_second() -> None:
    events = _random_events(200_000, seed=0)
    model = CachingAllocatorModel()
    start = time.perf_counter()
    _replay(model, events)
    elapsed = time.perf_counter() - start
    assert model.allocated_bytes == 0
    assert elapsed < 1.0, f"replay of 200,000 events took {elapsed:.2f} s"
