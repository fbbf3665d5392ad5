"""Process environment set before torch.distributed or DeepSpeed starts (scaletrain.distributed)."""

from __future__ import annotations

import os
import shutil
import sys
from unittest import mock

from scaletrain.distributed import prepare_environment


def test_the_venvs_ninja_builds_deepspeeds_ops_whatever_path_says(tmp_path):
    """A `ninja` found first on PATH that is not the venv's (here a stand-in; on this machine the
    system's 1.11 beside pip's 1.13) would make DeepSpeed rebuild its ops at every start that
    alternates with the other: prepare_environment puts the venv's own first."""
    own = os.path.join(os.path.dirname(sys.executable), "ninja")
    assert os.access(own, os.X_OK), "deepspeed installs ninja into the venv"
    other = tmp_path / "ninja"
    other.write_text("#!/bin/sh\nexit 1\n")
    other.chmod(0o755)
    with mock.patch.dict(os.environ, {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}):  # restored after
        assert shutil.which("ninja") == str(other)
        prepare_environment()
        assert shutil.which("ninja") == own
        path = os.environ["PATH"]
        prepare_environment()  # idempotent: PATH does not grow at every call
        assert os.environ["PATH"] == path


def test_importing_scaletrain_then_diffusers_prints_no_torchao_noise():
    """torchao (engine.precision=fp8) is imported by diffusers whenever it is installed; on this CPU
    torch it would print its CUDA-extension load failures, a torch pytree deprecation and a
    diffusers note in every process. scaletrain filters exactly those lines (scaletrain/__init__.py):
    a process importing both prints nothing, and another line on the same loggers still prints."""
    import logging
    import subprocess

    code = ("import scaletrain, diffusers, torchao.float8; from diffusers import UNet2DConditionModel; "
            "import logging; logging.getLogger('torchao').warning('Failed to import a thing that is not known')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.strip() == "Failed to import a thing that is not known" and r.stdout == ""
    record = logging.LogRecord("torchao", logging.WARNING, __file__, 1, "Failed to load /x/_C_mxfp8.so", None, None)
    assert not logging.getLogger("torchao").filter(record)
