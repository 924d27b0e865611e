"""TD3+BC pre-training, then TD3 fine-tuning with a fixed BC weight: the TD3-ft and TD3+BC peers.

Paper: Y. Zhao, R. Boney, A. Ilin, J. Kannala, J. Pajarinen, "Adaptive Behavior Cloning Regularization
for Stable Offline-to-Online Reinforcement Learning" (arXiv:2210.13846). Three of its peers run here:
- TD3-ft (Fig. 2; Fig. 4 "without downsampling"): TD3+BC pre-training, then plain TD3 online
  (alpha_online = 0) with the whole offline dataset kept in the replay buffer. The default.
- TD3+BC fine-tuned with a fixed BC weight (Fig. 1): --alpha-online 0.1 or 0.3.
- TD3-ft with downsampling (Fig. 4): --keep-ratio 0.05 --keep-min 0 keeps 5% of the offline data.

TD3+BC (Fujimoto & Gu 2021) with the main script's parametrization of the BC weight: two critics, both in
the target's minimum, the first critic alone in the actor loss (Eq. 1):
    a' = clip(pi'(s') + clip(eps, -c, c), a_low, a_high),   eps ~ N(0, sigma_target)
    y  = r + gamma * (1 - terminal) * min(Q'_1(s', a'), Q'_2(s', a'))
    L(Q) = mean((Q_1(s, a) - y)^2) + mean((Q_2(s, a) - y)^2)
    L(pi) = -mean(Q_1(s, pi(s))) / mean(|Q_1(s, pi(s))|) + alpha * mean((pi(s) - a)^2)
Pre-training: K gradient steps at alpha_offline. Online: G gradient steps per environment step at the fixed
alpha_online. What differs from redq_adaptive_bc.py: 2 critics instead of N = 10 and both in the target
instead of a random M, Q_1 in the actor instead of the ensemble mean, no Eq. 2, all offline data kept.

Open choices, each with its default's source and the flag that changes it (TD3_BC = sfujim/TD3_BC, TD3 =
sfujim/TD3, authors' code = zhaoyi11/adaptive_bc):
    G, gradient steps per env step   1: the paper does not state G for TD3-ft (Section 5.1 calls it "the
                                     standard TD3 algorithm"); TD3 trains once per env step (TD3
                                     main.py:136-137). --utd 20 is the G-matched variant (Table 1's G).
    BC weight                        alpha on the BC term over mean|Q_1| (paper Eq. 1, Table 1: 0.4); TD3+BC
                                     puts lambda = 2.5 / mean|Q| on the Q term (TD3_BC.py:141-143): the same
                                     direction up to the loss's scale. --alpha-offline, --alpha-online.
    alpha_offline on walker2d-random 100 (paper Section 5.1).
    state normalization              none (paper Section 5.1); TD3+BC normalizes (TD3_BC main.py:57, 106-107).
    target network updates           every gradient step (paper Algorithm 1); TD3+BC only on actor steps
                                     (TD3_BC.py:136, 150-155): --delay-target-updates.
    critic loss, actor's critic      sum of both MSEs (TD3_BC.py:128); Q_1 alone (TD3_BC.py:140).
    smoothing noise, policy delay    0.2, clip 0.5, every 2nd step (TD3_BC main.py:52-54; Table 1: 0.5, 2).
    exploration noise                0.1 x half the action range (Table 1; TD3 main.py:44, 120-123), from the
                                     first online step: no random warm-up (TD3 main.py:41's
                                     start_timesteps is for training from scratch).
    offline data kept at the switch  all of it, --keep-ratio 1.0 (Fig. 4's TD3-ft); with a ratio, at least
                                     --keep-min 50,000 (authors' code utils.py:67-71; 0 = the ratio alone),
                                     --keep-with-replacement as utils.py:71.
    replay capacity online           kept + online steps: nothing is overwritten (not stated). --buffer-size.
    initialization                   nn.Linear's default for actor and both critics (TD3_BC.py:11-40).
    evaluation                       10 deterministic episodes every 5,000 steps (paper Section 5.1), the
                                     env seeded seed + 100 (TD3_BC main.py:14-16).

Algorithm, line by line:
    pre-train K steps: critics, every 2nd step actor (alpha_offline), targets    pretrain -> Agent.update
    keep the offline data (all, or a random fraction)                          switch_to_online -> downsample
    every env step: act with noise, store, G x (critics, actor, targets)       finetune -> Agent.update

Run:
    python baselines/td3_bc.py --env hopper --dataset medium                     # TD3-ft
    python baselines/td3_bc.py --env hopper --dataset medium --utd 20            # TD3-ft at the method's G
    python baselines/td3_bc.py --env hopper --dataset medium --alpha-online 0.1  # Fig. 1
    python baselines/td3_bc.py --env hopper --dataset random --keep-ratio 0.05 --keep-min 0   # Fig. 4
    python baselines/td3_bc.py --help
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
from plumbing.run_folder import PROGRESS_COLUMNS, check_run_size, load_pretrained, open_run
from plumbing.runtime import pick_device, progress_bar, seed_everything

METHOD = "td3_bc"
NUM_CRITICS = 2  # TD3's twin critics


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
    policy_noise: float = 0.1
    """sigma_target, std of the target smoothing noise (Table 1's TD3 'policy noise std 0.1'; authors' code: 0.2)"""
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
    utd: int = 1
    """G, gradient steps per online env step (TD3: 1; the paper does not state G for TD3-ft; 20: the method's)"""
    delay_target_updates: bool = True
    """update targets only on actor steps (Table 1's TD3 'policy update frequency 2', TD3+BC's and the authors'
    code); --no-delay-target-updates: every step"""
    alpha_offline: float | None = None
    """alpha_offline, BC weight of pre-training (None: Table 1's 0.4; 100 on walker2d-random as in the paper)"""
    alpha_online: float = 0.0
    """alpha_online, the fixed BC weight of fine-tuning (0: TD3-ft; Fig. 1: 0.1, 0.3)"""
    keep_ratio: float = 1.0
    """fraction of the offline data kept for fine-tuning (TD3-ft: 1.0, all of it; Fig. 4 downsampled: 0.05)"""
    keep_min: int = 50_000
    """keep at least this many offline transitions when downsampling (authors' code: 50k; 0: the ratio alone)"""
    keep_with_replacement: bool = False
    """draw the kept transitions with replacement, as the authors' code does"""
    buffer_size: int | None = None
    """FIFO replay capacity online (None: the kept offline data + online-steps, nothing is overwritten)"""


def resolve_defaults(args: Args, env_name: str, dataset_name: str, dataset_size: int) -> None:
    """Turn every None into its value, the ones that depend on the task and the data. config.json records them."""
    if args.alpha_offline is None:  # the paper: alpha_offline = 100 for D4RL's walker2d-random only
        args.alpha_offline = 100.0 if env_name == "walker2d" and dataset_name.startswith("random") else 0.4
    if args.buffer_size is None:  # TD3-ft overwrites nothing
        args.buffer_size = num_kept(dataset_size, args.keep_ratio, args.keep_min) + args.online_steps


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
            "learning_rate",
            "buffer_size",
        ],
        non_negative=[
            "online_steps",
            "policy_noise",
            "noise_clip",
            "exploration_noise",
            "keep_min",
            "alpha_offline",
            "alpha_online",
        ],
        fraction=["keep_ratio", "tau"],
        finite=["gamma"],
    )
    if not 0 <= args.gamma <= 1:
        raise UsageError(f"--gamma must be in [0, 1], got {args.gamma}")
    transitions = max(args.online_steps, args.buffer_size or 0)
    size = (NUM_CRITICS + 1, args.hidden_dim, args.hidden_layers)
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
    """N critics in one module (here N = 2: TD3's Q_1 and Q_2): layer l of both critics is one (N, in, out)
    weight tensor, so they run as a few batched matrix multiplies. Each is initialized like nn.Linear."""

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
        """Q-values of shape (N, B), or (k, B) for a subset of k critics (an index tensor or a slice)."""
        weights, biases = list(self.weights), list(self.biases)
        if critic_idx is not None:
            weights, biases = [w[critic_idx] for w in weights], [b[critic_idx] for b in biases]
        x = torch.cat([obs, action], dim=-1).expand(len(weights[0]), -1, -1)  # the same input for every critic
        for layer, (weight, bias) in enumerate(zip(weights, biases)):
            x = torch.baddbmm(bias, x, weight)
            if layer < len(weights) - 1:
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
    """The switch: a new FIFO buffer holding a uniform random subset of the offline data (all of it, in a
    random order, with TD3-ft's keep_ratio 1.0)."""
    k = num_kept(buffer.size, keep_ratio, keep_min)
    if with_replacement:  # authors' code utils.py:71, np.random.randint
        keep = torch.randint(0, buffer.size, (k,), generator=generator)
    else:
        keep = torch.randperm(buffer.size, generator=generator)[:k]
    online = ReplayBuffer(capacity, buffer.data.obs.shape[1], buffer.data.actions.shape[1], buffer.device)
    online.add(*(field[keep.to(buffer.device)] for field in buffer.data))
    return online


