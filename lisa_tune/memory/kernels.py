"""Stand-ins that give a meta-device trace the memory behaviour of the target device's kernels.

On the meta device, ``scaled_dot_product_attention`` takes the math path, which materialises the
batch x heads x sequence x sequence score matrix, and autocast does nothing. The GPU does neither. ``TargetKernels``
is a ``TorchFunctionMode`` that, during a trace:

- routes ``scaled_dot_product_attention`` to the ATen operator the target device runs (flash attention for
  bf16 on CUDA, memory-efficient attention for fp32 on CUDA, the CPU flash kernel on CPU). Their meta kernels give
  the outputs and the tensors autograd saves (output and log-sum-exp, O(sequence) per head, not O(sequence^2));
- emulates bf16 autocast for ``amp-bf16``: matrix products take bf16 copies of their fp32 inputs, with each
  parameter cast once per forward pass as autocast's weight cache does, and the target device's fp32-listed
  operators cast to fp32.

``workspace_rule`` returns the internal scratch memory of the kernels whose workspace the meta kernels do not show.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten

# Operators autocast runs in the lower precision on CUDA (a subset of PyTorch's list: the ones that transformer
# language models call). Source: PyTorch's autocast op reference, "CUDA Ops that can autocast to float16".
_LOWER_PRECISION_FUNCTIONS = {
    F.linear,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.mm,
    torch.Tensor.mm,
    torch.bmm,
    torch.Tensor.bmm,
    torch.addmm,
    torch.Tensor.addmm,
    torch.baddbmm,
    torch.Tensor.baddbmm,
    torch.einsum,
}
# Operators autocast runs in fp32 ("CUDA Ops that can autocast to float32"), again the ones language models call.
_FP32_FUNCTIONS = {
    F.softmax,
    torch.softmax,
    torch.Tensor.softmax,
    F.log_softmax,
    torch.log_softmax,
    torch.Tensor.log_softmax,
    F.cross_entropy,
    F.nll_loss,
    F.layer_norm,
    torch.rsqrt,
    torch.Tensor.rsqrt,
    torch.exp,
    torch.Tensor.exp,
    torch.pow,
    torch.Tensor.pow,
}
# Of the operators above, CPU autocast runs only the losses in fp32. Under torch.autocast("cpu", torch.bfloat16) in
# torch 2.13, cross_entropy and nll_loss return fp32 for bf16 inputs, while softmax, log_softmax, layer_norm, rsqrt,
# exp and pow return bf16.
_CPU_FP32_FUNCTIONS = {
    F.cross_entropy,
    F.nll_loss,
}


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


class TargetKernels(TorchFunctionMode):
    """Substitute the target device's attention kernels and autocast behaviour during a meta-device trace."""

    def __init__(self, target_device: str, autocast_dtype: torch.dtype | None) -> None:
        super().__init__()
        if target_device not in ("cuda", "cpu"):
            raise ValueError(f"invalid target device {target_device!r}: use 'cuda' or 'cpu'")
        self.target_device = target_device
        self.autocast_dtype = autocast_dtype
        self.fp32_functions = _FP32_FUNCTIONS if target_device == "cuda" else _CPU_FP32_FUNCTIONS
        self.cache_casts = True
        self._cast_cache: dict[int, torch.Tensor] = {}

    def checkpoint_contexts(self) -> tuple[AbstractContextManager[Any], AbstractContextManager[Any]]:
        """Return the forward and recomputation contexts for ``torch.utils.checkpoint``'s ``context_fn``.

        Autograd may run backward, and so a checkpointed layer's recomputation, on a thread where this mode is not
        active. The recomputation therefore gets a copy of the mode without the weight cache, because autocast
        keeps no cache there either.
        """
        recompute = TargetKernels(self.target_device, self.autocast_dtype)
        recompute.cache_casts = False
        return nullcontext(), recompute

    def clear_cast_cache(self, enabled: bool) -> None:
        """Drop autocast's weight cache, as leaving the autocast region does; ``enabled`` sets whether to cache."""
        self._cast_cache.clear()
        self.cache_casts = enabled

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        if self.autocast_dtype is not None:
            if func in _LOWER_PRECISION_FUNCTIONS:
                args, kwargs = self._cast_all(args, kwargs, self.autocast_dtype)
            elif func in self.fp32_functions:
                args, kwargs = self._cast_all(args, kwargs, torch.float32)
        return func(*args, **kwargs)

    # Autocast ------------------------------------------------------------------------------------------------

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == dtype:
            return value
        cacheable = self.cache_casts and value.is_leaf and value.requires_grad and dtype != torch.float32
        if cacheable and id(value) in self._cast_cache:
            return self._cast_cache[id(value)]
        with torch._C.DisableTorchFunction():
            cast = value.to(dtype)
        if cacheable:
            self._cast_cache[id(value)] = cast
        return cast

    def _cast_all(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], dtype: torch.dtype
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (
            tuple(self._cast(arg, dtype) for arg in args),
            {key: self._cast(value, dtype) for key, value in kwargs.items()},
        )

    # Attention -----------------------------------------------------------------------------------------------

    def _attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        if self.autocast_dtype is not None:
            query, key, value = (self._cast(t, self.autocast_dtype) for t in (query, key, value))
        with torch._C.DisableTorchFunction():
            if self.target_device == "cpu":
                # The CPU flash kernel takes grouped key/value heads and a mask as they are.
                output: torch.Tensor = aten._scaled_dot_product_flash_attention_for_cpu(
                    query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
                )[0]
                return output
            flash_ok = (
                query.dtype in (torch.float16, torch.bfloat16)
                and attn_mask is None
                and query.shape[-1] <= 256
                and query.shape[-1] % 8 == 0
            )
            if flash_ok:
                # Flash attention handles grouped key/value heads natively.
                output = aten._scaled_dot_product_flash_attention(
                    query, key, value, dropout_p, is_causal, False, scale=scale
                )[0]
                return output
            if key.shape[1] != query.shape[1]:
                # Memory-efficient attention needs as many key/value heads as query heads.
                groups = query.shape[1] // key.shape[1]
                key = key.repeat_interleave(groups, dim=1)
                value = value.repeat_interleave(groups, dim=1)
            output = aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale
            )[0]
            return output


