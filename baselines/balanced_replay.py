"""Balanced Replay on TD3+BC: a baseline of the adaptive-BC paper's Figure 2.

Paper: S. Lee, Y. Seo, K. Lee, P. Abbeel, J. Shin, "Offline-to-Online Reinforcement Learning via
Balanced Replay and Pessimistic Q-Ensemble" (CoRL 2021, arXiv:2107.00591). The adaptive-BC paper
(Zhao et al., Sec. 5.1) re-implemented it on TD3+BC instead of CQL, in the same codebase as its
other methods; this script is such a re-implementation, with this project's command line,
datasets, evaluation and logs. Lee et al.'s code (shlee94/Off2OnRL) settles details the papers
leave open; where this script follows it, it says so below.

1. Pessimistic Q-ensemble. Ten critics in two groups of five (num_groups x group_size). Their
   prediction is the mean within each group and the minimum across the groups:

       Qp(s, a) = min_g mean_{i in group g} Q_i(s, a)

   Qp replaces both the TD3 target's min over twin critics and the actor's Q:

       a' = clip(pi'(s') + clip(eps, -c, c), a_low, a_high),   eps ~ N(0, sigma_target)
       y  = r + gamma * (1 - terminal) * Qp'(s', a')           every critic regresses to y
       L(pi) = -mean(Qp(s, pi(s))) / mean(|Qp(s, pi(s))|) + alpha * mean((pi(s) - a)^2)

   (TD3+BC's objective, normalized as in the main script, redq_adaptive_bc.py.)

2. Offline pre-training (K gradient steps): the step above on uniform mini-batches of the
   dataset, alpha = alpha_offline.

3. Balanced replay during fine-tuning (T environment steps, G gradient steps each). Three
   buffers, as in the paper: the whole offline dataset, the online data (FIFO), and a joint
   prioritized buffer holding both. A density-ratio network w(s, a) >= 0 estimates
   d_online(s, a) / d_offline(s, a); it is trained, every gradient step, on a batch of online
   and a batch of offline transitions with the variational lower bound of the Jensen-Shannon
   divergence, whose optimum is the true ratio:

       L(w) = mean_offline[ log((w + 1) / 2) ] - mean_online[ log(2 w / (w + 1)) ]

   The RL mini-batch is drawn from the joint buffer with probability proportional to each
   transition's priority. After each draw, the drawn transitions' priorities become their
   self-normalized, tempered density ratio (Lee et al.'s temperature, 5, written temp here
   because T is the number of online steps):

       p(s, a) = clip( w(s, a)^(1/temp) / mean_offline-batch(w^(1/temp)), 1e-3, 1e3 )

   so near-on-policy transitions, offline ones included, are replayed more often.

Choices the papers leave open, and the one taken (flag in brackets):
- Online objective: alpha_online = 0, plain TD3 with the pessimistic ensemble, the analogue of
  Lee et al. dropping CQL's penalty online (CQL -> SAC) [--alpha-online].
- alpha_offline = 0.4, 100 on walker2d-random, as the adaptive-BC paper for every TD3+BC
  method [--alpha-offline]; TD3's target noise 0.2 clipped at 0.5, exploration noise 0.1,
  actor every 2nd step, targets soft-updated every step, lr 3e-4, batch 256, 2 x 256 ReLU
  networks; the critics' squared errors are summed over the ten critics; no state
  normalization; timeouts keep bootstrapping (Lee et al.'s code drops timeout transitions).
- Ensemble order: mean within a group, then min across groups, as the adaptive-BC paper
  describes it. Lee et al.'s code pairs critic i of one ensemble with critic i of the other,
  takes the min of each pair and then the mean over pairs, and pre-trains five independent
  agents whose policies it averages; here there is one actor and one ten-critic module.
- G = 1 gradient step per environment step (Lee et al.: 1; their extra 10x updates in the
  first 1000 steps are not used) [--utd].
- Density-ratio network: 2 x 256 ReLU MLP on (s, a), ReLU output, last bias initialized at 1
  so that w starts near 1 (Lee et al.'s code), Adam 3e-4, 256 online + 256 offline samples per
  gradient step drawn uniformly from the online and offline buffers; it is not trained
  offline (there is no online data yet) [--ratio-*].
- Priorities: computed with the ratio network before its gradient step, the normalizer from
  the same step's offline ratio batch (Lee et al.'s code); no importance-sampling
  correction, since the point is to change the training distribution. Offline transitions
  enter the joint buffer with priority 1; each new online transition gets the largest
  priority so far (as in prioritized replay). That running maximum starts at
  M f / ((1 - f) N) for a dataset of M transitions, so the first N = 1000 online transitions
  hold a fraction f = 0.5 of the sampling mass between them (Lee et al.'s code)
  [--init-online-fraction, --online-fraction-horizon, --priority-min, --priority-max].
- Buffer sizes (the adaptive-BC paper, Sec. 5.2): offline = the dataset (0.1-2M), online =
  T (0.25M), joint = dataset + T (0.35M-2.25M); nothing is ever overwritten. The memory
  they take is printed at the switch, written to config.json (buffer_bytes) and logged in
  progress.csv (buffer_bytes). Hopper with a 1M dataset: 108 bytes a transition, 108 MB
  offline + 27 MB online + 140 MB joint (with its priorities) = 275 MB, against 27 MB for the
  main script's single 250k buffer.
- Prioritized sampling with torch.multinomial over the joint buffer's priority vector rather
  than a sum tree: one call draws the batch exactly from p_i / sum_j p_j, stays on the
  device with no host synchronization, and an update is one scatter. A draw costs a pass
  over the vector (about 2.5 ms for 2.25M entries on one CPU core, small beside the
  gradient step; not yet measured on a GPU); a sum tree would cost O(B log n) but needs a
  level-by-level Python loop of gathers per draw and per update. Draws are i.i.d. (Lee et
  al.'s sum tree draws one per stratum). torch.multinomial takes at most 2^24 categories,
  checked before any work.

Run:
    python baselines/balanced_replay.py --env hopper --dataset medium
    python baselines/balanced_replay.py --help      # every hyperparameter
    python baselines/balanced_replay.py --resume runs/<run folder>   # continue a killed run from its latest.pt
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

METHOD = "balanced_replay"
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
MAX_CATEGORIES = 2 ** 24  # torch.multinomial's limit on the number of categories


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

    # Schedule (the same as the other scripts)
    offline_steps: int = 1_000_000
    """K, offline gradient steps (adaptive-BC paper: 1M for every method)"""
    online_steps: int = 250_000
    """T, online environment steps, also the online buffer's size (adaptive-BC paper: 250k)"""
    eval_every: int = 5_000
    """evaluate every this many gradient steps offline / environment steps online (paper: 5000)"""
    eval_episodes: int = 10
    """episodes per evaluation (paper: 10)"""

    # TD3+BC (Table 1)
    learning_rate: float = 3e-4
    """Adam learning rate of actor and critics (Table 1: 3e-4)"""
    batch_size: int = 256
    """B, RL mini-batch size (Table 1: 256)"""
    tau: float = 5e-3
    """target network update rate (Table 1: 5e-3)"""
    gamma: float = 0.99
    """discount factor"""
    policy_noise: float = 0.2
    """sigma_target, std of the target smoothing noise (TD3: 0.2)"""
    noise_clip: float = 0.5
    """c, clip of the target smoothing noise (Table 1: 0.5)"""
    exploration_noise: float = 0.1
    """sigma_expl, std of the online exploration noise (Table 1: 0.1)"""
    policy_freq: int = 2
    """one actor update every this many critic updates (Table 1: 2)"""
    hidden_layers: int = 2
    """hidden layers of actor and critics (Table 1: 2)"""
    hidden_dim: int = 256
    """units per hidden layer of actor and critics (Table 1: 256)"""
    activation: Literal["relu", "tanh", "elu", "gelu"] = "relu"
    """hidden activation (Table 1: ReLU)"""
    utd: int = 1
    """G, gradient steps per online environment step (Lee et al.: 1)"""
    alpha_offline: Optional[float] = None
    """alpha_offline, BC weight in pre-training (None = 0.4, or 100 on walker2d-random as in the paper)"""
    alpha_online: float = 0.0
    """alpha_online, BC weight in fine-tuning (0 = TD3, as Balanced Replay drops its offline regularizer online)"""

    # Pessimistic Q-ensemble
    num_groups: int = 2
    """critic groups; Qp is the minimum over groups (adaptive-BC paper: 2)"""
    group_size: int = 5
    """critics per group; Qp averages within a group (adaptive-BC paper: 5)"""

    # Balanced replay
    temperature: float = 5.0
    """temp, priority = w^(1/temp) / mean_offline(w^(1/temp)) (Lee et al.'s temperature T: 5)"""
    priority_min: float = 1e-3
    """lower clip of a priority (Lee et al.'s code: 1e-3)"""
    priority_max: float = 1e3
    """upper clip of a priority (Lee et al.'s code: 1e3)"""
    init_online_fraction: float = 0.5
    """f, share of the sampling mass the first N online transitions start with (Lee et al.'s code: 0.5)"""
    online_fraction_horizon: int = 1000
    """N, online transitions that together start with the share f (Lee et al.'s code: 1000)"""
    ratio_learning_rate: float = 3e-4
    """Adam learning rate of the density-ratio network (Lee et al.: 3e-4)"""
    ratio_batch_size: int = 256
    """online and offline samples each per density-ratio update (Lee et al.: 256)"""
    ratio_hidden_layers: int = 2
    """hidden layers of the density-ratio network (Lee et al.: 2)"""
    ratio_hidden_dim: int = 256
    """units per hidden layer of the density-ratio network (Lee et al.: 256)"""

    # Data and checkpoints
    random_dataset_steps: int = 1_000_000
    """size of the locally built random dataset (D4RL: 1M; other sizes get the id local/<env>/random-<n>steps-v0)"""
    ref_min_score: Optional[float] = None
    """return that normalizes to 0 (default: dataset metadata, else D4RL's random score)"""
    ref_max_score: Optional[float] = None
    """return that normalizes to 100 (default: dataset metadata, else D4RL's expert score)"""
    load_offline: Optional[str] = None
    """path to an offline.pt of this script: skip pre-training and fine-tune that agent"""
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
        method = config.get("method")  # checked first: another script's run lacks some of these fields
        if method is not None and method != METHOD:
            raise UsageError(f"--resume: {run_dir} is a run of {method}, not {METHOD}")
        fields = {name: config[name] for name in Args.__dataclass_fields__ if name != "resume"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"--resume: {run_dir} is not a run folder of this script ({type(e).__name__})") from None
    if method != METHOD:
        raise UsageError(f"--resume: {run_dir} is not a run folder of this script (no method)")
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
                "hidden_layers", "hidden_dim", "utd", "num_groups", "group_size", "online_fraction_horizon",
                "ratio_batch_size", "ratio_hidden_layers", "ratio_hidden_dim", "random_dataset_steps",
                "checkpoint_every"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 < args.tau <= 1 or not 0 <= args.gamma <= 1:
        raise UsageError(f"--tau must be in (0, 1] and --gamma in [0, 1], got {args.tau} and {args.gamma}")
    for name in ["learning_rate", "ratio_learning_rate", "temperature", "priority_min", "priority_max"]:
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    for name in ["policy_noise", "noise_clip", "exploration_noise", "alpha_offline", "alpha_online"]:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a non-negative number, got {value}")
    if args.priority_min >= args.priority_max:
        raise UsageError(f"--priority-min must be below --priority-max, got {args.priority_min} and {args.priority_max}")
    if not 0 < args.init_online_fraction < 1:
        raise UsageError(f"--init-online-fraction must be in (0, 1), got {args.init_online_fraction}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    if args.load_offline is not None and not Path(args.load_offline).is_file():
        raise UsageError(f"--load-offline: no such file: {args.load_offline}")


# ---------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU}


def mlp(in_dim, out_dim, hidden_dim, hidden_layers, activation) -> nn.Sequential:
    layers, width = [], in_dim
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, hidden_dim), ACTIVATIONS[activation]()]
        width = hidden_dim
    return nn.Sequential(*layers, nn.Linear(width, out_dim))


