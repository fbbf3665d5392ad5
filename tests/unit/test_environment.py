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