# ---- The gradient step: TD3 target, critic loss, TD3+BC actor loss (Eq. 1), soft target updates -------------
@torch.no_grad()
def td_target(batch: Batch, actor_target, critic_target, gamma, policy_noise, noise_clip):
    """y = r + gamma (1 - terminal) min(Q'_1(s', a'), Q'_2(s', a')), with a' the smoothed target action."""
    noise = (torch.randn_like(batch.actions) * policy_noise).clamp(-noise_clip, noise_clip)
    next_actions = actor_target(batch.next_obs) + noise * actor_target.action_scale
    low = actor_target.action_bias - actor_target.action_scale
    high = actor_target.action_bias + actor_target.action_scale
    q_next = critic_target(batch.next_obs, next_actions.clamp(low, high)).min(dim=0).values  # clipped double Q
    return batch.rewards + gamma * (1.0 - batch.terminals) * q_next


def critic_loss(critic, batch: Batch, y):
    """Both critics regress to the same y; TD3 sums their squared errors. Returns (loss, mean Q)."""
    q = critic(batch.obs, batch.actions)  # (2, B)
    return ((q - y) ** 2).mean(dim=1).sum(), q.detach().mean()


def actor_loss(actor, critic, batch: Batch, alpha):
    """Eq. 1 with Q_1: -mean(Q_1(s, pi(s))) / mean|Q_1| + alpha * mean((pi(s) - a)^2)."""
    pi = actor(batch.obs)
    q1 = critic(batch.obs, pi, slice(0, 1))[0]  # Q_1 alone, as in TD3 (a slice: a view, no copy)
    # Dividing by the batch's mean |Q_1| (no gradient) makes alpha independent of the reward scale.
    return -q1.mean() / q1.abs().mean().detach() + alpha * ((pi - batch.actions) ** 2).mean()


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau):
    """theta' <- tau theta + (1 - tau) theta', for all parameters in one fused call."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), tau)


class Agent:
    """Actor, twin critics, their target copies, optimizers, and the gradient step."""

    def __init__(self, obs_dim, act_dim, action_low, action_high, args: Args, device):
        net = dict(hidden_dim=args.hidden_dim, hidden_layers=args.hidden_layers, activation=args.activation)
        self.actor = Actor(obs_dim, act_dim, action_low, action_high, **net).to(device)
        self.critic = CriticEnsemble(NUM_CRITICS, obs_dim, act_dim, **net).to(device)
        self.actor_target = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=args.learning_rate, fused=True)
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=args.learning_rate, fused=True)
        self.args = args
        self.device = device
        self.num_updates = 0

    def critic_step(self, batch: Batch):
        args = self.args
        y = td_target(batch, self.actor_target, self.critic_target, args.gamma, args.policy_noise, args.noise_clip)
        loss, q_mean = critic_loss(self.critic, batch, y)
        self.critic_optim.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_optim.step()
        return loss.detach(), q_mean

    def actor_step(self, batch: Batch, alpha):
        """Eq. 1. The critics are frozen: the actor's gradient flows through Q_1, not into it."""
        self.critic.requires_grad_(False)
        loss = actor_loss(self.actor, self.critic, batch, alpha)
        self.actor_optim.zero_grad(set_to_none=True)
        loss.backward()
        self.actor_optim.step()
        self.critic.requires_grad_(True)
        return loss.detach()

    def update(self, batch: Batch, alpha) -> dict:
        """One gradient step: critics, every policy_freq-th step the actor, targets. Metrics stay tensors."""
        self.num_updates += 1
        update_actor = self.num_updates % self.args.policy_freq == 0
        loss, q_mean = self.critic_step(batch)
        metrics = {"critic_loss": loss, "q_mean": q_mean}
        if update_actor:
            metrics["actor_loss"] = self.actor_step(batch, alpha)
        if update_actor or not self.args.delay_target_updates:
            soft_update(self.critic_target, self.critic, self.args.tau)
            soft_update(self.actor_target, self.actor, self.args.tau)
        return metrics

    def state_dict(self):
        names = ("actor", "critic", "actor_target", "critic_target", "actor_optim", "critic_optim")
        return {name: getattr(self, name).state_dict() for name in names}

    def load_state_dict(self, state):
        for name, value in state.items():
            getattr(self, name).load_state_dict(value)


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


