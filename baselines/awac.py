"""AWAC: Advantage-Weighted Actor-Critic, a baseline of the adaptive-BC paper's Figure 2.

Paper: A. Nair, A. Gupta, M. Dalal, S. Levine, "AWAC: Accelerating Online Reinforcement Learning
with Offline Datasets" (arXiv:2006.09359, 2020). The adaptive-BC paper (Zhao et al., Sec. 5.1)
produced its AWAC curves with the reference implementation in ikostrikov/jaxrl (agents/awac);
this script follows that implementation's choices, written anew in PyTorch with this project's
command line, datasets, evaluation and logs.

One set of updates runs first on the offline dataset (K gradient steps) and then, unchanged,
while the agent collects its own data (T environment steps, G updates each). Nothing switches
at the boundary: the actor is constrained to the buffer's actions only implicitly, through the
weights below, so the constraint loosens by itself as online data fill the buffer.

1. Critics: twin Q-functions that evaluate the current actor (no entropy term):

       a' ~ pi(.|s')                          the current actor: AWAC has no target actor
       y  = r + gamma * (1 - terminal) * min_i Q'_i(s', a')
       L(Q) = sum_i mean_batch (Q_i(s, a) - y)^2

2. Actor: weighted maximum likelihood of the buffer's own actions (the AWAC paper's policy
   update, argmax_pi E_{s,a ~ buffer}[log pi(a|s) exp(A(s,a) / lambda) / Z(s)]):

       V(s)   = min_i mean_k Q_i(s, a_k),      a_k ~ pi(.|s), k = 1..num_action_samples
       A(s,a) = min_i Q_i(s, a) - V(s)
       w(s,a) = exp(A / lambda) / mean_batch exp(A / lambda)       (no gradient)
       L(pi)  = - mean_batch w(s,a) log pi(a|s)

   The normalizer Z is the batch mean of exp(A / lambda). jaxrl writes the same loss as
   -sum(softmax(A / lambda) * log pi): B * softmax(A / lambda) is exactly w above. That softmax
   is how jaxrl keeps the weights in check: it is computed without overflow and bounds every
   weight to (0, B], so jaxrl has no separate clip and neither does the default here.
   --max-weight adds one, w <- min(w, max_weight), and --no-normalize-weights uses the raw
   exp(A / lambda) of the AWAC paper's equation, which then needs --max-weight.

3. The actor is a Gaussian whose mean is bounded by a tanh (scaled to the action bounds) and
   whose log-std is one learned vector, clipped to [-10, 2] (jaxrl's NormalTanhPolicy with
   tanh_squash_distribution=False). The distribution itself is not squashed, so log pi(a|s)
   of every buffer action is finite. It acts by sampling during fine-tuning (clipped to the
   action bounds, as jaxrl does) and by its mean in evaluation.

Choices, jaxrl's unless said otherwise: batch 1024 (the adaptive-BC paper and the AWAC paper);
lambda = 1 (the value given for the adaptive-BC paper's AWAC runs; jaxrl's example config, which
it labels the official implementation's values, says 2.0: --lam 2); actor 4 x 256 trained with
AdamW (weight decay 1e-4); critics 2 x 256 with Adam; learning rate 3e-4; tau 5e-3 every step;
one policy sample for V(s); target actions a' are sampled and not clipped; one gradient step per
environment step online (G = 1). As in the other scripts: 1M offline gradient steps (jaxrl's
fine-tuning example pre-trains 50k), 250k online steps, evaluation every 5,000 steps with 10
episodes of the deterministic policy, the evaluation environment reseeded with seed + 100 each
time, no state normalization. One FIFO buffer holds the whole offline dataset and then the
online data; its default capacity, dataset + online steps, never overwrites anything.

Run:
    python baselines/awac.py --env hopper --dataset medium
    python baselines/awac.py --help      # every hyperparameter
    python baselines/awac.py --resume runs/<run folder>   # continue a killed run from its latest.pt
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

METHOD = "awac"
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

    # Schedule (the same as the other scripts)
    offline_steps: int = 1_000_000
    """K, offline gradient steps (adaptive-BC paper: 1M for every method)"""
    online_steps: int = 250_000
    """T, online environment steps (adaptive-BC paper: 250k)"""
    eval_every: int = 5_000
    """evaluate every this many gradient steps offline / environment steps online (paper: 5000)"""
    eval_episodes: int = 10
    """episodes per evaluation (paper: 10)"""

    # AWAC (jaxrl's defaults unless noted)
    learning_rate: float = 3e-4
    """Adam learning rate of actor and critics (jaxrl: 3e-4)"""
    actor_weight_decay: float = 1e-4
    """AdamW weight decay of the actor (jaxrl: 1e-4)"""
    batch_size: int = 1024
    """B, mini-batch size (adaptive-BC paper and AWAC paper: 1024)"""
    tau: float = 5e-3
    """target critic update rate (jaxrl: 5e-3)"""
    gamma: float = 0.99
    """discount factor (jaxrl: 0.99)"""
    target_update_period: int = 1
    """soft-update the target critics every this many gradient steps (jaxrl: 1)"""
    lam: float = 1.0
    """lambda, temperature of the advantage weights exp(A/lambda) (adaptive-BC paper's runs: 1; jaxrl's config: 2)"""
    normalize_weights: bool = True
    """divide exp(A/lambda) by its batch mean, i.e. B * softmax(A/lambda) as jaxrl does"""
    max_weight: Optional[float] = None
    """clip every advantage weight at this value (None: no clip besides the normalization, as jaxrl)"""
    num_action_samples: int = 1
    """actions drawn from pi(.|s) to estimate V(s) = E_a Q(s, a) (jaxrl: 1)"""
    num_critics: int = 2
    """critics; targets and advantages use their minimum (AWAC: 2, twin critics)"""
    hidden_layers: int = 2
    """hidden layers of the critics (jaxrl: 2)"""
    actor_hidden_layers: int = 4
    """hidden layers of the actor (jaxrl's AWAC: 4)"""
    hidden_dim: int = 256
    """units per hidden layer of actor and critics (jaxrl: 256)"""
    activation: Literal["relu", "tanh", "elu", "gelu"] = "relu"
    """hidden activation (jaxrl: ReLU)"""
    state_dependent_std: bool = False
    """predict the actor's log-std from the state instead of learning one vector (jaxrl's AWAC: False)"""
    log_std_min: float = -10.0
    """lower clip of the actor's log-std (jaxrl: -10)"""
    log_std_max: float = 2.0
    """upper clip of the actor's log-std (jaxrl: 2)"""
    utd: int = 1
    """G, gradient steps per online environment step (jaxrl: 1)"""
    buffer_size: Optional[int] = None
    """FIFO replay capacity (None = dataset + online steps: the whole dataset and every online step)"""

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
    positive = ["offline_steps", "online_steps", "eval_every", "eval_episodes", "batch_size", "target_update_period",
                "num_action_samples", "num_critics", "hidden_layers", "actor_hidden_layers", "hidden_dim", "utd",
                "random_dataset_steps", "checkpoint_every"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 < args.tau <= 1 or not 0 <= args.gamma <= 1:
        raise UsageError(f"--tau must be in (0, 1] and --gamma in [0, 1], got {args.tau} and {args.gamma}")
    for name in ["learning_rate", "lam", "max_weight"]:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if not (math.isfinite(args.actor_weight_decay) and args.actor_weight_decay >= 0):
        raise UsageError(f"--actor-weight-decay must be a non-negative number, got {args.actor_weight_decay}")
    if not args.normalize_weights and args.max_weight is None:
        raise UsageError("--no-normalize-weights needs --max-weight: raw exp(A/lambda) overflows without a clip")
    if not (math.isfinite(args.log_std_min) and math.isfinite(args.log_std_max) and args.log_std_min < args.log_std_max):
        raise UsageError(f"--log-std-min must be below --log-std-max, got {args.log_std_min} and {args.log_std_max}")
    if args.buffer_size is not None and args.buffer_size <= 0:
        raise UsageError(f"--buffer-size must be positive, got {args.buffer_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    if args.load_offline is not None and not Path(args.load_offline).is_file():
        raise UsageError(f"--load-offline: no such file: {args.load_offline}")


# ---------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU}


class GaussianActor(nn.Module):
    """pi(a|s) = N(mu(s), sigma^2): mu tanh-bounded to the action range, log sigma clipped.

    The distribution is a plain (unsquashed) Gaussian, as jaxrl's AWAC actor; calling the
    module returns its mean, the deterministic action used in evaluation.
    """

    def __init__(self, obs_dim, act_dim, action_low, action_high, hidden_dim=256, hidden_layers=4,
                 activation="relu", state_dependent_std=False, log_std_min=-10.0, log_std_max=2.0):
        super().__init__()
        layers, width = [], obs_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden_dim), ACTIVATIONS[activation]()]
            width = hidden_dim
        self.trunk = nn.Sequential(*layers)
        self.mean = nn.Linear(width, act_dim)
        if state_dependent_std:
            self.log_std = nn.Linear(width, act_dim)
        else:
            self.log_std = nn.Parameter(torch.zeros(act_dim))  # jaxrl initializes it at 0 (sigma = 1)
        self.log_std_min, self.log_std_max = log_std_min, log_std_max
        low, high = torch.as_tensor(action_low, dtype=torch.float32), torch.as_tensor(action_high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)

    def forward(self, obs):
        return torch.tanh(self.mean(self.trunk(obs))) * self.action_scale + self.action_bias

    def distribution(self, obs) -> torch.distributions.Normal:
        h = self.trunk(obs)
        mean = torch.tanh(self.mean(h)) * self.action_scale + self.action_bias
        log_std = self.log_std(h) if isinstance(self.log_std, nn.Linear) else self.log_std.expand_as(mean)
        std = log_std.clamp(self.log_std_min, self.log_std_max).exp() * self.action_scale
        # validate_args=False: argument checks would cost a host sync per call.
        return torch.distributions.Normal(mean, std, validate_args=False)


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

    AWAC keeps one buffer for both phases: it starts with the whole offline dataset and online
    transitions are appended after it (once full, each new transition overwrites the oldest).
    """

    def __init__(self, capacity, obs_dim, act_dim, device):
        self.capacity, self.device = capacity, device
        self.ptr = self.size = self.added = 0  # added: every transition ever appended
        self.data = Batch(
            obs=torch.zeros(capacity, obs_dim, device=device),
            actions=torch.zeros(capacity, act_dim, device=device),
            rewards=torch.zeros(capacity, device=device),
            next_obs=torch.zeros(capacity, obs_dim, device=device),
            terminals=torch.zeros(capacity, device=device),
        )

    def add(self, obs, actions, rewards, next_obs, terminals):
        """Append n transitions (arrays or tensors with a leading dimension n)."""
        n = len(rewards)
        idx = (self.ptr + torch.arange(n, device=self.device)) % self.capacity
        for storage, values in zip(self.data, (obs, actions, rewards, next_obs, terminals)):
            storage[idx] = torch.as_tensor(values, dtype=torch.float32, device=self.device)
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self.added += n

    def sample(self, batch_size) -> Batch:
        idx = torch.randint(0, self.size, (batch_size,), device=self.device)
        return Batch(*(field[idx] for field in self.data))

    def __len__(self):
        return self.size

    def state_dict(self, rebuilt=0):
        """rebuilt: the first this many transitions ever added (the dataset) are left out, as the caller
        adds them again before load_state_dict, except the slots the FIFO has overwritten since."""
        overwritten = min(rebuilt, max(0, self.added - self.capacity))
        return {"ptr": self.ptr, "size": self.size, "added": self.added, "rebuilt": rebuilt,
                "overwritten": overwritten,
                **{name: torch.cat([storage[:overwritten], storage[rebuilt: self.size]])
                   for name, storage in zip(Batch._fields, self.data)}}

    def load_state_dict(self, state):
        """After the state's first `rebuilt` transitions were added again."""
        rebuilt, overwritten = state["rebuilt"], state["overwritten"]
        assert self.added == rebuilt, "add the left-out transitions first"
        for name, storage in zip(Batch._fields, self.data):
            storage[:overwritten] = state[name][:overwritten]
            storage[rebuilt: state["size"]] = state[name][overwritten:]
        self.ptr, self.size, self.added = state["ptr"], state["size"], state["added"]


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
            description=f"{num_steps} steps of uniformly random actions in {env_id}, built by awac.py",
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
# The gradient step: critic target, critic loss, advantage weights, actor loss, targets
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def td_target(batch: Batch, actor: GaussianActor, critic_target, gamma):
    """y = r + gamma (1 - terminal) min_i Q'_i(s', a'), a' ~ pi(.|s') from the current actor."""
    next_actions = actor.distribution(batch.next_obs).sample()
    q_next = critic_target(batch.next_obs, next_actions).min(dim=0).values
    return batch.rewards + gamma * (1.0 - batch.terminals) * q_next


def critic_loss(critic, batch: Batch, y):
    """Each critic's mean squared error to y, summed over critics. Returns (loss, mean Q)."""
    q = critic(batch.obs, batch.actions)  # (N, B)
    return ((q - y) ** 2).mean(dim=1).sum(), q.detach().mean()


@torch.no_grad()
def state_value(critic, obs, policy_actions):
    """V(s) = min_i mean_k Q_i(s, a_k) for policy_actions a_k of shape (K, B, act_dim).

    The mean over the K samples is taken per critic, then the minimum over critics (jaxrl).
    """
    num_samples, batch_size = policy_actions.shape[:2]
    obs_k = obs.expand(num_samples, -1, -1).reshape(num_samples * batch_size, -1)
    q = critic(obs_k, policy_actions.reshape(num_samples * batch_size, -1))  # (N, K * B)
    return q.view(q.shape[0], num_samples, batch_size).mean(dim=1).min(dim=0).values


def advantage_weights(advantages, lam, normalize=True, max_weight=None):
    """w = exp(A / lambda), divided by its batch mean when normalize (= B softmax(A / lambda),
    computed without overflow), then clipped at max_weight when one is given."""
    if normalize:
        weights = torch.softmax(advantages / lam, dim=0) * advantages.shape[0]
    else:
        weights = torch.exp(advantages / lam)  # may overflow to inf: the clip below is then required
    if max_weight is not None:
        weights = weights.clamp(max=max_weight)
    return weights


def actor_loss(actor: GaussianActor, critic, batch: Batch, lam, normalize, max_weight, num_action_samples):
    """-mean_batch w(s, a) log pi(a|s), with w from the advantage A = min_i Q_i(s, a) - V(s).

    Returns (loss, largest weight, mean policy std)."""
    dist = actor.distribution(batch.obs)
    with torch.no_grad():
        v = state_value(critic, batch.obs, dist.sample((num_action_samples,)))
        advantages = critic(batch.obs, batch.actions).min(dim=0).values - v
        weights = advantage_weights(advantages, lam, normalize, max_weight)
    log_prob = dist.log_prob(batch.actions).sum(dim=-1)
    return -(weights * log_prob).mean(), weights.max(), dist.stddev.detach().mean()


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau):
    """theta' <- tau theta + (1 - tau) theta', for all parameters in one fused call."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


class Agent:
    """Gaussian actor, twin critics, target critics, optimizers, and the gradient step."""

    def __init__(self, obs_dim, act_dim, action_low, action_high, args: Args, device):
        self.actor = GaussianActor(obs_dim, act_dim, action_low, action_high, hidden_dim=args.hidden_dim,
                                   hidden_layers=args.actor_hidden_layers, activation=args.activation,
                                   state_dependent_std=args.state_dependent_std, log_std_min=args.log_std_min,
                                   log_std_max=args.log_std_max).to(device)
        self.critic = CriticEnsemble(args.num_critics, obs_dim, act_dim, hidden_dim=args.hidden_dim,
                                     hidden_layers=args.hidden_layers, activation=args.activation).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optim = torch.optim.AdamW(self.actor.parameters(), lr=args.learning_rate,
                                             weight_decay=args.actor_weight_decay, fused=True)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=args.learning_rate, fused=True)
        self.args = args
        self.num_updates = 0

    def update(self, batch: Batch):
        """One gradient step: critics first, then the actor against the updated critics (jaxrl's
        order). No host-device synchronization: metrics stay tensors."""
        a = self.args
        self.num_updates += 1
        y = td_target(batch, self.actor, self.critic_target, a.gamma)
        loss_q, q_mean = critic_loss(self.critic, batch, y)
        self.critic_optim.zero_grad(set_to_none=True)
        loss_q.backward()
        self.critic_optim.step()

        # The critics enter the actor loss only through the weights, computed without gradient.
        loss_pi, weight_max, policy_std = actor_loss(self.actor, self.critic, batch, a.lam, a.normalize_weights,
                                                     a.max_weight, a.num_action_samples)
        self.actor_optim.zero_grad(set_to_none=True)
        loss_pi.backward()
        self.actor_optim.step()

        if self.num_updates % a.target_update_period == 0:
            soft_update(self.critic_target, self.critic, a.tau)
        return {"critic_loss": loss_q.detach(), "actor_loss": loss_pi.detach(), "q_mean": q_mean,
                "weight_max": weight_max, "policy_std": policy_std}

    def state_dict(self):
        return {name: getattr(self, name).state_dict() for name in
                ("actor", "critic", "critic_target", "actor_optim", "critic_optim")}

    def load_state_dict(self, state):
        for name, value in state.items():
            getattr(self, name).load_state_dict(value)


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(actor, env, num_episodes, device, seed) -> np.ndarray:
    """Undiscounted returns of the deterministic policy (the Gaussian's mean). Every evaluation starts
    from the same seed, so all evaluations of a run see the same initial states."""
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
# The project's columns in the project's order (alpha stays empty: AWAC has no BC weight), then
# AWAC's own: the largest advantage weight of the last batch and the policy's mean std.
COLUMNS = ["phase", "step", "normalized_score", "normalized_score_std", "return_mean", "alpha", "critic_loss",
           "actor_loss", "q_mean", "updates_per_s", "env_steps_per_s", "wall_s", "episode_normalized_return",
           "weight_max", "policy_std"]


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


def rng_states(env):
    """Every random stream a run draws from, so that a resumed run continues it exactly. AWAC draws
    nothing from numpy: its actions are sampled with torch."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "env": env.unwrapped.np_random.bit_generator.state}


def set_rng_states(states, env):
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"].cpu())  # .cpu(): latest.pt is loaded with map_location=device
    if states["cuda"]:
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])
    env.unwrapped.np_random.bit_generator.state = states["env"]


