"""Whether this CPU computes bf16 natively, and the CPU training precision that follows.

With AMX or AVX512-BF16, bf16 matmuls run natively and bf16 autocast trains the tiny world models faster than fp32
(stage 2 1.2x, the world's CLIP and LLM pretraining 1.04x and 1.2x on 2 AMX cores). Without them (AVX2-only
CPUs) bf16 is emulated: a CLIP pretraining step of the world took about 5 s in bf16 against 0.6 s in fp32.
A CPU run whose precision is left unset therefore takes bf16 where it is native and fp32 elsewhere.
"""

from __future__ import annotations

import torch


def has_native_bf16() -> bool:
    """True when this CPU has AMX tiles or AVX512-BF16, i.e. bf16 matmuls are not emulated."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def cpu_precision(requested: str | None) -> str:
    """Lightning precision of a CPU run: `requested` if set, else `bf16-mixed` with native bf16 and `32-true` without."""
    if requested is not None:
        return str(requested)
    return "bf16-mixed" if has_native_bf16() else "32-true"