COLUMNS = PROGRESS_COLUMNS + ["episode_normalized_return"]
EPISODE_COLUMNS = ["step", "length", "return", "normalized_return"]  # normalized_return x100, like the scores


def checkpoint(agent, phase, step, buffer=None, **state) -> dict:
    """What latest.pt holds besides the random streams: enough to continue this run exactly (--resume)."""
    buffer_state = {} if buffer is None else {"buffer": buffer.state_dict()}
    return dict(
        phase=phase, step=step, agent=agent.state_dict(), num_updates=agent.num_updates, **buffer_state, **state
    )


def log_evaluation(run, agent, task, args, rng, phase, step, alpha, resume: dict, env=None, **extra) -> np.ndarray:
    """evaluate(), then a progress.csv row: scores x100 (D4RL's) and the losses averaged since the previous row.
    When a stop signal cuts the evaluation short, save `resume` (the state before it, so --resume redoes it)."""
    returns = evaluate(agent, task.eval_env, args.eval_episodes, args.seed + 100)
    if returns is None:
        run.save_latest(dict(resume, evaluation_due=True), rng, env)  # raises Preempted
    scores = 100 * task.normalized(returns)
    run.log_evaluation(phase, step, returns, scores, run.means.pop(), agent.num_updates, alpha=alpha, **extra)
    return returns


