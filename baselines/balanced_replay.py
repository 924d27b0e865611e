"""Balanced Replay on TD3+BC: a baseline of the adaptive-BC paper's Figure 2.

Paper: S. Lee, Y. Seo, K. Lee, P. Abbeel, J. Shin, "Offline-to-Online Reinforcement Learning via Balanced
Replay and Pessimistic Q-Ensemble" (CoRL 2021). The adaptive-BC paper (Sec. 5.1) re-implemented it on TD3+BC
instead of CQL, in its own codebase, as this script does. Lee et al.'s code (shlee94/Off2OnRL: "ours.py" =
rlkit/examples/ours.py, "trainer" = rlkit/rlkit/torch/sac/ours.py, "loop" = rlkit/rlkit/core/
batch_rl_algorithm.py) settles what the papers leave open; each difference from it is a flag away.

1. Pessimistic Q-ensemble of critics Q_gi, num_groups = 2 groups of group_size = 5: the paper (Sec. 5.1)
   averages within a group, then takes the minimum, Qp = min_g mean_i Q_gi, in the TD3 target and the actor:
       y = r + gamma (1 - terminal) Qp'(s', a'),  a' = clip(pi'(s') + clip(eps, -c, c)),  every critic -> y
       L(pi) = -mean(Qp(s, pi(s))) / mean(|Qp(s, pi(s))|) + alpha * mean((pi(s) - a)^2)          (TD3+BC)
   --ensemble per-pair, Lee et al.'s code: member i regresses to its own y_i = r + gamma (1 - terminal)
   min_g Q'_gi(s', a') (trainer:253-273); the actor uses mean_i min_g Q_gi(s, pi(s)) (trainer:218-229).
2. Pre-training: K such gradient steps on uniform batches of the dataset, alpha = alpha_offline.
3. Fine-tuning with three buffers: the dataset, the online data, a joint prioritized one of both. A network
   w(s, a) >= 0 trained each step on an online and an offline batch estimates d_online / d_offline (trainer:
   180-190); RL batches come from the joint buffer in proportion to priorities, which become the replayed
   transitions' tempered, self-normalized ratios (trainer:278-285), so near-on-policy data are replayed more:
       L(w) = mean_offline[ log((w + 1) / 2) ] - mean_online[ log(2 w / (w + 1)) ]
       p(s, a) = clip( w(s, a)^(1/temp) / mean_offline-batch(w^(1/temp)), 1e-3, 1e3 ),   temp = 5 (ours.py:389)

Open choices, the value taken, and its source (flag in brackets):
- Ensemble: the paper's group means, as it states what it ran. Per-pair targets are more pessimistic: with
  i.i.d. critic noise sigma, the min of two group means biases Q by -sigma/sqrt(5 pi) = -0.25 sigma, the mean
  of five pair minima by -sigma/sqrt(pi) = -0.56 sigma [--ensemble per-pair]. Lee et al. also average the
  policies of five pre-trained CQL agents (ours.py:256-289); here one actor.
- Schedule: G updates after every environment step from the first, the loop of the TD3 codebase the paper ran
  all but AWAC in (Sec. 5.1). Lee et al. alternate 1,000 environment steps and 1,000 updates, the first block's
  updates x10 (ours.py:373, 382, 410-411; loop:183-201), so their ratio network first sees 1,000 online
  transitions, not one [--update-schedule blocks, --block-steps, --first-block-multiplier]. G = 1 as Lee et
  al.; the paper gives none for it, the method runs 20 [--utd].
- alpha_online = 0, plain TD3, as Lee et al. drop CQL's penalty online [--alpha-online]; Table 1's TD3+BC
  otherwise; critic errors summed (trainer:268-273); timeouts bootstrap (Lee et al. drop them, ours.py:328).
- Ratio network 2 x 256 ReLU, ReLU output, last bias 1 (ours.py:230-235), Adam 3e-4, 256 + 256 samples, not
  trained offline [--ratio-*]. Offline data enter the joint buffer at priority 1, an online transition at the
  largest so far, which starts at M f / ((1 - f) N) so that the first N = 1000 hold a share f = 0.5
  (loop:142-146) [--init-online-fraction, --online-fraction-horizon].
- Buffers of dataset, T, dataset + T (the paper, Sec. 5.2; hopper-1M: 108 + 27 + 140 MB, the main script 27 MB).
  Sampling by torch.multinomial: exact, on the device, i.i.d. where Lee et al.'s sum tree stratifies.

Map: (1) pessimistic_q, pairwise_min, td_target, actor_loss -> Agent.update, run by pretrain; (3) switch_to_online
-> online_buffers; finetune -> updates_after, Agent.update_ratio (ratio_loss, ratio_priorities), Agent.update.
Run: python baselines/balanced_replay.py --env hopper --dataset medium   (--resume <run folder> continues one)
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the plumbing package lives one folder up
from plumbing.cli import RunArgs, check_ranges, run_main
from plumbing.datasets import check_transitions, open_task
from plumbing.errors import UsageError, stop_requested
from plumbing.run_folder import PROGRESS_COLUMNS, check_memory, check_run_size, load_pretrained, open_run
from plumbing.runtime import pick_device, progress_bar, seed_everything

METHOD = "balanced_replay"


@dataclass
class Args(RunArgs):
    offline_steps: int = 1_000_000
    """K, offline gradient steps (adaptive-BC paper: 1M for every method)"""
    online_steps: int = 250_000
    """T, online environment steps, also the online buffer's size (adaptive-BC paper: 250k; 0 = pre-train only)"""
    learning_rate: float = 3e-4
    """Adam learning rate of actor and critics (Table 1: 3e-4)"""
    batch_size: int = 256
    """B, RL mini-batch size (Table 1: 256)"""
    tau: float = 5e-3
    """target network update rate (Table 1: 5e-3)"""
    gamma: float = 0.99
    """discount factor"""
    policy_noise: float = 0.1
    """sigma_target, std of the target smoothing noise (Table 1's TD3 'policy noise std 0.1'; authors' code: 0.2)"""
    noise_clip: float = 0.5
    """c, clip of the target smoothing noise (Table 1: 0.5)"""
    exploration_noise: float = 0.1
    """sigma_expl, std of the online exploration noise (TD3's and the authors' 0.1)"""
    policy_freq: int = 2
    """one actor update every this many critic updates (Table 1: 2)"""
    hidden_layers: int = 2
    """hidden layers of actor and critics (Table 1: 2)"""
    hidden_dim: int = 256
    """units per hidden layer of actor and critics (Table 1: 256)"""
    activation: Literal["relu", "tanh", "elu", "gelu"] = "relu"
    """hidden activation (Table 1: ReLU)"""
    delay_target_updates: bool = True
    """update targets only on actor steps (Table 1's TD3 'policy update frequency 2'); --no-...: every step"""
    utd: int = 1
    """G, gradient steps per online environment step (Lee et al.: 1; the paper does not say; the method: 20)"""
    update_schedule: Literal["every-step", "blocks"] = "every-step"
    """G updates after every env step (the paper's TD3 codebase), or Lee et al.'s alternating blocks"""
    block_steps: int = 1000
    """with --update-schedule blocks: env steps, then G x as many updates, per block (Lee et al.: 1000)"""
    first_block_multiplier: int = 10
    """with --update-schedule blocks: the first block's updates are multiplied by this (Lee et al.: 10)"""
    alpha_offline: float | None = None
    """alpha_offline, BC weight in pre-training (None = 0.4, or 100 on walker2d-random as in the paper)"""
    alpha_online: float = 0.0
    """alpha_online, BC weight in fine-tuning (0 = TD3, as Balanced Replay drops its offline regularizer online)"""
    num_groups: int = 2
    """critic groups (adaptive-BC paper: 2; Lee et al.: the pair Q1, Q2)"""
    group_size: int = 5
    """critics per group (adaptive-BC paper and Lee et al.: 5)"""
    ensemble: Literal["group-means", "per-pair"] = "group-means"
    """min over groups of the group means, one target (the paper), or Lee et al.'s per-member targets"""
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