# ---------------------------------------------------------------------------------------
# Main: offline loop, online loop (the same updates in both)
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
    size = len(data["rewards"])
    if args.buffer_size is None:
        args.buffer_size = size + args.online_steps
    elif args.buffer_size < size:
        raise UsageError(f"--buffer-size {args.buffer_size} cannot hold the {size} transitions of {dataset_id}")
    info = dict(dataset_id=dataset_id, env_id=env.spec.id, env=env_name, dataset=dataset_name,
                ref_min_score=ref_min, ref_max_score=ref_max, ref_source=ref_source, dataset_transitions=size)
    return env, eval_env, data, info


def main(args: Args):
    env, eval_env, data, info = setup(args)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
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

    def log_evaluation(phase, step, metrics, updates, env_steps, episode_R=None):
        """Evaluate pi, write a progress.csv row, and stop if a loss went NaN. Returns the score (fraction)."""
        returns = evaluate(agent.actor, eval_env, args.eval_episodes, device, seed=args.seed + 100)
        score = normalized(returns, info["ref_min_score"], info["ref_max_score"])
        values = {k: float(v) for k, v in metrics.items()}  # the only host syncs: once per evaluation
        now = time.time()
        elapsed, clock["time"] = max(now - clock["time"], 1e-9), now
        row = dict(phase=phase, step=step, normalized_score=100 * score.mean(), normalized_score_std=100 * score.std(),
                   return_mean=returns.mean(), alpha="", **values,
                   updates_per_s=(updates - clock["updates"]) / elapsed if updates > clock["updates"] else "",
                   env_steps_per_s=(env_steps - clock["env_steps"]) / elapsed if env_steps > clock["env_steps"] else "",
                   wall_s=now - start, episode_normalized_return="" if episode_R is None else 100 * episode_R)
        clock["updates"], clock["env_steps"] = updates, env_steps
        log.write(row)
        scores.append(float(100 * score.mean()))
        if not all(math.isfinite(v) for v in values.values()):
            raise TrainingDiverged(f"a loss became non-finite ({values}) at {phase} step {step}")
        return float(score.mean())

    def save_latest(phase, step, **online_state):
        """Everything needed to continue from here; written atomically, so a kill leaves the old or the new one."""
        state = dict(phase=phase, step=step, agent=agent.state_dict(), num_updates=agent.num_updates,
                     csv_rows=log.rows, scores=scores, wall_s=time.time() - start, rng=rng_states(env), **online_state)
        atomic_write(run_dir / "latest.pt", lambda tmp: torch.save(state, tmp))

    if latest:
        agent.load_state_dict(latest["agent"])
        agent.num_updates = latest["num_updates"]
        set_rng_states(latest["rng"], env)
        clock["updates"] = agent.num_updates
    phase, done_steps = (latest["phase"], latest["step"]) if latest else ("offline", 0)

    # ---- Offline pre-training: K gradient steps on the dataset -----------------------------
    buffer = ReplayBuffer(args.buffer_size, obs_dim, act_dim, device)  # on resume the dataset is added again
    buffer.add(data["obs"], data["actions"], data["rewards"], data["next_obs"], data["terminals"])
    num_offline = len(data["rewards"])
    del data  # the buffer holds the only copy
    if phase == "offline" and not args.load_offline:
        with tqdm(total=args.offline_steps, initial=done_steps, desc="offline", unit="upd", mininterval=2) as bar:
            if done_steps == 0:
                log_evaluation("offline", 0, {}, 0, 0)
            for step in range(done_steps + 1, args.offline_steps + 1):
                metrics = agent.update(buffer.sample(args.batch_size))
                if step % args.eval_every == 0 or step == args.offline_steps:
                    score = log_evaluation("offline", step, metrics, step, 0)
                    bar.set_postfix(score=f"{100 * score:.1f}")
                if step % args.checkpoint_every == 0 and step < args.offline_steps:
                    save_latest("offline", step)
                bar.update()
        save_checkpoint(run_dir / "offline.pt", agent, {**meta, "offline_steps": args.offline_steps})

    # ---- No switch: the offline data stay, online data are appended to the same buffer -----
    # Checkpoints hold the online part of the buffer only (and any dataset slots it overwrote).
    if phase == "offline":
        print(f"switch to online: the buffer keeps all {len(buffer)} offline transitions, FIFO capacity "
              f"{buffer.capacity}", file=sys.stderr)
        log_evaluation("online", 0, {}, agent.num_updates, 0)
        R_current, done_steps = None, 0
        save_latest("online", 0, buffer=buffer.state_dict(rebuilt=num_offline), R_current=R_current)
    else:  # resuming fine-tuning where an episode was about to start
        buffer.load_state_dict(latest["buffer"])
        R_current = latest["R_current"]
        clock["env_steps"] = done_steps

    # ---- Online fine-tuning: act by sampling pi, G gradient steps per environment step -----
    obs, _ = env.reset(seed=args.seed if done_steps == 0 else None)
    episode_return, last_checkpoint = 0.0, done_steps
    with tqdm(total=args.online_steps, initial=done_steps, desc="online", unit="step", mininterval=2) as bar:
        for step in range(done_steps + 1, args.online_steps + 1):
            with torch.no_grad():
                obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)[None]
                action = agent.actor.distribution(obs_t).sample()[0].cpu().numpy()
            action = np.clip(action, low, high)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            buffer.add(obs[None], action[None], [reward], next_obs[None], [float(terminated)])
            obs = next_obs
            episode_return += float(reward)

            for _ in range(args.utd):
                metrics = agent.update(buffer.sample(args.batch_size))

            episode_over = terminated or truncated
            if episode_over:
                R_current = float(normalized(episode_return, info["ref_min_score"], info["ref_max_score"]))

            if step % args.eval_every == 0 or step == args.online_steps:
                score = log_evaluation("online", step, metrics, agent.num_updates, step, R_current)
                bar.set_postfix(score=f"{100 * score:.1f}")

            if episode_over:
                # Checkpoints wait for an episode's end: then the environment's state is only its RNG.
                if step - last_checkpoint >= args.checkpoint_every and step < args.online_steps:
                    save_latest("online", step, buffer=buffer.state_dict(rebuilt=num_offline), R_current=R_current)
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