class Actor(nn.Module):
    """Deterministic policy pi(s): an MLP with a tanh output scaled to the action bounds."""

    def __init__(self, obs_dim, act_dim, action_low, action_high, hidden_dim=256, hidden_layers=2, activation="relu"):
        super().__init__()
        self.net = nn.Sequential(*mlp(obs_dim, act_dim, hidden_dim, hidden_layers, activation), nn.Tanh())
        low, high = torch.as_tensor(action_low, dtype=torch.float32), torch.as_tensor(action_high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)

    def forward(self, obs):
        return self.net(obs) * self.action_scale + self.action_bias


class CriticEnsemble(nn.Module):
    """N critics Q_1..Q_N in one module (here N = num_groups x group_size; critics
    g * group_size .. (g + 1) * group_size - 1 form group g).

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

    def forward(self, obs, action):
        """Q-values of shape (N, B)."""
        x = torch.cat([obs, action], dim=-1)
        num_layers = len(self.weights)
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            # The first layer broadcasts the same (B, in) input to every critic.
            x = torch.baddbmm(bias, x.expand(weight.shape[0], -1, -1), weight) if x.dim() == 2 else torch.baddbmm(bias, x, weight)
            if layer < num_layers - 1:
                x = self.activation(x)
        return x.squeeze(-1)


def pessimistic_q(q, num_groups):
    """Qp = min over groups of the mean within each group, for q of shape (N, B) -> (B,)."""
    return q.view(num_groups, -1, q.shape[-1]).mean(dim=1).min(dim=0).values


class DensityRatio(nn.Module):
    """w(s, a) >= 0, an estimate of d_online(s, a) / d_offline(s, a)."""

    def __init__(self, obs_dim, act_dim, hidden_dim=256, hidden_layers=2, activation="relu"):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, 1, hidden_dim, hidden_layers, activation)
        nn.init.constant_(self.net[-1].bias, 1.0)  # w starts near 1: every transition alike

    def forward(self, obs, action):
        return torch.relu(self.net(torch.cat([obs, action], dim=-1))).squeeze(-1)


# ---------------------------------------------------------------------------------------
# Replay buffers: offline, online (FIFO), joint prioritized
# ---------------------------------------------------------------------------------------
class Batch(NamedTuple):
    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminals: torch.Tensor  # 1.0 only for a true termination; a time-limit truncation keeps bootstrapping


class ReplayBuffer:
    """Preallocated FIFO ring buffer of transitions, kept as tensors on the training device.

    Once full, each new transition overwrites the oldest one (with the sizes used here, never).
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
        """Append n transitions (arrays or tensors with a leading dimension n). Returns their slots."""
        n = len(rewards)
        idx = (self.ptr + torch.arange(n, device=self.device)) % self.capacity
        for storage, values in zip(self.data, (obs, actions, rewards, next_obs, terminals)):
            storage[idx] = torch.as_tensor(values, dtype=torch.float32, device=self.device)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        return idx

    def sample(self, batch_size) -> Batch:
        idx = torch.randint(0, self.size, (batch_size,), device=self.device)
        return Batch(*(field[idx] for field in self.data))

    def nbytes(self) -> int:
        return sum(field.nbytes for field in self.data)

    def __len__(self):
        return self.size

    def state_dict(self):
        return {"ptr": self.ptr, "size": self.size, **self.data._asdict()}

    def load_state_dict(self, state):
        self.ptr, self.size = state["ptr"], state["size"]
        for name, storage in zip(Batch._fields, self.data):
            storage.copy_(state[name])


