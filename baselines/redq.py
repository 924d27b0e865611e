"""REDQ (scratch): online TD3 with a randomized critic ensemble, no offline data; also builds D4RL-style datasets.

Paper: Y. Zhao, R. Boney, A. Ilin, J. Kannala, J. Pajarinen, "Adaptive Behavior Cloning Regularization
for Stable Offline-to-Online Reinforcement Learning" (arXiv:2210.13846), Fig. 2's "REDQ (scratch)" peer.
REDQ is X. Chen, C. Wang, Z. Zhou, K. Ross, "Randomized Ensembled Double Q-Learning: Learning Fast Without a
Model" (ICLR 2021), here on TD3 instead of SAC, as in the paper (Section 5.1). The algorithm is
redq_adaptive_bc.py's online phase without the offline data and without BC:
    a_t = uniform random for the first learning_starts steps, then clip(pi(s_t) + N(0, sigma_expl))
    a'  = clip(pi'(s') + clip(eps, -c, c), a_low, a_high),   eps ~ N(0, sigma_target)
    y   = r + gamma * (1 - terminal) * min_{i in M} Q'_i(s', a')    (Eq. 3, M a fresh random subset)
    L(Q) = sum_i mean((Q_i(s, a) - y)^2),   L(pi) = -mean(Qbar(s, pi(s)))  (Eq. 4 without BC; Qbar: mean of N)
with G gradient steps per environment step once the warm-up is over (N = 10, M = 2, G = 20).

Open choices, their sources and flags (REDQ = watchernyu/REDQ, authors' code = zhaoyi11/adaptive_bc):
    actor updates     every policy_freq-th gradient step, 10 per env step at G = 20 (Table 1's policy update
                      frequency 2, as the main script); REDQ updates the actor once per env step, on the last of
                      its G (redq_sac.py:214, 244; policy_update_delay = utd_ratio = 20, train_redq_sac.py:20-21):
                      --actor-update-rate per-env-step.
    N, M, G           10, 2, 20 (Table 1; train_redq_sac.py:20): --num-critics, --num-min-critics, --utd.
    critic loss       the critics' MSEs summed (REDQ: N x the mean, redq_sac.py:207); the authors' code averages
                      them: --critic-loss-reduction mean. Actor: -mean of all N critics (redq_sac.py:223-224).
    target networks   soft update after every gradient step (redq_sac.py:247-249; Algorithm 1); the authors'
                      code only on actor steps: --delay-target-updates.
    warm-up           5,000 uniform random actions, no gradient step before step 5,001 (train_redq_sac.py:19;
                      redq_sac.py:97-103, 195): --learning-starts.
    exploration       N(0, 0.1 x half the action range) on pi (TD3, Table 1); REDQ samples SAC (redq_sac.py:99).
    initialization    nn.Linear's default; REDQ: Xavier uniform, zero biases (core.py:18-22, 98). Not a flag.
    replay capacity   --online-steps, nothing overwritten (REDQ: 1M, train_redq_sac.py:16): --buffer-size.
    evaluation        10 deterministic episodes every 5,000 steps, env seeded seed + 100 (paper Section 5.1);
                      REDQ: 1 episode per 1,000-step epoch (train_redq_sac.py:13, 150-154).

The loop, line by line:
    every env step: act (uniform in the warm-up, else pi + noise), store it        train -> explore
    after the warm-up, G times: critics (Eq. 3), the actor when due, targets      Agent.update, actor_update_due
    at the end: the datasets asked for, then final.pt                             export_datasets -> rollout

Building datasets D4RL's way (Fu et al. 2020; README): --stop-at-score X stops at the first evaluation scoring
X (the early-stopped "medium" agent); --export-replay ID writes every transition collected, warm-up included
(the "medium-replay" recipe), --export-rollouts ID --rollout-steps of the final policy ("medium", "expert"),
as Minari datasets with the env id and reference scores, so `redq_adaptive_bc.py --dataset-id ID` reads them.

Run:
    python baselines/redq.py --env hopper                          # Fig. 2's REDQ (scratch)
    python baselines/redq.py --env hopper --actor-update-rate per-env-step   # REDQ's own actor rate
    python baselines/redq.py --env hopper --utd 1 --num-critics 2 --online-steps 1000000 --stop-at-score 33 \\
        --export-replay local/hopper/redq-medium-replay-v0 --export-rollouts local/hopper/redq-medium-v0
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from tyro.conf import Suppress

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the plumbing package lives one folder up
from plumbing.cli import RunArgs, check_ranges, run_main
from plumbing.datasets import ENV_IDS, Task, choose_reference_scores, dataset_path
from plumbing.errors import UsageError, stop_requested
from plumbing.recording import EpisodeRecorder
from plumbing.run_folder import PROGRESS_COLUMNS, check_run_size, open_run
from plumbing.runtime import pick_device, progress_bar, seed_everything

METHOD = "redq"


@dataclass
class Args(RunArgs):
    dataset: Literal[
        "scratch",
        "random",
        "medium",
        "medium-replay",
        "medium-expert",
        "expert",
        "simple",
        "uniform-random",
        "minari-medium-expert",
        "redq-medium-replay",
    ] = "scratch"
    """a label only, no data is loaded: the <dataset> of the run folder, i.e. which plot.py panel shows this run"""
    dataset_id: Suppress[str | None] = None  # no dataset is read: these RunArgs flags are hidden
    random_dataset_steps: Suppress[int] = 1_000_000
    load_offline: Suppress[str | None] = None
    online_steps: int = 250_000
    """T, environment steps (paper: 250k, the fine-tuning budget of the offline-to-online methods)"""
    learning_starts: int = 5_000
    """uniformly random actions and no gradient steps for the first this many environment steps (REDQ: 5000)"""
    learning_rate: float = 3e-4
    """Adam learning rate of actor and critics (Table 1: 3e-4)"""
    batch_size: int = 256
    """B, mini-batch size (Table 1: 256)"""
    tau: float = 5e-3
    """target network update rate (Table 1: 5e-3)"""
    gamma: float = 0.99
    """discount factor"""
    policy_noise: float = 0.1
    """sigma_target, std of the target smoothing noise (Table 1's TD3 'policy noise std 0.1'; authors' code: 0.2)"""
    noise_clip: float = 0.5
    """c, clip of the target smoothing noise (Table 1: 0.5)"""
    exploration_noise: float = 0.1
    """sigma_expl, std of the exploration noise after the warm-up (TD3's and the authors' 0.1)"""
    policy_freq: int = 2
    """with --actor-update-rate policy-freq: one actor update every this many critic updates (Table 1: 2)"""
    actor_update_rate: Literal["policy-freq", "per-env-step"] = "policy-freq"
    """policy-freq: G/policy_freq actor updates per env step (Table 1); per-env-step: one, as REDQ's code"""
    hidden_layers: int = 2
    """hidden layers of actor and critics (Table 1: 2)"""
    hidden_dim: int = 256
    """units per hidden layer (Table 1: 256)"""
    activation: Literal["relu", "tanh", "elu", "gelu"] = "relu"
    """hidden activation (Table 1: ReLU)"""
    num_critics: int = 10
    """N, critics in the ensemble (Table 1: 10; 2 with --num-min-critics 2 is TD3's clipped double Q)"""
    num_min_critics: int = 2
    """M, randomly drawn critics whose minimum forms the target (Table 1: 2)"""
    utd: int = 20
    """G, gradient steps per environment step after the warm-up (Table 1: 20; 1 is TD3)"""
    delay_target_updates: bool = True
    """update targets only on actor steps (Table 1's TD3 'policy update frequency 2', the authors' code);
    --no-delay-target-updates: every step (REDQ's code)"""
    critic_loss_reduction: Literal["sum", "mean"] = "sum"
    """sum the N critics' squared errors (REDQ: each critic its own MSE) or average them (authors' code)"""
    buffer_size: int | None = None
    """FIFO replay capacity (None: online-steps, nothing is overwritten)"""
    stop_at_score: float | None = None
    """stop at the first evaluation after step 0 whose normalized score (x100) reaches this (D4RL's medium agent)"""
    export_replay: str | None = None
    """write every transition collected, warm-up included, as this Minari dataset id (D4RL's medium-replay)"""
    export_rollouts: str | None = None
    """roll out the final policy for --rollout-steps steps into this Minari dataset id (D4RL's medium/expert)"""
    rollout_steps: int = 1_000_000
    """environment steps of --export-rollouts (D4RL: 1M)"""
    rollout_noise: float = 0.1
    """std of the Gaussian noise on pi(s) in the rollouts (D4RL sampled stochastic SAC policies; 0: deterministic)"""


