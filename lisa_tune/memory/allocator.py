"""Model of PyTorch's CUDA caching allocator for one device and one stream.

``CachingAllocatorModel`` replays a sequence of storage allocations and frees
and reports what ``torch.cuda.memory_allocated()`` and
``torch.cuda.memory_reserved()`` would read, with their peaks. The rules come
from ``DeviceCachingAllocator`` in ``c10/cuda/CUDACachingAllocator.cpp``
(pytorch/pytorch, commit 001074d25084fdb87a799823e395a50f5ec044d3) with the
default settings of ``c10/core/AllocatorConfig.h`` (commit
007b9bc026a6844ce406a10aa8820a466cf2d770): ``max_split_size`` unlimited,
no ``roundup_power2_divisions`` and ``expandable_segments`` off.

Rules modelled:

- Zero-byte requests: ``NativeCachingAllocator::allocate`` skips the caching
  allocator for ``size == 0`` and returns a null pointer, so such a request
  changes no counter. Freeing a null pointer is a no-op.
- Rounding (``round_size``): a request below 512 bytes becomes 512 bytes,
  and any other request is rounded up to a multiple of 512 bytes.
- Pools (``get_pool``): a rounded size of at most 1 MiB goes to the small
  pool, a larger one to the large pool. A free block serves requests of its
  own pool only.
- Segment size (``get_allocation_size``): when no cached block fits, a new
  segment is reserved with cudaMalloc. Small requests get a 2 MiB segment,
  requests below 10 MiB get a 20 MiB segment, and larger requests get their
  size rounded up to a multiple of 2 MiB.
- Best fit (``get_free_block``): the free blocks of a pool are ordered by
  (size, address), and a request takes the first block whose size is at least
  the rounded request, which is the smallest fitting block.
- Splitting (``should_split``): a block is split when the remainder is at
  least 512 bytes in the small pool, or more than 1 MiB in the large pool.
  Without a split the whole block is handed out, and ``allocated_bytes``
  counts the whole block.
- Coalescing (``free_block``, ``try_merge_blocks``): a freed block merges with
  its free neighbours in the same segment. Blocks of different segments
  never merge.
- Segments are never released. ``release_cached_blocks`` runs only on
  ``torch.cuda.empty_cache()`` or when a cudaMalloc fails, and this model has
  neither, so ``reserved_bytes`` never decreases.
- Counters (``alloc_found_block``, ``free``, ``alloc_block``):
  ``allocated_bytes`` is the sum of the sizes of the allocated blocks, and
  ``reserved_bytes`` the sum of the sizes of the segments. A peak is raised
  whenever its counter grows, and ``reset_peaks`` sets each peak to the
  current value, like ``torch.cuda.reset_peak_memory_stats()``.

Known limitations:

- There is no device capacity, so the model never runs out of memory. On a
  failed cudaMalloc the real allocator frees cached unsplit segments and
  retries, which lowers ``reserved_bytes``. A replay whose reserved peak
  exceeds the device memory would therefore have raised an out-of-memory
  error or reserved less on the device.
- One stream only. Blocks used on other streams (``recordStream``) and the
  events that delay their reuse are not modelled.
- The settings ``max_split_size_mb``, ``max_non_split_rounding_mb``,
  ``roundup_power2_divisions``, ``garbage_collection_threshold`` and
  ``expandable_segments`` of ``PYTORCH_CUDA_ALLOC_CONF`` (also read from
  ``PYTORCH_ALLOC_CONF``) are not modelled, nor are CUDA graph private pools
  or ``PYTORCH_NO_CUDA_MEMORY_CACHING``.
- Memory that does not go through the caching allocator (the CUDA context,
  and workspaces that libraries obtain with their own cudaMalloc) is not
  counted, just as ``torch.cuda.memory_reserved()`` does not count it.
"""

from __future__ import annotations

from bisect import bisect_left, insort

