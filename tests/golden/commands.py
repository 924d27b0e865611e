"""The golden runs: which script, which flags, and how a run is compared with its recording.
Shared by record.py and tests/test_golden.py."""

import math
import subprocess
import sys

# conftest's 400-step random Hopper dataset; every phase runs, nets of 16 units.
SCHEDULE = (
    "--dataset uniform-random --random-dataset-steps 400 --offline-steps 40 --online-steps 60 --eval-every 20 "
    "--eval-episodes 2 --hidden-dim 16 --batch-size 32 --seed 3"
).split()

OLD_TD3 = ["--policy-noise", "0.2", "--no-delay-target-updates"]

GOLDEN_RUNS = {
    # Today's defaults of the main script, with the small budgets above (recorded after issue 18's Table 1 change).
    "redq_adaptive_bc_defaults": ("redq_adaptive_bc.py", SCHEDULE),
    # The flags after --num-critics keep the defaults of c151b98 (issues 11 and 18 changed them), so these runs are
    # the trajectories first recorded there. OLD_TD3 undoes issue 18's reading of Table 1 (sigma_target 0.1,
    # targets on actor steps).
    "redq_adaptive_bc": (
        "redq_adaptive_bc.py",
        SCHEDULE
        + "--utd 2 --num-critics 3 --keep-min 100 --critic-init pytorch --critic-loss-reduction sum".split()
        + "--r-last-start mean".split()
        + OLD_TD3,
    ),
    "td3_bc": ("baselines/td3_bc.py", SCHEDULE + ["--utd", "2"] + OLD_TD3),
    # --lam 1.0 restores the default that issue 14 changed (jaxrl's config: 2.0).
    "awac": ("baselines/awac.py", SCHEDULE + "--utd 2 --actor-hidden-layers 1 --lam 1.0".split()),
    "balanced_replay": (
        "baselines/balanced_replay.py",
        SCHEDULE + "--utd 2 --ratio-hidden-dim 16 --ratio-batch-size 32".split() + OLD_TD3,
    ),
    "redq": (
        "baselines/redq.py",
        (
            "--online-steps 300 --learning-starts 100 --eval-every 100 --eval-episodes 2 --utd 2 --num-critics 3 "
            "--hidden-dim 16 --batch-size 32 --seed 3"
        ).split()
        + OLD_TD3,
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
    "critic_loss",
    "actor_loss",
    "q_mean",
]
NUMERIC = COMPARED[2:]

# How far a value may move across CPUs (tests/test_golden.py's docstring has the measurements behind it).
RELATIVE_TOLERANCE = 2e-5


def differences(got: list[dict], expected: list[dict]) -> list[str]:
    """Each value of `got` that is not within RELATIVE_TOLERANCE of the recording, as 'row r column c: a != b
    (relative difference d)'. Row count, phase, step and empty cells must match exactly."""
    if len(got) != len(expected):
        return [f"{len(got)} rows, recorded {len(expected)}"]
    found = []
    for r, (g, e) in enumerate(zip(got, expected)):
        for column in COMPARED:
            a, b = g.get(column, ""), e.get(column, "")
            if column in NUMERIC and a != "" and b != "":
                close = math.isclose(float(a), float(b), rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-9)
                relative = abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)
                if not close:
                    found.append(f"row {r} {column}: {a} != {b} (relative difference {relative:.2g})")
            elif a != b:
                found.append(f"row {r} {column}: {a!r} != {b!r}")
    return found


def largest_relative_difference(got: list[dict], expected: list[dict]) -> float:
    return max(
        abs(float(g[c]) - float(e[c])) / max(abs(float(e[c])), 1e-12)
        for g, e in zip(got, expected)
        for c in NUMERIC
        if g.get(c, "") != "" and e.get(c, "") != ""
    )


def build_dataset(env):
    """local/hopper/uniform-random-400steps-v0 in env's MINARI_DATASETS_PATH, through the main script's own recipe."""
    code = (
        "from plumbing.datasets import build_random_dataset as b; "
        "b('local/hopper/uniform-random-400steps-v0', 'Hopper-v5', 400)"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
