"""D4RL's MuJoCo locomotion files (the paper's data), read without D4RL: find the file in D4RL's cache or
download it from D4RL's server, check it, and turn it into the transitions of `d4rl.qlearning_dataset`,
grouped into Minari episodes that every script's `flatten_episodes` reads back unchanged.

D4RL's own loader needs mujoco-py, which no longer installs; its files are plain HDF5 that h5py reads.
The converted dataset is stored under local/d4rl/<D4RL id> (e.g. local/d4rl/hopper-medium-v0): a local
id is never sent to Minari's hub, and it cannot collide with Minari's remote `D4RL/` namespace.
"""

from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from plumbing.errors import Preempted, UsageError, stop_requested
from plumbing.runtime import progress_bar

# D4RL's server (d4rl/infos.py, d4rl/gym_mujoco/__init__.py); D4RL_BASE_URL replaces it (tests: a local server).
BASE_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl"
FOLDERS = {"v0": "gym_mujoco", "v2": "gym_mujoco_v2"}
ENVS = ("hopper", "halfcheetah", "walker2d")
NAMES = ("random", "medium", "medium-replay", "medium-expert", "expert")
VERSIONS = ("v0", "v2")
# The Gymnasium environments with D4RL's MuJoCo models (v5 changed Walker2d's foot friction).
ENV_IDS = {"hopper": "Hopper-v4", "halfcheetah": "HalfCheetah-v4", "walker2d": "Walker2d-v4"}
MAX_EPISODE_STEPS = 1000  # env._max_episode_steps of D4RL's gym environments: the v0 counter rule's limit
LOCAL_PREFIX = "local/d4rl/"
REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals")


def file_name(env: str, name: str, version: str) -> str:
    """D4RL's file name: v0 `hopper_medium.hdf5` (medium-replay is `<env>_mixed`, walker's `walker_mixed`),
    v2 `hopper_medium_replay-v2.hdf5`."""
    if version == "v2":
        return f"{env}_{name.replace('-', '_')}-v2.hdf5"
    if name == "medium-replay":
        return f"{'walker' if env == 'walker2d' else env}_mixed.hdf5"
    return f"{env}_{name.replace('-', '_')}.hdf5"


def url_of(env: str, name: str, version: str) -> str:
    base = os.environ.get("D4RL_BASE_URL", BASE_URL).rstrip("/")
    return f"{base}/{FOLDERS[version]}/{file_name(env, name, version)}"


def cache_dir() -> Path:
    """Where D4RL itself keeps its downloads, so people who ran D4RL before download nothing."""
    return Path(os.environ.get("D4RL_DATASET_DIR", Path.home() / ".d4rl" / "datasets"))


def d4rl_id(env: str, name: str, version: str) -> str:
    return f"{env}-{name}-{version}"


def local_id(env: str, name: str, version: str) -> str:
    return LOCAL_PREFIX + d4rl_id(env, name, version)


def check_env(env: str, dataset: str) -> None:
    if env not in ENVS:
        raise UsageError(
            f"--dataset {dataset} is D4RL's, read here for {', '.join(ENVS)} only, not --env {env} (D4RL's ant "
            f"observations have 111 values, Ant-v4's 27); use --dataset uniform-random or --dataset-id"
        )


def parse_local_id(dataset_id: str):
    """(env, name, version) of local/d4rl/<env>-<name>-<version>, else None."""
    pattern = rf"{re.escape(LOCAL_PREFIX)}({'|'.join(ENVS)})-({'|'.join(NAMES)})-(v0|v2)"
    match = re.fullmatch(pattern, dataset_id)
    return match.groups() if match else None


# ---------------------------------------------------------------------------------------
# The file: D4RL's cache, else a download checked before it is kept
# ---------------------------------------------------------------------------------------
def obtain_file(env: str, name: str, version: str) -> Path:
    """The path of D4RL's file in cache_dir(), downloaded first if it is not there."""
    path = cache_dir() / file_name(env, name, version)
    if not path.is_file():
        download(url_of(env, name, version), path)
    return path


