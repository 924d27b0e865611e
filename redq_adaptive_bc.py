"""REDQ+AdaptiveBC: offline-to-online reinforcement learning with adaptive behavior cloning.

Paper: Y. Zhao, R. Boney, A. Ilin, J. Kannala, J. Pajarinen, "Adaptive Behavior Cloning
Regularization for Stable Offline-to-Online Reinforcement Learning" (arXiv:2210.13846).

The method in three parts:

1. Offline pre-training (K gradient steps on a fixed dataset): TD3+BC whose critic is a
   randomized ensemble of N Q-functions (REDQ). Every critic regresses to the same target,
   built from the minimum over a random subset M of the N target critics (Eq. 3):

       a' = clip(pi'(s') + clip(eps, -c, c), a_low, a_high),   eps ~ N(0, sigma_target)
       y  = r + gamma * (1 - terminal) * min_{i in M} Q'_i(s', a')

   The actor maximizes the ensemble mean Qbar, normalized as in TD3+BC, plus a behavior
   cloning term with weight alpha (Eq. 1 and 4):

       L(pi) = -mean(Qbar(s, pi(s))) / mean(|Qbar(s, pi(s))|) + alpha * mean((pi(s) - a)^2)

2. The switch: keep a random 5% of the offline transitions, free the rest, so that fresh
   online data is not drowned in offline samples.

3. Online fine-tuning (T environment steps, G gradient steps each). At the end of every
   training episode a PD controller moves alpha_online from the normalized episode return
   (Eq. 2), lowering the BC weight while the agent is below target and raising it when the
   return drops:

       delta = K_P * (R_current - R_target) + K_D * max(0, R_last - R_current)
       alpha_online <- clip(alpha_online + delta, 0, alpha_offline)

   As in the authors' code, delta is multiplied by the episode's length (see README).

Run:
    python redq_adaptive_bc.py --env hopper --dataset medium
    python redq_adaptive_bc.py --help      # every hyperparameter of the paper's Table 1
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from tqdm import tqdm

METHOD = "redq_adaptive_bc"
ENV_IDS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5", "ant": "Ant-v5"}
# D4RL's reference returns (random policy, expert policy) used to normalize scores when a
# dataset's metadata carries none (Minari's mujoco/*-v0 datasets carry none).
D4RL_REF_SCORES = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}
REMOTE_DATASETS = ("medium", "expert", "simple")  # on Minari's server as mujoco/<env>/<name>-v0


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------
@dataclass
class Args:
    # Experiment
    env: Literal["hopper", "halfcheetah", "walker2d", "ant"] = "hopper"
    """MuJoCo task (Gymnasium v5)"""
    dataset: Literal["random", "medium", "medium-replay", "medium-expert", "expert", "simple"] = "medium"
    """offline dataset (random and medium-expert are built locally on first use)"""
    dataset_id: Optional[str] = None
    """any Minari dataset id; overrides --env and --dataset"""
    seed: int = 0
    """random seed (the evaluation environment uses seed + 100)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """torch device; auto picks cuda when available"""
    output_dir: str = "runs"
    """runs are written to <output-dir>/<env>-<dataset>__<method>__<seed>__<unix time>/"""

    # Schedule
    offline_steps: int = 1_000_000
    """K, offline gradient steps (paper: 1M)"""
    online_steps: int = 250_000
    """T, online environment steps (paper: 250k)"""
    eval_every: int = 5_000
    """evaluate every this many gradient steps offline / environment steps online (paper: 5000)"""
    eval_episodes: int = 10
    """episodes per evaluation (paper: 10)"""

    # Table 1: TD3
    learning_rate: float = 3e-4
    """Adam learning rate of actor and critics (Table 1: 3e-4)"""
    batch_size: int = 256
    """B, mini-batch size (Table 1: 256)"""
    tau: float = 5e-3
    """target network update rate (Table 1: 5e-3)"""
    gamma: float = 0.99
    """discount factor"""
    policy_noise: float = 0.2
    """sigma_target, std of the target smoothing noise (TD3 and the authors' code: 0.2)"""
    noise_clip: float = 0.5
    """c, clip of the target smoothing noise (Table 1: 0.5)"""
    exploration_noise: float = 0.1
    """sigma_expl, std of the online exploration noise (Table 1's 'policy noise std 0.1')"""
    policy_freq: int = 2
    """one actor update every this many critic updates (Table 1: 2)"""
    hidden_layers: int = 2
    """hidden layers of actor and critics (Table 1: 2)"""
    hidden_dim: int = 256
    """units per hidden layer (Table 1: 256)"""
    activation: Literal["relu", "tanh", "elu", "gelu"] = "relu"
    """hidden activation (Table 1: ReLU)"""

    # Table 1: REDQ
    num_critics: int = 10
    """N, critics in the ensemble (Table 1: 10)"""
    num_min_critics: int = 2
    """M, randomly drawn critics whose minimum forms the target (Table 1: 2)"""
    utd: int = 20
    """G, gradient steps per online environment step (Table 1: 20; authors' code: 10)"""

    # Table 1: behavior cloning
    alpha_offline: Optional[float] = None
    """alpha_offline, BC weight in pre-training and upper bound online (Table 1: 0.4; None = 0.4, or 100 on walker2d-random as in the paper)"""
    kp: float = 3e-5
    """K_P, proportional gain of Eq. 2 (Table 1: 3e-5)"""
    kd: float = 8e-5
    """K_D, derivative gain of Eq. 2 (Table 1: 8e-5; authors' code: 1e-4)"""
    target_return: float = 1.0
    """R_target, normalized target return of Eq. 2 (paper: 1.0 = expert; authors' code: 1.05)"""

    # Fine-tuning
    adaptive_bc: bool = True
    """adapt alpha_online with Eq. 2; --no-adaptive-bc keeps it fixed"""
    alpha_online: Optional[float] = None
    """alpha_online at the start of fine-tuning, and its fixed value without adaptation (None = alpha_offline)"""
    scale_by_episode_length: bool = True
    """multiply Eq. 2's increment by the episode length, as the authors' code does (README)"""
    r_last_smoothing: float = 1.0
    """R_last <- s*R_current + (1-s)*R_last; 1.0 = the previous episode (paper), 0.05 = authors' moving average"""
    keep_ratio: float = 0.05
    """fraction of the offline data kept for fine-tuning (paper: 0.05)"""
    keep_min: int = 50_000
    """keep at least this many offline transitions (authors' code: 50k; 0 = the ratio alone)"""
    keep_with_replacement: bool = False
    """draw the kept transitions with replacement, as the authors' code does"""
    buffer_size: Optional[int] = None
    """FIFO replay capacity online (None = online-steps, enlarged to hold the kept data if needed)"""
    delay_target_updates: bool = False
    """update target networks only on actor-update steps (authors' code) instead of every step (paper)"""
    critic_loss_reduction: Literal["sum", "mean"] = "sum"
    """sum the N critics' squared errors (each critic its own MSE) or average them (authors' code)"""

    # Data and checkpoints
    random_dataset_steps: int = 1_000_000
    """size of the locally built random dataset (D4RL: 1M; other sizes get the id local/<env>/random-<n>steps-v0)"""
    ref_min_score: Optional[float] = None
    """return that normalizes to 0 (default: dataset metadata, else D4RL's random score)"""
    ref_max_score: Optional[float] = None
    """return that normalizes to 100 (default: dataset metadata, else D4RL's expert score)"""
    load_offline: Optional[str] = None
    """path to an offline.pt: skip pre-training and fine-tune that agent"""
    compile: bool = False
    """torch.compile the gradient step (CUDA: also CUDA graphs); same results, faster on GPU (README)"""
    checkpoint_every: int = 50_000
    """write a resumable latest.pt every this many gradient steps offline / env steps online (at the episode's end)"""
    resume: Optional[str] = None
    """a run folder to continue from its latest.pt, with the arguments in its config.json (other flags are ignored)"""