def cuda_workspace_rule(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Return the scratch bytes CUDA attention kernels allocate inside their backward pass.

    Sources are listed in ``docs/cuda-memory-notes.md``. Flash attention 2's backward (PyTorch's vendored
    ``mha_bwd``, default non-deterministic mode) allocates ``softmax_d`` (fp32, batch x heads x sequence rounded up
    to 128) and ``dq_accum`` (fp32, batch x rounded sequence x heads x head dim rounded up to 32). With fewer key/value
    heads than query heads it first computes ``dk`` and ``dv`` for every query head (input dtype, batch x sequence x
    heads x head dim each) and sums them per group. The memory-efficient backward allocates an fp32 ``delta``
    (batch x heads x sequence) and a workspace of about an fp32 copy of ``dq``. That size depends on the kernel
    instance, so it is an estimate.
    """
    del kwargs
    if func is aten._scaled_dot_product_flash_attention_backward.default:
        grad_out, query, key = args[0], args[1], args[2]
        batch, heads, q_len, head_dim = query.shape
        q_rounded = _round_up(q_len, 128)
        workspace = batch * heads * q_rounded * 4
        workspace += batch * q_rounded * heads * _round_up(head_dim, 32) * 4
        if key.shape[1] != heads:
            workspace += 2 * batch * key.shape[2] * heads * head_dim * grad_out.element_size()
        return int(workspace)
    if func is aten._scaled_dot_product_efficient_attention_backward.default:
        query = args[1]
        batch, heads, q_len, head_dim = query.shape
        return int(batch * heads * q_len * 4 + batch * heads * q_len * head_dim * 4)
    return 0


def no_workspace_rule(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Return 0: the target's kernels have no modelled workspace."""
    del func, args, kwargs
    return 0


@contextmanager
def fused_adamw_on_meta() -> Iterator[None]:
    """Let ``AdamW(fused=True)`` step meta parameters, whose fused kernel has a meta implementation.

    PyTorch's device check before the fused step rejects the meta device. The check is skipped for meta parameters
    inside this context only, so the trace runs the fused code path the GPU runs.
    """
    import torch.optim.adam as adam_module

    name = "_device_dtype_check_for_fused"
    original = getattr(adam_module, name)

    def accept_meta(p: torch.Tensor, cuda_unsupported: bool = False) -> None:
        if p.device.type != "meta":
            original(p, cuda_unsupported)

    setattr(adam_module, name, accept_meta)
    try:
        yield
    finally:
        setattr(adam_module, name, original)
