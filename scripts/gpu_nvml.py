"""GPU counters the kit samples while a stage runs, read from NVML through ctypes (no pynvml needed).

Two questions only NVML answers from outside the measured process: did the JPEG engine
(nvJPEG's hardware decoder, NVJPG) do any work while the DALI GPU loader ran, and how much
device memory did the stage use at its peak (DALI's pools and torch's caching allocator
together, every process on the GPU). Without libnvidia-ml (no driver, a CPU machine) or
without nvmlDeviceGetJpgUtilization (drivers before R520), the answer is None, said in words.
"""

from __future__ import annotations

import ctypes
import threading


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def _nvml():
    """The NVML library, initialised; None (and why) where there is none."""
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as e:
        return None, f"no NVML here ({e})"
    if lib.nvmlInit_v2() != 0:
        return None, "nvmlInit failed"
    return lib, ""


class Sampler:
    """Samples GPU `index` every `period` seconds in a thread: peak memory used, peak JPEG engine load."""

    def __init__(self, index: int = 0, period: float = 0.1) -> None:
        self.index, self.period = index, period
        self.lib, self.why = _nvml()
        self.handle = ctypes.c_void_p()
        if self.lib is not None and self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.handle)) != 0:
            self.lib, self.why = None, f"NVML has no GPU {index}"
        self.jpg_supported = self.lib is not None and hasattr(self.lib, "nvmlDeviceGetJpgUtilization")
        self.peak_used = self.start_used = 0
        self.peak_jpg: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _memory_used(self) -> int:
        m = _Memory()
        return m.used if self.lib.nvmlDeviceGetMemoryInfo(self.handle, ctypes.byref(m)) == 0 else 0

    def _jpg(self) -> int | None:
        util, period = ctypes.c_uint(), ctypes.c_uint()
        if self.lib.nvmlDeviceGetJpgUtilization(self.handle, ctypes.byref(util), ctypes.byref(period)) != 0:
            return None
        return int(util.value)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak_used = max(self.peak_used, self._memory_used())
            if self.jpg_supported:
                j = self._jpg()
                if j is not None:
                    self.peak_jpg = max(self.peak_jpg or 0, j)

    def __enter__(self) -> Sampler:
        if self.lib is not None:
            self.start_used = self.peak_used = self._memory_used()
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.lib is not None:
            self._stop.set()
            self._thread.join()

    def figures(self) -> dict:
        """What was seen; None with a reason where NVML could not tell."""
        if self.lib is None:
            return {"nvml": self.why}
        out = {"gpu_memory_peak_gib": round(self.peak_used / 2**30, 2),
               "gpu_memory_before_gib": round(self.start_used / 2**30, 2)}  # fmt: skip
        if not self.jpg_supported:
            out["jpeg_engine"] = "unknown: this driver's NVML has no nvmlDeviceGetJpgUtilization"
        else:
            out["jpeg_engine_peak_percent"] = self.peak_jpg
        return out