def resolve_defaults(args: Args, env_name: str, dataset_name: str) -> None:
    """Turn every None into its value (the one that depends on the task). config.json records it."""
    if args.alpha_offline is None:  # the paper: alpha_offline = 100 for D4RL's walker2d-random only
        args.alpha_offline = 100.0 if env_name == "walker2d" and dataset_name.startswith("random") else 0.4


def check_args(args: Args) -> None:
    """Reject bad values with one line (exit status 2). Unresolved defaults (None) pass."""
    check_ranges(
        args,
        positive=[
            "offline_steps",
            "batch_size",
            "policy_freq",
            "hidden_layers",
            "hidden_dim",
            "utd",
            "block_steps",
            "first_block_multiplier",
            "num_groups",
            "group_size",
            "online_fraction_horizon",
            "ratio_batch_size",
            "ratio_hidden_layers",
            "ratio_hidden_dim",
            "learning_rate",
            "ratio_learning_rate",
            "temperature",
            "priority_min",
            "priority_max",
        ],
        non_negative=[
            "online_steps",
            "policy_noise",
            "noise_clip",
            "exploration_noise",
            "alpha_offline",
            "alpha_online",
        ],
        fraction=["tau"],
        finite=["gamma"],
    )
    if not 0 <= args.gamma <= 1:
        raise UsageError(f"--gamma must be in [0, 1], got {args.gamma}")
    check_run_size(
        args.num_groups * args.group_size + 3,
        max(args.hidden_dim, args.ratio_hidden_dim),
        args.hidden_layers,
        transitions=0,
        batch_size=max(args.batch_size, args.ratio_batch_size),
    )  # the buffers are checked against the dataset's size later
    if args.priority_min >= args.priority_max:
        raise UsageError(f"--priority-min {args.priority_min} must be below --priority-max {args.priority_max}")
    if not 0 < args.init_online_fraction < 1:
        raise UsageError(f"--init-online-fraction must be in (0, 1), got {args.init_online_fraction}")