class PrioritizedReplayBuffer(ReplayBuffer):
    """The joint offline + online buffer, sampled in proportion to per-transition priorities.

    Sampling is torch.multinomial over the priority vector (see the module docstring for why
    not a sum tree); a priority update is a scatter. Nothing here synchronizes with the host.
    """

    def __init__(self, capacity, obs_dim, act_dim, device):
        super().__init__(capacity, obs_dim, act_dim, device)
        self.priorities = torch.zeros(capacity, device=device)
        self.max_priority = torch.ones((), device=device)

    def add(self, obs, actions, rewards, next_obs, terminals, priority=None):
        """Append n transitions with the given priority, by default the largest one so far."""
        idx = super().add(obs, actions, rewards, next_obs, terminals)
        self.priorities[idx] = self.max_priority if priority is None else priority
        return idx

    def sample(self, batch_size):
        """A batch drawn i.i.d. with P(i) = p_i / sum_j p_j, and the drawn slots."""
        idx = torch.multinomial(self.priorities[: self.size], batch_size, replacement=True)
        return Batch(*(field[idx] for field in self.data)), idx

    def update_priorities(self, idx, priorities):
        self.priorities[idx] = priorities
        self.max_priority = torch.maximum(self.max_priority, priorities.max())

    def nbytes(self) -> int:
        return super().nbytes() + self.priorities.nbytes

    def state_dict(self, transitions=True):
        """transitions=False leaves out the transitions (the caller rebuilds them): pointers and priorities only."""
        state = super().state_dict() if transitions else {"ptr": self.ptr, "size": self.size}
        return {**state, "priorities": self.priorities[: self.size].clone(), "max_priority": self.max_priority}

    def load_state_dict(self, state):
        """Transitions left out of state must already be in place."""
        if "obs" in state:
            super().load_state_dict(state)
        self.ptr, self.size = state["ptr"], state["size"]
        self.priorities.zero_()
        self.priorities[: self.size] = state["priorities"]
        self.max_priority = state["max_priority"].clone()


