"""The golden runs: which script, which flags. Shared by record.py and tests/test_golden.py."""

import subprocess
import sys

# conftest's 400-step random Hopper dataset; every phase runs, nets of 16 units.
SCHEDULE = [
    "--dataset",
    "uniform-random",
    "--random-dataset-steps",
    "400",
    "--offline-steps",
    "40",
    "--online-steps",
    "60",
    "--eval-every",
    "20",
    "--eval-episodes",
    "2",
    "--hidden-dim",
    "16",
    "--batch-size",
    "32",
    "--seed",
    "3",
]

GOLDEN_RUNS = {
    # The flags after --keep-min restore the defaults of c151b98 that issue 11 changed.
    "redq_adaptive_bc": (
        "redq_adaptive_bc.py",
        SCHEDULE
        + [
            "--utd",
            "2",
            "--num-critics",
            "3",
            "--keep-min",
            "100",
            "--critic-init",
            "pytorch",
            "--critic-loss-reduction",
            "sum",
            "--r-last-start",
            "mean",
        ],
    ),
    "td3_bc": ("baselines/td3_bc.py", SCHEDULE + ["--utd", "2"]),
    # --lam 1.0 restores the default that issue 14 changed (jaxrl's config: 2.0).
    "awac": ("baselines/awac.py", SCHEDULE + ["--utd", "2", "--actor-hidden-layers", "1", "--lam", "1.0"]),
    "balanced_replay": (
        "baselines/balanced_replay.py",
        SCHEDULE + ["--utd", "2", "--ratio-hidden-dim", "16", "--ratio-batch-size", "32"],
    ),
    "redq": (
        "baselines/redq.py",
        [
            "--online-steps",
            "300",
            "--learning-starts",
            "100",
            "--eval-every",
            "100",
            "--eval-episodes",
            "2",
            "--utd",
            "2",
            "--num-critics",
            "3",
            "--hidden-dim",
            "16",
            "--batch-size",
            "32",
            "--seed",
            "3",
        ],
    ),
}

# Columns that depend on the whole training trajectory and on nothing else (not on wall time).
COMPARED = [
    "phase",
    "step",
    "normalized_score",
    "normalized_score_std",
    "return_mean",
    "alpha",
    "episode_normalized_return",
]


def build_dataset(env):
    """local/hopper/uniform-random-400steps-v0 in env's MINARI_DATASETS_PATH, through the main script's own recipe."""
    code = (
        "from plumbing.datasets import build_random_dataset as b; "
        "b('local/hopper/uniform-random-400steps-v0', 'Hopper-v5', 400)"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