# ---- Networks -----------------------------------------------------------------------------------------------
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
    """N = num_groups x group_size critics, group g the critics g * group_size .. (g + 1) * group_size - 1, as one
    (N, in, out) weight tensor per layer: a few batched matmuls. Each initialized like its own nn.Linear stack."""

    def __init__(self, num_critics, obs_dim, act_dim, hidden_dim=256, hidden_layers=2, activation="relu"):
        super().__init__()
        sizes = [obs_dim + act_dim] + [hidden_dim] * hidden_layers + [1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(num_critics, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_critics, 1, fan_out).uniform_(-bound, bound)))
        self.activation = ACTIVATIONS[activation]()

    def forward(self, obs, action):
        """Q-values of shape (N, B)."""
        x = torch.cat([obs, action], dim=-1).expand(len(self.weights[0]), -1, -1)  # the same input for every critic
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(bias, x, weight)
            if layer < len(self.weights) - 1:
                x = self.activation(x)
        return x.squeeze(-1)


def pessimistic_q(q, num_groups):
    """The paper's Qp = min over groups of the mean within each group: (N, B) -> (B,)."""
    return q.view(num_groups, -1, q.shape[-1]).mean(dim=1).min(dim=0).values


def pairwise_min(q, num_groups):
    """Lee et al.'s min over groups per member, min_g Q_gi: (N, B) -> (group_size, B)."""
    return q.view(num_groups, -1, q.shape[-1]).min(dim=0).values


class DensityRatio(nn.Module):
    """w(s, a) >= 0, an estimate of d_online(s, a) / d_offline(s, a)."""

    def __init__(self, obs_dim, act_dim, hidden_dim=256, hidden_layers=2, activation="relu"):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, 1, hidden_dim, hidden_layers, activation)
        nn.init.constant_(self.net[-1].bias, 1.0)  # w starts near 1: every transition alike

    def forward(self, obs, action):
        return torch.relu(self.net(torch.cat([obs, action], dim=-1))).squeeze(-1)


# ---- Replay buffers: offline, online (FIFO), joint prioritized -----------------------------------------------
class Batch(NamedTuple):
    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminals: torch.Tensor  # 1.0 only for a true termination; a time-limit truncation keeps bootstrapping


class ReplayBuffer:
    """Preallocated FIFO ring buffer on the training device (with the sizes used here, nothing is overwritten)."""

    def __init__(self, capacity, obs_dim, act_dim, device):
        self.capacity = capacity
        self.device = device
        self.ptr = 0  # where the next transition goes
        self.size = 0
        self.data = Batch(
            *(torch.zeros(capacity, *shape, device=device) for shape in [(obs_dim,), (act_dim,), (), (obs_dim,), ()])
        )

    def add(self, obs, actions, rewards, next_obs, terminals):
        """Append n transitions (arrays with a leading dimension n). Returns their slots."""
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

    def transitions(self) -> list:
        return [field[: self.size].clone() for field in self.data]


