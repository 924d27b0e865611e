"""The refactor of issue 10 changed no behaviour: each script's fixed-seed tiny run gives the numbers
recorded before it (tests/golden/record.py, recorded on c151b98). Scores, returns and alpha depend on
every gradient step of the run, so any change to the algorithm or to a random stream shows here."""

import csv
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from commands import COMPARED, GOLDEN_RUNS, build_dataset

pytestmark = pytest.mark.slow  # each test runs a script end to end


@pytest.fixture(scope="module")
def golden_env(tmp_path_factory):
    path = tmp_path_factory.mktemp("golden")
    env = {**os.environ, "MINARI_DATASETS_PATH": str(path / "minari"), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    build_dataset(env)
    return env, path


def rows(path):
    with open(path, newline="") as f:
        return [{k: row.get(k, "") for k in COMPARED} for row in csv.DictReader(f)]


@pytest.mark.parametrize("name", list(GOLDEN_RUNS))
def test_refactored_script_reproduces_the_recorded_run(name, golden_env):
    env, path = golden_env
    script, flags = GOLDEN_RUNS[name]
    out = path / name
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *flags, "--output-dir", str(out)],
        cwd=path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = out.iterdir()
    expected = rows(ROOT / "tests" / "golden" / f"{name}.csv")
    assert len(expected) >= 4
    assert rows(run_dir / "progress.csv") == expected
