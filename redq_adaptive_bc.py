"""REDQ+AdaptiveBC: offline-to-online reinforcement learning with adaptive behavior cloning.

Paper: Y. Zhao, R. Boney, A. Ilin, J. Kannala, J. Pajarinen, "Adaptive Behavior Cloning Regularization
for Stable Offline-to-Online Reinforcement Learning" (arXiv:2210.13846).

1. Pre-training (K gradient steps on the dataset): TD3+BC with a randomized ensemble of N critics (REDQ).
   Every critic regresses to one target, the min over a random subset M of the target critics (Eq. 3):
       a' = clip(pi'(s') + clip(eps, -c, c), a_low, a_high),   eps ~ N(0, sigma_target)
       y  = r + gamma * (1 - terminal) * min_{i in M} Q'_i(s', a')
   The actor maximizes the ensemble mean Qbar, normalized as in TD3+BC, plus behavior cloning (Eq. 1, 4):
       L(pi) = -mean(Qbar(s, pi(s))) / mean(|Qbar(s, pi(s))|) + alpha * mean((pi(s) - a)^2)
2. The switch: keep a random 5% of the offline transitions in a FIFO buffer, drop the rest.
3. Fine-tuning (T environment steps, G gradient steps each). After every training episode a PD controller
   moves alpha_online from the D4RL-normalized return R (a fraction, 1 = expert) (Eq. 2; the increment is
   scaled by the episode's length as in the authors' code, see README):
       delta = K_P * (R_current - R_target) + K_D * max(0, R_last - R_current)
       alpha_online <- clip(alpha_online + delta * episode_length, 0, alpha_online_max)

Algorithm 1, line by line:
    initialize agent, targets, buffer with the dataset                                 Agent, main
    for k = 0..K: sample, critics (Eq. 3), actor (Eq. 4, alpha_offline), targets       pretrain -> Agent.update
    remove 95% of the offline samples                                                   switch_to_online -> downsample
    for every episode: act with noise, store, G x (critics, actor, targets)             finetune -> Agent.update
                       adapt alpha_online from R_last and R_current (Eq. 2)             adapt_alpha

Names from plumbing/ (the shared code no paper describes; nothing there is needed to follow the method):
    RunArgs       the flags every script shares: --env, --dataset, --seed, --eval-every, --eval-episodes, ...
    open_task     the dataset, the training and evaluation environments, task.normalized (D4RL's score, a fraction)
    open_run      the run folder: run.means (loss averages per row), run.logs, run.checkpoint_due, run.save_latest
    run_main      parses the flags, calls check_args, runs main, turns errors and signals into exit statuses

Run:
    python redq_adaptive_bc.py --env hopper --dataset medium
    python redq_adaptive_bc.py --env hopper --dataset medium --authors-code   # the authors' configuration
    python redq_adaptive_bc.py --help                                            # every Table 1 hyperparameter
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn

from plumbing.cli import RunArgs, check_ranges, run_main
from plumbing.compile import compile_step
from plumbing.datasets import check_transitions, open_task, warn_if_the_data_reach
from plumbing.errors import UsageError, stop_requested
from plumbing.run_folder import PROGRESS_COLUMNS, check_run_size, load_pretrained, open_run
from plumbing.runtime import pick_device, progress_bar, seed_everything

METHOD = "redq_adaptive_bc"


@dataclass
class Args(RunArgs):
    offline_steps: int = 1_000_000
    """K, offline gradient steps (paper: 1M)"""
    online_steps: int = 250_000
    """T, online environment steps (paper: 250k; 0 = pre-train only)"""
    learning_rate: float = 3e-4
    """Adam learning rate of actor and critics (Table 1: 3e-4)"""
    batch_size: int = 256
    """B, mini-batch size (Table 1: 256)"""
    tau: float = 5e-3
    """target network update rate (Table 1: 5e-3)"""
    gamma: float = 0.99
    """discount factor"""
    policy_noise: float | None = None
    """sigma_target, std of the target smoothing noise (None: Table 1's TD3 'policy noise std 0.1'; authors: 0.2)"""
    noise_clip: float = 0.5
    """c, clip of the target smoothing noise (Table 1: 0.5)"""
    exploration_noise: float = 0.1
    """sigma_expl, std of the online exploration noise (TD3's and the authors' 0.1; the paper states none)"""
    policy_freq: int = 2
    """one actor update every this many critic updates (Table 1: 2)"""
    hidden_layers: int = 2
    """hidden layers of actor and critics (Table 1: 2)"""
    hidden_dim: int = 256
    """units per hidden layer (Table 1: 256)"""
    activation: Literal["relu", "tanh", "elu", "gelu"] = "relu"
    """hidden activation (Table 1: ReLU)"""
    critic_init: Literal["authors", "pytorch"] = "authors"
    """critic weights: truncated normal, std 1/(2 sqrt(fan_in)), zero biases (authors' code), or nn.Linear's"""
    num_critics: int = 10
    """N, critics in the ensemble (Table 1: 10)"""
    num_min_critics: int = 2
    """M, randomly drawn critics whose minimum forms the target (Table 1: 2)"""
    min_over_all_offline: bool = False
    """with M = N, take the min over all critics in pre-training too (authors' code: fine-tuning only)"""
    num_min_critics_offline: int | None = None
    """M while pre-training (None: M, except a random pair where M = N without --min-over-all-offline)"""
    utd: int | None = None
    """G, gradient steps per online environment step (None: Table 1's 20; --authors-code: 10)"""
    critic_loss_reduction: Literal["mean", "sum"] = "mean"
    """average the N critics' squared errors (authors' code) or sum them (equal under Adam up to eps)"""
    delay_target_updates: bool = True
    """update targets only on actor steps (Table 1's TD3 'policy update frequency 2' and the authors' code);
    --no-delay-target-updates: every step, Algorithm 1 read literally"""
    alpha_offline: float | None = None
    """alpha_offline, BC weight of pre-training (None: Table 1's 0.4; 100 on walker2d-random as in the paper)"""
    alpha_online: float | None = None
    """alpha_online at the switch, and its value without adaptation (None: min(alpha_offline, alpha_online_max))"""
    alpha_online_max: float = 0.4
    """upper clip of alpha_online in Eq. 2 (paper: 0.4, the pre-training value, also on walker2d-random)"""
    kp: float = 3e-5
    """K_P, proportional gain of Eq. 2 (Table 1: 3e-5)"""
    kd: float | None = None
    """K_D, derivative gain of Eq. 2 (None: Table 1's 8e-5; --authors-code: 1e-4)"""
    target_return: float | None = None
    """R_target of Eq. 2, a normalized return (fraction; None: the paper's 1.0; --authors-code: 1.05)"""
    adaptive_bc: bool = True
    """adapt alpha_online with Eq. 2; --no-adaptive-bc keeps it fixed"""
    scale_by_episode_length: bool = True
    """multiply Eq. 2's increment by the episode length, as the authors' code does (README)"""
    r_last: Literal["previous", "moving-average"] | None = None
    """R_last of Eq. 2 (None: the previous episode, paper; --authors-code: moving average, P term on it)"""
    r_last_smoothing: float = 0.05
    """s in R_last <- s R_current + (1 - s) R_last, with --r-last moving-average (authors' code: 0.05)"""
    r_last_start: Literal["one-episode", "mean"] = "one-episode"
    """R_last at the switch: one evaluation episode (authors' code) or the mean of --eval-episodes"""
    keep_ratio: float = 0.05
    """fraction of the offline data kept for fine-tuning (paper: 0.05)"""
    keep_min: int | None = None
    """keep at least this many offline transitions (None: 0, the ratio alone; --authors-code: 50,000)"""
    keep_with_replacement: bool | None = None
    """draw the kept transitions with replacement (None: no, paper; --authors-code: yes)"""
    buffer_size: int | None = None
    """FIFO replay capacity online (None: online-steps, enlarged to hold the kept data if needed)"""
    authors_code: bool = False
    """the authors' configuration (zhaoyi11/adaptive_bc) wherever it differs from the paper (README table)"""
    compile: bool = False
    """torch.compile the gradient step (CUDA: also CUDA graphs); same results, faster on GPU (docs/speed.md)"""


# (the paper's value, the authors' code's value) of the flags where they differ: main.py, redq_bc.py, utils.py
PAPER_VS_AUTHORS = dict(
    utd=(20, 10),
    kd=(8e-5, 1e-4),
    target_return=(1.0, 1.05),
    r_last=("previous", "moving-average"),
    keep_min=(0, 50_000),
    keep_with_replacement=(False, True),
    policy_noise=(0.1, 0.2),
)


def resolve_defaults(args: Args, env_name: str, dataset_name: str, dataset_size: int) -> None:
    """Turn every None into its value: the paper's, or with --authors-code the authors' (PAPER_VS_AUTHORS), and
    the values that depend on the task and the data. config.json records the result."""
    for name, (paper, authors) in PAPER_VS_AUTHORS.items():
        if getattr(args, name) is None:
            setattr(args, name, authors if args.authors_code else paper)
    if args.alpha_offline is None:  # the paper: alpha_offline = 100 for walker2d-random only
        args.alpha_offline = 100.0 if env_name == "walker2d" and dataset_name.startswith("random") else 0.4
    if args.alpha_online is None:
        args.alpha_online = min(args.alpha_offline, args.alpha_online_max)
    if args.num_min_critics_offline is None:  # redq_bc.py:141: the min over all critics only when fine-tuning
        all_critics = args.num_min_critics == args.num_critics and not args.min_over_all_offline
        args.num_min_critics_offline = min(2, args.num_critics) if all_critics else args.num_min_critics
    if args.buffer_size is None:
        args.buffer_size = max(args.online_steps, num_kept(dataset_size, args.keep_ratio, args.keep_min))


def check_args(args: Args) -> None:
    """Reject bad values with one line (exit status 2). Unresolved defaults (None) pass."""
    check_ranges(
        args,
        positive=(
            "offline_steps batch_size policy_freq hidden_layers hidden_dim num_critics num_min_critics "
            "num_min_critics_offline utd learning_rate buffer_size"
        ).split(),
        non_negative=(
            "online_steps policy_noise noise_clip exploration_noise kp kd keep_min alpha_offline alpha_online "
            "alpha_online_max"
        ).split(),
        fraction=["keep_ratio", "r_last_smoothing", "tau"],
        finite=["target_return", "gamma"],
    )
    for name in ("num_min_critics", "num_min_critics_offline"):
        M = getattr(args, name)
        if M is not None and M > args.num_critics:
            raise UsageError(f"--{name.replace('_', '-')} M={M} exceeds --num-critics N={args.num_critics}")
    if not 0 <= args.gamma <= 1:
        raise UsageError(f"--gamma must be in [0, 1], got {args.gamma}")
    if args.target_return is not None and not 0 <= args.target_return <= 2:
        raise UsageError(f"--target-return (a fraction, 1 = expert) must be in [0, 2], got {args.target_return}")
    transitions = max(args.online_steps, args.buffer_size or 0)
    size = (args.num_critics + 1, args.hidden_dim, args.hidden_layers)
    check_run_size(*size, transitions=transitions, batch_size=args.batch_size)


# ---- Networks -----------------------------------------------------------------------------------------------
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
    """N critics Q_1..Q_N in one module: layer l of all N critics is one (N, in, out) weight tensor, so the
    ensemble runs as a few batched matrix multiplies instead of a Python loop over critics."""

    def __init__(
        self, num_critics, obs_dim, act_dim, hidden_dim=256, hidden_layers=2, activation="relu", init="authors"
    ):
        super().__init__()
        sizes = [obs_dim + act_dim] + [hidden_dim] * hidden_layers + [1]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            weight, bias = torch.empty(num_critics, fan_in, fan_out), torch.zeros(num_critics, 1, fan_out)
            if init == "authors":  # redq_bc.py:16-19 (the +-2 truncation is absolute: ~15 std, i.e. a normal)
                nn.init.trunc_normal_(weight, std=1 / (2 * math.sqrt(fan_in)))
            else:  # nn.Linear's default, each critic independently
                bound = 1 / math.sqrt(fan_in)
                weight.uniform_(-bound, bound)
                bias.uniform_(-bound, bound)
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(bias))
        self.activation = ACTIVATIONS[activation]()

    def forward(self, obs, action, critic_idx=None):
        """Q-values of shape (N, B), or (len(critic_idx), B) for a subset of the critics."""
        n = len(self.weights[0]) if critic_idx is None else len(critic_idx)
        x = torch.cat([obs, action], dim=-1).expand(n, -1, -1)  # the same (B, in) input for every critic
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            if critic_idx is not None:
                weight, bias = weight[critic_idx], bias[critic_idx]
            x = torch.baddbmm(bias, x, weight)
            if layer < len(self.weights) - 1:
                x = self.activation(x)
        return x.squeeze(-1)