class UsageError(Exception):
    """Bad input: reported as one line on stderr with exit status 2, before any work starts."""


def parse_args(argv: Optional[list[str]] = None) -> Args:
    """tyro.cli, with tyro's boxed error message folded into one line (exit status 2)."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = tyro.cli(Args, args=argv, description=__doc__.split("\n\n")[0])
    except SystemExit as e:
        if e.code not in (0, None):
            print("error: " + tyro_error_line(captured.getvalue()), file=sys.stderr)
        raise
    if args.resume is not None:
        args = resumed_args(args.resume)
    check_args(args)
    return args


def resumed_args(run_dir) -> Args:
    """The arguments a run folder was started with, to continue it."""
    try:
        config = json.loads((Path(run_dir) / "config.json").read_text())
        if isinstance(config, dict) and config.get("method") not in (METHOD, None):
            raise UsageError(f"--resume: {run_dir} is a run of {config['method']}, not {METHOD}")
        fields = {name: config[name] for name in Args.__dataclass_fields__ if name != "resume"}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--resume: {run_dir} is not a run folder of this script ({type(e).__name__})") from None
    return Args(**fields, resume=str(run_dir))


def tyro_error_line(text):
    """The message in tyro's error box, drawn in Unicode (title in the top border) or in ASCII
    (title, rule, message) when stderr cannot encode Unicode."""
    sections = [[]]
    for line in text.splitlines():
        content = line.strip().strip("│|").strip()
        if content[:1] in ("╭", "╰"):
            continue
        if content and set(content) <= set("─-"):
            sections.append([])
        elif content:
            sections[-1].append(content)
    message = sections[1] if "╭" not in text and len(sections) > 1 else sections[0]
    return " ".join(message) or text.strip()


def check_args(args: Args) -> None:
    positive = ["offline_steps", "online_steps", "eval_every", "eval_episodes", "batch_size", "policy_freq",
                "hidden_layers", "hidden_dim", "num_critics", "num_min_critics", "utd", "random_dataset_steps",
                "checkpoint_every"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.num_min_critics > args.num_critics:
        raise UsageError(f"--num-min-critics (M={args.num_min_critics}) must be at most --num-critics (N={args.num_critics})")
    if not 0 < args.keep_ratio <= 1:
        raise UsageError(f"--keep-ratio must be in (0, 1], got {args.keep_ratio}")
    if not 0 < args.r_last_smoothing <= 1:
        raise UsageError(f"--r-last-smoothing must be in (0, 1], got {args.r_last_smoothing}")
    if not 0 < args.tau <= 1 or not 0 <= args.gamma <= 1:
        raise UsageError(f"--tau must be in (0, 1] and --gamma in [0, 1], got {args.tau} and {args.gamma}")
    if args.buffer_size is not None and args.buffer_size <= 0:
        raise UsageError(f"--buffer-size must be positive, got {args.buffer_size}")
    for name in ["learning_rate", "policy_noise", "noise_clip", "exploration_noise", "kp", "kd", "keep_min",
                 "alpha_offline", "alpha_online"]:
        value = getattr(args, name)
        if value is not None and (not math.isfinite(value) or value < 0 or (name == "learning_rate" and value == 0)):
            raise UsageError(f"--{name.replace('_', '-')} must be a {'positive' if name == 'learning_rate' else 'non-negative'} number, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    if args.load_offline is not None and not Path(args.load_offline).is_file():
        raise UsageError(f"--load-offline: no such file: {args.load_offline}")


# ---------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU}


class Actor(nn.Module):
    """Deterministic policy pi(s): an MLP with a tanh output scaled to the action bounds."""

    def __init__(self, obs_dim, act_dim, action_low, action_high, hidden_dim=256, hidden_layers=2, activation="relu"):
        super().__init__()
        layers, width = [], obs_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden_dim), ACTIVATIONS[activation]()]
            width = hidden_dim
        self.net = nn.Sequential(*layers, nn.Linear(width, act_dim), nn.Tanh())
        low, high = torch.as_tensor(action_low, dtype=torch.float32), torch.as_tensor(action_high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)

    def forward(self, obs):
        return self.net(obs) * self.action_scale + self.action_bias


class CriticEnsemble(nn.Module):
    """N critics Q_1..Q_N in one module.

    Layer l of all N critics is one weight tensor of shape (N, in, out), so the whole ensemble
    runs as a few batched matrix multiplies instead of a Python loop over critics. Each critic
    is initialized like its own nn.Linear stack, independently of the others.
    """

    def __init__(self, num_critics, obs_dim, act_dim, hidden_dim=256, hidden_layers=2, activation="relu"):
        super().__init__()
        sizes = [obs_dim + act_dim] + [hidden_dim] * hidden_layers + [1]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(num_critics, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_critics, 1, fan_out).uniform_(-bound, bound)))
        self.activation = ACTIVATIONS[activation]()

    def forward(self, obs, action, critic_idx=None):
        """Q-values of shape (N, B), or (len(critic_idx), B) for a subset of the critics."""
        n = len(self.weights[0]) if critic_idx is None else len(critic_idx)
        x = torch.cat([obs, action], dim=-1).expand(n, -1, -1)  # the same (B, in) input for every critic
        num_layers = len(self.weights)
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            if critic_idx is not None:
                weight, bias = weight[critic_idx], bias[critic_idx]
            x = torch.baddbmm(bias, x, weight)
            if layer < num_layers - 1:
                x = self.activation(x)
        return x.squeeze(-1)


# ---------------------------------------------------------------------------------------
# Replay buffer
# ---------------------------------------------------------------------------------------
class Batch(NamedTuple):
    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminals: torch.Tensor  # 1.0 only for a true termination; a time-limit truncation keeps bootstrapping


class ReplayBuffer:
    """Preallocated FIFO ring buffer of transitions, kept as tensors on the training device.

    Once full, each new transition overwrites the oldest one.
    """

    def __init__(self, capacity, obs_dim, act_dim, device):
        self.capacity, self.device = capacity, device
        self.ptr = self.size = 0
        self.data = Batch(
            obs=torch.zeros(capacity, obs_dim, device=device),
            actions=torch.zeros(capacity, act_dim, device=device),
            rewards=torch.zeros(capacity, device=device),
            next_obs=torch.zeros(capacity, obs_dim, device=device),
            terminals=torch.zeros(capacity, device=device),
        )

    def add(self, obs, actions, rewards, next_obs, terminals):
        """Append n transitions (arrays with a leading dimension n)."""
        n = len(rewards)
        idx = (self.ptr + torch.arange(n, device=self.device)) % self.capacity
        for storage, values in zip(self.data, (obs, actions, rewards, next_obs, terminals)):
            storage[idx] = torch.as_tensor(values, dtype=torch.float32, device=self.device)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size) -> Batch:
        idx = torch.randint(0, self.size, (batch_size,), device=self.device)
        return Batch(*(field[idx] for field in self.data))

    def __len__(self):
        return self.size

    def state_dict(self):
        return {"ptr": self.ptr, "size": self.size, **self.data._asdict()}

    def load_state_dict(self, state):
        self.ptr, self.size = state["ptr"], state["size"]
        for name, storage in zip(Batch._fields, self.data):
            storage.copy_(state[name])


def num_kept(dataset_size, keep_ratio, keep_min):
    """How many offline transitions survive the switch: max(ratio x size, floor), capped at the size."""
    return min(dataset_size, max(math.ceil(keep_ratio * dataset_size), keep_min))


def downsample(buffer: ReplayBuffer, capacity, keep_ratio, keep_min, with_replacement, generator) -> ReplayBuffer:
    """The switch to online: a new FIFO buffer holding a uniform random subset of the offline data."""
    k = num_kept(len(buffer), keep_ratio, keep_min)
    if with_replacement:
        keep = torch.randint(0, len(buffer), (k,), generator=generator)
    else:
        keep = torch.randperm(len(buffer), generator=generator)[:k]
    online = ReplayBuffer(capacity, buffer.data.obs.shape[1], buffer.data.actions.shape[1], buffer.device)
    keep = keep.to(buffer.device)
    online.add(*(field[keep] for field in buffer.data))
    return online


# ---------------------------------------------------------------------------------------
# Datasets (Minari) and normalized scores
# ---------------------------------------------------------------------------------------
def datasets_root() -> Path:
    return Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))


def dataset_exists(dataset_id) -> bool:
    return (datasets_root() / dataset_id / "data").is_dir()


def resolve_dataset_id(args: Args) -> str:
    if args.dataset_id is not None:
        return args.dataset_id
    if args.dataset in REMOTE_DATASETS:
        return f"mujoco/{args.env}/{args.dataset}-v0"
    if args.dataset == "random" and args.random_dataset_steps != 1_000_000:  # a smaller one gets its own id
        return f"local/{args.env}/random-{args.random_dataset_steps}steps-v0"
    return f"local/{args.env}/{args.dataset}-v0"


@contextlib.contextmanager
def staged_dataset(dataset_id):
    """Write a dataset in a scratch folder and move it into place only once complete, so an
    interrupted download or build never leaves a half-written dataset that a later run would use."""
    root = datasets_root()
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    (scratch / dataset_id).parent.mkdir(parents=True, exist_ok=True)
    os.environ["MINARI_DATASETS_PATH"] = str(scratch)
    try:
        yield
        (root / dataset_id).parent.mkdir(parents=True, exist_ok=True)
        os.replace(scratch / dataset_id, root / dataset_id)
    finally:
        os.environ["MINARI_DATASETS_PATH"] = str(root)
        shutil.rmtree(scratch, ignore_errors=True)


def get_dataset(dataset_id, args: Args):
    """Load a Minari dataset; download it, or build it D4RL's way, on first use."""
    import minari

    if dataset_exists(dataset_id):
        return minari.load_dataset(dataset_id)
    env_name = dataset_id.split("/")[1] if dataset_id.count("/") == 2 else args.env
    name = dataset_id.split("/")[-1]
    random_recipe = re.fullmatch(r"random(?:-(\d+)steps)?-v0", name)
    if dataset_id.startswith("local/") and random_recipe and env_name in ENV_IDS:
        build_random_dataset(dataset_id, ENV_IDS[env_name], int(random_recipe.group(1) or 1_000_000))
    elif dataset_id.startswith("local/") and name == "medium-expert-v0" and env_name in ENV_IDS:
        parts = [get_dataset(f"mujoco/{env_name}/{part}-v0", args) for part in ("medium", "expert")]
        with staged_dataset(dataset_id), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            minari.combine_datasets(parts, new_dataset_id=dataset_id)
    elif dataset_id.startswith("local/") and name == "medium-replay-v0":
        raise UsageError(
            f"dataset {dataset_id} does not exist: Minari's server has no medium-replay data and D4RL's recipe needs "
            f"the replay buffer of a behavior agent; build it with `python baselines/redq.py --export-replay "
            f"{dataset_id} ...` (README: Building D4RL-style datasets) or choose another --dataset")
    elif dataset_id.startswith("local/"):
        raise UsageError(f"dataset {dataset_id} not found in {datasets_root()} (set MINARI_DATASETS_PATH or build it)")
    else:
        try:
            with staged_dataset(dataset_id):
                minari.download_dataset(dataset_id)
        except Exception as e:  # no network, unknown id, server error: all end the same way
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UsageError(
                f"dataset {dataset_id} is not in {datasets_root()} and could not be downloaded ({reason}); "
                f"on a machine with internet access run `minari download {dataset_id}` and copy "
                f"~/.minari/datasets/{dataset_id} into {datasets_root()}") from None
    return minari.load_dataset(dataset_id)


