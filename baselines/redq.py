"""REDQ (scratch): online TD3 with a randomized critic ensemble, no offline data. Also builds
D4RL-style datasets (medium, medium-replay, expert) that Minari's server does not have.

Paper: Y. Zhao, R. Boney, A. Ilin, J. Kannala, J. Pajarinen, "Adaptive Behavior Cloning
Regularization for Stable Offline-to-Online Reinforcement Learning" (arXiv:2210.13846), Fig. 2's
"REDQ (scratch)" peer; REDQ is X. Chen, C. Wang, Z. Zhou, K. Ross, "Randomized Ensembled Double
Q-Learning: Learning Fast Without a Model" (ICLR 2021), here on TD3 rather than SAC, as in the paper.

The algorithm: redq_adaptive_bc.py's online phase without the offline data and without BC.

    a_t = uniform random for the first learning_starts steps, then clip(pi(s_t) + N(0, sigma_expl))
    a'  = clip(pi'(s') + clip(eps, -c, c), a_low, a_high),   eps ~ N(0, sigma_target)
    y   = r + gamma * (1 - terminal) * min_{i in M} Q'_i(s', a')    (Eq. 3, M a fresh random subset)
    L(Q) = sum_i mean((Q_i(s, a) - y)^2),   L(pi) = -mean(Qbar(s, pi(s)))  (Qbar: mean of all N)

with G gradient steps per environment step once the warm-up is over (N = 10, M = 2, G = 20).

Building datasets D4RL's way (Fu et al. 2020), with cheap settings (see README):
    --stop-at-score X          stop at the first evaluation scoring X (the early-stopped "medium" agent)
    --export-replay ID         every transition the agent collected, warm-up included, episode by
                               episode, as Minari dataset ID (the "medium-replay" recipe)
    --export-rollouts ID       --rollout-steps steps of the final policy as Minari dataset ID
                               (the "medium" and "expert" recipes)
Exported datasets carry the Gymnasium env id and reference scores (--ref-min-score/--ref-max-score,
else D4RL's), so `python redq_adaptive_bc.py --dataset-id ID` and `minari.get_normalized_score` work.
Training itself never touches Minari or any dataset.

Run:
    python baselines/redq.py --env hopper                          # Fig. 2's REDQ (scratch)
    python baselines/redq.py --env hopper --utd 1 --num-critics 2 --online-steps 1000000 \\
        --stop-at-score 33 --export-replay local/hopper/medium-replay-v0 --export-rollouts local/hopper/medium-v0
    python baselines/redq.py --resume runs/<run folder>             # continue a killed run
    python baselines/redq.py --help
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

METHOD = "redq"
ENV_IDS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5", "ant": "Ant-v5"}
# D4RL's reference returns (random policy, expert policy): the normalized score's 0 and 100.
D4RL_REF_SCORES = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}
DATASET_ID = re.compile(r"([-\w]+/)*[-\w]+-v\d+")  # Minari's (namespace/)name-v(version)


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------
@dataclass
class Args:
    # Experiment
    env: Literal["hopper", "halfcheetah", "walker2d", "ant"] = "hopper"
    """MuJoCo task (Gymnasium v5)"""
    dataset: Literal["scratch", "random", "medium", "medium-replay", "medium-expert", "expert", "simple"] = "scratch"
    """a label only, no data is loaded: the <dataset> of the run folder, i.e. which plot.py panel shows this run (Fig. 2 draws REDQ (scratch) in every panel)"""
    seed: int = 0
    """random seed (the evaluation environment uses seed + 100, exported rollouts seed + 200)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """torch device; auto picks cuda when available"""
    output_dir: str = "runs"
    """runs are written to <output-dir>/<env>-<dataset>__redq__<seed>__<unix time>/"""

    # Schedule
    online_steps: int = 250_000
    """T, environment steps (paper: 250k, the fine-tuning budget of the offline-to-online methods)"""
    learning_starts: int = 5_000
    """uniformly random actions and no gradient steps for the first this many environment steps (REDQ: 5000)"""
    eval_every: int = 5_000
    """evaluate every this many environment steps (paper: 5000)"""
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
    """sigma_expl, std of the exploration noise after the warm-up (Table 1's 'policy noise std 0.1')"""
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
    """N, critics in the ensemble (Table 1: 10; 2 with --num-min-critics 2 is TD3's clipped double Q)"""
    num_min_critics: int = 2
    """M, randomly drawn critics whose minimum forms the target (Table 1: 2)"""
    utd: int = 20
    """G, gradient steps per environment step after the warm-up (Table 1: 20; 1 is TD3)"""
    delay_target_updates: bool = False
    """update target networks only on actor-update steps (authors' code) instead of every step (paper)"""
    critic_loss_reduction: Literal["sum", "mean"] = "sum"
    """sum the N critics' squared errors (each critic its own MSE) or average them (authors' code)"""
    buffer_size: Optional[int] = None
    """FIFO replay capacity (None = online-steps: nothing is overwritten)"""

    # Normalized scores
    ref_min_score: Optional[float] = None
    """return that normalizes to 0 (default: D4RL's random score for --env)"""
    ref_max_score: Optional[float] = None
    """return that normalizes to 100 (default: D4RL's expert score for --env)"""

    # Building D4RL-style datasets
    stop_at_score: Optional[float] = None
    """stop at the first evaluation after step 0 whose normalized score (x100) reaches this (D4RL's early-stopped medium agent)"""
    export_replay: Optional[str] = None
    """write every transition the agent collected, warm-up included, as this Minari dataset id (D4RL's medium-replay recipe)"""
    export_rollouts: Optional[str] = None
    """roll out the final policy for --rollout-steps steps into this Minari dataset id (D4RL's medium/expert recipe)"""
    rollout_steps: int = 1_000_000
    """environment steps of --export-rollouts (D4RL: 1M)"""
    rollout_noise: float = 0.1
    """std of the Gaussian noise on pi(s) in the rollouts (D4RL sampled its SAC agents' stochastic policies; 0 = deterministic)"""

    # Checkpoints
    checkpoint_every: int = 50_000
    """write a resumable latest.pt every this many env steps (at the episode's end)"""
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
        method = config.get("method")  # checked first: another script's run lacks some of these fields
        names = [name for name in Args.__dataclass_fields__ if name != "resume"] if method == METHOD else []
        fields = {name: config[name] for name in names}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--resume: {run_dir} is not a run folder of this script ({type(e).__name__})") from None
    if method != METHOD:
        raise UsageError(f"--resume: {run_dir} is a run of {method}, not {METHOD}")
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
    positive = ["online_steps", "eval_every", "eval_episodes", "batch_size", "policy_freq", "hidden_layers",
                "hidden_dim", "num_critics", "num_min_critics", "utd", "rollout_steps", "checkpoint_every"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.learning_starts < 0:
        raise UsageError(f"--learning-starts must be non-negative, got {args.learning_starts}")
    if args.num_min_critics > args.num_critics:
        raise UsageError(f"--num-min-critics (M={args.num_min_critics}) must be at most --num-critics (N={args.num_critics})")
    if not 0 < args.tau <= 1 or not 0 <= args.gamma <= 1:
        raise UsageError(f"--tau must be in (0, 1] and --gamma in [0, 1], got {args.tau} and {args.gamma}")
    if args.buffer_size is not None and args.buffer_size <= 0:
        raise UsageError(f"--buffer-size must be positive, got {args.buffer_size}")
    for name in ["learning_rate", "policy_noise", "noise_clip", "exploration_noise", "rollout_noise"]:
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (name == "learning_rate" and value == 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a {'positive' if name == 'learning_rate' else 'non-negative'} number, got {value}")
    for name in ["stop_at_score", "ref_min_score", "ref_max_score"]:
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    reference_scores(args.env, args)  # raises on min >= max
    # A dataset id that cannot be written must fail now, not after a day of training. (A finished run
    # being resumed wrote its datasets itself: main() reports it finished and writes nothing.)
    finished = args.resume is not None and (Path(args.resume) / "final.pt").exists()
    for flag, dataset_id in [("--export-replay", args.export_replay), ("--export-rollouts", args.export_rollouts)]:
        if dataset_id is None:
            continue
        if not DATASET_ID.fullmatch(dataset_id):
            raise UsageError(f"{flag}: {dataset_id!r} is not a Minari dataset id (namespace/name-v<version>, "
                             f"e.g. local/{args.env}/medium-replay-v0)")
        if not finished and (datasets_root() / dataset_id).exists():
            raise UsageError(f"{flag}: dataset {dataset_id} already exists in {datasets_root()}; delete it or "
                             f"choose another id")
    if args.export_replay is not None and args.export_replay == args.export_rollouts:
        raise UsageError(f"--export-replay and --export-rollouts must name different datasets, "
                         f"both are {args.export_replay}")


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
        x = torch.cat([obs, action], dim=-1)
        num_layers = len(self.weights)
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            if critic_idx is not None:
                weight, bias = weight[critic_idx], bias[critic_idx]
            # The first layer broadcasts the same (B, in) input to every critic.
            x = torch.baddbmm(bias, x.expand(weight.shape[0], -1, -1), weight) if x.dim() == 2 else torch.baddbmm(bias, x, weight)
            if layer < num_layers - 1:
                x = self.activation(x)
        return x.squeeze(-1)


# ---------------------------------------------------------------------------------------
# Replay buffer, and the record of every step that the dataset export writes
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


class Trajectories:
    """Every environment step in order, in the env's own dtypes (float64 observations), for export.

    An observation is stored once: within an episode, next_obs of step t is obs of step t + 1;
    only each episode's last next_obs is kept aside.
    """

    def __init__(self, capacity, observation_space, action_space):
        self.obs = np.zeros((capacity, *observation_space.shape), observation_space.dtype)
        self.actions = np.zeros((capacity, *action_space.shape), action_space.dtype)
        self.rewards = np.zeros(capacity)
        self.terminations = np.zeros(capacity, bool)
        self.truncations = np.zeros(capacity, bool)
        self.final_obs = {}  # index of an episode's last step -> the observation after it
        self.next_obs = None  # the observation after the latest step
        self.size = 0

    def add(self, obs, action, reward, terminated, truncated, next_obs):
        i = self.size
        self.obs[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.terminations[i], self.truncations[i] = terminated, truncated
        self.next_obs = np.array(next_obs)
        if terminated or truncated:
            self.final_obs[i] = self.next_obs
        self.size += 1

    def episodes(self) -> list[dict]:
        """Minari episodes: T + 1 observations, T actions, rewards, terminations, truncations.
        An episode still running at the end is cut there: its last step is marked truncated."""
        n = self.size
        truncations = self.truncations[:n].copy()
        if n and not (self.terminations[n - 1] or truncations[n - 1]):
            truncations[n - 1] = True  # a time-out, not a termination: it keeps bootstrapping
        ends = np.flatnonzero(self.terminations[:n] | truncations)
        episodes, start = [], 0
        for end in ends:
            steps = slice(start, end + 1)
            last = self.final_obs.get(end, self.next_obs)  # not there: the cut episode
            episodes.append(dict(observations=np.concatenate([self.obs[steps], last[None]]),
                                 actions=self.actions[steps], rewards=self.rewards[steps],
                                 terminations=self.terminations[steps], truncations=truncations[steps]))
            start = end + 1
        return episodes

    def state_dict(self):
        """The steps so far as tensors (torch.load(weights_only=True) reads no numpy arrays)."""
        n, ends = self.size, sorted(self.final_obs)
        return {"size": n, **{name: torch.from_numpy(getattr(self, name)[:n].copy()) for name in
                              ("obs", "actions", "rewards", "terminations", "truncations")},
                "final_obs_index": ends,
                "final_obs": torch.from_numpy(np.array([self.final_obs[i] for i in ends], self.obs.dtype)
                                              .reshape(len(ends), *self.obs.shape[1:])),
                "next_obs": None if self.next_obs is None else torch.from_numpy(self.next_obs.copy())}

    def load_state_dict(self, state):
        n = self.size = state["size"]
        for name in ("obs", "actions", "rewards", "terminations", "truncations"):
            getattr(self, name)[:n] = state[name].numpy()
        self.final_obs = {i: obs.numpy() for i, obs in zip(state["final_obs_index"], state["final_obs"])}
        self.next_obs = None if state["next_obs"] is None else state["next_obs"].numpy()


# ---------------------------------------------------------------------------------------
# Dataset export (Minari) and normalized scores
# ---------------------------------------------------------------------------------------
def datasets_root() -> Path:
    return Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))


@contextlib.contextmanager
def staged_dataset(dataset_id):
    """Write a dataset in a scratch folder and move it into place only once complete, so an
    interrupted export never leaves a half-written dataset that a later run would use."""
    root = datasets_root()
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    (scratch / dataset_id).parent.mkdir(parents=True, exist_ok=True)
    os.environ["MINARI_DATASETS_PATH"] = str(scratch)
    try:
        yield
        os.environ["MINARI_DATASETS_PATH"] = str(root)
        (root / dataset_id).parent.mkdir(parents=True, exist_ok=True)
        os.replace(scratch / dataset_id, root / dataset_id)
    finally:
        os.environ["MINARI_DATASETS_PATH"] = str(root)
        shutil.rmtree(scratch, ignore_errors=True)


def export_dataset(dataset_id, trajectories: Trajectories, env_id, ref_min, ref_max, algorithm_name, description):
    """Write the trajectories as a Minari dataset, with the env id and the reference scores in its metadata."""
    import minari  # only here: training never touches Minari
    from minari.data_collector import EpisodeBuffer

    episodes = [EpisodeBuffer(id=i, **ep) for i, ep in enumerate(trajectories.episodes())]
    print(f"writing {dataset_id}: {len(episodes)} episodes, {trajectories.size} steps ...", file=sys.stderr)
    with staged_dataset(dataset_id), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Minari warns about unset author/permalink fields
        minari.create_dataset_from_buffers(
            dataset_id, episodes, env=env_id, algorithm_name=algorithm_name, description=description,
            ref_min_score=ref_min, ref_max_score=ref_max)


def reference_scores(env_name, args: Args):
    """(ref_min, ref_max, source): each end from its flag, else D4RL's table."""
    d4rl = D4RL_REF_SCORES[env_name]
    low = args.ref_min_score if args.ref_min_score is not None else d4rl[0]
    high = args.ref_max_score if args.ref_max_score is not None else d4rl[1]
    sources = ["flags" if flag is not None else "D4RL table" for flag in (args.ref_min_score, args.ref_max_score)]
    if not high > low:
        raise UsageError(f"reference scores must satisfy min < max, got {low} and {high}")
    source = sources[0] if sources[0] == sources[1] else f"{sources[0]} (min), {sources[1]} (max)"
    return float(low), float(high), source


def normalized(episode_return, ref_min, ref_max):
    """D4RL normalization as a fraction: 0 = random policy, 1 = expert."""
    return (episode_return - ref_min) / (ref_max - ref_min)


# ---------------------------------------------------------------------------------------
# The gradient step: target (Eq. 3), critic loss (Eq. 3), actor loss, targets
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def td_target(batch: Batch, actor_target, critic_target, critic_idx, gamma, policy_noise, noise_clip):
    """y = r + gamma (1 - terminal) min_{i in M} Q'_i(s', a'), with a' the smoothed target action."""
    noise = (torch.randn_like(batch.actions) * policy_noise).clamp(-noise_clip, noise_clip)
    next_actions = actor_target(batch.next_obs) + noise * actor_target.action_scale
    low = actor_target.action_bias - actor_target.action_scale
    high = actor_target.action_bias + actor_target.action_scale
    next_actions = torch.max(torch.min(next_actions, high), low)
    q_next = critic_target(batch.next_obs, next_actions, critic_idx).min(dim=0).values
    return batch.rewards + gamma * (1.0 - batch.terminals) * q_next


def critic_loss(critic, batch: Batch, y, reduction="sum"):
    """Eq. 3: every critic regresses to the same y. Returns (loss, mean Q)."""
    q = critic(batch.obs, batch.actions)  # (N, B)
    per_critic = ((q - y) ** 2).mean(dim=1)
    loss = per_critic.sum() if reduction == "sum" else per_critic.mean()
    return loss, q.detach().mean()


def actor_loss(actor, critic, batch: Batch):
    """REDQ: maximize the mean over all N critics, -mean(Qbar(s, pi(s))). No BC term, no normalizer."""
    return -critic(batch.obs, actor(batch.obs)).mean()


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
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=args.learning_rate, fused=True)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=args.learning_rate, fused=True)
        self.args = args
        self.num_updates = 0
        self.last_actor_loss = torch.zeros((), device=device)

    def update(self, batch: Batch):
        """One gradient step. No host-device synchronization: metrics stay tensors."""
        a = self.args
        self.num_updates += 1
        update_actor = self.num_updates % a.policy_freq == 0

        critic_idx = None  # M = N (TD3's clipped double Q with N = 2): the min over all critics
        if a.num_min_critics < a.num_critics:  # a fresh random subset of M critics per gradient step (REDQ)
            critic_idx = torch.randperm(a.num_critics, device=batch.obs.device)[: a.num_min_critics]
        y = td_target(batch, self.actor_target, self.critic_target, critic_idx, a.gamma, a.policy_noise, a.noise_clip)
        loss_q, q_mean = critic_loss(self.critic, batch, y, a.critic_loss_reduction)
        self.critic_optim.zero_grad(set_to_none=True)
        loss_q.backward()
        self.critic_optim.step()

        if update_actor:
            self.critic.requires_grad_(False)  # the actor's gradient flows through Q, not into it
            loss_pi = actor_loss(self.actor, self.critic, batch)
            self.actor_optim.zero_grad(set_to_none=True)
            loss_pi.backward()
            self.actor_optim.step()
            self.critic.requires_grad_(True)
            self.last_actor_loss = loss_pi.detach()

        if update_actor or not a.delay_target_updates:
            soft_update(self.critic_target, self.critic, a.tau)
            soft_update(self.actor_target, self.actor, a.tau)
        return {"critic_loss": loss_q.detach(), "actor_loss": self.last_actor_loss, "q_mean": q_mean}

    def state_dict(self):
        return {name: getattr(self, name).state_dict() for name in
                ("actor", "critic", "actor_target", "critic_target", "actor_optim", "critic_optim")}

    def load_state_dict(self, state):
        for name, value in state.items():
            getattr(self, name).load_state_dict(value)


