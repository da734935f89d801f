"""shardline's DALI plugin (loaders/native/*.cc): compiled on first use, cached, loaded once.

The plugin holds `fn.shardline_resize_normalize`, the CPU train pipeline's fused resize + flip +
normalize (see loaders/native/resize_normalize.cc for why). It is compiled like
torch.utils.cpp_extension.load does it: with the machine's C++ compiler ($CXX, else c++)
against the installed DALI's headers, into a cache folder keyed by the source, the DALI
version and the flags ($SHARDLINE_CACHE_DIR, else ~/.cache/shardline), published with an
atomic rename so concurrent ranks never load a half-written library. DALI's headers include
CUDA's, so CUDA's headers must be found: a toolkit's ($CUDA_HOME, /usr/local/cuda*), else the
pip wheels that ship them (find_cuda_headers), so the build needs no toolkit and no GPU.

Where the build cannot happen (no compiler, no CUDA headers), `load()` logs one line saying
why and returns False, and the pipeline keeps DALI's own resize + crop_mirror_normalize:
slower on CPU, same images up to rounding.

`python -m loaders.dali_plugin` builds it now and says in one line which path the DALI CPU
loader takes, the fused operator (and where CUDA's headers came from) or DALI's resize
(make install runs it).
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


# What DALI's plugin headers pull in from CUDA (found with `c++ -M`): the runtime API, the
# compiler's host configuration, and libcu++'s nv/target (through cuda_fp16.h).
CUDA_HEADERS = ("cuda_runtime_api.h", "crt/host_config.h", "nv/target")


def toolkit_roots() -> list[str]:
    """CUDA toolkit folders to look in, in order: $SHARDLINE_CUDA_ROOTS (os.pathsep-separated;
    set and empty, none), else $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, /usr/local/cuda-* newest first."""
    given = os.environ.get("SHARDLINE_CUDA_ROOTS")
    if given is not None:
        return [r for r in given.split(os.pathsep) if r]
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")]
    return [r for r in [*roots, "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)] if r]


def wheel_sites() -> list[str]:
    """Folders that may hold NVIDIA's CUDA header wheels: $SHARDLINE_CUDA_WHEELS (os.pathsep-separated;
    set and empty, none), else this interpreter's sys.path (the venv's site-packages)."""
    given = os.environ.get("SHARDLINE_CUDA_WHEELS")
    if given is not None:
        return [r for r in given.split(os.pathsep) if r]
    return [p for p in sys.path if p]


def _with_cccl(inc: Path) -> list[Path]:
    # CUDA 13 keeps libcu++ (nv/target, which cuda_fp16.h needs) under include/cccl too.
    return [inc, inc / "cccl"] if (inc / "cccl").is_dir() else [inc]


def _complete(dirs: list[Path]) -> bool:
    return all(any((d / h).is_file() for d in dirs) for h in CUDA_HEADERS)


def find_cuda_headers() -> tuple[list[str], str] | None:
    """(include folders, where they are in words) for CUDA's headers, or None.

    A toolkit on disk first; else the pip wheels that ship them: CUDA 13's nvidia/cu13/include
    (nvidia-cuda-runtime, nvidia-cuda-crt, nvidia-cuda-cccl: `cuda-toolkit[cudart,crt,cccl]`,
    which pyproject.toml's dev extra declares for Linux), or CUDA 12's nvidia/cuda_runtime,
    nvidia/cuda_nvcc and nvidia/cuda_cccl. Headers only: no GPU, no CUDA libraries are used.
    """
    for root in toolkit_roots():
        dirs = _with_cccl(Path(root) / "include")
        if _complete(dirs):
            return [str(d) for d in dirs], f"the CUDA toolkit at {root}"
    for site in wheel_sites():
        for layout in ("cu1[0-9]", "cuda_*"):  # one CUDA major's wheels, not a mix of two
            dirs = [d for inc in sorted(Path(site).glob(f"nvidia/{layout}/include")) for d in _with_cccl(inc)]
            if dirs and _complete(dirs):
                return [str(d) for d in dirs], f"NVIDIA's CUDA header wheels in {site}"
    return None


def cuda_include_dirs() -> list[str]:
    """Include folders of CUDA's headers (a toolkit's, else the pip wheels'); [] where there are none."""
    found = find_cuda_headers()
    return found[0] if found else []


def compile_command(output: Path) -> list[str]:
    import nvidia.dali.sysconfig as dali_sysconfig

    if not SOURCES:
        raise PluginBuildError(f"the plugin's source is missing from {Path(__file__).parent / 'native'}")
    cuda = cuda_include_dirs()
    if not cuda:
        raise PluginBuildError(
            "no CUDA headers found: no toolkit (set CUDA_HOME) and no nvidia-cuda-runtime/-crt/-cccl wheels "
            "(pip install 'cuda-toolkit[cudart,crt,cccl]'); DALI's plugin headers include cuda_runtime_api.h"
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
    """Build now and say in one line which path the DALI CPU loader takes (make install prints it)."""
    built_before = library_path().is_file()
    try:
        lib = build()
    except (PluginBuildError, OSError) as e:
        print(f"DALI CPU loader: DALI's resize (the fused operator did not build: {e})")
        return 1
    found = find_cuda_headers()
    source = "built earlier" if built_before or not found else f"built with {found[1]}"
    print(f"DALI CPU loader: fused resize-normalize ({source}): {lib}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