def build_random_dataset(dataset_id, env_id, num_steps, seed=0):
    """D4RL's random recipe: a uniform random policy for num_steps steps, stored episode by episode."""
    import minari
    from minari.data_collector import EpisodeBuffer

    env = gym.make(env_id)
    env.action_space.seed(seed)
    episodes, steps = [], 0
    with tqdm(total=num_steps, desc=f"building {dataset_id}", unit="step", mininterval=2) as bar:
        while steps < num_steps:
            obs, _ = env.reset(seed=seed if not episodes else None)
            ep = {"observations": [obs], "actions": [], "rewards": [], "terminations": [], "truncations": []}
            terminated = truncated = False
            while not (terminated or truncated) and steps < num_steps:
                action = env.action_space.sample()
                obs, reward, terminated, truncated, _ = env.step(action)
                for key, value in zip(ep, (obs, action, reward, terminated, truncated)):
                    ep[key].append(value)
                steps += 1
            ep["truncations"][-1] = not terminated  # the budget cut the last episode: a time-out, not a termination
            episodes.append(EpisodeBuffer(id=len(episodes), **{k: np.asarray(v) for k, v in ep.items()}))
            bar.update(len(ep["rewards"]))
    print(f"writing {len(episodes)} episodes ...", file=sys.stderr)
    with staged_dataset(dataset_id), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Minari warns about unset author/permalink fields
        minari.create_dataset_from_buffers(
            dataset_id, episodes, env=env_id, algorithm_name="uniform random policy (D4RL random recipe)",
            description=f"{num_steps} steps of uniformly random actions in {env_id}, built by redq_adaptive_bc.py",
            ref_min_score=None, ref_max_score=None)


