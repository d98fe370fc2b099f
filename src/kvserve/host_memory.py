"""How much host memory is free now: one place that reads /proc/meminfo."""
from __future__ import annotations


def available_bytes() -> int:
    """MemAvailable (MemTotal on kernels without it); 0 when /proc/meminfo cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    except OSError:
        return 0
    return info.get("MemAvailable", info.get("MemTotal", 0))
