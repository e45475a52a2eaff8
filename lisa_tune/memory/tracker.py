"""A dispatch-level tracker that records every tensor storage allocated and freed during a traced step.

``StorageTracker`` is a ``TorchDispatchMode``. It intercepts each ATen operator below autograd, so it records the saved
tensors, the gradients and the optimizer's temporaries as they are created. A storage counts once however many
views share it, and its free is observed through a weak reference to the Python storage object, which PyTorch keeps
alive for exactly as long as the C++ storage lives.

Known limitations:

- Memory that a kernel allocates internally and frees before it returns is invisible to the dispatcher. The
  ``workspace`` callback adds it back for the kernels whose workspace is known (see ``kernels.py``).
- Tensors created before the tracker starts are only counted when passed to ``track_existing``.
- Categories are decided after the fact: a storage that later becomes a ``.grad`` or an optimizer state is counted
  in that category for its whole life, even in the instant between its creation and that assignment.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lisa_tune.lisa.step import Phase
from lisa_tune.memory.categories import TENSOR_CATEGORIES, MemoryCategory

WorkspaceRule = Callable[[Any, tuple[Any, ...], dict[str, Any]], int]
"""Return the bytes of internal workspace an operator uses while it runs, given the operator and its arguments."""

_FREED = -1


@dataclass(frozen=True)
class Context:
    """The location of an allocation: step, phase, module and operator."""

    step: int
    phase: str
    module: str
    operator: str


@dataclass
class PeakReport:
    """The peak of a trace and what was alive at it."""

    peak_bytes: int
    by_category: dict[MemoryCategory, int]
    context: Context
    final_bytes: int
    """Bytes still alive when the trace ended."""
    final_by_category: dict[MemoryCategory, int]
    phase_peaks: dict[str, int] = field(default_factory=dict)
    """Highest live bytes reached in each phase."""


class StorageTracker(TorchDispatchMode):  # type: ignore[misc]
    """Record the allocation and free of every storage on the traced devices, with its context and category."""

    def __init__(
        self,
        device_types: Iterable[str] = ("meta",),
        workspace: WorkspaceRule | None = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.device_types = frozenset(device_types)
        self.workspace = workspace
        # Parallel lists indexed by allocation id.
        self.sizes: list[int] = []
        self.categories: list[MemoryCategory | None] = []
        self.default_categories: list[MemoryCategory] = []
        self.contexts: list[int] = []
        # One entry per event: allocation id + 1 for an allocation, -(allocation id + 1) for a free.
        self.events: list[int] = []
        self.context_table: list[Context] = []
        self._context_index: dict[Context, int] = {}
        self._live: dict[int, int] = {}
        self._references: dict[int, weakref.ref[Any]] = {}
        self.step = 0
        self.phase = "setup"
        self.backward_module = ""
        self._module_names: dict[int, str] = {}
        self._module_stack: list[str] = []
        self._no_activation_modules: set[str] = set()
        self._hooks: list[Any] = []
        self.recording = True
        self.phase_starts: dict[tuple[int, str], int] = {}
        """Number of events recorded when each (step, phase) began."""

    # Context -------------------------------------------------------------------------------------------------

    def set_phase(self, phase: Phase | str) -> None:
        """Attribute the next allocations to ``phase``."""
        self.phase = phase.value if isinstance(phase, Phase) else phase
        self.phase_starts.setdefault((self.step, self.phase), len(self.events))
        # Non-reentrant checkpointing stops a recomputation once it has the tensors it needs, so the forward hook
        # that pops the module stack may never run. No module is active between phases.
        self._module_stack.clear()
        if self.phase == Phase.FORWARD.value:
            self.backward_module = ""

    def _context(self, operator: str) -> int:
        if self.phase == Phase.BACKWARD.value and not self._module_stack:
            module = self.backward_module
        else:
            module = self._module_stack[-1] if self._module_stack else ""
        context = Context(self.step, self.phase, module, operator)
        index = self._context_index.get(context)
        if index is None:
            index = len(self.context_table)
            self.context_table.append(context)
            self._context_index[context] = index
        return index

    def _default_category(self) -> MemoryCategory:
        # Tensors made inside the model body's forward are activations, also when checkpointing recomputes them
        # during backward. Logits and loss come from the output embedding or the top-level module.
        if len(self._module_stack) >= 2 and self._module_stack[-1] not in self._no_activation_modules:
            return MemoryCategory.ACTIVATIONS
        return MemoryCategory.TEMPORARIES

    # Allocation records --------------------------------------------------------------------------------------

    def _allocate(self, nbytes: int, category: MemoryCategory | None, operator: str) -> int:
        allocation = len(self.sizes)
        self.sizes.append(nbytes)
        self.categories.append(category)
        self.default_categories.append(self._default_category())
        self.contexts.append(self._context(operator))
        self.events.append(allocation + 1)
        return allocation

    def _release(self, allocation: int) -> None:
        self.events.append(-(allocation + 1))

    def _on_storage_freed(self, key: int) -> None:
        allocation = self._live.pop(key, _FREED)
        self._references.pop(key, None)
        if allocation != _FREED and self.recording:
            self._release(allocation)

    def _free_callback(self, key: int) -> Callable[[Any], None]:
        def on_free(reference: Any) -> None:
            del reference
            self._on_storage_freed(key)

        return on_free

    def _track_storage(self, tensor: torch.Tensor, category: MemoryCategory | None, operator: str) -> None:
        if tensor.device.type not in self.device_types:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        allocation = self._allocate(storage.nbytes(), category, operator)
        self._live[key] = allocation
        self._references[key] = weakref.ref(storage, self._free_callback(key))

    def track_existing(self, tensors: Iterable[torch.Tensor], category: MemoryCategory) -> None:
        """Count tensors that exist before tracing starts, such as parameters and buffers."""
        for tensor in tensors:
            self._track_storage(tensor, category, "existing")

    def set_category(self, tensor: torch.Tensor, category: MemoryCategory) -> None:
        """Assign ``category`` to the live storage of ``tensor``, for its whole life."""
        key = tensor.untyped_storage()._cdata
        allocation = self._live.get(key)
        if allocation is not None:
            self.categories[allocation] = category

    # Dispatch ------------------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            # Meta tensors have no values. The one data-dependent check transformers makes in a training forward
            # tests whether sequences are packed (``.all()`` is True for unpacked ones), so return True, or 0.
            return True if args[0].dtype == torch.bool else 0
        operator = str(func)
        workspace_bytes = self.workspace(func, args, kwargs) if self.workspace is not None else 0
        workspace = self._allocate(workspace_bytes, MemoryCategory.TEMPORARIES, operator) if workspace_bytes else -1
        out = func(*args, **kwargs)
        self._track_outputs(out, operator)
        if workspace >= 0:
            self._release(workspace)
        return out

    def _track_outputs(self, out: Any, operator: str) -> None:
        if isinstance(out, torch.Tensor):
            self._track_storage(out, None, operator)
        elif isinstance(out, (tuple, list)):
            for item in out:
                self._track_outputs(item, operator)

    # Hooks for module names, gradients and optimizer state ---------------------------------------------------

    def attach(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        backward_modules: Iterable[nn.Module] = (),
        no_activation_modules: Iterable[nn.Module] = (),
    ) -> None:
        """Install the hooks that name modules, find gradients and find optimizer state."""
        self._module_names = {id(module): name or type(module).__name__ for name, module in model.named_modules()}
        self._no_activation_modules = {self._module_names[id(module)] for module in no_activation_modules}

        def enter(module: nn.Module, args: Any) -> None:
            self._module_stack.append(self._module_names.get(id(module), type(module).__name__))

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            if self._module_stack:
                self._module_stack.pop()

        self._hooks.append(nn.modules.module.register_module_forward_pre_hook(enter))
        self._hooks.append(nn.modules.module.register_module_forward_hook(leave))

        for module in backward_modules:
            name = self._module_names.get(id(module), type(module).__name__)
            self._hooks.append(module.register_forward_hook(self._make_backward_marker(name)))

        def on_gradient(parameter: torch.Tensor) -> None:
            if parameter.grad is not None:
                self.set_category(parameter.grad, MemoryCategory.GRADIENTS)

        seen: set[int] = set()
        for parameter in model.parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                # The hook can only be registered while the parameter requires grad; it stays when LISA
                # freezes and unfreezes the parameter later.
                requires_grad = parameter.requires_grad
                parameter.requires_grad_(True)
                self._hooks.append(parameter.register_post_accumulate_grad_hook(on_gradient))
                parameter.requires_grad_(requires_grad)

        def on_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for state in optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        self.set_category(value, MemoryCategory.OPTIMIZER_STATES)

        self._hooks.append(optimizer.register_step_post_hook(on_optimizer_step))

    def _make_backward_marker(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def mark(module: nn.Module, args: Any, output: Any) -> None:
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:

                def on_output_gradient(gradient: torch.Tensor) -> None:
                    self.backward_module = name

                tensor.register_hook(on_output_gradient)

        return mark

    def detach_hooks(self) -> None:
        """Remove every hook ``attach`` installed."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    # Results -------------------------------------------------------------------------------------------------

    def category_of(self, allocation: int) -> MemoryCategory:
        """Return the category of an allocation: the one assigned to it, else the one its context implies."""
        assigned = self.categories[allocation]
        return assigned if assigned is not None else self.default_categories[allocation]

    def live_at_allocations(self) -> Iterator[tuple[int, Context, int]]:
        """Yield, for every allocation event in order, its event index, its context and the live bytes after it.

        Live bytes only rise at allocations, so these are the only events where a peak can occur.
        """
        live = 0
        for index, event in enumerate(self.events):
            allocation = abs(event) - 1
            if event > 0:
                live += self.sizes[allocation]
                yield index, self.context_table[self.contexts[allocation]], live
            else:
                live -= self.sizes[allocation]

    def peak(self) -> PeakReport:
        """Find the highest live bytes over the trace and break it down by category."""
        peak = 0
        peak_index = -1
        phase_peaks: dict[str, int] = {}
        for index, context, live in self.live_at_allocations():
            if live > phase_peaks.get(context.phase, 0):
                phase_peaks[context.phase] = live
            if live > peak:
                peak = live
                peak_index = index

        alive_at_peak = self._alive_after(peak_index)
        alive_at_end = self._alive_after(len(self.events) - 1)
        context = (
            self.context_table[self.contexts[abs(self.events[peak_index]) - 1]]
            if peak_index >= 0
            else Context(0, "setup", "", "")
        )
        return PeakReport(
            peak_bytes=peak,
            by_category=self._sum_by_category(alive_at_peak),
            context=context,
            final_bytes=sum(self.sizes[a] for a in alive_at_end),
            final_by_category=self._sum_by_category(alive_at_end),
            phase_peaks=phase_peaks,
        )

    def live_by_category_at_phase_start(self, step: int, phase: Phase | str) -> dict[MemoryCategory, int]:
        """Break down the bytes alive when ``phase`` of ``step`` began."""
        name = phase.value if isinstance(phase, Phase) else phase
        start = self.phase_starts[(step, name)]
        return self._sum_by_category(self._alive_after(start - 1))

    def _alive_after(self, last_event: int) -> list[int]:
        alive: set[int] = set()
        for event in self.events[: last_event + 1]:
            if event > 0:
                alive.add(event - 1)
            else:
                alive.discard(-event - 1)
        return sorted(alive)

    def _sum_by_category(self, allocations: Iterable[int]) -> dict[MemoryCategory, int]:
        totals = dict.fromkeys(TENSOR_CATEGORIES, 0)
        for allocation in allocations:
            totals[self.category_of(allocation)] += self.sizes[allocation]
        return totals