def resolve_defaults(args: Args) -> None:
    """Turn every None into its value. config.json records it."""
    if args.buffer_size is None:  # nothing is overwritten
        args.buffer_size = args.online_steps


def check_args(args: Args) -> None:
    """Reject bad values with one line (exit status 2). Unresolved defaults (None) pass."""
    check_ranges(
        args,
        positive=[
            "online_steps",
            "batch_size",
            "policy_freq",
            "hidden_layers",
            "hidden_dim",
            "num_critics",
            "num_min_critics",
            "utd",
            "learning_rate",
            "buffer_size",
            "rollout_steps",
        ],
        non_negative=["learning_starts", "policy_noise", "noise_clip", "exploration_noise", "rollout_noise"],
        fraction=["tau"],
        finite=["gamma", "stop_at_score"],
    )
    if args.num_min_critics > args.num_critics:
        raise UsageError(
            f"--num-min-critics (M={args.num_min_critics}) must be at most --num-critics (N={args.num_critics})"
        )
    if not 0 <= args.gamma <= 1:
        raise UsageError(f"--gamma must be in [0, 1], got {args.gamma}")
    check_run_size(
        args.num_critics + 1,
        args.hidden_dim,
        args.hidden_layers,
        args.buffer_size or args.online_steps,
        batch_size=args.batch_size,
    )
    choose_reference_scores(args.env, args.ref_min_score, args.ref_max_score)  # rejects min >= max
    # An id that cannot be written fails now, not after a day of training (a resumed run may have written it).
    for flag, dataset_id in [("--export-replay", args.export_replay), ("--export-rollouts", args.export_rollouts)]:
        try:
            if dataset_id is not None and dataset_path(dataset_id).exists() and args.resume is None:
                raise UsageError(f"dataset {dataset_id} already exists; delete it or choose another id")
        except UsageError as e:  # also an id that is not a Minari id
            raise UsageError(f"{flag}: {e}") from None
    if args.export_replay is not None and args.export_replay == args.export_rollouts:
        raise UsageError(
            f"--export-replay and --export-rollouts must name different datasets, both are {args.export_replay}"
        )


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
    ensemble runs as a few batched matrix multiplies. Each critic is initialized like nn.Linear."""

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


# ---- Replay buffer ------------------------------------------------------------------------------------------
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


# ---- The gradient step: target (Eq. 3), critic loss (Eq. 3), actor loss (Eq. 4 without BC), targets ---------
@torch.no_grad()
def td_target(batch: Batch, actor_target, critic_target, critic_idx, gamma, policy_noise, noise_clip):
    """y = r + gamma (1 - terminal) min_{i in M} Q'_i(s', a'), with a' the smoothed target action."""
    noise = (torch.randn_like(batch.actions) * policy_noise).clamp(-noise_clip, noise_clip)
    next_actions = actor_target(batch.next_obs) + noise * actor_target.action_scale
    low = actor_target.action_bias - actor_target.action_scale
    high = actor_target.action_bias + actor_target.action_scale
    q_next = critic_target(batch.next_obs, next_actions.clamp(low, high), critic_idx).min(dim=0).values
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


def actor_update_due(num_updates, g, utd, rate, policy_freq) -> bool:
    """Whether gradient step g (0-based) of an env step's G updates the actor; num_updates counts every
    gradient step so far, this one included. policy-freq: every policy_freq-th step overall, G / policy_freq
    per env step (Table 1). per-env-step: the last of the G only (REDQ redq_sac.py:214 with
    policy_update_delay = G)."""
    return g == utd - 1 if rate == "per-env-step" else num_updates % policy_freq == 0


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
        self.device = device
        self.num_updates = 0

    def critic_step(self, batch: Batch):
        """Eq. 3 for all N critics, with a fresh random subset of M critics for the target (REDQ)."""
        args = self.args
        critic_idx = None  # M = N (TD3's clipped double Q with N = 2): the min over all
        if args.num_min_critics < args.num_critics:
            critic_idx = torch.randperm(args.num_critics, device=batch.obs.device)[: args.num_min_critics]
        targets = (self.actor_target, self.critic_target)
        y = td_target(batch, *targets, critic_idx, args.gamma, args.policy_noise, args.noise_clip)
        loss, q_mean = critic_loss(self.critic, batch, y, args.critic_loss_reduction)
        self.critic_optim.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_optim.step()
        return loss.detach(), q_mean

    def actor_step(self, batch: Batch):
        """The critics are frozen: the actor's gradient flows through Q, not into it."""
        self.critic.requires_grad_(False)
        loss = actor_loss(self.actor, self.critic, batch)
        self.actor_optim.zero_grad(set_to_none=True)
        loss.backward()
        self.actor_optim.step()
        self.critic.requires_grad_(True)
        return loss.detach()

    def update(self, batch: Batch, g=0) -> dict:
        """Gradient step g of an env step's G: critics, the actor when due, targets. Metrics stay tensors."""
        args = self.args
        self.num_updates += 1
        update_actor = actor_update_due(self.num_updates, g, args.utd, args.actor_update_rate, args.policy_freq)
        loss, q_mean = self.critic_step(batch)
        metrics = {"critic_loss": loss, "q_mean": q_mean}
        if update_actor:
            metrics["actor_loss"] = self.actor_step(batch)
        if update_actor or not args.delay_target_updates:
            soft_update(self.critic_target, self.critic, args.tau)
            soft_update(self.actor_target, self.actor, args.tau)
        return metrics

    def state_dict(self):
        names = ("actor", "critic", "actor_target", "critic_target", "actor_optim", "critic_optim")
        return {name: getattr(self, name).state_dict() for name in names}

    def load_state_dict(self, state):
        for name, value in state.items():
            getattr(self, name).load_state_dict(value)