# ---- Replay buffer and the switch's downsampling ------------------------------------------------------------
class Batch(NamedTuple):
    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminals: torch.Tensor  # 1.0 only for a true termination; a time-limit truncation keeps bootstrapping


class ReplayBuffer:
    """Preallocated FIFO ring buffer of transitions on the training device: once full, each new
    transition overwrites the oldest one."""

    def __init__(self, capacity, obs_dim, act_dim, device):
        self.capacity = capacity
        self.device = device
        self.ptr = 0  # where the next transition goes
        self.size = 0
        self.data = Batch(
            *(torch.zeros(capacity, *shape, device=device) for shape in [(obs_dim,), (act_dim,), (), (obs_dim,), ()])
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

    def state_dict(self):
        return {"ptr": self.ptr, "size": self.size, **self.data._asdict()}

    def load_state_dict(self, state):
        self.ptr = state["ptr"]
        self.size = state["size"]
        for name, storage in zip(Batch._fields, self.data):
            storage.copy_(state[name])


def num_kept(dataset_size, keep_ratio, keep_min):
    """How many offline transitions survive the switch: max(ratio x size, floor), capped at the size."""
    return min(dataset_size, max(math.ceil(keep_ratio * dataset_size), keep_min))


def downsample(buffer: ReplayBuffer, capacity, keep_ratio, keep_min, with_replacement, generator) -> ReplayBuffer:
    """The switch: a new FIFO buffer holding a uniform random subset of the offline data."""
    k = num_kept(buffer.size, keep_ratio, keep_min)
    if with_replacement:  # utils.py:71, np.random.randint
        keep = torch.randint(0, buffer.size, (k,), generator=generator)
    else:
        keep = torch.randperm(buffer.size, generator=generator)[:k]
    online = ReplayBuffer(capacity, buffer.data.obs.shape[1], buffer.data.actions.shape[1], buffer.device)
    online.add(*(field[keep.to(buffer.device)] for field in buffer.data))
    return online


# ---- The gradient step: target (Eq. 3), critic loss (Eq. 3), actor loss (Eq. 1 and 4), targets --------------
@torch.no_grad()
def td_target(batch: Batch, actor_target, critic_target, critic_idx, gamma, policy_noise, noise_clip):
    """y = r + gamma (1 - terminal) min_{i in M} Q'_i(s', a'), with a' the smoothed target action."""
    noise = (torch.randn_like(batch.actions) * policy_noise).clamp(-noise_clip, noise_clip)
    next_actions = actor_target(batch.next_obs) + noise * actor_target.action_scale
    low = actor_target.action_bias - actor_target.action_scale
    high = actor_target.action_bias + actor_target.action_scale
    q_next = critic_target(batch.next_obs, next_actions.clamp(low, high), critic_idx).min(dim=0).values
    return batch.rewards + gamma * (1.0 - batch.terminals) * q_next


def critic_loss(critic, batch: Batch, y, reduction="mean"):
    """Eq. 3: every critic regresses to the same y. Returns (loss, mean Q)."""
    q = critic(batch.obs, batch.actions)  # (N, B)
    per_critic = ((q - y) ** 2).mean(dim=1)
    return (per_critic.sum() if reduction == "sum" else per_critic.mean()), q.detach().mean()


def actor_loss(actor, critic, batch: Batch, alpha):
    """Eq. 4: L(pi) = -mean(Qbar(s, pi(s))) / mean|Qbar(s, pi(s))| + alpha * mean((pi(s) - a)^2)."""
    pi = actor(batch.obs)
    q_bar = critic(batch.obs, pi).mean(dim=0)  # mean over all N critics
    # Eq. 1's normalization: dividing by the batch's mean |Qbar| (no gradient) makes alpha independent of the
    # reward scale.
    q_term = -q_bar.mean() / q_bar.abs().mean().detach()
    bc_term = ((pi - batch.actions) ** 2).mean()  # Eq. 4's behavior cloning term
    return q_term + alpha * bc_term


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau):
    """theta' <- tau theta + (1 - tau) theta', for all parameters in one fused call."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


class Agent:
    """Actor, critic ensemble, their target copies, optimizers, and the gradient step."""

    def __init__(self, obs_dim, act_dim, action_low, action_high, args: Args, device):
        net = dict(hidden_dim=args.hidden_dim, hidden_layers=args.hidden_layers, activation=args.activation)
        self.actor = Actor(obs_dim, act_dim, action_low, action_high, **net).to(device)
        self.critic = CriticEnsemble(args.num_critics, obs_dim, act_dim, **net, init=args.critic_init).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        # CUDA graphs need the optimizer's step counter on the device (capturable); otherwise fused is fastest.
        optim = dict(capturable=True) if args.compile and device.type == "cuda" else dict(fused=True)
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=args.learning_rate, **optim)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=args.learning_rate, **optim)
        self.args = args
        self.device = device
        self.num_updates = 0

    def critic_step(self, batch: Batch, num_min_critics):
        """Eq. 3 for all N critics, with a fresh random subset of M critics for the target (REDQ)."""
        args = self.args
        critic_idx = None  # M = N: the min over all critics
        if num_min_critics < args.num_critics:
            critic_idx = torch.randperm(args.num_critics, device=batch.obs.device)[:num_min_critics]
        noise = (args.policy_noise, args.noise_clip)
        y = td_target(batch, self.actor_target, self.critic_target, critic_idx, args.gamma, *noise)
        loss, q_mean = critic_loss(self.critic, batch, y, args.critic_loss_reduction)
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

    def update(self, batch: Batch, alpha, num_min_critics) -> dict:
        """One gradient step. No host-device synchronization: the metrics stay tensors."""
        self.num_updates += 1
        update_actor = self.num_updates % self.args.policy_freq == 0
        loss, q_mean = self.critic_step(batch, num_min_critics)
        metrics = {"critic_loss": loss, "q_mean": q_mean}
        if update_actor:
            metrics["actor_loss"] = self.actor_step(batch, alpha)
        if update_actor or not self.args.delay_target_updates:
            self.target_step()
        return metrics

    def state_dict(self):
        names = ("actor", "critic", "actor_target", "critic_target", "actor_optim", "critic_optim")
        return {name: getattr(self, name).state_dict() for name in names}

    def load_state_dict(self, state):
        for name, value in state.items():
            getattr(self, name).load_state_dict(value)


# ---- Adaptive behavior cloning: the PD controller of Eq. 2 --------------------------------------------------
class AlphaUpdate(NamedTuple):
    alpha_online: float  # the new alpha_online
    R_last: float  # R_last for the next episode
    p_term: float  # K_P (R - R_target), before the episode-length scaling
    d_term: float  # K_D max(0, R_last - R_current), likewise


def adapt_alpha(
    alpha_online, R_current, R_last, *, kp, kd, target_return, alpha_max, episode_length=1, moving_average=None
) -> AlphaUpdate:
    """Eq. 2 at the end of a training episode (R: normalized returns, fractions).

    moving_average=None is the paper: the P term on R_current, then R_last <- R_current.
    moving_average=s is the authors' code (main.py:221-227): the P term on the old R_last, then
    R_last <- s R_current + (1 - s) R_last.
    """
    p_term = kp * ((R_current if moving_average is None else R_last) - target_return)
    d_term = kd * max(0.0, R_last - R_current)
    alpha_online = min(max(alpha_online + (p_term + d_term) * episode_length, 0.0), alpha_max)
    R_next = R_current if moving_average is None else moving_average * R_current + (1 - moving_average) * R_last
    return AlphaUpdate(alpha_online, R_next, p_term, d_term)


# ---- Evaluation ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(agent, env, episodes: int, seed: int) -> np.ndarray | None:
    """Undiscounted returns of the deterministic policy pi(s) in `episodes` episodes, the first reset with `seed`
    so every evaluation sees the same starts. None when a stop signal (SIGTERM) cut the evaluation short."""
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed if episode == 0 else None)
        done, episode_return = False, 0.0
        while not done:
            if stop_requested:
                return None
            action = agent.actor(torch.as_tensor(obs, dtype=torch.float32, device=agent.device)[None])[0]
            obs, reward, terminated, truncated, _ = env.step(action.cpu().numpy())
            episode_return += float(reward)
            done = terminated or truncated
        returns.append(episode_return)
    return np.array(returns)


COLUMNS = PROGRESS_COLUMNS + ["episode_normalized_return"]
EPISODE_COLUMNS = ["step", "length", "return", "R_current", "R_last", "p_term", "d_term", "alpha"]


def checkpoint(agent, phase, step, buffer=None, **state) -> dict:
    """What latest.pt holds besides the random streams: enough to continue this run exactly (--resume)."""
    state = dict(phase=phase, step=step, agent=agent.state_dict(), num_updates=agent.num_updates, **state)
    return state if buffer is None else dict(state, buffer=buffer.state_dict())


def log_evaluation(run, agent, task, args, rng, phase, step, alpha, resume: dict, env=None, **extra) -> np.ndarray:
    """evaluate(), then a progress.csv row: scores x100 (D4RL's) and the losses averaged since the previous row.
    When a stop signal cuts the evaluation short, save `resume` (the state before it, so --resume redoes it)."""
    returns = evaluate(agent, task.eval_env, args.eval_episodes, args.seed + 100)
    if returns is None:
        run.save_latest({"evaluation_due": True, **resume}, rng, env)  # raises Preempted
    scores = 100 * task.normalized(returns)
    run.log_evaluation(phase, step, returns, scores, run.means.pop(), agent.num_updates, alpha=alpha, **extra)
    return returns


# ---- The three phases of Algorithm 1 ------------------------------------------------------------------------
def flatten_episodes(dataset) -> dict[str, np.ndarray]:
    """Minari episodes (T+1 observations, T actions) as transitions. next_obs stays within its episode,
    and only terminations end bootstrapping: a time-limit truncation does not."""
    parts = {"obs": [], "actions": [], "rewards": [], "next_obs": [], "terminals": []}
    for ep in dataset.iterate_episodes():
        values = (ep.observations[:-1], ep.actions, ep.rewards, ep.observations[1:], ep.terminations)
        for key, value in zip(parts, values):
            parts[key].append(value)
    return {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}


def pretrain(agent, buffer, args, run, task, rng, start=0, evaluation_due=True):
    """Algorithm 1, lines 4-9: K gradient steps of TD3+BC with the REDQ ensemble, alpha = alpha_offline."""
    alpha_offline = torch.tensor(args.alpha_offline, device=agent.device)  # a tensor: see finetune
    if evaluation_due:  # the untrained agent's, or the one a stop signal cut short
        resume = checkpoint(agent, "offline", start)
        log_evaluation(run, agent, task, args, rng, "offline", start, args.alpha_offline, resume)
    with progress_bar(args.offline_steps, start, desc="offline", unit="upd") as bar:
        for step in range(start + 1, args.offline_steps + 1):
            batch = buffer.sample(args.batch_size)
            run.means.add(agent.update(batch, alpha_offline, args.num_min_critics_offline))
            if step % args.eval_every == 0 or step == args.offline_steps:
                resume = checkpoint(agent, "offline", step)
                log_evaluation(run, agent, task, args, rng, "offline", step, args.alpha_offline, resume)
            if step < args.offline_steps and run.checkpoint_due(step):
                run.save_latest(checkpoint(agent, "offline", step), rng)
            bar.update()
    run.save_offline(agent.state_dict(), agent.num_updates, rng)


def switch_to_online(agent, buffer, args, run, task, rng):
    """Algorithm 1, lines 10-12: keep a random subset of the offline data, evaluate the pre-trained agent."""
    generator = torch.Generator().manual_seed(args.seed)
    online_buffer = downsample(
        buffer, args.buffer_size, args.keep_ratio, args.keep_min, args.keep_with_replacement, generator
    )
    kept, total = online_buffer.size, buffer.size
    everything = " (all of them: --keep-min is not below the dataset's size)" if kept >= total else ""
    print(f"switch to online: kept {kept} of {total} offline transitions{everything}", file=sys.stderr)
    # A stop signal here resumes from the end of pre-training (its rows all written), which redoes the seeded switch.
    resume = checkpoint(agent, "offline", args.offline_steps, evaluation_due=False)
    returns = log_evaluation(run, agent, task, args, rng, "online", 0, args.alpha_online, resume)
    R_last = task.normalized(returns[0] if args.r_last_start == "one-episode" else returns.mean())  # main.py:181
    state = dict(alpha_online=args.alpha_online, R_last=float(R_last), R_current=None)
    run.save_latest(checkpoint(agent, "online", 0, online_buffer, **state), rng, task.env)
    return online_buffer, dict(state, step=0)


def episode_row(step, length, episode_return, R_current, R_last, update: AlphaUpdate, alpha_online) -> dict:
    """episodes.csv: Eq. 2's inputs and output (fractions, as --target-return), so a row can be checked by hand."""
    row = dict(step=step, length=length, R_current=R_current, R_last=R_last, alpha=alpha_online)
    return row | {"return": episode_return, "p_term": update.p_term, "d_term": update.d_term}


def evaluate_online(run, agent, task, args, rng, buffer, step, state):
    """An online progress.csv row, with the last training episode's R (x100) beside the evaluation's score."""
    resume = checkpoint(agent, "online", step, buffer, **state)
    score = "" if state["R_current"] is None else 100 * state["R_current"]
    extra = dict(env_steps=step, episode_normalized_return=score)
    log_evaluation(run, agent, task, args, rng, "online", step, state["alpha_online"], resume, task.env, **extra)


def finetune(agent, buffer, args, run, task, rng, state):
    """Algorithm 1, lines 13-25: G gradient steps per environment step, alpha_online from Eq. 2 per episode."""
    alpha_online, R_last, R_current = state["alpha_online"], state["R_last"], state["R_current"]
    # The BC weight lives in a device tensor that the gradient step reads: Eq. 2 changes it in place, without a
    # host-device synchronization or a recompilation of the compiled step.
    bc_weight = torch.tensor(alpha_online, device=agent.device)
    env, low, high = task.env, task.env.action_space.low, task.env.action_space.high
    noise_std = args.exploration_noise * (high - low) / 2
    moving_average = args.r_last_smoothing if args.r_last == "moving-average" else None  # main.py:227
    gains = dict(kp=args.kp, kd=args.kd, target_return=args.target_return, alpha_max=args.alpha_online_max)
    if state.get("evaluation_due"):  # a stop signal cut this evaluation short: redo it
        evaluate_online(run, agent, task, args, rng, buffer, state["step"], state)
    obs, _ = env.reset(seed=args.seed if state["step"] == 0 else None)
    episode_return, episode_length = 0.0, 0
    with progress_bar(args.online_steps, state["step"], desc="online", unit="step") as bar:
        for step in range(state["step"] + 1, args.online_steps + 1):
            with torch.no_grad():
                action = agent.actor(torch.as_tensor(obs, dtype=torch.float32, device=agent.device)[None])[0]
            action = np.clip(action.cpu().numpy() + rng.normal(0.0, noise_std), low, high)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            buffer.add(obs[None], action[None], [reward], next_obs[None], [float(terminated)])
            obs = next_obs
            episode_return += float(reward)
            episode_length += 1
            for _ in range(args.utd):
                run.means.add(agent.update(buffer.sample(args.batch_size), bc_weight, args.num_min_critics))
            if terminated or truncated:  # Eq. 2
                R_current = task.normalized(episode_return)
                length = episode_length if args.scale_by_episode_length else 1
                update = adapt_alpha(
                    alpha_online, R_current, R_last, **gains, moving_average=moving_average, episode_length=length
                )
                if args.adaptive_bc:
                    alpha_online = update.alpha_online
                    bc_weight.fill_(alpha_online)
                row = episode_row(step, episode_length, episode_return, R_current, R_last, update, alpha_online)
                run.logs["episodes"].write(row if args.adaptive_bc else dict(row, p_term="", d_term=""))
                R_last = update.R_last  # also without adaptation, so the logged R_last stays what Eq. 2 would see
            state = dict(alpha_online=alpha_online, R_last=R_last, R_current=R_current)
            if step % args.eval_every == 0 or step == args.online_steps:
                evaluate_online(run, agent, task, args, rng, buffer, step, state)
            # A stop signal saves at once (the episode is cut); periodic checkpoints wait for an episode's end.
            if step < args.online_steps and run.checkpoint_due(step, safe=terminated or truncated):
                run.save_latest(checkpoint(agent, "online", step, buffer, **state), rng, env)
            if terminated or truncated:
                obs, _ = env.reset()
                episode_return, episode_length = 0.0, 0
            bar.update()


# ---- Main: load the data, open the run folder, run the phases (resuming where latest.pt left off) -----------
NETWORK_KEYS = ["hidden_dim", "hidden_layers", "activation", "num_critics", "critic_init", "alpha_offline"]


def main(args: Args):
    pretrained = load_pretrained(args, METHOD, NETWORK_KEYS) if args.load_offline else None
    task = open_task(args)
    data = flatten_episodes(task.dataset)
    check_transitions(data, task.dataset_id, task.env.action_space)
    dataset_size = len(data["rewards"])
    resolve_defaults(args, task.env_name, task.dataset_name, dataset_size)
    check_args(args)  # again: the resolved values, and those taken over from a pre-training run
    warn_if_the_data_reach(task.summary, args.target_return)
    kept = num_kept(dataset_size, args.keep_ratio, args.keep_min)
    if args.buffer_size < kept:
        raise UsageError(f"--buffer-size {args.buffer_size} cannot hold the {kept} offline transitions kept")
    pretrained_from = pretrained and pretrained["path"]
    info = dict(dataset_transitions=dataset_size, offline_kept=kept, pretrained_from=pretrained_from)
    run = open_run(args, METHOD, task, **info)

    device, rng = pick_device(args.device), seed_everything(args.seed)
    obs_dim, space = data["obs"].shape[1], task.env.action_space
    agent = Agent(obs_dim, space.shape[0], space.low, space.high, args, device)
    if args.compile:
        compile_step(agent)
    net = dict(hidden_dim=args.hidden_dim, hidden_layers=args.hidden_layers, activation=args.activation)
    bounds = dict(action_low=space.low.tolist(), action_high=space.high.tolist())
    run.describe_actor("Actor", obs_dim=obs_dim, act_dim=space.shape[0], **bounds, **net)
    run.log("progress", COLUMNS, echo=True)
    run.log("episodes", EPISODE_COLUMNS)
    latest = run.restore(agent, rng, task.env, pretrained)  # --resume's latest.pt, else --load-offline's agent

    with run:
        if latest is None or latest["phase"] == "offline":
            buffer = ReplayBuffer(dataset_size, obs_dim, space.shape[0], device)
            buffer.add(**data)
            if pretrained is None:
                start = latest["step"] if latest else 0
                evaluation_due = latest is None or latest.get("evaluation_due", False)
                pretrain(agent, buffer, args, run, task, rng, start, evaluation_due)
            if args.online_steps > 0:
                buffer, state = switch_to_online(agent, buffer, args, run, task, rng)
        else:
            buffer = ReplayBuffer(args.buffer_size, obs_dim, space.shape[0], device)
            buffer.load_state_dict(latest["buffer"])
            state = latest
        del data  # the buffer holds the only copy
        if args.online_steps > 0:
            finetune(agent, buffer, args, run, task, rng, state)
        run.finish(agent.state_dict(), agent.actor.state_dict())


if __name__ == "__main__":
    run_main(main, Args, METHOD, check_args, description=__doc__.split("\n\n")[0])