class PrioritizedReplayBuffer(ReplayBuffer):
    """The joint offline + online buffer, sampled in proportion to per-transition priorities with
    torch.multinomial (module docstring); a priority update is a scatter. Nothing here syncs with the host."""

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

    def state_dict(self):
        """The priorities only: the caller adds the transitions again (the offline, then the online data)."""
        return {"priorities": self.priorities[: self.size].clone(), "max_priority": self.max_priority}

    def load_state_dict(self, state):
        self.priorities[: self.size] = state["priorities"]
        self.max_priority = state["max_priority"].to(self.priorities.device, copy=True)


def buffer_bytes(offline_size, online_size, obs_dim, act_dim) -> dict:
    """Bytes of the three buffers: float32 obs, action, reward, next obs, terminal per transition, plus a
    float32 priority per slot of the joint buffer."""
    per_transition = 4 * (2 * obs_dim + act_dim + 2)
    sizes = {
        "offline": offline_size * per_transition,
        "online": online_size * per_transition,
        "prioritized": (offline_size + online_size) * (per_transition + 4),
    }
    return {**sizes, "total": sum(sizes.values())}


# ---- The gradient steps: TD3+BC with the pessimistic ensemble (1), density ratio and priorities (3) ----------
@torch.no_grad()
def td_target(
    batch: Batch, actor_target, critic_target, num_groups, gamma, policy_noise, noise_clip, ensemble="group-means"
):
    """(1) y = r + gamma (1 - terminal) Qp'(s', a'), a' the smoothed target action: shape (B,). With
    ensemble="per-pair" each member's own target min_g Q'_gi, repeated per group: shape (N, B)."""
    noise = (torch.randn_like(batch.actions) * policy_noise).clamp(-noise_clip, noise_clip)
    next_actions = actor_target(batch.next_obs) + noise * actor_target.action_scale
    bias, scale = actor_target.action_bias, actor_target.action_scale
    q_next = critic_target(batch.next_obs, torch.max(torch.min(next_actions, bias + scale), bias - scale))
    if ensemble == "per-pair":  # trainer:253-260: member i of every group regresses to its pair's min
        q_next = pairwise_min(q_next, num_groups).repeat(num_groups, 1)
    else:
        q_next = pessimistic_q(q_next, num_groups)
    return batch.rewards + gamma * (1.0 - batch.terminals) * q_next


def critic_loss(critic, batch: Batch, y):
    """(1) Each critic regresses to y (its row of y when per-pair); the mean squared errors are summed over
    critics (trainer:268-273). Returns (loss, mean Q)."""
    q = critic(batch.obs, batch.actions)  # (N, B)
    return ((q - y) ** 2).mean(dim=1).sum(), q.detach().mean()


def actor_loss(actor, critic, batch: Batch, alpha, num_groups, ensemble="group-means"):
    """(1) TD3+BC: -mean(Q)/mean|Q| + alpha * mean((pi(s) - a)^2), Q = Qp, or mean_i min_g Q_gi when per-pair
    (trainer:218-229)."""
    pi = actor(batch.obs)
    q = critic(batch.obs, pi)
    q = pairwise_min(q, num_groups).mean(dim=0) if ensemble == "per-pair" else pessimistic_q(q, num_groups)
    # Dividing by the batch's mean |Q| (no gradient) makes alpha independent of the reward scale.
    return -q.mean() / q.abs().mean().detach() + alpha * ((pi - batch.actions) ** 2).mean()


def ratio_loss(w_offline, w_online, eps=1e-10):
    """(3) Jensen-Shannon variational bound, minimized by w = d_online / d_offline (trainer:185-190):
    mean_offline log((w + 1) / 2) - mean_online log(2 w / (w + 1))."""
    return (-torch.log(2 / (w_offline + 1) + eps)).mean() - torch.log(2 * w_online / (w_online + 1) + eps).mean()