# ---- The phases: pre-training, the switch, fine-tuning ------------------------------------------------------
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
    """K gradient steps of TD3+BC at alpha = alpha_offline."""
    alpha_offline = torch.tensor(args.alpha_offline, device=agent.device)  # a tensor: the step reads it on device
    if evaluation_due:  # the untrained agent's, or the one a stop signal cut short
        resume = checkpoint(agent, "offline", start)
        log_evaluation(run, agent, task, args, rng, "offline", start, args.alpha_offline, resume)
    with progress_bar(args.offline_steps, start, desc="offline", unit="upd") as bar:
        for step in range(start + 1, args.offline_steps + 1):
            run.means.add(agent.update(buffer.sample(args.batch_size), alpha_offline))
            if step % args.eval_every == 0 or step == args.offline_steps:
                resume = checkpoint(agent, "offline", step)
                log_evaluation(run, agent, task, args, rng, "offline", step, args.alpha_offline, resume)
            if step < args.offline_steps and run.checkpoint_due(step):
                run.save_latest(checkpoint(agent, "offline", step), rng)
            bar.update()
    run.save_offline(agent.state_dict(), agent.num_updates, rng)


def switch_to_online(agent, buffer, args, run, task, rng):
    """Keep the offline data (TD3-ft: all of it) in the online buffer; fine-tuning starts by evaluating the
    pre-trained agent."""
    generator = torch.Generator().manual_seed(args.seed)
    online_buffer = downsample(
        buffer, args.buffer_size, args.keep_ratio, args.keep_min, args.keep_with_replacement, generator
    )
    kept, capacity = online_buffer.size, online_buffer.capacity
    print(f"switch to online: kept {kept} offline transitions, FIFO capacity {capacity}", file=sys.stderr)
    state = dict(R_episode=None, evaluation_due=True)  # saved before that evaluation, so --resume does it
    run.save_latest(checkpoint(agent, "online", 0, online_buffer, **state), rng, task.env)
    return online_buffer, dict(state, step=0)