def download(url: str, path: Path, chunk: int = 1 << 16, timeout: float = 5.0) -> None:
    """url into path through a staging file, kept only when its size is the server's Content-Length and h5py
    opens it (http.client does not raise on a short body). A stop signal abandons it within `timeout` s."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise UsageError(
                f"D4RL file {path.name} is not in {path.parent} and {url} cannot be reached ({reason}); "
                f"download it on a machine with internet access and put it in {path.parent} (or set D4RL_DATASET_DIR)"
            ) from None
        with response, open(staging, "wb") as out:
            expected = int(response.headers.get("Content-Length") or 0) or None
            received = copy_body(response, out, expected, chunk, desc=f"downloading {path.name}")
        if expected is not None and received != expected:
            raise UsageError(
                f"download of {url} ended after {received} of {expected} bytes; nothing was kept, run again"
            )
        open_hdf5(staging, url)  # a complete file that is not HDF5 (an error page) is refused here
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def copy_body(response, out, expected, chunk: int, desc: str) -> int:
    received = 0
    with progress_bar(expected, desc=desc, unit="B", unit_scale=True) as bar:
        while True:
            if stop_requested:
                raise stop_error(stop_requested[0], f"the download into {out.name} was abandoned")
            try:
                block = response.read(chunk)
            except (OSError, TimeoutError):  # a dropped connection: the size check below refuses the file
                break
            if not block:
                break
            out.write(block)
            received += len(block)
            bar.update(len(block))
    return received


def stop_error(signum: int, what: str) -> Preempted:
    return Preempted(signum, note=f"{what}; nothing half-written is kept")


def open_hdf5(path: Path, source: str):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise UsageError(
            f"{source} is not a readable HDF5 file ({str(e).splitlines()[0][:120]}); delete {path} and run again"
        ) from None


# ---------------------------------------------------------------------------------------
# Reading and checking the arrays
# ---------------------------------------------------------------------------------------
def read_file(path: Path, obs_dim: int, act_dim: int) -> dict[str, np.ndarray]:
    """The arrays qlearning_dataset reads (and `timeouts` when present), checked: every key there, rewards and
    terminals of shape (N,) or (N, 1) (D4RL's get_dataset flattens them), sizes that fit the environment."""
    with open_hdf5(path, str(path)) as f:
        missing = [key for key in REQUIRED_KEYS if key not in f]
        if missing:
            raise UsageError(f"D4RL file {path} lacks {', '.join(missing)}; delete it and download it again")
        try:
            data = {key: f[key][()] for key in (*REQUIRED_KEYS, "timeouts") if key in f}
        except Exception as e:  # a truncated or damaged dataset inside an openable file
            raise UsageError(f"D4RL file {path} cannot be read ({str(e).splitlines()[0][:120]}); delete it") from None
    n = len(data["observations"])
    for key in ("rewards", "terminals", "timeouts"):
        if key in data and data[key].shape in ((n, 1),):
            data[key] = data[key][:, 0]
    shapes = {"observations": (n, obs_dim), "actions": (n, act_dim), "rewards": (n,), "terminals": (n,)}
    shapes.update({"timeouts": (n,)} if "timeouts" in data else {})
    for key, shape in shapes.items():
        if data[key].shape != shape:
            raise UsageError(
                f"D4RL file {path}: {key} has shape {data[key].shape}, the environment needs {shape} "
                f"({obs_dim} observation and {act_dim} action values per step)"
            )
    for key in ("observations", "actions", "rewards"):
        if not np.isfinite(data[key]).all():
            raise UsageError(f"D4RL file {path} has NaN or infinite values in {key}")
    return data


# ---------------------------------------------------------------------------------------
# qlearning_dataset's transitions, as episodes
# ---------------------------------------------------------------------------------------
def kept_steps(terminals: np.ndarray, timeouts: np.ndarray | None) -> np.ndarray:
    """Which rows i in 0..N-2 qlearning_dataset (terminate_on_end=False) keeps as the transition
    (observations[i], actions[i], rewards[i], observations[i+1], terminals[i]); the last row never is one.
    With timeouts (v2): every row but those with timeouts[i]. Without (v0): a step counter, dropping the step
    where it reads MAX_EPISODE_STEPS - 1. A drop resets it to 0; a terminal resets it to 0 and is then counted
    like every kept step, so the next episode starts at 1 and its drop comes one step early (D4RL's quirk)."""
    n = len(terminals)
    if timeouts is not None:
        return np.flatnonzero(~timeouts[: n - 1].astype(bool))
    kept, counter = [], 0
    for i in range(n - 1):
        if counter == MAX_EPISODE_STEPS - 1:
            counter = 0
            continue
        if terminals[i]:
            counter = 0
        kept.append(i)
        counter += 1
    return np.asarray(kept, dtype=np.int64)


def episode_bounds(kept: np.ndarray, terminals: np.ndarray):
    """[(first, last)] row ranges of consecutive kept rows, also cut after each terminal: within one range each
    transition's next observation is the following transition's observation, so a Minari episode holds it."""
    if len(kept) == 0:
        return []
    cut = (np.diff(kept) != 1) | terminals[kept[:-1]].astype(bool)
    starts = np.concatenate([[0], np.flatnonzero(cut) + 1])
    ends = np.concatenate([starts[1:] - 1, [len(kept) - 1]])
    return [(int(kept[s]), int(kept[e])) for s, e in zip(starts, ends)]


def to_episodes(data: dict[str, np.ndarray]):
    """Minari EpisodeBuffers whose transitions, read in order, are qlearning_dataset's. A terminal episode's
    last observation is the next row (D4RL pairs it so; never bootstrapped). An episode that ends otherwise
    (a dropped time-out step, or the file's end) is marked truncated. Values are cast to float32 as D4RL does."""
    from minari.data_collector import EpisodeBuffer

    terminals = data["terminals"].astype(bool)
    kept = kept_steps(terminals, data.get("timeouts"))
    obs = data["observations"].astype(np.float32).astype(np.float64)  # float64: the Box space's dtype
    actions = data["actions"].astype(np.float32)
    rewards = data["rewards"].astype(np.float32).astype(np.float64)
    episodes = []
    for first, last in episode_bounds(kept, terminals):
        if stop_requested:
            raise stop_error(stop_requested[0], "the conversion was abandoned")
        rows = slice(first, last + 1)
        ends = np.zeros(last + 1 - first, bool)
        ends[-1] = not terminals[last]
        episodes.append(
            EpisodeBuffer(
                id=len(episodes),
                observations=obs[first : last + 2],
                actions=actions[rows],
                rewards=rewards[rows],
                terminations=terminals[rows],
                truncations=ends,
            )
        )
    return episodes


def describe(env: str, name: str, version: str) -> str:
    return (
        f"D4RL {d4rl_id(env, name, version)} ({url_of(env, name, version)}) converted at {time.strftime('%Y-%m-%d')} "
        f"with d4rl.qlearning_dataset's rule, episodes split after terminals and around dropped time-out steps"
    )