def ratio_priorities(w, w_offline, temperature, priority_min, priority_max):
    """(3) p = clip(w^(1/temp) / mean(w_offline^(1/temp)), p_min, p_max): tempered, self-normalized ratios."""
    normalizer = (w_offline ** (1 / temperature)).mean() + 1e-10
    return (w ** (1 / temperature) / normalizer).clamp(priority_min, priority_max)


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau):
    """theta' <- tau theta + (1 - tau) theta', for all parameters in one fused call."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


class Agent:
    """Actor, ten-critic ensemble, their targets, the density-ratio network, optimizers, gradient steps."""

    def __init__(self, obs_dim, act_dim, action_low, action_high, args: Args, device):
        net = dict(hidden_dim=args.hidden_dim, hidden_layers=args.hidden_layers, activation=args.activation)
        self.actor = Actor(obs_dim, act_dim, action_low, action_high, **net).to(device)
        self.critic = CriticEnsemble(args.num_groups * args.group_size, obs_dim, act_dim, **net).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.ratio = DensityRatio(
            obs_dim, act_dim, args.ratio_hidden_dim, args.ratio_hidden_layers, args.activation
        ).to(device)
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=args.learning_rate, fused=True)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=args.learning_rate, fused=True)
        self.ratio_optim = torch.optim.Adam(self.ratio.parameters(), lr=args.ratio_learning_rate, fused=True)
        self.args = args
        self.device = device
        self.num_updates = 0

    def update(self, batch: Batch, alpha) -> dict:
        """One TD3+BC gradient step. No host-device synchronization: the metrics stay tensors."""
        args = self.args
        self.num_updates += 1
        y = td_target(
            batch,
            self.actor_target,
            self.critic_target,
            args.num_groups,
            args.gamma,
            args.policy_noise,
            args.noise_clip,
            args.ensemble,
        )
        loss_q, q_mean = critic_loss(self.critic, batch, y)
        self.critic_optim.zero_grad(set_to_none=True)
        loss_q.backward()
        self.critic_optim.step()
        metrics = {"critic_loss": loss_q.detach(), "q_mean": q_mean}
        if self.num_updates % args.policy_freq == 0:
            self.critic.requires_grad_(False)  # the actor's gradient flows through Q, not into it
            loss_pi = actor_loss(self.actor, self.critic, batch, alpha, args.num_groups, args.ensemble)
            self.actor_optim.zero_grad(set_to_none=True)
            loss_pi.backward()
            self.actor_optim.step()
            self.critic.requires_grad_(True)
            metrics["actor_loss"] = loss_pi.detach()
        if self.num_updates % args.policy_freq == 0 or not args.delay_target_updates:
            soft_update(self.critic_target, self.critic, args.tau)
            soft_update(self.actor_target, self.actor, args.tau)
        return metrics

    def update_ratio(self, offline: Batch, online: Batch, replayed: Batch):
        """One density-ratio step; returns (its loss, new priorities of the replayed batch), the priorities from
        the network before this step and this step's offline batch, as Lee et al.'s code (trainer:278-285)."""
        w_offline = self.ratio(offline.obs, offline.actions)
        w_online = self.ratio(online.obs, online.actions)
        loss = ratio_loss(w_offline, w_online)
        with torch.no_grad():
            w = self.ratio(replayed.obs, replayed.actions)
            args = self.args
            priorities = ratio_priorities(w, w_offline, args.temperature, args.priority_min, args.priority_max)
        self.ratio_optim.zero_grad(set_to_none=True)
        loss.backward()
        self.ratio_optim.step()
        return loss.detach(), priorities

    def state_dict(self):
        networks = ("actor", "critic", "actor_target", "critic_target", "ratio")
        optimizers = ("actor_optim", "critic_optim", "ratio_optim")
        return {name: getattr(self, name).state_dict() for name in networks + optimizers}

    def load_state_dict(self, state):
        for name, value in state.items():
            getattr(self, name).load_state_dict(value)


def updates_after(step, args: Args) -> int:
    """Gradient steps after online environment step `step` (from 1): G every step, or with the blocks schedule
    G x the block's steps at each block's end (and at T), the first block's x first_block_multiplier."""
    if args.update_schedule == "every-step":
        return args.utd
    if step % args.block_steps != 0 and step != args.online_steps:
        return 0
    first = args.first_block_multiplier if step <= args.block_steps else 1
    return args.utd * ((step - 1) % args.block_steps + 1) * first