# ---- Acting: warm-up and exploration, evaluation, rollouts --------------------------------------------------
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


@torch.no_grad()
def rollout(actor, env, num_steps, noise_std, rng, device, seed) -> EpisodeRecorder:
    """D4RL's medium/expert recipe: num_steps steps of the policy, episode after episode."""
    trajectories = EpisodeRecorder(num_steps, env.observation_space, env.action_space, stoppable=True)
    noise_std = noise_std * (env.action_space.high - env.action_space.low) / 2
    obs, _ = env.reset(seed=seed)
    with progress_bar(num_steps, desc="rollouts", unit="step") as bar:
        for _ in range(num_steps):
            action = explore(actor, obs, 1, 0, env.action_space, noise_std, rng, device)  # no warm-up
            next_obs, reward, terminated, truncated, _ = env.step(action)
            trajectories.add(obs, action, reward, terminated, truncated, next_obs)
            obs = env.reset()[0] if terminated or truncated else next_obs
            bar.update()
    return trajectories


COLUMNS = PROGRESS_COLUMNS + ["episode_normalized_return"]
EPISODE_COLUMNS = ["step", "length", "return", "normalized_return"]  # normalized_return x100, like the scores


# ---- Training from scratch, then the dataset exports --------------------------------------------------------
def checkpoint(step, R_episode, agent, buffer, replay, env) -> dict:
    """What latest.pt holds besides the random streams: enough to continue at the next episode's start."""
    return dict(
        phase="online",
        step=step,
        R_episode=R_episode,
        agent=agent.state_dict(),
        num_updates=agent.num_updates,
        buffer=buffer.state_dict(),
        replay=None if replay is None else replay.state_dict(),
        action_space_rng=env.action_space.np_random.bit_generator.state,
    )  # the warm-up's uniform actions


