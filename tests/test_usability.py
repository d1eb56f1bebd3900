"""First-contact conventions: file modes follow the umask, `python -m stardomain` works."""

import os
import stat
import subprocess
import sys

from stardomain.checkpoint import atomic_write_text


def test_atomic_writes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600


def test_python_dash_m_runs_the_cli():
    res = subprocess.run([sys.executable, "-m", "stardomain", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    assert "star" in res.stdout and "barrier" in res.stdout