# ---- Evaluation ---------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(agent, env, episodes: int, seed: int) -> np.ndarray | None:
    """Undiscounted returns of the deterministic policy pi(s) in `episodes` episodes, the first reset with `seed`
    so every evaluation sees the same starts. None when a stop signal (SIGTERM) cut the evaluation short."""
    returns = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed if episode == 0 else None)
        done = False
        episode_return = 0.0
        while not done:
            if stop_requested:
                return None
            action = agent.actor(torch.as_tensor(obs, dtype=torch.float32, device=agent.device)[None])[0]
            obs, reward, terminated, truncated, _ = env.step(action.cpu().numpy())
            episode_return += float(reward)
            done = terminated or truncated
        returns.append(episode_return)
    return np.array(returns)


# Balanced Replay's own: the share of online samples in RL batches and the ratio loss (means), the buffers' bytes.
COLUMNS = PROGRESS_COLUMNS + ["episode_normalized_return", "online_fraction", "ratio_loss", "buffer_bytes"]
EPISODE_COLUMNS = ["step", "length", "return", "normalized_return"]


def checkpoint(agent, phase, step, online=None, joint=None, **state) -> dict:
    """What latest.pt holds besides the random streams: enough to continue this run exactly (--resume). Of the
    buffers, the online transitions and the joint buffer's priorities: --resume reads the dataset again."""
    buffers = {} if online is None else {"online": online.transitions(), "joint": joint.state_dict()}
    return dict(phase=phase, step=step, agent=agent.state_dict(), num_updates=agent.num_updates, **buffers, **state)


def log_evaluation(run, agent, task, args, rng, phase, step, alpha, resume: dict, env=None, **extra) -> np.ndarray:
    """evaluate(), then a progress.csv row: scores x100 (D4RL's) and the losses averaged since the previous row.
    When a stop signal cuts the evaluation short, save `resume` (the state before it, so --resume redoes it)."""
    returns = evaluate(agent, task.eval_env, args.eval_episodes, args.seed + 100)
    if returns is None:
        run.save_latest(dict(resume, evaluation_due=True), rng, env)  # raises Preempted
    scores = 100 * task.normalized(returns)
    run.log_evaluation(phase, step, returns, scores, run.means.pop(), agent.num_updates, alpha=alpha, **extra)
    return returns


# ---- The phases: pre-training, the switch (three buffers), fine-tuning --------------------------------------
def flatten_episodes(dataset) -> dict[str, np.ndarray]:
    """Minari episodes (T+1 observations, T actions) as transitions. next_obs stays within its episode,
    and only terminations end bootstrapping: a time-limit truncation does not."""
    parts = {"obs": [], "actions": [], "rewards": [], "next_obs": [], "terminals": []}
    for ep in dataset.iterate_episodes():
        values = (ep.observations[:-1], ep.actions, ep.rewards, ep.observations[1:], ep.terminations)
        for key, value in zip(parts, values):
            parts[key].append(value)
    return {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}


def pretrain(agent, offline, args, run, task, rng, start=0, evaluation_due=True):
    """K gradient steps of TD3+BC with the pessimistic ensemble on uniform batches, alpha = alpha_offline."""
    alpha_offline = torch.tensor(args.alpha_offline, device=agent.device)  # a tensor: the step reads it on device
    memory = dict(buffer_bytes=run.config["buffer_bytes"]["offline"])
    if evaluation_due:  # the untrained agent's, or the one a stop signal cut short
        resume = checkpoint(agent, "offline", start)
        log_evaluation(run, agent, task, args, rng, "offline", start, args.alpha_offline, resume, **memory)
    with progress_bar(args.offline_steps, start, desc="offline", unit="upd") as bar:
        for step in range(start + 1, args.offline_steps + 1):
            run.means.add(agent.update(offline.sample(args.batch_size), alpha_offline))
            if step % args.eval_every == 0 or step == args.offline_steps:
                resume = checkpoint(agent, "offline", step)
                log_evaluation(run, agent, task, args, rng, "offline", step, args.alpha_offline, resume, **memory)
            if step < args.offline_steps and run.checkpoint_due(step):
                run.save_latest(checkpoint(agent, "offline", step), rng)
            bar.update()
    run.save_offline(agent.state_dict(), agent.num_updates, rng)


