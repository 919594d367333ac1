"""A description of the machine and software a benchmark ran on, for its record."""
import os
import platform
from pathlib import Path

import torch

# CPU flags that decide which bfloat16 kernels oneDNN can use
_CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo() -> tuple[str, set[str]]:
    """Return the model name and the flags of the first processor in /proc/cpuinfo (Linux only)."""
    model, flags = None, set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return model or platform.processor() or "unknown", flags


def usable_cores() -> int:
    """Return the CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not available on macOS
        return os.cpu_count() or 1


def load_average() -> list[float]:
    """Return the 1, 5 and 15 minute load averages, rounded to 0.01."""
    return [round(value, 2) for value in os.getloadavg()]


def describe_machine() -> dict:
    """Return the CPU model, its bfloat16-related flags, core count, GPU and library versions."""
    model, flags = _cpuinfo()
    try:
        onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn_bf16 = False
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": model,
        "cpu_flags": sorted(flag for flag in _CPU_FLAGS if flag in flags),
        "onednn_bf16": onednn_bf16,
        "cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": load_average(),
    }
