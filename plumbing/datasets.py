"""Minari datasets: resolve an id, load it (convert D4RL's file, download, or build on first use), check it,
recover its environments, summarize it, and its reference scores for D4RL normalization.

--dataset random/medium/medium-replay/medium-expert/expert is D4RL's file (plumbing/d4rl.py), converted once
into local/d4rl/<env>-<name>-<version>. Built here without network: uniform-random (a uniform random policy)
and minari-medium-expert (Minari's medium + expert). redq-medium-replay needs a behavior agent's replay
buffer: `baselines/redq.py --export-replay` writes it. Minari's own data: --dataset-id mujoco/<env>/<name>-v0.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import shutil
import socket
import sys
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import gymnasium as gym
import numpy as np

from plumbing import d4rl
from plumbing.errors import Preempted, UsageError, stop_raises, stop_requested
from plumbing.runtime import progress_bar

ENV_IDS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5", "ant": "Ant-v5"}
# D4RL's reference returns (random policy, expert policy): Minari's mujoco/*-v0 datasets carry none.
D4RL_REF_SCORES = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}
# Built here, under names that cannot be mistaken for D4RL's: local/<env>/<name>-v0.
LOCAL_DATASETS = ("uniform-random", "minari-medium-expert", "redq-medium-replay")
DEFAULT_RANDOM_STEPS = 1_000_000  # as many steps as D4RL's random datasets
DATASET_ID = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*-v\d+")  # Minari's (namespace/)name-v(version)
STAGING = ".staging"


def datasets_root() -> Path:
    root = Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))
    if root.exists() and not root.is_dir():
        raise UsageError(f"MINARI_DATASETS_PATH={root} is not a folder; point it at the folder that holds datasets")
    return root


def dataset_path(dataset_id: str) -> Path:
    """The dataset's folder, refusing ids that would leave the datasets root."""
    if not DATASET_ID.fullmatch(dataset_id) or any(part in ("", ".", "..") for part in dataset_id.split("/")):
        raise UsageError(
            f"dataset id {dataset_id!r} is not a Minari id like mujoco/hopper/medium-v0 "
            f"(letters, digits, '_', '.', '-', '/'-separated, ending in -v<version>)"
        )
    return datasets_root() / dataset_id


def resolve_dataset_id(
    env: str, dataset: str, dataset_id: str | None, random_steps: int, d4rl_version: str = "v0"
) -> str:
    """--dataset-id as given, else the id of --env/--dataset: D4RL's under local/d4rl/, built ones under local/."""
    if dataset_id is not None:
        dataset_path(dataset_id)
        return dataset_id
    if dataset in d4rl.NAMES:
        d4rl.check_env(env, dataset)
        return d4rl.local_id(env, dataset, d4rl_version)
    if dataset == "uniform-random" and random_steps != DEFAULT_RANDOM_STEPS:  # a smaller one gets its own id
        return f"local/{env}/uniform-random-{random_steps}steps-v0"
    return f"local/{env}/{dataset}-v0"


def env_name_of(env_id: str) -> str:
    """'Walker2d-v5' -> 'walker2d'."""
    return re.sub(r"-v\d+$", "", env_id.split("/")[-1]).lower()


def dataset_name_of(dataset_id: str) -> str:
    """'mujoco/hopper/medium-v0' -> 'medium'."""
    return re.sub(r"-v\d+$", "", dataset_id.split("/")[-1])


# ---------------------------------------------------------------------------------------
# Loading, downloading, building
# ---------------------------------------------------------------------------------------
def load_dataset(dataset_id: str):
    """The Minari dataset dataset_id: from disk, else downloaded (remote ids) or built (local/ recipes)."""
    path = dataset_path(dataset_id)
    if not (path / "data").is_dir():
        obtain_dataset(dataset_id)
    return open_dataset(dataset_id)