def initial_max_priority(offline_size, fraction, horizon):
    """The first online priority: N online transitions at M f / ((1 - f) N) each hold a share f
    of the mass when the M offline transitions hold priority 1 each."""
    return offline_size * fraction / ((1 - fraction) * horizon)


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
        os.environ["MINARI_DATASETS_PATH"] = str(root)
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
            description=f"{num_steps} steps of uniformly random actions in {env_id}, built by balanced_replay.py",
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
# The gradient steps: TD3+BC with the pessimistic ensemble, density ratio, priorities
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def td_target(batch: Batch, actor_target, critic_target, num_groups, gamma, policy_noise, noise_clip):
    """y = r + gamma (1 - terminal) Qp'(s', a'), with a' the smoothed target action."""
    noise = (torch.randn_like(batch.actions) * policy_noise).clamp(-noise_clip, noise_clip)
    next_actions = actor_target(batch.next_obs) + noise * actor_target.action_scale
    low = actor_target.action_bias - actor_target.action_scale
    high = actor_target.action_bias + actor_target.action_scale
    next_actions = torch.max(torch.min(next_actions, high), low)
    q_next = pessimistic_q(critic_target(batch.next_obs, next_actions), num_groups)
    return batch.rewards + gamma * (1.0 - batch.terminals) * q_next


