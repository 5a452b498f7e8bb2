"""The package as `pip install .` gives it, away from the repository: a wheel built from this tree holds every file
the commands need (prompts, the bundled data, `commands/dpo.py`) and the `trl-longreward` script; installed into a
directory of its own and run from elsewhere, `trl-longreward dpo --help` works and the bundled data loads from the
installed copy (not from this checkout).

The wheel's dependencies come from the test environment (`--no-deps`): installing torch again would take minutes
and test pip, not this package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NEEDED = (
    "trl_longreward/commands/dpo.py",
    "trl_longreward/commands/__init__.py",
    "trl_longreward/data/longqa_train.jsonl",
    "trl_longreward/data/longqa_eval.jsonl",
    "trl_longreward/reward/prompts/completeness_extract.txt",
)


def _pip(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.slow
def test_the_installed_wheel_runs_away_from_the_repository(tmp_path):
    # build from a copy of the tracked tree: a build writes build/ and *.egg-info beside the sources
    source = tmp_path / "source"
    files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    for name in files.split():
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO_ROOT / name).read_bytes())
    _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("trl_longreward-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    missing = [name for name in NEEDED if name not in names]
    assert not missing, f"the wheel lacks {missing}"
    assert "trl-longreward = trl_longreward.commands:main" in entry_points

    site = tmp_path / "site"
    _pip("install", "--no-deps", "-q", "--target", str(site), str(wheel), cwd=tmp_path)
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1")  # the installed copy first on the path
    script = site / "bin" / "trl-longreward"
    done = subprocess.run(
        [str(script), "dpo", "--help"], cwd=away, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage: trl-longreward dpo" in done.stdout and "--judge_server" in done.stdout
    check = (
        "import trl_longreward, trl_longreward.commands.dpo as dpo; from trl_longreward.data import load_long_qa; "
        "print(trl_longreward.__file__); print(len(load_long_qa('train')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", check], cwd=away, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    location, rows = done.stdout.split()
    assert Path(location).is_relative_to(site), location  # the installed copy, not this checkout
    assert int(rows) > 0
