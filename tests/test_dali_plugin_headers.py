"""Where the DALI plugin's CUDA headers come from, and the one line that says which path the DALI
CPU loader takes: a build with no CUDA toolkit on disk, from the pip wheels' headers alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("nvidia.dali")

ROOT = Path(__file__).resolve().parents[1]
NO_TOOLKIT = {"SHARDLINE_CUDA_ROOTS": ""}  # /usr/local/cuda and $CUDA_HOME hidden from the search


def plugin_main(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loaders.dali_plugin"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def wheel_headers_here() -> tuple[list[str], str] | None:
    from loaders import dali_plugin

    old = os.environ.get("SHARDLINE_CUDA_ROOTS")
    os.environ["SHARDLINE_CUDA_ROOTS"] = ""
    try:
        return dali_plugin.find_cuda_headers()
    finally:
        if old is None:
            del os.environ["SHARDLINE_CUDA_ROOTS"]
        else:
            os.environ["SHARDLINE_CUDA_ROOTS"] = old


def test_without_cuda_headers_the_line_says_dalis_resize(tmp_path):
    done = plugin_main({**NO_TOOLKIT, "SHARDLINE_CUDA_WHEELS": "", "SHARDLINE_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 1
    (line,) = done.stdout.splitlines()
    assert line.startswith("DALI CPU loader: DALI's resize (the fused operator did not build: no CUDA headers")
    assert "cuda-toolkit[cudart,crt,cccl]" in line


@pytest.mark.skipif(
    wheel_headers_here() is None,
    reason="the CUDA header wheels (the dev extra's cuda-toolkit[cudart,crt,cccl]) are not installed here",
)
def test_builds_from_the_wheel_headers_with_no_toolkit_and_says_so(tmp_path):
    done = plugin_main({**NO_TOOLKIT, "SHARDLINE_CACHE_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = done.stdout.splitlines()
    assert line.startswith("DALI CPU loader: fused resize-normalize (built with NVIDIA's CUDA header wheels in ")
    lib = Path(line.rsplit(": ", 1)[1])
    assert lib.is_file() and tmp_path in lib.parents
    # The library loads and its operator runs: a CPU pipeline through fn.shardline_resize_normalize.
    script = (
        "import numpy as np; from nvidia.dali import fn, pipeline_def, plugin_manager;"
        f"plugin_manager.load_library({str(lib)!r});"
        "img = [np.full((30, 40, 3), 128, np.uint8)];"
        "p = pipeline_def(batch_size=1, num_threads=1, device_id=None)(lambda: fn.shardline_resize_normalize("
        "fn.external_source(source=lambda: img, batch=True, layout='HWC'), size=[8, 8],"
        " mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0]))();"
        "p.build(); (out,) = p.run(); print('SHAPE', np.array(out[0]).shape)"
    )
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "SHAPE" in ran.stdout
