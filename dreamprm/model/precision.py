"""fp32 arithmetic on a bf16/fp16 model, for the passes whose results are small differences.

The upper level's directional derivatives d_k = ⟨∂L_k/∂θ, v⟩ are tiny next to |∂L_k/∂θ|·|v| under
the pairwise objective (median |v|/|d| ≈ 20 on the demo's fidelity batches, against ≈ 1 for mse), so
the ~1-2% rounding error of a bf16 forward and backward swamps them: bf16 `exact` was off by up to
63% with wrong signs. Inside `fp32_compute()` the same model, with its bf16 parameters as they are
(sharded or not: ZeRO-3 gathers them as usual), computes every activation and gradient in fp32:

- ``linear``: x·Wᵀ in fp32 by `_Fp32Linear`, which keeps the bf16 parameter itself for the backward
  (as ``F.linear`` does) instead of an fp32 copy: the extra memory is the fp32 activations only,
  never a full-width fp32 copy of the weights. ``torch.nn.functional.linear`` is swapped for it
  while the context is open, as DeepSpeed's ZeRO-3 swaps in its own (whose backward would mix
  dtypes); a ZeRO-3 weight released before the backward is gathered again there, as DeepSpeed's does.
- ``embedding``: the bf16 rows looked up, then widened (exact); its backward sums the tokens'
  gradients in fp32 (`_Fp32Embedding`), not in bf16 as ``embedding_dense_backward`` does: on the demo
  batches that bf16 sum alone cost ~1% of d. Transient: one fp32 table-sized gradient.
- convolutions, normalisations, matmuls, attention: low-precision floating arguments widened.
- a cast of an fp32 activation down to bf16/fp16 (Hugging Face layers cast back to the parameters'
  dtype in places) keeps it fp32.

Everything else runs untouched, including DeepSpeed's parameter gathers (they allocate with
``dtype=`` and copy; neither is intercepted). Gradients reach each parameter in its own dtype, as
autograd always returns them. The mode is thread-local and active during the forward only: the
backward of what it recorded is already fp32.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

LOW = (torch.bfloat16, torch.float16)
_WIDEN_ARGS = {
    F.conv1d, F.conv2d, F.conv3d, F.layer_norm, F.group_norm, F.rms_norm, F.scaled_dot_product_attention,
    torch.matmul, torch.bmm, torch.mm, torch.baddbmm, torch.addmm, torch.einsum,
    torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
}
_NARROWING_CASTS = (torch.Tensor.bfloat16, torch.Tensor.half)
_TORCH_LINEAR = torch._C._nn.linear  # F.linear itself, whatever wrapper is installed over it


def _widen(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in LOW:
        return value.float()
    return value


class _Fp32Linear(torch.autograd.Function):
    """y = x Wᵀ + b in fp32 for a low-precision W; saves W itself (not an fp32 copy) for the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = x.float() @ weight.float().t()
        return out if bias is None else out + bias.float()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        # ZeRO-3 normally re-gathers a module's parameters before its backward; a weight used
        # outside its module may still be partitioned here (duck-typed: no DeepSpeed import).
        released = getattr(getattr(weight, "ds_status", None), "name", None) == "NOT_AVAILABLE"
        if released:
            weight.all_gather()
        try:
            grad = grad.float()
            grad_x = (grad @ weight.float()).to(x.dtype) if ctx.needs_input_grad[0] else None
            grad_w = None
            if ctx.needs_input_grad[1]:
                grad_w = (grad.reshape(-1, grad.shape[-1]).t() @ x.float().reshape(-1, x.shape[-1])).to(weight.dtype)
        finally:
            if released:
                weight.partition()
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` while `fp32_compute` is open."""
    if weight.dtype in LOW or x.dtype in LOW:
        with torch._C.DisableTorchFunction():
            return _Fp32Linear.apply(_widen(x), weight, bias)
    return _TORCH_LINEAR(x, weight, bias)


class _Fp32Embedding(torch.autograd.Function):
    """Row lookup of a low-precision table, widened; the backward sums token gradients in fp32."""

    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.shape, ctx.dtype, ctx.padding_idx = weight.shape, weight.dtype, padding_idx
        return weight[ids].float()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (ids,) = ctx.saved_tensors
        table = torch.zeros(ctx.shape, dtype=torch.float32, device=grad.device)
        table.index_add_(0, ids.reshape(-1), grad.reshape(-1, ctx.shape[1]).float())
        if ctx.padding_idx is not None:
            table[ctx.padding_idx] = 0
        return None, table.to(ctx.dtype), None


class Fp32Compute(TorchFunctionMode):
    """See the module docstring."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _TORCH_LINEAR:
            return fp32_linear(*args, **kwargs)
        if func is F.embedding:
            ids, weight = args[0], args[1]
            padding_idx = args[2] if len(args) > 2 else kwargs.get("padding_idx")
            plain = len(args) <= 3 and not any(kwargs.get(k) for k in ("max_norm", "scale_grad_by_freq", "sparse"))
            if weight.dtype in LOW and plain:
                if padding_idx is not None and padding_idx < 0:
                    padding_idx += weight.shape[0]
                with torch._C.DisableTorchFunction():
                    return _Fp32Embedding.apply(ids, weight, padding_idx)
            return func(*args, **kwargs).float()
        elif func in _WIDEN_ARGS:
            args, kwargs = pytree.tree_map(_widen, (args, kwargs))
        elif func in _NARROWING_CASTS and args[0].dtype == torch.float32:
            return args[0]
        elif func in (torch.Tensor.to, torch.Tensor.type) and args[0].dtype == torch.float32:
            target = kwargs.get("dtype", next((a for a in args[1:] if isinstance(a, torch.dtype)), None))
            if target in LOW:
                args = tuple(torch.float32 if a in LOW else a for a in args)
                kwargs = {**kwargs, "dtype": torch.float32} if "dtype" in kwargs else kwargs
        return func(*args, **kwargs)


@contextlib.contextmanager
def fp32_compute(enabled: bool = True) -> Iterator[None]:
    """Forward passes inside compute in fp32 on low-precision parameters (see the module docstring).
    TF32 matmuls are off meanwhile: their 10-bit inputs would bring back much of bf16's rounding."""
    if not enabled:
        yield
        return
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    installed, F.linear = F.linear, fp32_linear
    try:
        with Fp32Compute():
            yield
    finally:
        F.linear = installed
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
