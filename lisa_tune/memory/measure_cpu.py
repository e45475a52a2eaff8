"""Ground-truth peak of live CPU tensor storage, measured by running real code.

``measure_peak_live_bytes(fn)`` runs ``fn`` under
``torch.profiler.profile(activities=[ProfilerActivity.CPU], profile_memory=True)``
and replays the profiler's allocation events in time order. It is independent
of the meta-device tracer that it checks: it installs no ``TorchDispatchMode``
and works the same whether or not one is active.

Event source (read in torch 2.13): with ``profile_memory=True``, c10's
``DefaultCPUAllocator`` reports to the profiler every non-empty allocation,
and every free of a block that it allocated while a profiler was recording
(``ProfiledCPUMemoryReporter`` in ``c10/core/CPUAllocator.cpp``). The profiler
keeps each report as an ``Allocation`` event with the pointer, a signed byte
delta and a timestamp. These events are read from
``prof.profiler.kineto_results.experimental_event_tree()``, the only view
that carries the pointer. The flat ``kineto_results.events()`` list ("[memory]"
events with ``nbytes()``) and ``FunctionEvent.cpu_memory_usage`` have the
deltas but no pointer, so they cannot tell apart the free of a block
allocated before the call.

Included:

- every storage allocated through the c10 CPU allocator on the thread that
  calls ``fn``: tensors, gradients, kernel scratch tensors made with
  ``at::empty`` and 0-dim tensors that wrap Python scalars. For example,
  ``x.mul_(2.0)`` allocates 8 bytes and then 4 bytes for a float32 ``x``;
- buffers that ideep allocates for oneDNN tensors, because
  ``aten/src/ATen/native/mkldnn/IDeepRegistration.cpp`` routes them to the
  c10 CPU allocator;
- sizes as requested from the allocator (``torch.empty(3)`` is 12 bytes).
  Alignment padding and malloc's chunk headers are not included, and
  zero-byte requests are not reported.

Not included:

- memory that BLAS (MKL, OpenBLAS), oneDNN's own scratchpads, OpenMP or any
  other library obtains with ``malloc``/``mmap`` directly;
- storage that PyTorch did not allocate: ``torch.from_numpy``,
  ``torch.frombuffer``, memory-mapped checkpoint files;
- Python objects, the interpreter, and allocator caching or fragmentation;
- allocations and frees on threads without the profiler's thread-local
  state: OpenMP worker threads inside ``at::parallel_for`` (except the
  calling thread, which is worker 0) and Python threads that ``fn`` starts.
  ``_ExperimentalConfig(profile_all_threads=True)`` does not change this for
  memory events in torch 2.13. CPU autograd runs on the calling thread, so
  ``backward()`` is included.

A profiler session cannot be nested, so ``measure_peak_live_bytes`` raises
``RuntimeError`` when a PyTorch profiler is already running.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, cast

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

MECHANISM = "torch.profiler profile_memory allocation events (c10 CPU allocator)"


@dataclass(frozen=True)
class CpuPeakMeasurement:
    """Live CPU tensor storage during one call, from the profiler's allocation events."""

    peak_bytes: int
    """Maximum over the call of the bytes allocated during the call and not yet freed."""

    end_bytes: int
    """Bytes allocated during the call and still live when it returned.

    The value that ``fn`` returns is kept alive until the profiler stops, so
    tensors reachable from it count here.
    """

    allocations: int
    """Number of non-empty CPU allocator requests during the call."""

    frees: int
    """Number of frees, during the call, of blocks that the call allocated."""

    mechanism: str
    """Short name of the event source."""


class _AllocationFields(Protocol):
    """The attributes of ``torch._C._profiler._ExtraFields_Allocation`` read here."""

    ptr: int
    alloc_size: int
    device: torch.device


class _ProfilerEventNode(Protocol):
    """The attributes of ``torch._C._profiler._ProfilerEvent`` read here."""

    tag: _EventType
    start_time_ns: int
    extra_fields: object
    children: list[_ProfilerEventNode]


@dataclass(frozen=True)
class _AllocationEvent:
    time_ns: int
    ptr: int
    delta_bytes: int


def measure_peak_live_bytes(fn: Callable[[], object]) -> CpuPeakMeasurement:
    """Run ``fn`` once and measure the peak of the CPU tensor storage it allocates.

    Only allocations made during the call count: build the model and the
    inputs inside ``fn`` to include them. Frees of storage allocated before
    the call are ignored.

    Raises ``RuntimeError`` when a PyTorch profiler is already running,
    because the profiler cannot be nested.
    """
    if torch._C._autograd._profiler_enabled():
        raise RuntimeError(
            "CPU memory measurement failed: a PyTorch profiler is already running. "
            "Stop it before calling measure_peak_live_bytes, because profiler "
            "sessions cannot be nested."
        )

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    # The result stays referenced until the profiler has stopped, so that
    # ``end_bytes`` counts what ``fn`` returned. It is freed only now.
    del result

    return _replay(_cpu_allocation_events(prof))


def _cpu_allocation_events(prof: profile) -> list[_AllocationEvent]:
    """Collect the CPU allocation events of a finished profile, in time order."""
    autograd_profile = prof.profiler
    kineto_results = getattr(autograd_profile, "kineto_results", None)
    if kineto_results is None:
        raise RuntimeError(
            "CPU memory measurement failed: torch.profiler returned no kineto_results. "
            f"torch {torch.__version__} is not supported by measure_peak_live_bytes, "
            "which was written against torch 2.13."
        )
    roots = cast(list[_ProfilerEventNode], kineto_results.experimental_event_tree())

    events: list[_AllocationEvent] = []
    for node in _walk(roots):
        if node.tag != _EventType.Allocation:
            continue
        fields = cast(_AllocationFields, node.extra_fields)
        if fields.device.type != "cpu":
            continue
        events.append(_AllocationEvent(node.start_time_ns, fields.ptr, fields.alloc_size))

    # The sort is stable, so events with equal timestamps keep their
    # pre-order position in the tree.
    events.sort(key=lambda event: event.time_ns)
    return events


def _walk(roots: list[_ProfilerEventNode]) -> Iterator[_ProfilerEventNode]:
    """Yield every node of the event tree in pre-order, without recursion."""
    stack = list(reversed(roots))
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children))


def _replay(events: list[_AllocationEvent]) -> CpuPeakMeasurement:
    """Rebuild the running total of live bytes from signed allocation deltas."""
    live_sizes: dict[int, int] = {}
    live_bytes = 0
    peak_bytes = 0
    allocations = 0
    frees = 0

    for event in events:
        if event.delta_bytes > 0:
            # NOTE: an address that is still live here was freed on a thread
            # without profiler state, so its free was not reported. The old
            # block is dropped now, and until now it was counted as live, so
            # the peak can be too high in that case.
            live_bytes -= live_sizes.pop(event.ptr, 0)
            live_sizes[event.ptr] = event.delta_bytes
            live_bytes += event.delta_bytes
            allocations += 1
            peak_bytes = max(peak_bytes, live_bytes)
        elif event.ptr in live_sizes:
            live_bytes -= live_sizes.pop(event.ptr)
            frees += 1
        # A free of an unknown address releases a block allocated before the
        # call. The allocator reports such frees when the block was allocated
        # during an earlier profiling session, and they are ignored here.

    return CpuPeakMeasurement(
        peak_bytes=peak_bytes,
        end_bytes=live_bytes,
        allocations=allocations,
        frees=frees,
        mechanism=MECHANISM,
    )