def flatten_episodes(dataset) -> dict[str, np.ndarray]:
    """Minari stores episodes with T+1 observations and T actions; flatten them into transitions.

    next_obs is the following observation of the same episode, so an episode cut by a time
    limit contributes no transition into the next episode's first state. Only terminations end
    bootstrapping.
    """
    parts = {"obs": [], "actions": [], "rewards": [], "next_obs": [], "terminals": []}
    for ep in dataset.iterate_episodes():
        parts["obs"].append(ep.observations[:-1])
        parts["actions"].append(ep.actions)
        parts["rewards"].append(ep.rewards)
        parts["next_obs"].append(ep.observations[1:])
        parts["terminals"].append(ep.terminations)
    data = {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}
    for key, value in data.items():
        if not np.isfinite(value).all():
            raise UsageError(f"dataset {dataset.spec.dataset_id} has NaN or infinite values in {key}")
    return data


def reference_scores(dataset, env_name, args: Args):
    """(ref_min, ref_max, source): each end from its flag, else the dataset's metadata, else D4RL's table."""
    metadata, d4rl = dataset.storage.metadata, D4RL_REF_SCORES.get(env_name, (None, None))
    ends = []
    for flag, key, table in [(args.ref_min_score, "ref_min_score", d4rl[0]),
                             (args.ref_max_score, "ref_max_score", d4rl[1])]:
        value, source = next(((v, s) for v, s in [(flag, "flags"), (metadata.get(key), "dataset metadata"),
                                                   (table, "D4RL table")] if v is not None), (None, None))
        if value is None:
            raise UsageError(f"no reference scores for {env_name}: pass --ref-min-score and --ref-max-score")
        ends.append((float(value), source))
    (low, low_source), (high, high_source) = ends
    if not high > low:
        raise UsageError(f"reference scores must satisfy min < max, got {low} and {high}")
    return low, high, low_source if low_source == high_source else f"{low_source} (min), {high_source} (max)"