def open_dataset(dataset_id: str):
    """minari.load_dataset with every way a folder can be broken reported as one line."""
    import minari

    path = dataset_path(dataset_id) / "data"
    if not (path / "metadata.json").is_file():
        raise UsageError(
            f"dataset {dataset_id}: {path} has no metadata.json (an incomplete copy?); "
            f"delete {path.parent} to download or build it again"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = minari.load_dataset(dataset_id)
            num_episodes = dataset.total_episodes
            if num_episodes:  # reads the episode file, so a truncated one or a lost last episode shows here
                list(dataset.iterate_episodes([0, num_episodes - 1]))
    except Exception as e:  # h5py, json and Minari errors alike
        raise UsageError(
            f"dataset {dataset_id} in {path.parent} cannot be read ({one_line(e)}); "
            f"delete the folder to download or build it again"
        ) from None
    if num_episodes == 0:
        raise UsageError(f"dataset {dataset_id} has no episodes")
    return dataset


def obtain_dataset(dataset_id: str) -> None:
    """Download a remote dataset, or build a local one from D4RL's recipes."""
    import minari

    parts = dataset_id.split("/")
    env_name, name = (parts[1] if len(parts) == 3 else None), parts[-1]
    check_datasets_root(dataset_id)
    random_recipe = re.fullmatch(r"uniform-random(?:-([1-9]\d*)steps)?-v0", name)
    if parts[0] != "local":
        download_dataset(dataset_id)
    elif d4rl.parse_local_id(dataset_id):
        convert_d4rl(dataset_id, *d4rl.parse_local_id(dataset_id))
    elif random_recipe and env_name in ENV_IDS:
        build_random_dataset(dataset_id, ENV_IDS[env_name], int(random_recipe.group(1) or DEFAULT_RANDOM_STEPS))
    elif name == "minari-medium-expert-v0" and env_name in ENV_IDS:
        sources = [load_dataset(f"mujoco/{env_name}/{part}-v0") for part in ("medium", "expert")]
        with staged_dataset(dataset_id), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            combined = minari.combine_datasets(sources, new_dataset_id=dataset_id)
            ref = D4RL_REF_SCORES[env_name]  # combine_datasets drops the reference scores
            summary = summarize(combined, ref)
            combined.storage.update_metadata(
                {"ref_min_score": ref[0], "ref_max_score": ref[1], **summary_meta(summary)}
            )
    elif name == "redq-medium-replay-v0":
        raise UsageError(
            f"dataset {dataset_id} does not exist: D4RL's medium-replay recipe needs the replay buffer of a behavior "
            f"agent; build it with `python baselines/redq.py --export-replay {dataset_id} ...` (docs/datasets.md), "
            f"or use D4RL's own file with --dataset medium-replay"
        )
    else:
        local = sorted(str(p.parent.relative_to(datasets_root())) for p in datasets_root().glob("local/**/data"))
        close = difflib.get_close_matches(dataset_id, local, n=3)
        raise UsageError(
            f"local dataset {dataset_id} not found in {datasets_root()} (local ids are never downloaded"
            + (
                f"; did you mean {' or '.join(close)}?)"
                if close
                else f"; {len(local)} local datasets there; set MINARI_DATASETS_PATH or build it)"
            )
        )


def download_dataset(dataset_id: str) -> None:
    import minari

    try:
        with staged_dataset(dataset_id):
            minari.download_dataset(dataset_id)
    except (UsageError, Preempted):
        raise
    except Exception as e:  # no network, unknown id, server error: all end the same way
        raise UsageError(
            f"dataset {dataset_id} is not in {datasets_root()} and could not be downloaded ({one_line(e)}); "
            f"on a machine with internet access run `minari download {dataset_id}` and copy "
            f"~/.minari/datasets/{dataset_id} into {datasets_root()}"
        ) from None


def check_datasets_root(dataset_id: str) -> None:
    """A dataset about to be downloaded or built can be written into the datasets root: checked before the work
    (a read-only root would otherwise fail after it)."""
    root = datasets_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=root, prefix=f"{STAGING}-{socket.gethostname()}-{os.getpid()}-"))
    except OSError as e:
        raise UsageError(
            f"dataset {dataset_id} is not in {root} and cannot be written there ({e.strerror}); "
            f"set MINARI_DATASETS_PATH to a writable folder, or copy the dataset there"
        ) from None


@contextlib.contextmanager
def staged_dataset(dataset_id: str):
    """Write a dataset in a scratch folder and move it into place only once complete, so an interrupted
    download or build never leaves a half-written dataset. Scratch folders of dead builds are removed.
    A stop signal ends the work inside at once (Preempted): the scratch folder goes, nothing else changes."""
    root = datasets_root()
    check_datasets_root(dataset_id)
    remove_dead_staging(root)
    scratch = Path(tempfile.mkdtemp(dir=root, prefix=f"{STAGING}-{socket.gethostname()}-{os.getpid()}-"))
    (scratch / dataset_id).parent.mkdir(parents=True, exist_ok=True)
    os.environ["MINARI_DATASETS_PATH"] = str(scratch)
    try:
        with stop_raises(stopped_note(dataset_id)):
            yield
        (root / dataset_id).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(scratch / dataset_id, root / dataset_id)
        except OSError as e:  # a parallel run finished the same dataset first (keep its copy), or a stray folder
            if not (root / dataset_id / "data" / "metadata.json").is_file():
                raise UsageError(
                    f"dataset {dataset_id}: cannot move it into {root / dataset_id} ({e.strerror}); "
                    f"that folder holds no dataset: delete it and try again"
                ) from None
    finally:
        os.environ["MINARI_DATASETS_PATH"] = str(root)
        shutil.rmtree(scratch, ignore_errors=True)


