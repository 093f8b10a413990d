"""Triton kernels for moelib's FP8 precision layer (quantisation and block-scaled GEMMs).

Without a CUDA GPU the kernels run in Triton's CPU interpreter, which is slow but exact enough to test
them against the pure-PyTorch core (``moelib.precision.fp8``). The package imports nothing of moelib (a
kernel package others could vendor): the kernels take inputs whose shapes the caller has checked
(moelib.precision.fp8_triton does, with moelib's errors) and raise ``KernelInputError`` for what only they
see; ``moelib_cuda.formats`` states the FP8 formats, and moelib's reference takes them from there.

Triton decides whether to interpret when a function is decorated, so ``prepare_triton()`` sets
``TRITON_INTERPRET`` before a kernel module imports triton (a value the user set explicitly wins). If
triton.language was imported earlier without it (``torch.compile`` and ``torch.utils._triton.has_triton()``
do that), its library functions are switched to interpreted ones. Importing the package itself does
neither, so importing ``moelib_cuda.formats`` changes nothing in the process.

``import moelib_cuda`` never fails for lack of Triton: ask ``triton_unavailable_reason()`` first, then
import ``moelib_cuda.quant`` / ``moelib_cuda.gemm``.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch

_prepared = False


def prepare_triton() -> None:
    """Without a CUDA GPU, switch Triton to its CPU interpreter (once; see the module docstring)."""
    global _prepared
    if _prepared:
        return
    _prepared = True
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        _interpret_preimported_triton()


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter rather than on a GPU."""
    prepare_triton()
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpret_preimported_triton() -> None:
    """Re-wrap triton.language's library functions (tl.max, tl.cdiv, ...) for the interpreter.

    They are @triton.jit functions, made compiled-mode objects if triton.language was imported before
    TRITON_INTERPRET was set, and the interpreter refuses to call those ("Cannot call @triton.jit'd outside
    of the scope of a kernel"). Wrapping each one in the interpreter's function type is what decorating
    them with TRITON_INTERPRET=1 would have done; the same object keeps one wrapper everywhere, so the
    interpreter's fast paths that compare combine functions by identity still apply.
    """
    if not interpreting() or "triton.language" not in sys.modules:
        return
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    wrapped: dict[int, InterpretedFunction] = {}
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("triton.language"):
            continue
        for attr, value in list(vars(module).items()):
            if type(value) is JITFunction:
                setattr(module, attr, wrapped.setdefault(id(value), InterpretedFunction(value.fn)))


def triton_unavailable_reason() -> str | None:
    """None when the kernels can run here, else one sentence saying why not."""
    prepare_triton()
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton, or moelib[triton]); use the fp8-emulated backend."
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install raises all sorts of things
        return f"Triton is installed but failed to import ({type(exc).__name__}: {exc}); use fp8-emulated."
    if not torch.cuda.is_available() and not interpreting():
        return "there is no CUDA GPU and TRITON_INTERPRET=0 disables Triton's CPU interpreter; use fp8-emulated."
    return None


def triton_available() -> bool:
    return triton_unavailable_reason() is None


def kernel_device(t: torch.Tensor) -> None:
    """Interpreted kernels read CPU tensors, compiled ones CUDA tensors; say so instead of crashing."""
    want = "cpu" if interpreting() else "cuda"
    if t.device.type != want:
        from moelib_cuda.formats import KernelInputError

        raise KernelInputError(f"moelib_cuda kernels here take {want} tensors, got one on {t.device}.")
