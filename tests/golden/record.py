"""Record the golden runs: a fixed-seed tiny run of each training script, on one CPU thread.

tests/test_golden.py replays these commands and compares the progress.csv numbers within a tolerance.
First recorded on c151b98; re-recorded, with the loss columns now compared too, with

    python tests/golden/record.py [NAME ...]

Re-record only when a change is meant to alter the numbers, and say so in the commit.
"""

import csv
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from commands import COMPARED, GOLDEN_RUNS, build_dataset  # this folder is sys.path[0] when run as a script

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def read_rows(path):
    """The compared columns of a progress.csv."""
    with open(path, newline="") as f:
        return [{k: row.get(k, "") for k in COMPARED} for row in csv.DictReader(f)]


def main(names=None):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp / "minari"), "OMP_NUM_THREADS": "1"}
        build_dataset(env)
        for name, (script, flags) in GOLDEN_RUNS.items():
            if names and name not in names:
                continue
            out = tmp / name
            subprocess.run(
                [sys.executable, str(ROOT / script), *flags, "--output-dir", str(out)],
                cwd=tmp,
                env=env,
                check=True,
                capture_output=True,
            )
            (run_dir,) = out.iterdir()
            shutil.copy(run_dir / "progress.csv", HERE / f"{name}.csv")
            print(f"recorded {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
