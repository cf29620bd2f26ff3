"""What can still make CPU training differ across machines, recorded beside a trained artefact.

Same code, params, seed and data give the same bytes on one machine; across machines a float result can
still depend on the torch build, the CPU instruction set torch dispatches to (AVX2 vs AVX512 kernels sum in
another order), the BLAS / oneDNN libraries and the number of threads a reduction is split over. A
bootstrap records :func:`training_environment` in its sidecar's provenance. It is a record only: it never
enters a key, so moving a cache to another machine does not invalidate it (the key says *what* was
computed; this says *where*, for when two machines disagree).
"""

from __future__ import annotations

import os
import platform
import re
from typing import Any

#: Lines of ``torch.__config__.show()`` kept (the rest is compiler flags and CUDA build settings).
_CONFIG_LINES = ("Math Kernel Library", "MKL-DNN", "oneDNN", "OpenMP", "LAPACK", "NNPACK", "OpenBLAS",
                 "CPU capability")
#: Build settings of ``torch.__config__.show()`` that name the CPU maths libraries.
_BUILD_SETTINGS = ("BLAS_INFO", "LAPACK_INFO", "USE_MKL", "USE_MKLDNN", "USE_OPENMP")
#: Environment variables that change how many threads the maths libraries use.
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def config_summary(show: str) -> dict[str, Any]:
    """The CPU maths part of ``torch.__config__.show()``: the library lines (``libraries``, in order) and
    the BLAS / MKL / oneDNN / OpenMP build settings (``build``)."""
    libraries = [ln.strip(" -\t") for ln in show.splitlines()
                 if any(k in ln for k in _CONFIG_LINES) and "Build settings" not in ln]
    build = {}
    for name in _BUILD_SETTINGS:
        m = re.search(rf"\b{name}=([^,\s]+)", show)
        if m:
            build[name] = m.group(1)
    return {"libraries": libraries, "build": build}


def training_environment() -> dict[str, Any]:
    """torch version, CPU ISA torch dispatches to, maths libraries, thread counts and machine, as JSON
    types. Call it where training runs (thread counts are read at the call)."""
    import torch

    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "config": config_summary(torch.__config__.show()),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "thread_env": {v: os.environ[v] for v in _THREAD_VARS if v in os.environ},
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": _cpu_model() or platform.processor(),
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