def evaluate_online(run, agent, task, args, rng, buffer, step, R_episode):
    """An online progress.csv row, with the last training episode's normalized return (x100) beside the score."""
    resume = checkpoint(agent, "online", step, buffer, R_episode=R_episode)
    score = "" if R_episode is None else 100 * R_episode
    extra = dict(env_steps=step, episode_normalized_return=score)
    log_evaluation(run, agent, task, args, rng, "online", step, args.alpha_online, resume, task.env, **extra)


def finetune(agent, buffer, args, run, task, rng, state):
    """TD3 online: act with exploration noise, store, G gradient steps per env step at the fixed alpha_online."""
    alpha_online = torch.tensor(args.alpha_online, device=agent.device)
    R_episode = state["R_episode"]
    env, low, high = task.env, task.env.action_space.low, task.env.action_space.high
    noise_std = args.exploration_noise * (high - low) / 2
    if state.get("evaluation_due"):  # the pre-trained agent's, or the one a stop signal cut short
        evaluate_online(run, agent, task, args, rng, buffer, state["step"], R_episode)
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
                run.means.add(agent.update(buffer.sample(args.batch_size), alpha_online))
            if terminated or truncated:
                R_episode = task.normalized(episode_return)
                row = dict(step=step, length=episode_length, normalized_return=100 * R_episode)
                run.logs["episodes"].write(row | {"return": episode_return})
            if step % args.eval_every == 0 or step == args.online_steps:
                evaluate_online(run, agent, task, args, rng, buffer, step, R_episode)
            # A stop signal saves at once (the episode is cut); periodic checkpoints wait for an episode's end.
            if step < args.online_steps and run.checkpoint_due(step, safe=terminated or truncated):
                run.save_latest(checkpoint(agent, "online", step, buffer, R_episode=R_episode), rng, env)
            if terminated or truncated:
                obs, _ = env.reset()
                episode_return, episode_length = 0.0, 0
            bar.update()


# ---- Main: load the data, open the run folder, run the phases (resuming where latest.pt left off) -----------
NETWORK_KEYS = ["hidden_dim", "hidden_layers", "activation", "alpha_offline"]


def main(args: Args):
    pretrained = load_pretrained(args, METHOD, NETWORK_KEYS) if args.load_offline else None
    task = open_task(args)
    data = flatten_episodes(task.dataset)
    check_transitions(data, task.dataset_id, task.env.action_space)
    dataset_size = len(data["rewards"])
    resolve_defaults(args, task.env_name, task.dataset_name, dataset_size)
    check_args(args)  # again: the resolved values, and those taken over from a pre-training run
    kept = num_kept(dataset_size, args.keep_ratio, args.keep_min)
    if args.buffer_size < kept:
        raise UsageError(f"--buffer-size {args.buffer_size} cannot hold the {kept} offline transitions kept")
    pretrained_from = pretrained and pretrained["path"]
    info = dict(dataset_transitions=dataset_size, offline_kept=kept, pretrained_from=pretrained_from)
    run = open_run(args, METHOD, task, **info)

    device, rng = pick_device(args.device), seed_everything(args.seed)
    obs_dim, space = data["obs"].shape[1], task.env.action_space
    agent = Agent(obs_dim, space.shape[0], space.low, space.high, args, device)
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
            if args.online_steps > 0:  # 0: pre-train only (offline.pt, final.pt, actor.pt)
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