def log_evaluation(run, agent, task, args, rng, step, resume: dict, **extra) -> float:
    """evaluate(), then a progress.csv row with the losses averaged since the previous row; returns the mean
    normalized score (x100). When a stop signal cuts the evaluation short, save `resume` (the state before it,
    so --resume redoes it)."""
    returns = evaluate(agent, task.eval_env, args.eval_episodes, args.seed + 100)
    if returns is None:
        run.save_latest(dict(resume, evaluation_due=True), rng, task.env)  # raises Preempted
    scores = 100 * task.normalized(returns)
    run.log_evaluation("online", step, returns, scores, run.means.pop(), agent.num_updates, step, **extra)
    return float(scores.mean())


def evaluate_online(run, agent, task, args, rng, buffer, replay, step, R_episode) -> float:
    """A progress.csv row with the last training episode's normalized return (x100) beside the score."""
    resume = checkpoint(step, R_episode, agent, buffer, replay, task.env)
    R_score = "" if R_episode is None else 100 * R_episode
    return log_evaluation(run, agent, task, args, rng, step, resume, episode_normalized_return=R_score)


def score_reached(args: Args, step, score) -> bool:
    """--stop-at-score: the evaluation at `step` ends training."""
    if args.stop_at_score is None or score < args.stop_at_score:
        return False
    stop = f"normalized score {score:.1f} >= --stop-at-score {args.stop_at_score}"
    print(f"\nstopping at step {step}: {stop}", file=sys.stderr)
    return True