def critic_loss(critic, batch: Batch, y):
    """Every critic regresses to the same y; their mean squared errors are summed. Returns (loss, mean Q)."""
    q = critic(batch.obs, batch.actions)  # (N, B)
    return ((q - y) ** 2).mean(dim=1).sum(), q.detach().mean()


def actor_loss(actor, critic, batch: Batch, alpha, num_groups):
    """TD3+BC: -mean(Qp)/mean|Qp| + alpha * mean((pi(s) - a)^2), Qp the pessimistic ensemble."""
    pi = actor(batch.obs)
    q = pessimistic_q(critic(batch.obs, pi), num_groups)
    # Dividing by the batch's mean |Qp| (no gradient) makes alpha independent of the reward scale.
    return -q.mean() / q.abs().mean().detach() + alpha * ((pi - batch.actions) ** 2).mean()


def ratio_loss(w_offline, w_online, eps=1e-10):
    """Jensen-Shannon variational bound, minimized by w = d_online / d_offline:
    mean_offline log((w + 1) / 2) - mean_online log(2 w / (w + 1))."""
    return (-torch.log(2 / (w_offline + 1) + eps)).mean() - torch.log(2 * w_online / (w_online + 1) + eps).mean()


def ratio_priorities(w, w_offline, temperature, priority_min, priority_max):
    """p = clip(w^(1/temp) / mean(w_offline^(1/temp)), p_min, p_max): tempered, self-normalized ratios."""
    normalizer = (w_offline ** (1 / temperature)).mean() + 1e-10
    return (w ** (1 / temperature) / normalizer).clamp(priority_min, priority_max)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau):
    """theta' <- tau theta + (1 - tau) theta', for all parameters in one fused call."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


class Agent:
    """Actor, ten-critic ensemble, their targets, the density-ratio network, optimizers, steps."""

    def __init__(self, obs_dim, act_dim, action_low, action_high, args: Args, device):
        net = dict(hidden_dim=args.hidden_dim, hidden_layers=args.hidden_layers, activation=args.activation)
        self.actor = Actor(obs_dim, act_dim, action_low, action_high, **net).to(device)
        self.critic = CriticEnsemble(args.num_groups * args.group_size, obs_dim, act_dim, **net).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.ratio = DensityRatio(obs_dim, act_dim, args.ratio_hidden_dim, args.ratio_hidden_layers,
                                  args.activation).to(device)
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=args.learning_rate, fused=True)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=args.learning_rate, fused=True)
        self.ratio_optim = torch.optim.Adam(self.ratio.parameters(), lr=args.ratio_learning_rate, fused=True)
        self.args = args
        self.num_updates = 0
        self.last_actor_loss = torch.zeros((), device=device)

    def update(self, batch: Batch, alpha):
        """One TD3+BC gradient step. No host-device synchronization: metrics stay tensors."""
        a = self.args
        self.num_updates += 1
        y = td_target(batch, self.actor_target, self.critic_target, a.num_groups, a.gamma, a.policy_noise,
                      a.noise_clip)
        loss_q, q_mean = critic_loss(self.critic, batch, y)
        self.critic_optim.zero_grad(set_to_none=True)
        loss_q.backward()
        self.critic_optim.step()

        if self.num_updates % a.policy_freq == 0:
            self.critic.requires_grad_(False)  # the actor's gradient flows through Q, not into it
            loss_pi = actor_loss(self.actor, self.critic, batch, alpha, a.num_groups)
            self.actor_optim.zero_grad(set_to_none=True)
            loss_pi.backward()
            self.actor_optim.step()
            self.critic.requires_grad_(True)
            self.last_actor_loss = loss_pi.detach()

        soft_update(self.critic_target, self.critic, a.tau)
        soft_update(self.actor_target, self.actor, a.tau)
        return {"critic_loss": loss_q.detach(), "actor_loss": self.last_actor_loss, "q_mean": q_mean}

    def update_ratio(self, offline: Batch, online: Batch, replayed: Batch):
        """One density-ratio step; returns (its loss, new priorities of the replayed batch).

        The priorities use the network before this step and the normalizer of this step's
        offline batch, as Lee et al.'s code does."""
        a = self.args
        w_offline = self.ratio(offline.obs, offline.actions)
        w_online = self.ratio(online.obs, online.actions)
        loss = ratio_loss(w_offline, w_online)
        with torch.no_grad():
            priorities = ratio_priorities(self.ratio(replayed.obs, replayed.actions), w_offline, a.temperature,
                                          a.priority_min, a.priority_max)
        self.ratio_optim.zero_grad(set_to_none=True)
        loss.backward()
        self.ratio_optim.step()
        return loss.detach(), priorities

    def state_dict(self):
        return {name: getattr(self, name).state_dict() for name in
                ("actor", "critic", "actor_target", "critic_target", "ratio", "actor_optim", "critic_optim",
                 "ratio_optim")}

    def load_state_dict(self, state):
        for name, value in state.items():
            getattr(self, name).load_state_dict(value)


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(actor, env, num_episodes, device, seed) -> np.ndarray:
    """Undiscounted returns of the deterministic policy pi(s). Every evaluation starts from the
    same seed, so all evaluations of a run see the same initial states."""
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
# The project's columns in the project's order, then Balanced Replay's own: the share of the
# last RL batch drawn from online transitions, the density-ratio loss, and the bytes the
# replay buffers hold.
COLUMNS = ["phase", "step", "normalized_score", "normalized_score_std", "return_mean", "alpha", "critic_loss",
           "actor_loss", "q_mean", "updates_per_s", "env_steps_per_s", "wall_s", "episode_normalized_return",
           "online_fraction", "ratio_loss", "buffer_bytes"]


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
        assert isinstance(saved, dict)
    except Exception as e:
        raise UsageError(f"--load-offline: {path} is not a checkpoint of this script ({type(e).__name__})") from None
    if saved.get("method") != METHOD:
        raise UsageError(f"--load-offline: {path} was written by method {saved.get('method')!r}, not {METHOD!r}")
    for key in ("env_id", "obs_dim", "act_dim"):
        if saved.get(key) != meta[key]:
            raise UsageError(f"--load-offline: {path} was trained on {saved.get('env_id')} "
                             f"({key}={saved.get(key)}), this run uses {meta['env_id']} ({key}={meta[key]})")
    try:
        agent.load_state_dict(checkpoint["agent"])
    except (RuntimeError, KeyError, ValueError, AttributeError) as e:
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
    torch.set_rng_state(states["torch"].cpu())  # .cpu(): latest.pt is loaded with map_location=device
    if states["cuda"]:
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])
    env.unwrapped.np_random.bit_generator.state = states["env"]


