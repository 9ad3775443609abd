"""What every benchmark records: the machine and library versions, and a process's memory.

Imported by the benchmark scripts in this folder (run from the repository root as
``python bench/NAME.py``, which puts this folder on ``sys.path``).
"""

from __future__ import annotations

import os
import platform
import threading
import time
from datetime import datetime, timezone

import numpy as np


def machine_info() -> dict:
    """CPU, cores, memory, library versions, thread counts, load average and date (UTC)."""
    import faiss
    import pyarrow
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "faiss": faiss.__version__,
            "faiss_compile_options": faiss.get_compile_options(), "faiss_threads": faiss.omp_get_max_threads(),
            "torch_threads": torch.get_num_threads(), "pyarrow": pyarrow.__version__,
            "loadavg_start": os.getloadavg(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """``/proc/<pid>/status`` memory lines (``Vm*``, ``Rss*``) in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key.startswith(("Vm", "Rss")):
                values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


class RssSampler:
    """Peak ``VmRSS``, ``RssAnon`` and ``RssFile`` of process ``pid``, sampled every ``interval``
    seconds in a thread."""

    def __init__(self, interval: float = 0.01, pid: int | str = "self"):
        self.interval = interval
        self.pid = pid
        self.peak = 0
        self.peak_anon = 0
        self.peak_file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            status = proc_status(self.pid)
            self.peak = max(self.peak, status.get("VmRSS", 0))
            self.peak_anon = max(self.peak_anon, status.get("RssAnon", 0))
            self.peak_file = max(self.peak_file, status.get("RssFile", 0))
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