__all__ = [
    "LARGE_SEGMENT_BYTES",
    "MIN_BLOCK_BYTES",
    "MIN_LARGE_ALLOC_BYTES",
    "ROUND_LARGE_BYTES",
    "SMALL_REQUEST_MAX_BYTES",
    "SMALL_SEGMENT_BYTES",
    "CachingAllocatorModel",
    "round_request",
    "segment_size",
]

# Constants of c10/cuda/CUDACachingAllocator.cpp (kMinBlockSize, kSmallSize,
# kSmallBuffer, kLargeBuffer, kMinLargeAlloc and kRoundLarge).
MIN_BLOCK_BYTES = 512
SMALL_REQUEST_MAX_BYTES = 1 << 20
SMALL_SEGMENT_BYTES = 2 << 20
LARGE_SEGMENT_BYTES = 20 << 20
MIN_LARGE_ALLOC_BYTES = 10 << 20
ROUND_LARGE_BYTES = 2 << 20

# NativeCachingAllocator::allocate rejects requests of 1 EiB or more.
_MAX_REQUEST_BYTES = 1 << 60


def round_request(nbytes: int) -> int:
    """Round a request in bytes to the block size that the allocator hands out.

    Zero stays zero, because a zero-byte request never reaches the caching
    allocator. Raises ValueError for a negative request.
    """
    if nbytes < 0:
        raise ValueError(f"invalid request size {nbytes}: must be >= 0 bytes")
    if nbytes == 0:
        return 0
    if nbytes < MIN_BLOCK_BYTES:
        return MIN_BLOCK_BYTES
    return -(-nbytes // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES


def segment_size(rounded_nbytes: int) -> int:
    """Return the segment size reserved when no cached block fits a rounded request."""
    if rounded_nbytes <= SMALL_REQUEST_MAX_BYTES:
        return SMALL_SEGMENT_BYTES
    if rounded_nbytes < MIN_LARGE_ALLOC_BYTES:
        return LARGE_SEGMENT_BYTES
    return -(-rounded_nbytes // ROUND_LARGE_BYTES) * ROUND_LARGE_BYTES


def _should_split(remaining: int, is_small: bool) -> bool:
    """Return whether a block with ``remaining`` spare bytes is split (should_split)."""
    if is_small:
        return remaining >= MIN_BLOCK_BYTES
    return remaining > SMALL_REQUEST_MAX_BYTES


class _Block:
    """A contiguous range of one segment, either allocated or cached as free."""

    __slots__ = ("address", "allocated", "is_small", "next", "prev", "size")

    def __init__(self, address: int, size: int, is_small: bool) -> None:
        self.address = address
        self.size = size
        self.is_small = is_small
        self.allocated = False
        self.prev: _Block | None = None
        self.next: _Block | None = None


# An entry of a free list. Entries sort by (size, address), the order of
# BlockComparatorSize for one stream. The block itself is never compared,
# because addresses are unique within a pool.
_FreeEntry = tuple[int, int, _Block]


class CachingAllocatorModel:
    """Replayable model of the CUDA caching allocator of one device and one stream.

    ``malloc`` returns an integer handle that ``free`` takes back. Handles are
    positive and never reused, except that every zero-byte request returns
    handle 0, the model's null pointer.
    """

    def __init__(self) -> None:
        self._small_free: list[_FreeEntry] = []
        self._large_free: list[_FreeEntry] = []
        self._live: dict[int, _Block] = {}
        self._next_handle = 1
        # Model addresses of new segments. They start above 0 so that no block
        # shares the null address, and they only decide ties between free
        # blocks of equal size.
        # NOTE: cudaMalloc returns addresses in no set order, so on the device
        # such a tie may go to another block than here.
        self._next_address = SMALL_SEGMENT_BYTES
        self._allocated = 0
        self._reserved = 0
        self._peak_allocated = 0
        self._peak_reserved = 0

    @property
    def allocated_bytes(self) -> int:
        """Bytes in allocated blocks, as ``torch.cuda.memory_allocated()`` reports."""
        return self._allocated

    @property
    def reserved_bytes(self) -> int:
        """Bytes in reserved segments, as ``torch.cuda.memory_reserved()`` reports."""
        return self._reserved

    @property
    def peak_allocated_bytes(self) -> int:
        """Maximum of ``allocated_bytes`` since creation or the last ``reset_peaks``."""
        return self._peak_allocated

    @property
    def peak_reserved_bytes(self) -> int:
        """Maximum of ``reserved_bytes`` since creation or the last ``reset_peaks``."""
        return self._peak_reserved

    def reset_peaks(self) -> None:
        """Set both peaks to the current values, like ``reset_peak_memory_stats()``."""
        self._peak_allocated = self._allocated
        self._peak_reserved = self._reserved

    def malloc(self, nbytes: int) -> int:
        """Allocate a block for a request of ``nbytes`` bytes and return its handle.

        Raises ValueError for a negative request and MemoryError for a request
        of 1 EiB or more, which PyTorch rejects as out of memory.
        """
        if nbytes == 0:
            return 0
        if nbytes >= _MAX_REQUEST_BYTES:
            raise MemoryError(f"request of {nbytes} bytes is 1 EiB or more, which PyTorch rejects as out of memory")
        size = round_request(nbytes)
        is_small = size <= SMALL_REQUEST_MAX_BYTES
        free_list = self._small_free if is_small else self._large_free

        block = self._take_best_fit(free_list, size)
        if block is None:
            block = self._reserve_segment(size, is_small)

        if _should_split(block.size - size, is_small):
            self._split(block, size, free_list)

        block.allocated = True
        self._allocated += block.size
        self._peak_allocated = max(self._peak_allocated, self._allocated)

        handle = self._next_handle
        self._next_handle = handle + 1
        self._live[handle] = block
        return handle

    def free(self, handle: int) -> None:
        """Free the block of ``handle`` and merge it with its free neighbours.

        Handle 0 is ignored. Raises ValueError for a handle that is not
        allocated, for example one freed before.
        """
        if handle == 0:
            return
        block = self._live.pop(handle, None)
        if block is None:
            raise ValueError(f"invalid handle {handle}: it was not returned by malloc or was already freed")
        block.allocated = False
        self._allocated -= block.size
        free_list = self._small_free if block.is_small else self._large_free

        prev = block.prev
        if prev is not None and not prev.allocated:
            self._remove_free(free_list, prev)
            block.address = prev.address
            block.size += prev.size
            block.prev = prev.prev
            if block.prev is not None:
                block.prev.next = block

        following = block.next
        if following is not None and not following.allocated:
            self._remove_free(free_list, following)
            block.size += following.size
            block.next = following.next
            if block.next is not None:
                block.next.prev = block

        insort(free_list, (block.size, block.address, block))

    @staticmethod
    def _take_best_fit(free_list: list[_FreeEntry], size: int) -> _Block | None:
        # (size, 0) sorts before every entry of that size because addresses are
        # positive, so this finds the smallest block of at least `size` bytes.
        index = bisect_left(free_list, (size, 0))
        if index == len(free_list):
            return None
        return free_list.pop(index)[2]

    def _reserve_segment(self, size: int, is_small: bool) -> _Block:
        nbytes = segment_size(size)
        block = _Block(self._next_address, nbytes, is_small)
        self._next_address += nbytes
        self._reserved += nbytes
        self._peak_reserved = max(self._peak_reserved, self._reserved)
        return block

    @staticmethod
    def _split(block: _Block, size: int, free_list: list[_FreeEntry]) -> None:
        # The request keeps the low addresses and the remainder becomes a free
        # block after it, as in alloc_found_block.
        remainder = _Block(block.address + size, block.size - size, block.is_small)
        remainder.prev = block
        remainder.next = block.next
        if block.next is not None:
            block.next.prev = remainder
        block.next = remainder
        block.size = size
        insort(free_list, (remainder.size, remainder.address, remainder))

    @staticmethod
    def _remove_free(free_list: list[_FreeEntry], block: _Block) -> None:
        index = bisect_left(free_list, (block.size, block.address))
        del free_list[index]