def remove_dead_staging(root: Path) -> None:
    """Scratch folders named .staging-<host>-<pid>-* whose process on this host is gone."""
    host = socket.gethostname()
    for folder in root.glob(f"{STAGING}-*"):
        match = re.fullmatch(rf"{re.escape(STAGING)}-(.+)-(\d+)-[^-]+", folder.name)
        if match and match.group(1) == host and not process_alive(int(match.group(2))):
            shutil.rmtree(folder, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stopped_note(dataset_id: str) -> str:
    return f"dataset {dataset_id} was not finished and nothing of it was kept; the next run obtains it again"


def build_random_dataset(dataset_id: str, env_id: str, num_steps: int, seed: int = 0) -> None:
    """D4RL's random recipe: a uniform random policy for num_steps steps, stored episode by episode.
    A stop signal (SIGTERM, SIGUSR1) ends it within a step: Preempted, nothing written."""
    from minari.data_collector import EpisodeBuffer

    env = gym.make(env_id)
    env.action_space.seed(seed)
    episodes, steps = [], 0
    with progress_bar(num_steps, desc=f"building {dataset_id}", unit="step") as bar:
        while steps < num_steps:
            obs, _ = env.reset(seed=seed if not episodes else None)
            ep = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
            terminated = truncated = False
            while not (terminated or truncated) and steps < num_steps:
                if stop_requested:
                    raise Preempted(stop_requested[0], stopped_note(dataset_id))
                action = env.action_space.sample()
                obs, reward, terminated, truncated, _ = env.step(action)
                for key, value in zip(ep, (obs, action, reward, terminated, truncated)):
                    ep[key].append(value)
                steps += 1
            ep["truncations"][-1] = not terminated  # the budget cut the last episode: a time-out, not a termination
            episodes.append(EpisodeBuffer(id=len(episodes), **{k: np.asarray(v) for k, v in ep.items()}))
            bar.update(len(ep["rewards"]))
    write_dataset(
        dataset_id,
        episodes,
        env_id,
        algorithm_name="uniform random policy (not D4RL's random data: a randomly initialized policy's rollouts)",
        description=f"{num_steps} steps of uniformly random actions in {env_id}",
    )


def write_dataset(
    dataset_id, episodes, env_id, algorithm_name, description, ref_min=None, ref_max=None, extra_metadata=None
) -> None:
    """Minari EpisodeBuffers as dataset_id, written through a staging folder, with the summary of its episodes
    (and extra_metadata) in its metadata: written now, never later into an existing dataset."""
    import minari

    dataset_path(dataset_id)
    print(f"writing {dataset_id}: {len(episodes)} episodes ...", file=sys.stderr)
    env_name = env_name_of(env_id)
    ref = (ref_min, ref_max) if ref_min is not None and ref_max is not None else D4RL_REF_SCORES.get(env_name)
    returns = np.array([float(np.sum(ep.rewards)) for ep in episodes])
    summary = summary_of(returns, sum(len(ep.rewards) for ep in episodes), ref)
    with staged_dataset(dataset_id), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Minari warns about unset author/permalink fields, gymnasium about v4
        dataset = minari.create_dataset_from_buffers(
            dataset_id,
            episodes,
            env=env_id,
            algorithm_name=algorithm_name,
            description=description,
            ref_min_score=ref_min,
            ref_max_score=ref_max,
        )
        dataset.storage.update_metadata({**summary_meta(summary), **(extra_metadata or {})})


def convert_d4rl(dataset_id: str, env_name: str, name: str, version: str) -> None:
    """D4RL's file (from D4RL's cache, else downloaded) as the Minari dataset dataset_id, once: the transitions
    of d4rl.qlearning_dataset, on the Gymnasium environment with D4RL's MuJoCo model (v4)."""
    env_id = d4rl.ENV_IDS[env_name]
    with v4_quiet():
        env = gym.make(env_id)
    path = d4rl.obtain_file(env_name, name, version)
    data = d4rl.read_file(path, env.observation_space.shape[0], env.action_space.shape[0])
    episodes = d4rl.to_episodes(data)
    if not episodes:
        raise UsageError(f"D4RL file {path} holds no transition")
    ref_min, ref_max = D4RL_REF_SCORES[env_name]
    write_dataset(
        dataset_id,
        episodes,
        env_id,
        algorithm_name=f"D4RL {d4rl.d4rl_id(env_name, name, version)}",
        description=d4rl.describe(env_name, name, version),
        ref_min=ref_min,
        ref_max=ref_max,
        extra_metadata={
            "d4rl_id": d4rl.d4rl_id(env_name, name, version),
            "source_url": d4rl.url_of(env_name, name, version),
            "source_rows": len(data["rewards"]),
        },
    )


@contextlib.contextmanager
def v4_quiet():
    """Gymnasium calls *-v4 out of date; they are kept on purpose: D4RL's data was recorded on their models."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is out of date", category=DeprecationWarning)
        yield


# ---------------------------------------------------------------------------------------
# Know your data: the episodes as stored, which are what the method trains on
# ---------------------------------------------------------------------------------------
def summary_of(returns: np.ndarray, transitions: int, ref) -> dict:
    """Episodes, transitions, mean/min/max episode return, and the mean's D4RL-normalized score (x100)."""
    summary = {
        "episodes": len(returns),
        "transitions": int(transitions),
        "return_mean": float(np.mean(returns)) if len(returns) else float("nan"),
        "return_min": float(np.min(returns)) if len(returns) else float("nan"),
        "return_max": float(np.max(returns)) if len(returns) else float("nan"),
        "normalized_score_mean": None,
    }
    if ref is not None and ref[0] is not None and ref[1] is not None:
        summary["normalized_score_mean"] = 100 * (summary["return_mean"] - ref[0]) / (ref[1] - ref[0])
    return summary


def summarize(dataset, ref) -> dict:
    returns = np.array([float(np.sum(ep.rewards)) for ep in dataset.iterate_episodes()])
    return summary_of(returns, dataset.total_steps, ref)


def summary_meta(summary: dict) -> dict:
    return {"dataset_summary": summary}


def summary_line(summary: dict) -> str:
    score = summary["normalized_score_mean"]
    return (
        f"{summary['episodes']} episodes, {summary['transitions']} transitions; episode return mean "
        f"{summary['return_mean']:.6g} (min {summary['return_min']:.6g}, max {summary['return_max']:.6g})"
        + (f", normalized {score:.1f}" if score is not None else "")
    )


# ---------------------------------------------------------------------------------------
# Environments, checks and reference scores
# ---------------------------------------------------------------------------------------
def dataset_env_name(dataset, dataset_id: str, fallback: str) -> str:
    """The task a dataset belongs to: its recorded env spec, else its namespace (local/hopper/...), else --env."""
    if dataset.spec.env_spec is not None:
        return env_name_of(dataset.spec.env_spec.id)
    parts = dataset_id.split("/")
    return parts[1] if len(parts) == 3 and parts[1] in ENV_IDS else fallback


def make_envs(dataset, dataset_id: str, fallback_env: str):
    """(training env, evaluation env) for the dataset, checked against its spaces."""
    if dataset.spec.env_spec is not None:
        with v4_quiet():
            env, eval_env = dataset.recover_environment(), dataset.recover_environment(eval_env=True)
    else:
        name = dataset_env_name(dataset, dataset_id, fallback_env)
        env, eval_env = gym.make(ENV_IDS[name]), gym.make(ENV_IDS[name])
    for kind in ("observation_space", "action_space"):
        data_space, env_space = getattr(dataset, kind), getattr(env, kind)
        if not isinstance(env_space, gym.spaces.Box) or data_space.shape != env_space.shape:
            raise UsageError(f"dataset {dataset_id}: {kind} {data_space} does not match {env.spec.id}'s {env_space}")
    return env, eval_env


def check_transitions(data: dict, dataset_id: str, action_space, tolerance: float = 1e-3) -> None:
    """Reject NaN/infinite values and actions outside the environment's bounds."""
    for key, value in data.items():
        if not np.isfinite(value).all():
            raise UsageError(f"dataset {dataset_id} has NaN or infinite values in {key}")
    actions = data["actions"]
    if len(actions) == 0:
        raise UsageError(f"dataset {dataset_id} has no transitions")
    low, high = actions.min(axis=0), actions.max(axis=0)
    if (low < action_space.low - tolerance).any() or (high > action_space.high + tolerance).any():
        raise UsageError(
            f"dataset {dataset_id}: actions span [{low.min():.3g}, {high.max():.3g}], outside the "
            f"environment's bounds [{action_space.low.min():.3g}, {action_space.high.max():.3g}]"
        )


def reference_scores(dataset, env_name: str, ref_min: float | None, ref_max: float | None):
    """(ref_min, ref_max, source): each end from its flag, else the dataset's metadata, else D4RL's table."""
    metadata = dataset.storage.metadata if dataset is not None else {}
    return choose_reference_scores(
        env_name, ref_min, ref_max, metadata.get("ref_min_score"), metadata.get("ref_max_score")
    )


def choose_reference_scores(env_name, flag_min, flag_max, meta_min=None, meta_max=None):
    d4rl = D4RL_REF_SCORES.get(env_name, (None, None))
    ends = []
    for candidates in (
        [(flag_min, "flags"), (meta_min, "dataset metadata"), (d4rl[0], "D4RL table")],
        [(flag_max, "flags"), (meta_max, "dataset metadata"), (d4rl[1], "D4RL table")],
    ):
        value, source = next(((v, s) for v, s in candidates if v is not None), (None, None))
        if value is None:
            raise UsageError(f"no reference scores for {env_name}: pass --ref-min-score and --ref-max-score")
        ends.append((float(value), source))
    (low, low_source), (high, high_source) = ends
    if not high > low:
        raise UsageError(f"reference scores must satisfy min < max, got {low} and {high}")
    return low, high, low_source if low_source == high_source else f"{low_source} (min), {high_source} (max)"


class Task(NamedTuple):
    """What a run trains on: the dataset, its environments, and the reference scores of D4RL normalization."""

    dataset_id: str
    dataset: object  # minari.MinariDataset
    env: gym.Env
    eval_env: gym.Env
    env_name: str  # 'hopper'
    dataset_name: str  # 'medium' (D4RL v0), 'medium-v2', 'uniform-random-400steps', ...
    ref: tuple  # (return normalized to 0, return normalized to 1)
    ref_source: str
    summary: dict | None = None  # the stored episodes: counts, returns, the mean's normalized score (x100)
    source: dict | None = None  # D4RL's id and file URL for converted D4RL data

    def normalized(self, episode_return):
        """D4RL normalization as a fraction: 0 = random policy, 1 = expert."""
        return (episode_return - self.ref[0]) / (self.ref[1] - self.ref[0])


def warn_if_the_data_reach(summary: dict, target_return: float | None) -> None:
    """R_target (a fraction): warn when the data's mean return already reaches it, where Eq. 2 cannot lower alpha."""
    if target_return is not None and summary["normalized_score_mean"] >= 100 * target_return:
        print(
            f"warning: the dataset's mean return already scores {summary['normalized_score_mean']:.1f} >= R_target "
            f"= {100 * target_return:.4g}: Eq. 2's P term cannot lower alpha on data this good",
            file=sys.stderr,
        )


def open_task(args, target_return: float | None = None) -> Task:
    """The dataset of --env/--dataset (or --dataset-id), loaded or obtained, its environments, reference scores and
    summary. target_return (R_target, a fraction): warn when the data's mean return already reaches it."""
    version = getattr(args, "d4rl_version", "v0")
    dataset_id = resolve_dataset_id(args.env, args.dataset, args.dataset_id, args.random_dataset_steps, version)
    dataset = load_dataset(dataset_id)
    env, eval_env = make_envs(dataset, dataset_id, args.env)
    env_name = dataset_env_name(dataset, dataset_id, args.env)
    ref_min, ref_max, source = reference_scores(dataset, env_name, args.ref_min_score, args.ref_max_score)
    if args.resume:  # config.json holds the values resolved when the run started (and their source)
        source = f"{args.resume}/config.json"
    summary = summarize(dataset, (ref_min, ref_max))
    print(
        f"{dataset_id}: {summary_line(summary)}; {env.spec.id}; "
        f"reference scores {ref_min:.6g} (0) / {ref_max:.6g} (100) from {source}",
        file=sys.stderr,
    )
    warn_if_the_data_reach(summary, target_return)
    d4rl_parts = d4rl.parse_local_id(dataset_id)
    name = dataset_name_of(dataset_id)
    if d4rl_parts:  # 'medium' for the paper's v0, 'medium-v2' for v2: walker2d-random stays 'random...'
        name = d4rl_parts[1] + ("" if d4rl_parts[2] == "v0" else f"-{d4rl_parts[2]}")
    metadata = dataset.storage.metadata
    origin = {k: metadata[k] for k in ("d4rl_id", "source_url") if k in metadata} or None
    ref = (ref_min, ref_max)
    return Task(dataset_id, dataset, env, eval_env, env_name, name, ref, source, summary, origin)


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