def normalized(episode_return, ref_min, ref_max):
    """D4RL normalization as a fraction: 0 = random policy, 1 = expert."""
    return (episode_return - ref_min) / (ref_max - ref_min)


# ---------------------------------------------------------------------------------------
# The gradient step: target (Eq. 3), critic loss (Eq. 3), actor loss (Eq. 1 and 4), targets
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def td_target(batch: Batch, actor_target, critic_target, critic_idx, gamma, policy_noise, noise_clip):
    """y = r + gamma (1 - terminal) min_{i in M} Q'_i(s', a'), with a' the smoothed target action."""
    noise = (torch.randn_like(batch.actions) * policy_noise).clamp(-noise_clip, noise_clip)
    next_actions = actor_target(batch.next_obs) + noise * actor_target.action_scale
    low = actor_target.action_bias - actor_target.action_scale
    high = actor_target.action_bias + actor_target.action_scale
    next_actions = next_actions.clamp(low, high)
    q_next = critic_target(batch.next_obs, next_actions, critic_idx).min(dim=0).values
    return batch.rewards + gamma * (1.0 - batch.terminals) * q_next


def critic_loss(critic, batch: Batch, y, reduction="sum"):
    """Eq. 3: every critic regresses to the same y. Returns (loss, mean Q)."""
    q = critic(batch.obs, batch.actions)  # (N, B)
    per_critic = ((q - y) ** 2).mean(dim=1)
    loss = per_critic.sum() if reduction == "sum" else per_critic.mean()
    return loss, q.detach().mean()


