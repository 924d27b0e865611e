"""Measure the golden comparison's margins: how far each golden run lies from its recording on this machine
(drift), and how far one changed default moves a run (a real change). The numbers in tests/test_golden.py's
docstring come from here.

    python tests/golden/margin.py            # OMP_NUM_THREADS=1; run again with THREADS=2 for thread drift
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from commands import GOLDEN_RUNS, build_dataset, largest_relative_difference  # this folder is sys.path[0]
from record import read_rows

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

CHANGES = {
    "redq_adaptive_bc_defaults": [
        ["--target-return", "1.05"],
        ["--policy-noise", "0.2"],
        ["--kp", "8e-5"],
        ["--keep-ratio", "0.1"],
        ["--utd", "3"],
        ["--num-min-critics", "3"],
    ],
    "td3_bc": [["--policy-noise", "0.1"]],
    "balanced_replay": [["--policy-noise", "0.1"]],
    "redq": [["--policy-noise", "0.1"]],
    "awac": [["--lam", "2.0"]],
}


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        threads = os.environ.get("THREADS", "1")
        env = {**os.environ, "MINARI_DATASETS_PATH": str(tmp / "minari"), "OMP_NUM_THREADS": threads}
        build_dataset(env)
        for name, (script, flags) in GOLDEN_RUNS.items():
            recorded = read_rows(HERE / f"{name}.csv")
            for change in [[], *CHANGES.get(name, [])]:
                out = tmp / "-".join([name, *change])
                cmd = [sys.executable, str(ROOT / script), *flags, *change, "--output-dir", str(out)]
                subprocess.run(cmd, cwd=tmp, env=env, check=True, capture_output=True)
                (run_dir,) = out.iterdir()
                moved = largest_relative_difference(read_rows(run_dir / "progress.csv"), recorded)
                print(f"{name} {' '.join(change) or '(as recorded)'}: largest relative difference {moved:.2g}")


if __name__ == "__main__":
    main()
