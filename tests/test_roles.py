"""Cluster role commands refuse bad topology files with a clear message, not a traceback."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("role", ["adapter", "querier"])
def test_bad_topology_is_a_clear_error(tmp_path, role):
    missing = subprocess.run([sys.executable, "-m", "flashback", role, "--topology", str(tmp_path / "none.yml"),
                              "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "flashback: read topology" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = tmp_path / "bad.yml"
    bad.write_text("nats: [x]\nshards: []\n")
    out = subprocess.run([sys.executable, "-m", "flashback", role, "--topology", str(bad), "--listen", "127.0.0.1:0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "flashback: topology: 'shards' must list at least one shard" in out.stderr


@pytest.mark.parametrize("levels", ["2,4", "1,4,6", "1,x"])
def test_compactor_refuses_bad_levels(tmp_path, levels):
    out = subprocess.run([sys.executable, "-m", "flashback", "compactor", "--topology", str(tmp_path / "t.yml"),
                          "--listen", "127.0.0.1:0", "--shard", "shard-0", "--objstore.config-file",
                          str(tmp_path / "o.yml"), "--data-dir", str(tmp_path), "--levels", levels],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "argument --levels" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("flag", ["--head.retention", "--head.chunk-range", "--checkpoint-interval"])
@pytest.mark.parametrize("value", ["0s", "soon"])
def test_store_refuses_bad_head_durations(tmp_path, flag, value):
    out = subprocess.run([sys.executable, "-m", "flashback", "store", "--topology", str(tmp_path / "t.yml"),
                          "--listen", "127.0.0.1:0", "--shard", "shard-0", "--replica", "r0", "--data-dir",
                          str(tmp_path), "--grpc-listen", "127.0.0.1:0", flag, value],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"argument {flag}" in out.stderr and "Traceback" not in out.stderr