def online_buffers(offline, args, latest=None):
    """The online FIFO and the joint prioritized buffer: the offline data at priority 1 in slots 0 .. M - 1,
    then the online data. latest.pt keeps the online transitions and the joint buffer's priorities."""
    obs_dim, act_dim = offline.data.obs.shape[1], offline.data.actions.shape[1]
    online = ReplayBuffer(args.online_steps, obs_dim, act_dim, offline.device)
    joint = PrioritizedReplayBuffer(offline.size + args.online_steps, obs_dim, act_dim, offline.device)
    joint.add(*offline.data, priority=1.0)
    f, N = args.init_online_fraction, args.online_fraction_horizon  # loop:142-146: N at M f / ((1 - f) N) hold f
    joint.max_priority.fill_(offline.size * f / ((1 - f) * N))
    if latest is not None:
        online.add(*latest["online"])
        joint.add(*latest["online"])
        joint.load_state_dict(latest["joint"])
    return online, joint


def switch_to_online(agent, offline, args, run, task, rng):
    """The switch: three buffers from here on. Fine-tuning starts by evaluating the pre-trained agent."""
    online, joint = online_buffers(offline, args)
    sizes = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in run.config["buffer_bytes"].items())
    print(f"switch to online: replay buffers take {sizes}", file=sys.stderr)
    state = dict(R_current=None, evaluation_due=True)  # saved before that evaluation, so --resume does it
    run.save_latest(checkpoint(agent, "online", 0, online, joint, **state), rng, task.env)
    return online, joint, dict(state, step=0)


def replay_updates(agent, offline, online, joint, args, run, alpha_online, num_updates):
    """Balanced replay: each gradient step replays a batch from the joint buffer, and a density-ratio step
    re-prioritizes that batch."""
    for _ in range(num_updates):
        replayed, idx = joint.sample(args.batch_size)
        offline_batch = offline.sample(args.ratio_batch_size)
        online_batch = online.sample(args.ratio_batch_size)
        loss_w, priorities = agent.update_ratio(offline_batch, online_batch, replayed)
        joint.update_priorities(idx, priorities)
        online_fraction = (idx >= offline.size).float().mean()
        run.means.add(dict(agent.update(replayed, alpha_online), ratio_loss=loss_w, online_fraction=online_fraction))


def evaluate_online(run, agent, task, args, rng, online, joint, step, R_current):
    """An online progress.csv row, with the last training episode's normalized return (x100) beside the score."""
    resume = checkpoint(agent, "online", step, online, joint, R_current=R_current)
    score = "" if R_current is None else 100 * R_current
    extra = dict(env_steps=step, episode_normalized_return=score, buffer_bytes=run.config["buffer_bytes"]["total"])
    log_evaluation(run, agent, task, args, rng, "online", step, args.alpha_online, resume, task.env, **extra)


def finetune(agent, offline, online, joint, args, run, task, rng, state):
    """T environment steps with exploration noise; the updates of `updates_after` replay from the joint buffer,
    each with a density-ratio step that re-prioritizes the replayed batch. One episodes.csv row per episode."""
    alpha_online = torch.tensor(args.alpha_online, device=agent.device)
    R_current = state["R_current"]
    env, low, high = task.env, task.env.action_space.low, task.env.action_space.high
    noise_std = args.exploration_noise * (high - low) / 2
    if state.get("evaluation_due"):  # the pre-trained agent's, or the one a stop signal cut short
        evaluate_online(run, agent, task, args, rng, online, joint, state["step"], R_current)
    obs, _ = env.reset(seed=args.seed if state["step"] == 0 else None)
    episode_return, episode_length = 0.0, 0
    with progress_bar(args.online_steps, state["step"], desc="online", unit="step") as bar:
        for step in range(state["step"] + 1, args.online_steps + 1):
            with torch.no_grad():
                action = agent.actor(torch.as_tensor(obs, dtype=torch.float32, device=agent.device)[None])[0]
            action = np.clip(action.cpu().numpy() + rng.normal(0.0, noise_std), low, high)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            for buffer in (online, joint):  # into the joint buffer at the largest priority so far
                buffer.add(obs[None], action[None], [reward], next_obs[None], [float(terminated)])
            obs = next_obs
            episode_return += float(reward)
            episode_length += 1
            replay_updates(agent, offline, online, joint, args, run, alpha_online, updates_after(step, args))
            if terminated or truncated:
                R_current = float(task.normalized(episode_return))
                row = dict(step=step, length=episode_length, normalized_return=100 * R_current)
                run.logs["episodes"].write(row | {"return": episode_return})
            if step % args.eval_every == 0 or step == args.online_steps:
                evaluate_online(run, agent, task, args, rng, online, joint, step, R_current)
            # A stop signal saves at once (the episode is cut); periodic checkpoints wait for an episode's end.
            if step < args.online_steps and run.checkpoint_due(step, safe=terminated or truncated):
                run.save_latest(checkpoint(agent, "online", step, online, joint, R_current=R_current), rng, env)
            if terminated or truncated:
                obs, _ = env.reset()
                episode_return, episode_length = 0.0, 0
            bar.update()


