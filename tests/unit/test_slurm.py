"""The Slurm planner (scaletrain/slurm.py): hostlists as Slurm writes them, DeepSpeed
hostfiles, and one-line errors for what would otherwise fail inside the launch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from scaletrain.slurm import expand_nodelist, parse_hostfile, plan


@pytest.mark.parametrize("nodelist,hosts", [
    ("node1", ["node1"]),
    ("node[1-3]", ["node1", "node2", "node3"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a1,b[8-9],c", ["a1", "b8", "b9", "c"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("dgx-h100-[009-011]", ["dgx-h100-009", "dgx-h100-010", "dgx-h100-011"]),
])
def test_hostlists_expand_like_scontrol_show_hostnames(nodelist, hosts) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist,fragment", [
    ("node[1-", "unbalanced brackets"),
    ("node[3-1]", "range '3-1' runs backwards"),
    ("node[a-b]", "holds 'a-b', not N or N-M"),
    ("node1,,node2", "an empty name between commas"),
    ("node[1-2],node2", "names a host twice"),
    ("node 1", "malformed at ' 1'"),
])
def test_malformed_hostlists_are_one_line_errors(nodelist, fragment) -> None:
    with pytest.raises(ValueError) as e:
        expand_nodelist(nodelist)
    assert fragment in str(e.value) and str(e.value).startswith(f"SLURM_JOB_NODELIST={nodelist!r}")


def test_hostfile_lines() -> None:
    assert parse_hostfile("# two nodes\nnode1 slots=8\n\nnode2 slots=8  # spare\n") == {"node1": 8, "node2": 8}
    for text, fragment in [("node1 slots=8\nnode2 slot=8\n", "line 2 'node2 slot=8' is not 'HOST slots=N'"),
                           ("node1 slots=0\n", "line 1 'node1 slots=0' is not 'HOST slots=N' (N >= 1)"),
                           ("node1 slots=2\nnode1 slots=2\n", "line 2 names 'node1' a second time"),
                           ("# nothing\n", "lists no host")]:
        with pytest.raises(ValueError, match=None) as e:
            parse_hostfile(text)
        assert fragment in str(e.value), str(e.value)


def test_plan_from_slurm_environment() -> None:
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_JOB_NUM_NODES": "4",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_RESTART_COUNT": "2"}
    p = plan(env)
    assert (p["MASTER_ADDR"], p["NNODES"], p["NPROC_PER_NODE"], p["JOB_WORLD_SIZE"], p["RESTART_COUNT"]) == \
        ("gpu01", "4", "8", "32", "2")
    assert p["MASTER_PORT"] == str(20000 + 4242) and plan(env, nproc_per_node=2, port=29500)["MASTER_PORT"] == "29500"
    assert plan({**env, "SLURM_GPUS_ON_NODE": ""})["NPROC_PER_NODE"] == "1"  # CPU nodes: one rank each
    with pytest.raises(ValueError, match="has 4 hosts but SLURM_JOB_NUM_NODES=3"):
        plan({**env, "SLURM_JOB_NUM_NODES": "3"})
    with pytest.raises(ValueError, match="SLURM_JOB_ID is not set: run this inside a Slurm job"):
        plan({})


def test_plan_command_prints_exports_or_one_line(tmp_path) -> None:
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2"}
    ok = subprocess.run([sys.executable, "-m", "scaletrain.cli", "slurm", "plan", "--hostfile", str(tmp_path / "h")],
                        env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and "export MASTER_ADDR=n1\n" in ok.stdout and "export NNODES=2\n" in ok.stdout
    assert (tmp_path / "h").read_text() == "n1 slots=1\nn2 slots=1\n"
    (tmp_path / "bad").write_text("n1 slots=1\nn2 slots:1\n")
    for extra, fragment in [({"SLURM_JOB_NODELIST": "n[1-"}, "SLURM_JOB_NODELIST='n[1-' is malformed"),
                            ({"DS_HOSTFILE": str(tmp_path / "bad")}, "line 2 'n2 slots:1' is not 'HOST slots=N'"),
                            ({"DS_HOSTFILE": str(tmp_path / "h"), "SLURM_JOB_NODELIST": "n[1-3]",
                              "SLURM_JOB_NUM_NODES": "3"}, "lacks 'n3', a node of this job")]:
        r = subprocess.run([sys.executable, "-m", "scaletrain.slurm", "plan"], env={**env, **extra},
                           capture_output=True, text=True)
        assert r.returncode == 2 and r.stdout == "", r.stdout
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("scaletrain: ") and fragment in lines[0], r.stderr