# ---------------------------------------------------------------------------------------
# Acting: warm-up, exploration, evaluation, rollouts
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def explore(actor, obs, step, learning_starts, action_space, noise_std, rng, device):
    """The action at environment step `step` (1-based): uniformly random during the warm-up
    (steps 1..learning_starts, the policy is not consulted), then clip(pi(s) + N(0, noise_std))."""
    if step <= learning_starts:
        return action_space.sample()
    action = actor(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0].cpu().numpy()
    action = action + rng.normal(0.0, noise_std)
    return np.clip(action, action_space.low, action_space.high).astype(action_space.dtype)


@torch.no_grad()
def evaluate(actor, env, num_episodes, device, seed) -> np.ndarray:
    """Undiscounted returns of the deterministic policy pi(s). Every evaluation starts from the
    same seed (seed + 100, as TD3+BC), so curves compare policies on the same start states."""
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


@torch.no_grad()
def rollout(actor, env, num_steps, noise_std, rng, device, seed) -> Trajectories:
    """D4RL's medium/expert recipe: num_steps steps of the policy, episode after episode."""
    trajectories = Trajectories(num_steps, env.observation_space, env.action_space)
    low, high = env.action_space.low, env.action_space.high
    noise_std = noise_std * (high - low) / 2
    obs, _ = env.reset(seed=seed)
    for _ in tqdm(range(num_steps), desc="rollouts", unit="step", mininterval=2):
        action = actor(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0].cpu().numpy()
        action = np.clip(action + rng.normal(0.0, noise_std), low, high).astype(env.action_space.dtype)
        next_obs, reward, terminated, truncated, _ = env.step(action)
        trajectories.add(obs, action, reward, terminated, truncated, next_obs)
        obs = env.reset()[0] if terminated or truncated else next_obs
    return trajectories


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


