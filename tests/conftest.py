"""Shared test helpers: tiny Minari datasets written with Minari's own API, and script runners."""

import csv
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn

# The repository. pyproject.toml's pythonpath puts it, baselines/, scripts/ and tests/golden/ on sys.path.
ROOT = Path(__file__).resolve().parents[1]


def make_minari_dataset(dataset_id, episodes, env_id=None, observation_space=None, action_space=None, **metadata):
    """Write episodes (dicts of arrays: observations T+1 rows, actions/rewards/terminations/truncations T rows)
    as a Minari dataset in the current $MINARI_DATASETS_PATH."""
    import minari
    from minari.data_collector import EpisodeBuffer

    buffers = [EpisodeBuffer(id=i, **{k: np.asarray(v) for k, v in ep.items()}) for i, ep in enumerate(episodes)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return minari.create_dataset_from_buffers(
            dataset_id, buffers, env=env_id, observation_space=observation_space, action_space=action_space, **metadata
        )


def hopper_episodes(num_episodes, length, seed=0, reward=None):
    """Random-action Hopper-v5 shaped episodes (not simulated: shapes and values are all the tests need)."""
    rng = np.random.default_rng(seed)
    episodes = []
    for i in range(num_episodes):
        rewards = rng.normal(size=length) if reward is None else np.full(length, reward)
        episodes.append(
            dict(
                observations=rng.normal(size=(length + 1, 11)),
                actions=rng.uniform(-1, 1, size=(length, 3)).astype(np.float32),
                rewards=rewards,
                terminations=np.arange(length) == length - 1 if i % 2 == 0 else np.zeros(length, bool),
                truncations=np.arange(length) == length - 1 if i % 2 == 1 else np.zeros(length, bool),
            )
        )
    return episodes


def write_d4rl_file(path, terminals, timeouts=None, obs_dim=11, act_dim=3, column=False, seed=0):
    """A small file in D4RL's layout: observations, actions, rewards, terminals, and for v2 (timeouts given) also
    timeouts, next_observations, infos/* and metadata/*. column: rewards and terminals shaped (N, 1), as in some
    of D4RL's files. Returns the arrays written."""
    import h5py

    rng = np.random.default_rng(seed)
    n = len(terminals)
    data = {
        "observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32),
        "rewards": rng.normal(1.0, 1.0, size=n).astype(np.float32),
        "terminals": np.asarray(terminals, bool),
    }
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            f[key] = value[:, None] if column and value.ndim == 1 else value
        if timeouts is not None:
            data["timeouts"] = np.asarray(timeouts, bool)
            f["timeouts"] = data["timeouts"][:, None] if column else data["timeouts"]
            f["next_observations"] = np.roll(data["observations"], -1, axis=0)
            f["infos/qpos"] = rng.normal(size=(n, obs_dim // 2 + 1)).astype(np.float32)
            f["infos/action_log_probs"] = rng.normal(size=n).astype(np.float32)
            f["metadata/algorithm"] = "SAC"
    return data


def run_script(script, *flags, datasets_path, cwd, timeout=300, env=None):
    """Run a script as a user would; returns the CompletedProcess (text). env: extra environment variables."""
    # One torch thread: on a loaded 2-core machine, two OpenMP threads per process can run 10x slower.
    env = {**os.environ, "MINARI_DATASETS_PATH": str(datasets_path), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, flags)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# The tests' shared constants and helpers: defined here once, imported by each test file.
HOPPER_REF = (-20.272305, 3234.3)  # D4RL's hopper random / expert returns: the 400-step dataset has no metadata scores

# Tiny budgets on the 400-step dataset that still exercise every phase: 3 offline and 4 online evaluations.
TINY_BUDGETS = ["--random-dataset-steps", 400, "--offline-steps", 40, "--online-steps", 60, "--eval-every", 20]
TINY_BUDGETS += ["--eval-episodes", 1, "--utd", 2, "--hidden-dim", 16, "--batch-size", 32]
# The main script's: a 3-critic ensemble, and 100 of the 400 transitions kept at the switch.
TINY = [*TINY_BUDGETS, "--num-critics", 3, "--keep-min", 100]


def optimizer_steps(agent, name="final.pt", parts=("critic", "actor")):
    """Adam steps each part has taken so far (0 before its first), from an agent's state dict or from the
    checkpoint `name` of a run folder."""
    if isinstance(agent, Path):
        agent = torch.load(agent / name, weights_only=True)["agent"]
    return tuple(int(agent[f"{p}_optim"]["state"][0]["step"]) if agent[f"{p}_optim"]["state"] else 0 for p in parts)


@pytest.fixture(scope="session")
def datasets_path(tmp_path_factory):
    """A MINARI_DATASETS_PATH holding local/hopper/uniform-random-400steps-v0, built by the script itself."""
    path = tmp_path_factory.mktemp("minari")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    try:
        from plumbing.datasets import build_random_dataset

        build_random_dataset("local/hopper/uniform-random-400steps-v0", "Hopper-v5", num_steps=400)
    finally:
        if old is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = old
    return path


def spaces(obs_dim, act_dim):
    return dict(
        observation_space=gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float64),
        action_space=gym.spaces.Box(-1, 1, (act_dim,), np.float32),
    )


class FixedActor(nn.Module):
    """pi(s) = a fixed action per row, with action bounds [low, high] ([-1, 1] unless given): a stand-in for
    target-policy and actor-loss tests. Its action_scale and action_bias follow the scripts' Actor."""

    def __init__(self, actions, low=None, high=None):
        super().__init__()
        self.actions = actions
        low = -torch.ones(actions.shape[1]) if low is None else torch.as_tensor(low, dtype=torch.float32)
        high = torch.ones(actions.shape[1]) if high is None else torch.as_tensor(high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)

    def forward(self, obs):
        return self.actions


def start_script(script, *flags, datasets_path, cwd):
    """Start a script as a user would, without waiting for it (one torch thread, as in run_script)."""
    env = {**os.environ, "MINARI_DATASETS_PATH": str(datasets_path), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *map(str, flags)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def signal_when(proc, run_parent, phase, min_step, signum=signal.SIGKILL, timeout=120):
    """Send signum once a run under run_parent has a latest.pt of phase (None: any) at step >= min_step, so
    the run is somewhere between that checkpoint and the next; wait for it. Returns (step, stdout, stderr)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        for latest in run_parent.glob("*/latest.pt"):
            try:
                state = torch.load(latest, weights_only=True)
            except Exception:
                continue  # not written yet, or replaced while we read it
            if phase in (None, state["phase"]) and state["step"] >= min_step:
                proc.send_signal(signum)
                out, err = proc.communicate(timeout=60)
                return state["step"], out, err
        time.sleep(0.02)
    raise AssertionError(f"the run ended before a {phase or 'any'} checkpoint at step {min_step}")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_same_networks(run_a, run_b, parts):
    """The final.pt networks of two runs are equal bit for bit."""
    final_a = torch.load(run_a / "final.pt", weights_only=True)["agent"]
    final_b = torch.load(run_b / "final.pt", weights_only=True)["agent"]
    for part in parts:
        for key, value in final_a[part].items():
            assert torch.equal(value, final_b[part][key]), (part, key)


# ---- A stop signal during an evaluation (every script's test) ---------------------------------------------------
TIMINGS = ("updates_per_s", "env_steps_per_s", "wall_s")  # progress.csv columns that depend on wall time


def sigterm_during_an_evaluation(script, flags, out, log, rows, *, datasets_path, cwd):
    """Start a run whose evaluations take nearly all its time, and SIGTERM it once its `log` (a CSV of the run
    folder) has `rows` rows: the signal lands in the next evaluation. Checks that it stops as a preempted run
    (exit 143 within 5 s, no traceback); returns the run folder and its latest.pt."""
    proc = start_script(script, *flags, "--output-dir", out, datasets_path=datasets_path, cwd=cwd)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(Path(out).glob(f"*/{log}")):
        time.sleep(0.05)
    (run_dir,) = Path(out).iterdir()
    while time.time() < deadline and proc.poll() is None and len(read_csv(run_dir / log)) < rows:
        time.sleep(0.05)
    time.sleep(0.3)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.time() - sent < 5, "the evaluation stops within seconds of the signal"
    assert proc.returncode == 143, err
    assert "Traceback" not in err, err
    return run_dir, torch.load(run_dir / "latest.pt", weights_only=True)


def run_to_the_end(script, *flags, datasets_path, cwd):
    """A script run (or --resume RUN) that must finish with exit status 0."""
    proc = start_script(script, *flags, datasets_path=datasets_path, cwd=cwd)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def numbers(run_dir, columns):
    """progress.csv's values row by row, the wall-time columns left out: what two runs of one trajectory share."""
    same = [c for c in columns if c not in TIMINGS]
    return [[row[c] for c in same] for row in read_csv(run_dir / "progress.csv")]


# The baselines' cut evaluations (the main script's switch differs: its own table in test_redq_adaptive_bc.py).
# (K, T, rows written before the cut evaluation, the state latest.pt holds, every row of the finished run)
OFFLINE_ROWS = [("offline", "0"), ("offline", "5")]
BASELINE_CUT_EVALUATIONS = {
    "pre-training": (10, 0, 1, ("offline", 5), OFFLINE_ROWS + [("offline", "10")]),
    "the switch": (5, 10, 2, ("online", 0), OFFLINE_ROWS + [("online", "0"), ("online", "5"), ("online", "10")]),
}


def check_a_stop_signal_during_an_evaluation(script, where, extra_flags, columns, parts, *, datasets_path, tmp_path):
    """A baseline's evaluation cut by SIGTERM (BASELINE_CUT_EVALUATIONS[where]) is redone by --resume, which then
    ends like an uninterrupted run. Evaluations of 150 episodes every 5 steps: the run spends nearly all its time
    evaluating, so a SIGTERM sent just after a row lands in the next evaluation (latest.pt says which). Not a
    mid-fine-tuning evaluation: there a stop signal cuts the training episode, so a resumed run cannot match an
    uninterrupted one."""
    K, T, rows_before, (phase, step), rows = BASELINE_CUT_EVALUATIONS[where]
    flags = ["--dataset", "uniform-random", "--random-dataset-steps", 400, "--offline-steps", K, "--online-steps", T]
    flags += ["--eval-every", 5, "--eval-episodes", 150, "--hidden-dim", 16, "--batch-size", 32, *extra_flags]
    kw = dict(datasets_path=datasets_path, cwd=tmp_path)
    run_b, state = sigterm_during_an_evaluation(script, flags, tmp_path / "b", "progress.csv", rows_before, **kw)
    assert state["evaluation_due"], "latest.pt marks the cut evaluation as due"
    assert (state["phase"], state["step"]) == (phase, step), "the state saved is the one before the evaluation"
    assert len(read_csv(run_b / "progress.csv")) == rows_before, "the cut evaluation wrote no row"
    run_to_the_end(script, "--resume", run_b, **kw)
    run_to_the_end(script, *flags, "--output-dir", tmp_path / "a", **kw)
    (run_a,) = (tmp_path / "a").iterdir()
    assert [(r["phase"], r["step"]) for r in read_csv(run_b / "progress.csv")] == rows, "each evaluation once"
    assert numbers(run_b, columns) == numbers(run_a, columns), "same numbers"
    assert read_csv(run_b / "episodes.csv") == read_csv(run_a / "episodes.csv"), "same training episodes"
    assert_same_networks(run_a, run_b, parts)