# ---- Main: load the data, open the run folder, run the phases (resuming where latest.pt left off) -----------
NETWORK_KEYS = [
    "hidden_dim",
    "hidden_layers",
    "activation",
    "num_groups",
    "group_size",
    "ensemble",
    "ratio_hidden_dim",
    "ratio_hidden_layers",
    "alpha_offline",
]


def main(args: Args):
    pretrained = load_pretrained(args, METHOD, NETWORK_KEYS) if args.load_offline else None
    task = open_task(args)
    data = flatten_episodes(task.dataset)
    check_transitions(data, task.dataset_id, task.env.action_space)
    size, obs_dim, space = len(data["rewards"]), data["obs"].shape[1], task.env.action_space
    if size + args.online_steps > 2**24:
        raise UsageError(
            f"the joint buffer would hold {size} + {args.online_steps} transitions, more than the "
            f"{2**24} torch.multinomial can sample from; lower --online-steps"
        )
    resolve_defaults(args, task.env_name, task.dataset_name)
    check_args(args)  # again: the resolved values, and those taken over from a pre-training run
    memory = buffer_bytes(size, args.online_steps, obs_dim, space.shape[0])
    check_memory(memory["total"], "the replay buffers")
    capacity = {"offline": size, "online": args.online_steps, "prioritized": size + args.online_steps}
    pretrained_from = pretrained and pretrained["path"]
    info = dict(
        dataset_transitions=size, buffer_bytes=memory, buffer_capacity=capacity, pretrained_from=pretrained_from
    )
    run = open_run(args, METHOD, task, **info)
    device, rng = pick_device(args.device), seed_everything(args.seed)
    agent = Agent(obs_dim, space.shape[0], space.low, space.high, args, device)
    net = dict(hidden_dim=args.hidden_dim, hidden_layers=args.hidden_layers, activation=args.activation)
    bounds = dict(action_low=space.low.tolist(), action_high=space.high.tolist())
    run.describe_actor("Actor", obs_dim=obs_dim, act_dim=space.shape[0], **bounds, **net)
    run.log("progress", COLUMNS, echo=True)
    run.log("episodes", EPISODE_COLUMNS)
    latest = run.restore(agent, rng, task.env, pretrained)  # --resume: latest.pt; --load-offline: offline.pt

    with run:
        offline = ReplayBuffer(size, obs_dim, space.shape[0], device)
        offline.add(**data)  # the dataset, on --resume too: latest.pt leaves it out
        del data  # the buffer holds the only copy
        if latest is None or latest["phase"] == "offline":
            if pretrained is None:
                start = latest["step"] if latest else 0
                evaluation_due = latest is None or latest.get("evaluation_due", False)
                pretrain(agent, offline, args, run, task, rng, start, evaluation_due)
            if args.online_steps > 0:
                online, joint, state = switch_to_online(agent, offline, args, run, task, rng)
        else:
            online, joint = online_buffers(offline, args, latest)
            state = latest
        if args.online_steps > 0:
            finetune(agent, offline, online, joint, args, run, task, rng, state)
        run.finish(agent.state_dict(), agent.actor.state_dict())


if __name__ == "__main__":
    run_main(main, Args, METHOD, check_args, description=__doc__.split("\n\n")[0])