def train(agent, buffer, replay, args, run, task, rng, state):
    """T environment steps: warm-up, then G gradient steps per step. Returns (steps done, last score x100)."""
    env, R_episode = task.env, state["R_episode"]
    noise_std = args.exploration_noise * (env.action_space.high - env.action_space.low) / 2
    step = state["step"]
    score = None
    if state.get("evaluation_due"):  # a stop signal cut this evaluation short: redo it
        score = evaluate_online(run, agent, task, args, rng, buffer, replay, step, R_episode)
        if score_reached(args, step, score):
            return step, score
    obs, _ = env.reset(seed=args.seed if step == 0 else None)
    episode_return, episode_length = 0.0, 0
    with progress_bar(args.online_steps, state["step"], desc="online", unit="step") as bar:
        for step in range(state["step"] + 1, args.online_steps + 1):
            action = explore(
                agent.actor, obs, step, args.learning_starts, env.action_space, noise_std, rng, agent.device
            )
            next_obs, reward, terminated, truncated, _ = env.step(action)
            buffer.add(obs[None], action[None], [reward], next_obs[None], [float(terminated)])
            if replay is not None:
                replay.add(obs, action, reward, terminated, truncated, next_obs)
            obs = next_obs
            episode_return += float(reward)
            episode_length += 1
            if step > args.learning_starts:
                for g in range(args.utd):
                    run.means.add(agent.update(buffer.sample(args.batch_size), g))
            if terminated or truncated:
                R_episode = task.normalized(episode_return)
                row = dict(step=step, length=episode_length, normalized_return=100 * R_episode)
                run.logs["episodes"].write(row | {"return": episode_return})
            if step % args.eval_every == 0 or step == args.online_steps:
                score = evaluate_online(run, agent, task, args, rng, buffer, replay, step, R_episode)
                if score_reached(args, step, score):
                    break
            # A stop signal saves at once (the episode is cut); periodic checkpoints wait for an episode's end.
            if step < args.online_steps and run.checkpoint_due(step, safe=terminated or truncated):
                run.save_latest(checkpoint(step, R_episode, agent, buffer, replay, env), rng, env)
            if terminated or truncated:
                obs, _ = env.reset()
                episode_return, episode_length = 0.0, 0
            bar.update()
    return step, score


