"""Rows in the model's dtype as the CPU kernels read them: fp32, or bf16/fp16 widened to fp32 on load.

Offloaded keys and values live once, in the model's dtype (``offload.KVStore``); the numba kernels of
the indexes and of the CPU attention read those rows in place. NumPy has no bfloat16 and numba no
float16 on the CPU, so a half-precision tensor is handed to the kernels as its raw 16-bit patterns:
``kernel_array`` views bf16 as ``uint16`` and fp16 as ``int16`` (two dtypes, so numba compiles one
specialisation per format and no kernel branches per element), and fp32 as itself. Inside a kernel,
``f32(x)`` widens one element to fp32: bf16 is the upper half of an fp32 (a 16-bit shift); fp16 is
rebuilt from its exponent and mantissa bits with one multiply (exact, subnormals included; the rows
hold no Inf/NaN, which every entry point refuses). Both compile to a few vector instructions, so
reading half-precision rows costs less than reading fp32 ones: half the bytes.

``grown_capacity`` is the growth rule of every row buffer. This module knows nothing about indexes,
stores or models.
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

__all__ = ["f32", "kernel_array", "KERNEL_DTYPES", "to_float32", "FASTMATH", "grown_capacity"]

# numba fastmath flags of every CPU kernel: reassociation lets LLVM vectorise sums and dot products;
# no-NaN/no-Inf flags are left out on purpose
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}

# torch dtype -> the NumPy dtype its rows have in the kernels
KERNEL_DTYPES = {torch.float32: np.float32, torch.bfloat16: np.uint16, torch.float16: np.int16}


def grown_capacity(n: int) -> int:
    """Rows a growing buffer (store, index) allocates to hold ``n``: a quarter more, at least 1024 more.

    A quarter keeps the slack of a long generation small next to the rows themselves; doubling would
    cost as much memory as the rows at long contexts.
    """
    return n + max(1024, n // 4)


def kernel_array(t: torch.Tensor) -> np.ndarray:
    """The NumPy array the kernels read for a CPU tensor of ``KERNEL_DTYPES``: a view, never a copy."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy()
    if t.dtype == torch.float16:
        return t.view(torch.int16).numpy()
    if t.dtype == torch.float32:
        return t.numpy()
    raise ValueError(f"rows must be float32, bfloat16 or float16, got {t.dtype}")


def to_float32(a: np.ndarray) -> np.ndarray:
    """An fp32 copy of kernel rows ``a`` (fp32 itself is returned as is): for libraries that keep their own copy."""
    if a.dtype == np.float32:
        return a
    if a.dtype == np.uint16:
        return torch.from_numpy(np.ascontiguousarray(a)).view(torch.bfloat16).float().numpy()
    if a.dtype == np.int16:
        return torch.from_numpy(np.ascontiguousarray(a)).view(torch.float16).float().numpy()
    raise ValueError(f"rows must be float32, or bf16/fp16 bits as uint16/int16, got {a.dtype}")


@intrinsic
def _bf16_to_f32(typingctx, x):
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(x), codegen


@intrinsic
def _fp16_to_f32(typingctx, x):
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        h = builder.zext(args[0], i32)
        # exponent and mantissa moved into fp32 position, then scaled by 2^(127 - 15): exact for
        # normal and subnormal halves alike
        magnitude = builder.shl(builder.and_(h, ir.Constant(i32, 0x7FFF)), ir.Constant(i32, 13))
        value = builder.fmul(builder.bitcast(magnitude, ir.FloatType()), ir.Constant(ir.FloatType(), 2.0**112))
        sign = builder.shl(builder.and_(h, ir.Constant(i32, 0x8000)), ir.Constant(i32, 16))
        return builder.bitcast(builder.or_(builder.bitcast(value, i32), sign), ir.FloatType())

    return types.float32(x), codegen


def f32(x):
    """One element of kernel rows as fp32 (usable inside numba kernels only)."""
    raise NotImplementedError("f32 is a numba intrinsic: call it from @njit code")


@overload(f32, inline="always")
def _f32(x):
    if x == types.uint16:
        return lambda x: _bf16_to_f32(x)
    if x == types.int16:
        return lambda x: _fp16_to_f32(x)
    if x == types.float32:
        return lambda x: x
    if isinstance(x, types.Float):
        return lambda x: np.float32(x)
    return None