def actor_loss(actor, critic, batch: Batch, alpha):
    """Eq. 4 with Eq. 1's normalization: -mean(Qbar)/mean|Qbar| + alpha * mean((pi(s) - a)^2)."""
    pi = actor(batch.obs)
    q_bar = critic(batch.obs, pi).mean(dim=0)  # mean over all N critics
    # Dividing by the batch's mean |Qbar| (no gradient) makes alpha independent of the reward scale.
    return -q_bar.mean() / q_bar.abs().mean().detach() + alpha * ((pi - batch.actions) ** 2).mean()


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau):
    """theta' <- tau theta + (1 - tau) theta', for all parameters in one fused call."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


class Agent:
    """Actor, critic ensemble, their target copies, optimizers, and the gradient step."""

    def __init__(self, obs_dim, act_dim, action_low, action_high, args: Args, device):
        net = dict(hidden_dim=args.hidden_dim, hidden_layers=args.hidden_layers, activation=args.activation)
        self.actor = Actor(obs_dim, act_dim, action_low, action_high, **net).to(device)
        self.critic = CriticEnsemble(args.num_critics, obs_dim, act_dim, **net).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        # CUDA graphs need the optimizer's step counter on the device (capturable); otherwise fused is fastest.
        optim = dict(capturable=True) if args.compile and device.type == "cuda" else dict(fused=True)
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=args.learning_rate, **optim)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=args.learning_rate, **optim)
        self.args, self.device = args, device
        self.num_updates = 0
        self.last_actor_loss = torch.zeros((), device=device)
        self.cuda_graphs = False  # set by compile() on CUDA

    def critic_step(self, batch: Batch):
        """Eq. 3 for all N critics, with a fresh random subset of M critics for the target (REDQ)."""
        a = self.args
        critic_idx = None  # M = N: the min over all critics, no subset to draw
        if a.num_min_critics < a.num_critics:
            critic_idx = torch.randperm(a.num_critics, device=batch.obs.device)[: a.num_min_critics]
        y = td_target(batch, self.actor_target, self.critic_target, critic_idx, a.gamma, a.policy_noise, a.noise_clip)
        loss, q_mean = critic_loss(self.critic, batch, y, a.critic_loss_reduction)
        self.critic_optim.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_optim.step()
        return loss.detach(), q_mean

    def actor_step(self, batch: Batch, alpha):
        """Eq. 4. The critics are frozen: the actor's gradient flows through Q, not into it."""
        self.critic.requires_grad_(False)
        loss = actor_loss(self.actor, self.critic, batch, alpha)
        self.actor_optim.zero_grad(set_to_none=True)
        loss.backward()
        self.actor_optim.step()
        self.critic.requires_grad_(True)
        return loss.detach()

    def target_step(self):
        soft_update(self.critic_target, self.critic, self.args.tau)
        soft_update(self.actor_target, self.actor, self.args.tau)

    def update(self, batch: Batch, alpha):
        """One gradient step. No host-device synchronization: metrics stay tensors."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        self.num_updates += 1
        update_actor = self.num_updates % self.args.policy_freq == 0
        metrics = dict(zip(("critic_loss", "q_mean"), self.critic_step(batch)))
        if update_actor:
            self.last_actor_loss = self.actor_step(batch, alpha)
            if self.cuda_graphs:  # a CUDA graph's outputs are overwritten by its next replay: keep a copy
                self.last_actor_loss = self.last_actor_loss.clone()
        if update_actor or not self.args.delay_target_updates:
            self.target_step()
        metrics["actor_loss"] = self.last_actor_loss
        return {k: v.clone() for k, v in metrics.items()} if self.cuda_graphs else metrics

    def compile(self):
        """--compile: torch.compile each part of the step (on CUDA also captured as CUDA graphs)."""
        self.cuda_graphs = self.device.type == "cuda"
        mode = "reduce-overhead" if self.cuda_graphs else None
        self.critic_step = torch.compile(self.critic_step, mode=mode)
        self.actor_step = torch.compile(self.actor_step, mode=mode)
        self.target_step = torch.compile(self.target_step, mode=mode)

    def state_dict(self):
        return {name: getattr(self, name).state_dict() for name in
                ("actor", "critic", "actor_target", "critic_target", "actor_optim", "critic_optim")}

    def load_state_dict(self, state):
        for name, value in state.items():
            getattr(self, name).load_state_dict(value)


# ---------------------------------------------------------------------------------------
# Adaptive behavior cloning: the PD controller of Eq. 2
# ---------------------------------------------------------------------------------------
def adapt_alpha(alpha, R_current, R_last, *, kp, kd, target_return, alpha_max, episode_length=1,
                r_last_smoothing=1.0):
    """One application of Eq. 2 at the end of a training episode. Returns (alpha, R_last).

    R values are normalized returns (fractions). The P term lowers alpha while the agent is
    below R_target; the D term raises it when the return dropped since the last episode.
    With r_last_smoothing s < 1, R_last is a moving average and the P term uses it too (the
    authors' code); s = 1 is the paper's previous episode.
    """
    R_avg = r_last_smoothing * R_current + (1 - r_last_smoothing) * R_last
    delta = kp * (R_avg - target_return) + kd * max(0.0, R_last - R_current)
    alpha = min(max(alpha + delta * episode_length, 0.0), alpha_max)
    return alpha, R_avg


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(actor, env, num_episodes, device, seed) -> np.ndarray:
    """Undiscounted returns of the deterministic policy pi(s). Every evaluation starts from the same
    seed, so all evaluations of a run see the same initial states."""
    returns = []
    for episode in range(num_episodes):
        obs, _ = env.reset(seed=seed if episode == 0 else None)
        done, episode_return = False, 0.0
        while not done:
            action = actor(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0].cpu().numpy()
            obs, reward, terminated, truncated, _ = env.step(action)
            episode_return += float(reward)
            done = terminated or truncated
        returns.append(episode_return)
    return np.array(returns)


# ---------------------------------------------------------------------------------------
# Logging and checkpoints
# ---------------------------------------------------------------------------------------
COLUMNS = ["phase", "step", "normalized_score", "normalized_score_std", "return_mean", "alpha", "critic_loss",
           "actor_loss", "q_mean", "updates_per_s", "env_steps_per_s", "wall_s", "episode_normalized_return"]


class ProgressLog:
    """progress.csv: one row per evaluation, flushed at once so a killed run keeps its rows."""

    def __init__(self, path, keep_rows=None):
        """keep_rows: continue a file after its first keep_rows rows (--resume); None starts a new one."""
        lines = [",".join(COLUMNS) + "\n"]
        if keep_rows is not None:  # rows written after the checkpoint are written again
            lines = path.read_text().splitlines(keepends=True)[: 1 + keep_rows]
        atomic_write(path, lambda tmp: tmp.write_text("".join(lines)))
        self.rows = len(lines) - 1
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=COLUMNS, restval="")

    def write(self, row):
        self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self.file.flush()
        self.rows += 1


def atomic_write(path: Path, write):
    """write(tmp_path), then rename: a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(path: Path, agent: Agent, meta: dict):
    atomic_write(path, lambda tmp: torch.save({"agent": agent.state_dict(), "meta": meta}, tmp))


def load_checkpoint(path, agent: Agent, meta: dict):
    """Load an offline.pt into agent; weights_only=True so a foreign file cannot run code."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved = checkpoint["meta"]
        assert isinstance(saved, dict) and saved.get("method") == METHOD, "written by another script"
    except Exception as e:
        raise UsageError(f"--load-offline: {path} is not a checkpoint of this script ({type(e).__name__})") from None
    for key in ("env_id", "obs_dim", "act_dim"):
        if saved.get(key) != meta[key]:
            raise UsageError(f"--load-offline: {path} was trained on {saved.get('env_id')} "
                             f"({key}={saved.get(key)}), this run uses {meta['env_id']} ({key}={meta[key]})")
    try:
        agent.load_state_dict(checkpoint["agent"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise UsageError(f"--load-offline: {path} does not fit this network configuration "
                         f"({str(e).splitlines()[0][:160]})") from None


class TrainingDiverged(Exception):
    pass


def rng_states(rng: np.random.Generator, env):
    """Every random stream a run draws from, so that a resumed run continues it exactly."""
    return {"python": random.getstate(), "numpy": rng.bit_generator.state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "env": env.unwrapped.np_random.bit_generator.state}


def set_rng_states(states, rng: np.random.Generator, env):
    random.setstate(states["python"])
    rng.bit_generator.state = states["numpy"]
    torch.set_rng_state(states["torch"].cpu())  # latest.pt is loaded onto the training device
    if states["cuda"]:
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])
    env.unwrapped.np_random.bit_generator.state = states["env"]


# ---------------------------------------------------------------------------------------
# Main: offline loop, switch, online loop
# ---------------------------------------------------------------------------------------
def env_name_of(env_id: str) -> str:
    """'Walker2d-v5' -> 'walker2d'."""
    return re.sub(r"-v\d+$", "", env_id.split("/")[-1]).lower()


def setup(args: Args):
    """Everything that can reject the input, done before any training starts."""
    dataset_id = resolve_dataset_id(args)
    dataset = get_dataset(dataset_id, args)
    if dataset.spec.env_spec is not None:
        env, eval_env = dataset.recover_environment(), dataset.recover_environment(eval_env=True)
    else:
        env, eval_env = gym.make(ENV_IDS[args.env]), gym.make(ENV_IDS[args.env])
    for kind in ("observation_space", "action_space"):
        data_space, env_space = getattr(dataset, kind), getattr(env, kind)
        if not isinstance(env_space, gym.spaces.Box) or data_space.shape != env_space.shape:
            raise UsageError(f"dataset {dataset_id}: {kind} {data_space} does not match {env.spec.id}'s {env_space}")
    env_name = env_name_of(env.spec.id)
    dataset_name = re.sub(r"-v\d+$", "", dataset_id.split("/")[-1])
    ref_min, ref_max, ref_source = reference_scores(dataset, env_name, args)
    data = flatten_episodes(dataset)
    if args.alpha_offline is None:
        args.alpha_offline = 100.0 if env_name == "walker2d" and dataset_name.split("-")[0] == "random" else 0.4
    if args.alpha_online is None:
        args.alpha_online = args.alpha_offline
    kept = num_kept(len(data["rewards"]), args.keep_ratio, args.keep_min)
    if args.buffer_size is None:
        args.buffer_size = max(args.online_steps, kept)
    elif args.buffer_size < kept:
        raise UsageError(f"--buffer-size {args.buffer_size} cannot hold the {kept} offline transitions kept at the switch")
    info = dict(dataset_id=dataset_id, env_id=env.spec.id, env=env_name, dataset=dataset_name,
                ref_min_score=ref_min, ref_max_score=ref_max, ref_source=ref_source,
                dataset_transitions=len(data["rewards"]), offline_kept=kept)
    return env, eval_env, data, info


def main(args: Args):
    env, eval_env, data, info = setup(args)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    agent = Agent(obs_dim, act_dim, low, high, args, device)
    if args.compile:
        agent.compile()
    meta = dict(env_id=info["env_id"], obs_dim=obs_dim, act_dim=act_dim, method=METHOD)
    if args.load_offline:
        load_checkpoint(args.load_offline, agent, meta)

    latest = None  # the state saved by the last checkpoint, when resuming
    if args.resume:
        run_dir = Path(args.resume)
        if (run_dir / "final.pt").exists():
            print(f"{run_dir} has finished already (final.pt): nothing to resume", file=sys.stderr)
            return run_dir
        if (run_dir / "latest.pt").exists():
            latest = torch.load(run_dir / "latest.pt", map_location=device, weights_only=True)
        log = ProgressLog(run_dir / "progress.csv", keep_rows=latest["csv_rows"] if latest else 0)
    else:
        run_dir = Path(args.output_dir) / f"{info['env']}-{info['dataset']}__{METHOD}__{args.seed}__{int(time.time())}"
        run_dir.mkdir(parents=True, exist_ok=False)
        versions = {"python": platform.python_version(), "torch": torch.__version__, "gymnasium": gym.__version__,
                    "numpy": np.__version__}
        for package in ("minari", "mujoco"):
            with contextlib.suppress(Exception):
                versions[package] = __import__(package).__version__
        config = {"method": METHOD, **asdict(args), **info, "device": str(device), "versions": versions}
        atomic_write(run_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
        log = ProgressLog(run_dir / "progress.csv")
    print(f"run folder: {run_dir}  ({info['dataset_id']}, {info['dataset_transitions']} transitions, "
          f"{info['env_id']}, {device})" + (f", resuming {latest['phase']} step {latest['step']}" if latest else ""),
          file=sys.stderr)

    start = time.time() - (latest["wall_s"] if latest else 0.0)
    scores = latest["scores"] if latest else []
    clock = {"time": time.time(), "updates": 0, "env_steps": 0}

    def log_evaluation(phase, step, alpha, metrics, updates, env_steps, episode_R=None):
        """Evaluate pi, write a progress.csv row, and stop if a loss went NaN. Returns the score (fraction)."""
        returns = evaluate(agent.actor, eval_env, args.eval_episodes, device, seed=args.seed + 100)
        score = normalized(returns, info["ref_min_score"], info["ref_max_score"])
        losses = {k: float(v) for k, v in metrics.items()}  # the only host syncs: once per evaluation
        now = time.time()
        elapsed, clock["time"] = max(now - clock["time"], 1e-9), now
        row = dict(phase=phase, step=step, normalized_score=100 * score.mean(), normalized_score_std=100 * score.std(),
                   return_mean=returns.mean(), alpha=alpha, **losses,
                   updates_per_s=(updates - clock["updates"]) / elapsed if updates > clock["updates"] else "",
                   env_steps_per_s=(env_steps - clock["env_steps"]) / elapsed if env_steps > clock["env_steps"] else "",
                   wall_s=now - start, episode_normalized_return="" if episode_R is None else 100 * episode_R)
        clock["updates"], clock["env_steps"] = updates, env_steps
        log.write(row)
        scores.append(float(100 * score.mean()))
        if not all(math.isfinite(v) for v in losses.values()):
            raise TrainingDiverged(f"a loss became non-finite ({losses}) at {phase} step {step}")
        return float(score.mean())

    def save_latest(phase, step, buffer=None, **online_state):
        """Everything needed to continue from here; written atomically, so a kill leaves the old or the new one."""
        state = dict(phase=phase, step=step, agent=agent.state_dict(), num_updates=agent.num_updates,
                     last_actor_loss=agent.last_actor_loss, csv_rows=log.rows, scores=scores,
                     wall_s=time.time() - start, rng=rng_states(rng, env),
                     buffer=None if buffer is None else buffer.state_dict(), **online_state)
        atomic_write(run_dir / "latest.pt", lambda tmp: torch.save(state, tmp))

    if latest:
        agent.load_state_dict(latest["agent"])
        agent.num_updates, agent.last_actor_loss = latest["num_updates"], latest["last_actor_loss"]
        set_rng_states(latest["rng"], rng, env)
        clock["updates"] = agent.num_updates
    phase, done_steps = (latest["phase"], latest["step"]) if latest else ("offline", 0)

    # ---- Offline pre-training: K gradient steps of TD3+BC with the REDQ ensemble -------------
    alpha = torch.tensor(args.alpha_offline, device=device)
    if phase == "offline":
        buffer = ReplayBuffer(len(data["rewards"]), obs_dim, act_dim, device)
        buffer.add(data["obs"], data["actions"], data["rewards"], data["next_obs"], data["terminals"])
    del data  # the buffer holds the only copy
    if phase == "offline" and not args.load_offline:
        with tqdm(total=args.offline_steps, initial=done_steps, desc="offline", unit="upd", mininterval=2) as bar:
            if done_steps == 0:
                log_evaluation("offline", 0, args.alpha_offline, {}, 0, 0)
            for step in range(done_steps + 1, args.offline_steps + 1):
                metrics = agent.update(buffer.sample(args.batch_size), alpha)
                if step % args.eval_every == 0 or step == args.offline_steps:
                    score = log_evaluation("offline", step, args.alpha_offline, metrics, step, 0)
                    bar.set_postfix(score=f"{100 * score:.1f}")
                if step % args.checkpoint_every == 0 and step < args.offline_steps:
                    save_latest("offline", step)
                bar.update()
        save_checkpoint(run_dir / "offline.pt", agent, {**meta, "offline_steps": args.offline_steps})

    # ---- The switch: keep a random subset of the offline data, free the rest ---------------
    if phase == "offline":
        generator = torch.Generator().manual_seed(args.seed)
        buffer = downsample(buffer, args.buffer_size, args.keep_ratio, args.keep_min, args.keep_with_replacement,
                            generator)
        print(f"switch to online: kept {len(buffer)} offline transitions, FIFO capacity {buffer.capacity}",
              file=sys.stderr)
        alpha_online, R_current = args.alpha_online, None
        R_last = log_evaluation("online", 0, alpha_online, {}, agent.num_updates, 0)  # the pre-trained agent's score
        done_steps = 0
        save_latest("online", 0, buffer, alpha_online=alpha_online, R_last=R_last, R_current=R_current)
    else:  # resuming fine-tuning where an episode was about to start
        buffer = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device)
        buffer.load_state_dict(latest["buffer"])
        alpha_online, R_last, R_current = latest["alpha_online"], latest["R_last"], latest["R_current"]
        clock["env_steps"] = done_steps

    # ---- Online fine-tuning: G gradient steps per env step, alpha from Eq. 2 per episode ---
    alpha.fill_(alpha_online)
    obs, _ = env.reset(seed=args.seed if done_steps == 0 else None)
    episode_return, episode_length, last_checkpoint = 0.0, 0, done_steps
    noise_std = args.exploration_noise * (high - low) / 2
    with tqdm(total=args.online_steps, initial=done_steps, desc="online", unit="step", mininterval=2) as bar:
        for step in range(done_steps + 1, args.online_steps + 1):
            with torch.no_grad():
                action = agent.actor(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0].cpu().numpy()
            action = np.clip(action + rng.normal(0.0, noise_std), low, high)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            buffer.add(obs[None], action[None], [reward], next_obs[None], [float(terminated)])
            obs = next_obs
            episode_return += float(reward)
            episode_length += 1

            for _ in range(args.utd):
                metrics = agent.update(buffer.sample(args.batch_size), alpha)

            if terminated or truncated:
                R_current = normalized(episode_return, info["ref_min_score"], info["ref_max_score"])
                if args.adaptive_bc:  # Eq. 2
                    alpha_online, R_last = adapt_alpha(
                        alpha_online, R_current, R_last, kp=args.kp, kd=args.kd, target_return=args.target_return,
                        alpha_max=args.alpha_offline, r_last_smoothing=args.r_last_smoothing,
                        episode_length=episode_length if args.scale_by_episode_length else 1)
                    alpha.fill_(alpha_online)

            if step % args.eval_every == 0 or step == args.online_steps:
                score = log_evaluation("online", step, alpha_online, metrics, agent.num_updates, step, R_current)
                bar.set_postfix(score=f"{100 * score:.1f}", alpha=f"{alpha_online:.3f}")

            if terminated or truncated:
                # Checkpoints wait for an episode's end: then the environment's state is only its RNG.
                if step - last_checkpoint >= args.checkpoint_every and step < args.online_steps:
                    save_latest("online", step, buffer, alpha_online=alpha_online, R_last=R_last, R_current=R_current)
                    last_checkpoint = step
                obs, _ = env.reset()
                episode_return, episode_length = 0.0, 0
            bar.update()

    save_checkpoint(run_dir / "final.pt", agent, {**meta, "online_steps": args.online_steps})
    (run_dir / "latest.pt").unlink(missing_ok=True)  # final.pt marks the run as finished
    print(f"final normalized score {scores[-1]:.1f}, best {max(scores):.1f}, "
          f"wall time {time.time() - start:.0f} s, run folder {run_dir}")
    return run_dir


if __name__ == "__main__":
    try:
        main(parse_args())
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as e:
        print(f"error: {e}; stopped. progress.csv and the checkpoints written before are kept.", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: progress.csv and the checkpoints written so far are kept.", file=sys.stderr)
        sys.exit(130)