# ---------------------------------------------------------------------------------------
# Main: offline loop, switch (three buffers), online loop
# ---------------------------------------------------------------------------------------
def env_name_of(env_id: str) -> str:
    """'Walker2d-v5' -> 'walker2d'."""
    return re.sub(r"-v\d+$", "", env_id.split("/")[-1]).lower()


def buffer_bytes(offline_size, online_size, obs_dim, act_dim) -> dict:
    """Bytes of the three buffers: float32 obs, action, reward, next obs, terminal per
    transition, plus a float32 priority per slot of the joint buffer."""
    per_transition = 4 * (2 * obs_dim + act_dim + 2)
    sizes = {"offline": offline_size * per_transition, "online": online_size * per_transition,
             "prioritized": (offline_size + online_size) * (per_transition + 4)}
    return {**sizes, "total": sum(sizes.values())}


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
    size = len(data["rewards"])
    if size + args.online_steps > MAX_CATEGORIES:
        raise UsageError(f"the joint buffer would hold {size} + {args.online_steps} transitions, more than the "
                         f"{MAX_CATEGORIES} torch.multinomial can sample from; lower --online-steps")
    if args.alpha_offline is None:
        args.alpha_offline = 100.0 if env_name == "walker2d" and dataset_name.split("-")[0] == "random" else 0.4
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    info = dict(dataset_id=dataset_id, env_id=env.spec.id, env=env_name, dataset=dataset_name,
                ref_min_score=ref_min, ref_max_score=ref_max, ref_source=ref_source, dataset_transitions=size,
                buffer_capacity={"offline": size, "online": args.online_steps, "prioritized": size + args.online_steps},
                buffer_bytes=buffer_bytes(size, args.online_steps, obs_dim, act_dim))
    return env, eval_env, data, info