class TrainingDiverged(Exception):
    pass


def rng_states(rng: np.random.Generator, env):
    """Every random stream a run draws from, so that a resumed run continues it exactly (here also the
    action space's, which draws the warm-up's uniform actions)."""
    return {"python": random.getstate(), "numpy": rng.bit_generator.state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "env": env.unwrapped.np_random.bit_generator.state,
            "action_space": env.action_space.np_random.bit_generator.state}


def set_rng_states(states, rng: np.random.Generator, env):
    random.setstate(states["python"])
    rng.bit_generator.state = states["numpy"]
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    env.unwrapped.np_random.bit_generator.state = states["env"]
    env.action_space.np_random.bit_generator.state = states["action_space"]


# ---------------------------------------------------------------------------------------
# Main: online loop from scratch, saving, exports
# ---------------------------------------------------------------------------------------
def main(args: Args):
    env_id = ENV_IDS[args.env]
    env, eval_env = gym.make(env_id), gym.make(env_id)
    ref_min, ref_max, ref_source = reference_scores(args.env, args)
    if args.buffer_size is None:
        args.buffer_size = args.online_steps
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    agent = Agent(obs_dim, act_dim, low, high, args, device)
    meta = dict(env_id=env_id, obs_dim=obs_dim, act_dim=act_dim, method=METHOD)

    info = dict(dataset_id=None, env_id=env_id, env=args.env, dataset=args.dataset,
                ref_min_score=ref_min, ref_max_score=ref_max, ref_source=ref_source)
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
        run_dir = Path(args.output_dir) / f"{args.env}-{args.dataset}__{METHOD}__{args.seed}__{int(time.time())}"
        run_dir.mkdir(parents=True, exist_ok=False)
        versions = {"python": platform.python_version(), "torch": torch.__version__, "gymnasium": gym.__version__,
                    "numpy": np.__version__}
        with contextlib.suppress(Exception):
            versions["mujoco"] = __import__("mujoco").__version__
        config = {"method": METHOD, **asdict(args), **info, "device": str(device), "versions": versions}
        atomic_write(run_dir / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
        log = ProgressLog(run_dir / "progress.csv")
    print(f"run folder: {run_dir}  (from scratch, {env_id}, {device})"
          + (f", resuming step {latest['step']}" if latest else ""), file=sys.stderr)

    start = time.time() - (latest["wall_s"] if latest else 0.0)
    scores = latest["scores"] if latest else []
    clock = {"time": time.time(), "updates": 0, "env_steps": 0}

    def log_evaluation(step, metrics, updates, env_steps, episode_R=None):
        """Evaluate pi, write a progress.csv row, and stop if a loss went NaN. Returns the score (fraction)."""
        returns = evaluate(agent.actor, eval_env, args.eval_episodes, device, args.seed + 100)
        score = normalized(returns, ref_min, ref_max)
        losses = {k: float(v) for k, v in metrics.items()}  # the only host syncs: once per evaluation
        now = time.time()
        elapsed, clock["time"] = max(now - clock["time"], 1e-9), now
        row = dict(phase="online", step=step, normalized_score=100 * score.mean(),
                   normalized_score_std=100 * score.std(), return_mean=returns.mean(), **losses,
                   updates_per_s=(updates - clock["updates"]) / elapsed if updates > clock["updates"] else "",
                   env_steps_per_s=(env_steps - clock["env_steps"]) / elapsed if env_steps > clock["env_steps"] else "",
                   wall_s=now - start, episode_normalized_return="" if episode_R is None else 100 * episode_R)
        clock["updates"], clock["env_steps"] = updates, env_steps
        log.write(row)
        scores.append(float(100 * score.mean()))
        if not all(math.isfinite(v) for v in losses.values()):
            raise TrainingDiverged(f"a loss became non-finite ({losses}) at online step {step}")
        return float(score.mean())

    def save_latest(step):
        """Everything needed to continue from here (the export's record of every step included); written
        atomically, so a kill leaves the old or the new one."""
        state = dict(phase="online", step=step, agent=agent.state_dict(), num_updates=agent.num_updates,
                     last_actor_loss=agent.last_actor_loss, csv_rows=log.rows, scores=scores,
                     wall_s=time.time() - start, rng=rng_states(rng, env), buffer=buffer.state_dict(),
                     replay=None if replay is None else replay.state_dict(), R_episode=R_episode)
        atomic_write(run_dir / "latest.pt", lambda tmp: torch.save(state, tmp))

    # ---- Online training from scratch: warm-up, then G gradient steps per env step -------------
    buffer = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device)
    replay = Trajectories(args.online_steps, env.observation_space, env.action_space) if args.export_replay else None
    if latest:  # resuming where an episode was about to start
        agent.load_state_dict(latest["agent"])
        agent.num_updates, agent.last_actor_loss = latest["num_updates"], latest["last_actor_loss"]
        set_rng_states(latest["rng"], rng, env)
        buffer.load_state_dict(latest["buffer"])
        if replay is not None:
            replay.load_state_dict(latest["replay"])
        R_episode, done_steps = latest["R_episode"], latest["step"]
        clock["updates"], clock["env_steps"] = agent.num_updates, done_steps
    else:
        log_evaluation(0, {}, 0, 0)  # the untrained policy
        env.action_space.seed(args.seed)
        R_episode, done_steps = None, 0
        save_latest(0)
    metrics, steps_done = {}, done_steps
    obs, _ = env.reset(seed=args.seed if done_steps == 0 else None)
    episode_return, last_checkpoint = 0.0, done_steps
    noise_std = args.exploration_noise * (high - low) / 2
    with tqdm(total=args.online_steps, initial=done_steps, desc="online", unit="step", mininterval=2) as bar:
        for step in range(done_steps + 1, args.online_steps + 1):
            action = explore(agent.actor, obs, step, args.learning_starts, env.action_space, noise_std, rng, device)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            buffer.add(obs[None], action[None], [reward], next_obs[None], [float(terminated)])
            if replay is not None:
                replay.add(obs, action, reward, terminated, truncated, next_obs)
            obs = next_obs
            episode_return += float(reward)
            steps_done = step

            if step > args.learning_starts:
                for _ in range(args.utd):
                    metrics = agent.update(buffer.sample(args.batch_size))

            if terminated or truncated:
                R_episode = normalized(episode_return, ref_min, ref_max)

            if step % args.eval_every == 0 or step == args.online_steps:
                score = log_evaluation(step, metrics, agent.num_updates, step, R_episode)
                bar.set_postfix(score=f"{100 * score:.1f}")
                if args.stop_at_score is not None and 100 * score >= args.stop_at_score:
                    print(f"\nstopping at step {step}: normalized score {100 * score:.1f} >= --stop-at-score "
                          f"{args.stop_at_score}", file=sys.stderr)
                    break

            if terminated or truncated:
                # Checkpoints wait for an episode's end: then the environment's state is only its RNG.
                if step - last_checkpoint >= args.checkpoint_every and step < args.online_steps:
                    save_latest(step)
                    last_checkpoint = step
                obs, _ = env.reset()
                episode_return = 0.0
            bar.update()

    save_checkpoint(run_dir / "final.pt", agent, {**meta, "online_steps": steps_done, "num_updates": agent.num_updates})
    (run_dir / "latest.pt").unlink(missing_ok=True)  # final.pt marks the run as finished
    if args.stop_at_score is not None and max(scores[1:], default=-math.inf) < args.stop_at_score:
        print(f"note: --stop-at-score {args.stop_at_score} was never reached (best {max(scores):.1f}); the exports "
              f"below hold the agent after all {steps_done} steps", file=sys.stderr)

    # ---- Datasets D4RL's way: the replay buffer (medium-replay), the final policy's rollouts ---
    recipe = f"REDQ on TD3 (N={args.num_critics}, M={args.num_min_critics}, G={args.utd}), seed {args.seed}"
    if replay is not None:
        export_dataset(args.export_replay, replay, env_id, ref_min, ref_max, f"{recipe}: replay buffer",
                       f"every transition of {steps_done} training steps in {env_id} (the first "
                       f"{min(args.learning_starts, steps_done)} uniformly random), built by baselines/redq.py")
    if args.export_rollouts:
        rollout_env = gym.make(env_id)
        rollouts = rollout(agent.actor, rollout_env, args.rollout_steps, args.rollout_noise, rng, device,
                           args.seed + 200)
        export_dataset(args.export_rollouts, rollouts, env_id, ref_min, ref_max, f"{recipe}: final policy rollouts",
                       f"{args.rollout_steps} steps of pi(s) + N(0, {args.rollout_noise}) in {env_id}, the policy "
                       f"after {steps_done} training steps (last evaluation {scores[-1]:.1f}), "
                       f"built by baselines/redq.py")

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