def export_datasets(agent, replay, args, run, task, rng, state):
    """D4RL's recipes: the replay of every step (medium-replay), the final policy's rollouts (medium, expert).
    They belong to the run: latest.pt (phase "exports", listing those written) lets --resume finish them."""
    steps_done, score, written = state["step"], state["score"], state["exported"]
    if args.stop_at_score is not None and score < args.stop_at_score:
        print(
            f"note: --stop-at-score {args.stop_at_score} was never reached; the exports hold the agent after "
            f"all {steps_done} steps",
            file=sys.stderr,
        )
    env_id, built = task.env.spec.id, "built by baselines/redq.py"
    recipe = f"REDQ on TD3 (N={args.num_critics}, M={args.num_min_critics}, G={args.utd}), seed {args.seed}"
    if replay is not None and "replay" not in written:
        replay.write(
            args.export_replay,
            env_id,
            f"{recipe}: replay buffer",
            f"every transition of {steps_done} "
            f"training steps in {env_id} (the first {min(args.learning_starts, steps_done)} uniformly "
            f"random), {built}",
            *task.ref,
        )
        written.append("replay")
        if args.export_rollouts:  # a stop or kill during the rollouts keeps the replay
            run.save_latest(state, rng, task.env)
    if args.export_rollouts:
        rollouts = rollout(
            agent.actor, gym.make(env_id), args.rollout_steps, args.rollout_noise, rng, agent.device, args.seed + 200
        )
        rollouts.write(
            args.export_rollouts,
            env_id,
            f"{recipe}: final policy rollouts",
            f"{args.rollout_steps} "
            f"steps of pi(s) + N(0, {args.rollout_noise}) in {env_id}, the policy after {steps_done} "
            f"training steps (last evaluation {score:.1f}), {built}",
            *task.ref,
        )


# ---- Main: the environments, the run folder, training (resuming where latest.pt left off), the exports ------
def main(args: Args):
    env_id = ENV_IDS[args.env]
    *ref, ref_source = choose_reference_scores(args.env, args.ref_min_score, args.ref_max_score)
    task = Task(None, None, gym.make(env_id), gym.make(env_id), args.env, args.dataset, tuple(ref), ref_source)
    resolve_defaults(args)
    check_args(args)  # again: the resolved values
    run = open_run(args, METHOD, task)

    device, rng = pick_device(args.device), seed_everything(args.seed)
    obs_dim, space = task.env.observation_space.shape[0], task.env.action_space
    agent = Agent(obs_dim, space.shape[0], space.low, space.high, args, device)
    net = dict(hidden_dim=args.hidden_dim, hidden_layers=args.hidden_layers, activation=args.activation)
    bounds = dict(action_low=space.low.tolist(), action_high=space.high.tolist())
    run.describe_actor("Actor", obs_dim=obs_dim, act_dim=space.shape[0], **bounds, **net)
    run.log("progress", COLUMNS, echo=True)
    run.log("episodes", EPISODE_COLUMNS)
    buffer = ReplayBuffer(args.buffer_size, obs_dim, space.shape[0], device)
    replay = EpisodeRecorder(args.online_steps, task.env.observation_space, space) if args.export_replay else None
    state = run.restore(agent, rng, task.env)
    if state is not None:  # resuming where latest.pt left off
        space.np_random.bit_generator.state = state["action_space_rng"]  # the warm-up's uniform actions
        buffer.load_state_dict(state["buffer"])
        if replay is not None:
            replay.load_state_dict(state["replay"])

    with run:
        if state is None:  # seed the warm-up's uniform actions, evaluate the untrained policy, save step 0
            space.seed(args.seed)  # before the evaluation: a stop signal during it saves this seeded stream
            evaluate_online(run, agent, task, args, rng, buffer, replay, 0, None)
            state = checkpoint(0, None, agent, buffer, replay, task.env)
            run.save_latest(state, rng, task.env)
        if state["phase"] != "exports":  # (else a resumed run whose training had ended)
            steps_done, score = train(agent, buffer, replay, args, run, task, rng, state)
            state = dict(phase="exports", step=steps_done, score=score, exported=[])
            if args.export_replay or args.export_rollouts:  # training is done: a stop or kill in the exports keeps it
                state = checkpoint(steps_done, None, agent, buffer, replay, task.env) | state
                run.save_latest(state, rng, task.env)
        export_datasets(agent, replay, args, run, task, rng, state)
        run.finish(agent.state_dict(), agent.actor.state_dict())


if __name__ == "__main__":
    run_main(main, Args, METHOD, check_args, description=__doc__.split("\n\n")[0])
