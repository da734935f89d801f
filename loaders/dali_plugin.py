"""shardline's DALI plugin (loaders/native/*.cc): compiled on first use, cached, loaded once.

The plugin holds `fn.shardline_resize_normalize`, the CPU train pipeline's fused resize + flip +
normalize (see loaders/native/resize_normalize.cc for why). It is compiled like
torch.utils.cpp_extension.load does it: with the machine's C++ compiler ($CXX, else c++)
against the installed DALI's headers, into a cache folder keyed by the source, the DALI
version and the flags ($SHARDLINE_CACHE_DIR, else ~/.cache/shardline), published with an
atomic rename so concurrent ranks never load a half-written library. DALI's headers include
CUDA's, so a CUDA toolkit's include folder must be found ($CUDA_HOME, /usr/local/cuda*);
no GPU is needed.

Where the build cannot happen (no compiler, no CUDA headers), `load()` logs one line saying
why and returns False, and the pipeline keeps DALI's own resize + crop_mirror_normalize:
slower on CPU, same images up to rounding.

`python -m loaders.dali_plugin` builds it now and prints the library's path (make install runs it).
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from shards.cache_root import cache_root

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "native").glob("*.cc"))
FLAGS = ["-std=c++20", "-O3", "-shared", "-fPIC", "-w"]  # -w: DALI's headers warn under GCC 12
LIBRARY_NAME = "libshardline_dali.so"


class PluginBuildError(RuntimeError):
    """The plugin could not be compiled here; the message says why in one line."""


def cuda_include_dirs() -> list[str]:
    """Include folders of a CUDA toolkit (headers only: DALI's own headers include CUDA's)."""
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    roots += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for root in filter(None, roots):
        inc = Path(root) / "include"
        if (inc / "cuda_runtime_api.h").is_file() and (inc / "crt" / "host_config.h").is_file():
            # CUDA 13 keeps libcu++ (nv/target, which cuda_fp16.h needs) under include/cccl.
            cccl = inc / "cccl"
            return [str(inc), str(cccl)] if cccl.is_dir() else [str(inc)]
    return []


def compile_command(output: Path) -> list[str]:
    import nvidia.dali.sysconfig as dali_sysconfig

    if not SOURCES:
        raise PluginBuildError(f"the plugin's source is missing from {Path(__file__).parent / 'native'}")
    cuda = cuda_include_dirs()
    if not cuda:
        raise PluginBuildError(
            "no CUDA toolkit headers found (set CUDA_HOME; DALI's plugin headers include cuda_runtime_api.h)"
        )
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise PluginBuildError("no C++ compiler found (set CXX)")
    return [
        compiler,
        *FLAGS,
        *map(str, SOURCES),
        "-o",
        str(output),
        *dali_sysconfig.get_compile_flags(),
        *(f"-I{d}" for d in cuda),
        *dali_sysconfig.get_link_flags(),
    ]


def library_path() -> Path:
    import nvidia.dali

    key = hashlib.sha256()
    for src in SOURCES:
        key.update(src.read_bytes())
    key.update(" ".join([nvidia.dali.__version__, *FLAGS, sysconfig.get_platform()]).encode())
    return cache_root() / "dali-plugin" / key.hexdigest()[:16] / LIBRARY_NAME


def build() -> Path:
    """Compile the plugin unless the cache already has it; return the library's path."""
    lib = library_path()
    if lib.is_file():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    with open(lib.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one compile per machine; the others wait, then reuse it
        if lib.is_file():
            return lib
        fd, tmp = tempfile.mkstemp(dir=lib.parent, prefix=".build-", suffix=".so")
        os.close(fd)
        try:
            cmd = compile_command(Path(tmp))
            log.info("compiling shardline's DALI plugin (once per machine): %s", " ".join(cmd))
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                errors = [ln for ln in done.stderr.splitlines() if "error" in ln] or done.stderr.splitlines()[-1:]
                raise PluginBuildError(
                    f"compiling {SOURCES[0].name} failed: {errors[0] if errors else done.returncode}"
                )
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return lib


_loaded: bool | None = None


def load() -> bool:
    """Build (if needed) and load the plugin into this process; False, with one logged line, if it can't."""
    global _loaded
    if _loaded is None:
        try:
            import nvidia.dali.plugin_manager as plugin_manager

            lib = build()
            try:
                plugin_manager.load_library(str(lib))
            except RuntimeError as e:  # a damaged cache entry (disk full, copied folder): rebuild it once
                log.warning("cached DALI plugin %s does not load (%s); rebuilding it", lib, e)
                lib.unlink(missing_ok=True)
                plugin_manager.load_library(str(build()))
            _loaded = True
        except (PluginBuildError, OSError, RuntimeError) as e:
            log.warning("shardline DALI plugin unavailable, using DALI's resize on CPU (slower): %s", e)
            _loaded = False
    return _loaded


def main() -> int:
    try:
        print(build())
    except PluginBuildError as e:
        print(f"shardline DALI plugin: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