def main(args: Args):
    env, eval_env, data, info = setup(args)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    agent = Agent(obs_dim, act_dim, low, high, args, device)
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

    def log_evaluation(phase, step, alpha, metrics, updates, env_steps, memory, episode_R=None):
        """Evaluate pi, write a progress.csv row, and stop if a loss went NaN. Returns the score (fraction)."""
        returns = evaluate(agent.actor, eval_env, args.eval_episodes, device, seed=args.seed + 100)
        score = normalized(returns, info["ref_min_score"], info["ref_max_score"])
        values = {k: float(v) for k, v in metrics.items()}  # the only host syncs: once per evaluation
        now = time.time()
        elapsed, clock["time"] = max(now - clock["time"], 1e-9), now
        row = dict(phase=phase, step=step, normalized_score=100 * score.mean(), normalized_score_std=100 * score.std(),
                   return_mean=returns.mean(), alpha=alpha, **values,
                   updates_per_s=(updates - clock["updates"]) / elapsed if updates > clock["updates"] else "",
                   env_steps_per_s=(env_steps - clock["env_steps"]) / elapsed if env_steps > clock["env_steps"] else "",
                   wall_s=now - start, episode_normalized_return="" if episode_R is None else 100 * episode_R,
                   buffer_bytes=memory)
        clock["updates"], clock["env_steps"] = updates, env_steps
        log.write(row)
        scores.append(float(100 * score.mean()))
        if not all(math.isfinite(v) for v in values.values()):
            raise TrainingDiverged(f"a loss became non-finite ({values}) at {phase} step {step}")
        return float(score.mean())

    def save_latest(phase, step, **online_state):
        """Everything needed to continue from here; written atomically, so a kill leaves the old or the new one."""
        state = dict(phase=phase, step=step, agent=agent.state_dict(), num_updates=agent.num_updates,
                     last_actor_loss=agent.last_actor_loss, csv_rows=log.rows, scores=scores,
                     wall_s=time.time() - start, rng=rng_states(rng, env), **online_state)
        atomic_write(run_dir / "latest.pt", lambda tmp: torch.save(state, tmp))

    if latest:
        agent.load_state_dict(latest["agent"])
        agent.num_updates, agent.last_actor_loss = latest["num_updates"], latest["last_actor_loss"]
        set_rng_states(latest["rng"], rng, env)
        clock["updates"] = agent.num_updates
    phase, done_steps = (latest["phase"], latest["step"]) if latest else ("offline", 0)

    # ---- Offline pre-training: K gradient steps of TD3+BC with the pessimistic ensemble ----
    offline = ReplayBuffer(len(data["rewards"]), obs_dim, act_dim, device)  # rebuilt from the dataset on resume
    offline.add(data["obs"], data["actions"], data["rewards"], data["next_obs"], data["terminals"])
    del data  # the buffer holds the only copy
    alpha = torch.tensor(args.alpha_offline, device=device)
    if phase == "offline" and not args.load_offline:
        with tqdm(total=args.offline_steps, initial=done_steps, desc="offline", unit="upd", mininterval=2) as bar:
            if done_steps == 0:
                log_evaluation("offline", 0, args.alpha_offline, {}, 0, 0, offline.nbytes())
            for step in range(done_steps + 1, args.offline_steps + 1):
                metrics = agent.update(offline.sample(args.batch_size), alpha)
                if step % args.eval_every == 0 or step == args.offline_steps:
                    score = log_evaluation("offline", step, args.alpha_offline, metrics, step, 0, offline.nbytes())
                    bar.set_postfix(score=f"{100 * score:.1f}")
                if step % args.checkpoint_every == 0 and step < args.offline_steps:
                    save_latest("offline", step)
                bar.update()
        save_checkpoint(run_dir / "offline.pt", agent, {**meta, "offline_steps": args.offline_steps})

    # ---- The switch: an online FIFO buffer and the joint prioritized buffer -----------------
    num_offline = len(offline)
    online = ReplayBuffer(args.online_steps, obs_dim, act_dim, device)
    joint = PrioritizedReplayBuffer(num_offline + args.online_steps, obs_dim, act_dim, device)
    joint.add(*offline.data, priority=1.0)  # slots 0 .. num_offline - 1 hold the offline data
    joint.max_priority.fill_(initial_max_priority(num_offline, args.init_online_fraction, args.online_fraction_horizon))
    memory = offline.nbytes() + online.nbytes() + joint.nbytes()
    mb = 1 / 2 ** 20

    def buffer_state():
        # The joint buffer's transitions are the offline data then the online FIFO's (nothing is ever
        # overwritten): the checkpoint keeps only its pointers and priorities and rebuilds the rest.
        return dict(online=online.state_dict(), joint=joint.state_dict(transitions=False))

    if phase == "offline":
        print(f"switch to online: replay buffers take {memory * mb:.1f} MiB: offline {num_offline} transitions "
              f"{offline.nbytes() * mb:.1f} MiB, online capacity {online.capacity} {online.nbytes() * mb:.1f} MiB, "
              f"prioritized capacity {joint.capacity} {joint.nbytes() * mb:.1f} MiB", file=sys.stderr)
        alpha.fill_(args.alpha_online)
        log_evaluation("online", 0, args.alpha_online, {}, agent.num_updates, 0, memory)
        R_current, done_steps = None, 0
        save_latest("online", 0, **buffer_state(), R_current=R_current)
    else:  # resuming fine-tuning where an episode was about to start
        online.load_state_dict(latest["online"])
        joint.add(*(field[: online.size] for field in online.data))
        joint.load_state_dict(latest["joint"])
        R_current = latest["R_current"]
        clock["env_steps"] = done_steps

    # ---- Online fine-tuning: prioritized replay from the joint buffer, G steps per env step --
    alpha.fill_(args.alpha_online)
    obs, _ = env.reset(seed=args.seed if done_steps == 0 else None)
    episode_return, last_checkpoint = 0.0, done_steps
    noise_std = args.exploration_noise * (high - low) / 2
    with tqdm(total=args.online_steps, initial=done_steps, desc="online", unit="step", mininterval=2) as bar:
        for step in range(done_steps + 1, args.online_steps + 1):
            with torch.no_grad():
                action = agent.actor(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0].cpu().numpy()
            action = np.clip(action + rng.normal(0.0, noise_std), low, high)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            transition = (obs[None], action[None], [reward], next_obs[None], [float(terminated)])
            online.add(*transition)
            joint.add(*transition)  # at the largest priority so far
            obs = next_obs
            episode_return += float(reward)

            for _ in range(args.utd):
                replayed, idx = joint.sample(args.batch_size)
                loss_w, priorities = agent.update_ratio(offline.sample(args.ratio_batch_size),
                                                        online.sample(args.ratio_batch_size), replayed)
                joint.update_priorities(idx, priorities)
                metrics = agent.update(replayed, alpha)
            metrics.update(ratio_loss=loss_w, online_fraction=(idx >= num_offline).float().mean())

            episode_over = terminated or truncated
            if episode_over:
                R_current = float(normalized(episode_return, info["ref_min_score"], info["ref_max_score"]))

            if step % args.eval_every == 0 or step == args.online_steps:
                score = log_evaluation("online", step, args.alpha_online, metrics, agent.num_updates, step, memory,
                                       R_current)
                bar.set_postfix(score=f"{100 * score:.1f}")

            if episode_over:
                # Checkpoints wait for an episode's end: then the environment's state is only its RNG.
                if step - last_checkpoint >= args.checkpoint_every and step < args.online_steps:
                    save_latest("online", step, **buffer_state(), R_current=R_current)
                    last_checkpoint = step
                obs, _ = env.reset()
                episode_return = 0.0
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
