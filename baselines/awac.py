"""AWAC: Advantage-Weighted Actor-Critic, a baseline of the adaptive-BC paper's Figure 2.

Paper: A. Nair, A. Gupta, M. Dalal, S. Levine, "AWAC: Accelerating Online Reinforcement Learning with
Offline Datasets" (arXiv:2006.09359). The adaptive-BC paper (Zhao et al., Sec. 5.1) produced its AWAC
curves with ikostrikov/jaxrl (jaxrl/agents/awac); this script follows that code, written anew in PyTorch.

One set of updates runs on the offline dataset (K gradient steps) and then, unchanged, while the agent
collects its own data (T environment steps, G updates each). Nothing switches at the boundary: the actor
is tied to the buffer's actions only through the weights below, so the tie loosens as online data arrive.

1. Critics: twin Q-functions that evaluate the current actor (no entropy term, no target actor):
       a' ~ pi(.|s'),   y = r + gamma * (1 - terminal) * min_i Q'_i(s', a')
       L(Q) = sum_i mean_batch (Q_i(s, a) - y)^2
2. Actor: weighted maximum likelihood of the buffer's own actions (the AWAC paper's policy update):
       V(s)   = min_i mean_k Q_i(s, a_k),   a_k ~ pi(.|s), k = 1..num_action_samples
       A(s,a) = min_i Q_i(s, a) - V(s)
       w(s,a) = exp(A / lambda) / mean_batch exp(A / lambda)        (no gradient)
       L(pi)  = - mean_batch w(s,a) log pi(a|s)
   jaxrl writes this as -sum(softmax(A / lambda) * log pi) (jaxrl/agents/awac/actor.py:31): B softmax is
   exactly w, computed without overflow and bounded to (0, B], so there is no clip by default.
3. The actor is a Gaussian whose mean is tanh-bounded to the action range and whose log-std is one learned
   vector clipped to [-10, 2] (jaxrl's NormalTanhPolicy, tanh_squash_distribution=False,
   jaxrl/agents/awac/awac_learner.py:81-85): log pi(a|s) of every buffer action is finite. It acts by
   sampling online (clipped to the bounds, awac_learner.py:114) and by its mean in evaluation.

Open choices, the value taken, and its source (flag in brackets):
- lambda (jaxrl: beta) = 2.0: the adaptive-BC paper gives none; jaxrl's fine-tuning config, "hyper parameters
  from the official implementation", sets 2.0 (examples/configs/awac_default.py:23); the learner's class
  default 1.0 (awac_learner.py:68) is not what that script runs [--lam]. With advantages of std 2, a batch
  of 1024 keeps an effective sample size of about 5% at lambda 1 against 38% at 2: a much sharper update.
- Actor 4 x 256 (awac_default.py:13), though the paper says every method has two hidden layers (Sec. 5.1):
  the paper ran AWAC from jaxrl's code, outside the codebase its other methods share, so the config it ran
  is taken whole [--actor-hidden-layers 2 gives the paper's sentence].
- Batch 1024 (the paper, Sec. 5.1; train_finetuning.py:25). Actor AdamW (weight decay 1e-4), critics 2 x 256
  Adam, lr 3e-4, tau 5e-3 every step, one policy sample for V(s), target actions sampled, not clipped
  (awac_default.py:10-25). jaxrl clips buffer actions to +-(1 - 1e-5) before log pi (actor.py:19-20), which
  only its squashed variant needs; not done here.
- G = 1 update per environment step (train_finetuning.py:107-108); the paper gives no G for AWAC, and the
  main method runs G = 20 [--utd].
- K = 1M offline steps (the paper, for every method; jaxrl: 50k, train_finetuning.py:30), T = 250k,
  evaluation every 5,000 steps with 10 episodes, no state normalization (the paper, Sec. 5.1).
- One FIFO buffer: the whole dataset, then the online data; its default capacity, dataset + T, never
  overwrites anything (jaxrl: replay_buffer_size None, awac_default.py:27) [--buffer-size].

Algorithm, line by line:
    pre-train: K x (critics, actor, target critics) on the dataset        pretrain -> Agent.update
    no switch: the dataset stays in the buffer                            start_online
    fine-tune: act by sampling pi, store, G x the same update             finetune

Run:
    python baselines/awac.py --env hopper --dataset medium
    python baselines/awac.py --help                        # every hyperparameter
    python baselines/awac.py --resume runs/<run folder>    # continue a stopped run from its latest.pt
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

METHOD = "awac"


@dataclass
class Args(RunArgs):
    offline_steps: int = 1_000_000
    """K, offline gradient steps (adaptive-BC paper: 1M for every method)"""
    online_steps: int = 250_000
    """T, online environment steps (adaptive-BC paper: 250k; 0 = pre-train only)"""
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
    lam: float = 2.0
    """lambda, temperature of the advantage weights exp(A/lambda) (jaxrl's config: beta 2.0; the paper: none)"""
    normalize_weights: bool = True
    """divide exp(A/lambda) by its batch mean, i.e. B * softmax(A/lambda) as jaxrl does"""
    max_weight: float | None = None
    """clip every advantage weight at this value (None: no clip besides the normalization, as jaxrl)"""
    num_action_samples: int = 1
    """actions drawn from pi(.|s) to estimate V(s) = E_a Q(s, a) (jaxrl: 1)"""
    num_critics: int = 2
    """critics; targets and advantages use their minimum (AWAC: 2, twin critics)"""
    hidden_layers: int = 2
    """hidden layers of the critics (jaxrl: 2)"""
    actor_hidden_layers: int = 4
    """hidden layers of the actor (jaxrl's AWAC: 4; the paper's sentence for all methods: 2)"""
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
    """G, gradient steps per online environment step (jaxrl: 1; the paper does not say; the method: 20)"""
    buffer_size: int | None = None
    """FIFO replay capacity (None = dataset + online steps: the whole dataset and every online step)"""


def resolve_defaults(args: Args, dataset_size: int) -> None:
    """Turn every None into its value (the one that depends on the data). config.json records it."""
    if args.buffer_size is None:  # the whole dataset and every online step: nothing is overwritten
        args.buffer_size = dataset_size + args.online_steps


def check_args(args: Args) -> None:
    """Reject bad values with one line (exit status 2). Unresolved defaults (None) pass."""
    check_ranges(
        args,
        positive=[
            "offline_steps",
            "batch_size",
            "target_update_period",
            "num_action_samples",
            "num_critics",
            "hidden_layers",
            "actor_hidden_layers",
            "hidden_dim",
            "utd",
            "learning_rate",
            "lam",
            "max_weight",
            "buffer_size",
        ],
        non_negative=["online_steps", "actor_weight_decay"],
        fraction=["tau"],
        finite=["gamma", "log_std_min", "log_std_max"],
    )
    if not 0 <= args.gamma <= 1:
        raise UsageError(f"--gamma must be in [0, 1], got {args.gamma}")
    check_run_size(
        args.num_critics + 2,
        args.hidden_dim,
        max(args.hidden_layers, args.actor_hidden_layers),
        args.online_steps,
        batch_size=args.batch_size,
    )
    if not args.normalize_weights and args.max_weight is None:
        raise UsageError("--no-normalize-weights needs --max-weight: raw exp(A/lambda) overflows without a clip")
    if not args.log_std_min < args.log_std_max:
        raise UsageError(f"--log-std-min must be below --log-std-max, got {args.log_std_min} and {args.log_std_max}")


# ---- Networks -------------------------------------------------------------------------------------------------
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "gelu": nn.GELU}


class GaussianActor(nn.Module):
    """pi(a|s) = N(mu(s), sigma^2): mu tanh-bounded to the action range, log sigma clipped. The distribution
    is a plain (unsquashed) Gaussian, as jaxrl's AWAC actor; calling the module returns its mean."""

    def __init__(
        self,
        obs_dim,
        act_dim,
        action_low,
        action_high,
        hidden_dim=256,
        hidden_layers=4,
        activation="relu",
        state_dependent_std=False,
        log_std_min=-10.0,
        log_std_max=2.0,
    ):
        super().__init__()
        layers, width = [], obs_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden_dim), ACTIVATIONS[activation]()]
            width = hidden_dim
        self.trunk = nn.Sequential(*layers)
        self.mean = nn.Linear(width, act_dim)
        # A learned vector by default, initialized at 0 (sigma = 1) as jaxrl's (policies.py:72-73)
        self.log_std = nn.Linear(width, act_dim) if state_dependent_std else nn.Parameter(torch.zeros(act_dim))
        self.log_std_min = log_std_min
        self.log_std_max = log_std_max
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
        return torch.distributions.Normal(mean, std, validate_args=False)  # checks would cost a host sync


class CriticEnsemble(nn.Module):
    """N critics in one module: layer l of all N is one (N, in, out) weight tensor, so the ensemble runs as a
    few batched matrix multiplies. Each critic is initialized like its own nn.Linear stack."""

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


# ---- Replay buffer: the dataset first, then the online data, in one FIFO --------------------------------------
class Batch(NamedTuple):
    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminals: torch.Tensor  # 1.0 only for a true termination; a time-limit truncation keeps bootstrapping


class ReplayBuffer:
    """Preallocated FIFO ring buffer on the training device; once full, a new transition overwrites the oldest."""

    def __init__(self, capacity, obs_dim, act_dim, device):
        self.capacity = capacity
        self.device = device
        self.ptr = 0  # where the next transition goes
        self.size = 0
        self.added = 0  # every transition ever appended
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
        self.added += n

    def sample(self, batch_size) -> Batch:
        idx = torch.randint(0, self.size, (batch_size,), device=self.device)
        return Batch(*(field[idx] for field in self.data))

    def state_dict(self, rebuilt=0):
        """Leaves out the first `rebuilt` transitions ever added (the dataset, which the caller adds again before
        load_state_dict), except the slots the FIFO has overwritten since."""
        overwritten = min(rebuilt, max(0, self.added - self.capacity))
        return {
            "ptr": self.ptr,
            "size": self.size,
            "added": self.added,
            "rebuilt": rebuilt,
            "overwritten": overwritten,
            **{
                name: torch.cat([storage[:overwritten], storage[rebuilt : self.size]])
                for name, storage in zip(Batch._fields, self.data)
            },
        }

    def load_state_dict(self, state):
        rebuilt, overwritten = state["rebuilt"], state["overwritten"]
        assert self.added == rebuilt, "add the left-out transitions first"
        for name, storage in zip(Batch._fields, self.data):
            storage[:overwritten] = state[name][:overwritten]
            storage[rebuilt : state["size"]] = state[name][overwritten:]
        self.ptr = state["ptr"]
        self.size = state["size"]
        self.added = state["added"]


# ---- The gradient step: critic target and loss (1), advantage weights and actor loss (2), targets -------------
@torch.no_grad()
def td_target(batch: Batch, actor: GaussianActor, critic_target, gamma):
    """(1) y = r + gamma (1 - terminal) min_i Q'_i(s', a'), a' ~ pi(.|s') from the current actor."""
    next_actions = actor.distribution(batch.next_obs).sample()
    q_next = critic_target(batch.next_obs, next_actions).min(dim=0).values
    return batch.rewards + gamma * (1.0 - batch.terminals) * q_next


def critic_loss(critic, batch: Batch, y):
    """(1) Each critic's mean squared error to y, summed over critics. Returns (loss, mean Q)."""
    q = critic(batch.obs, batch.actions)  # (N, B)
    return ((q - y) ** 2).mean(dim=1).sum(), q.detach().mean()


@torch.no_grad()
def state_value(critic, obs, policy_actions):
    """(2) V(s) = min_i mean_k Q_i(s, a_k) for policy_actions of shape (K, B, act_dim): the mean over the K
    samples per critic, then the minimum over critics (jaxrl/agents/awac/value.py:21-22, actor.py:15)."""
    num_samples, batch_size = policy_actions.shape[:2]
    obs_k = obs.expand(num_samples, -1, -1).reshape(num_samples * batch_size, -1)
    q = critic(obs_k, policy_actions.reshape(num_samples * batch_size, -1))  # (N, K * B)
    return q.view(q.shape[0], num_samples, batch_size).mean(dim=1).min(dim=0).values


def advantage_weights(advantages, lam, normalize=True, max_weight=None):
    """(2) w = exp(A / lambda), divided by its batch mean when normalize (= B softmax(A / lambda), computed
    without overflow), then clipped at max_weight when one is given."""
    if normalize:
        weights = torch.softmax(advantages / lam, dim=0) * advantages.shape[0]
    else:
        weights = torch.exp(advantages / lam)  # may overflow to inf: the clip below is then required
    if max_weight is not None:
        weights = weights.clamp(max=max_weight)
    return weights


def actor_loss(actor: GaussianActor, critic, batch: Batch, lam, normalize, max_weight, num_action_samples):
    """(2) -mean_batch w(s, a) log pi(a|s), A = min_i Q_i(s, a) - V(s). Returns (loss, largest weight, mean std)."""
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
        self.actor = GaussianActor(obs_dim, act_dim, action_low, action_high, **actor_kwargs(args)).to(device)
        self.critic = CriticEnsemble(
            args.num_critics,
            obs_dim,
            act_dim,
            hidden_dim=args.hidden_dim,
            hidden_layers=args.hidden_layers,
            activation=args.activation,
        ).to(device)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.actor_optim = torch.optim.AdamW(
            self.actor.parameters(), lr=args.learning_rate, weight_decay=args.actor_weight_decay, fused=True
        )
        self.critic_optim = torch.optim.Adam(self.critic.parameters(), lr=args.learning_rate, fused=True)
        self.args = args
        self.device = device
        self.num_updates = 0

    def update(self, batch: Batch) -> dict:
        """Critics first, then the actor against the updated critics (jaxrl's order, awac_learner.py:26-42).
        No host-device synchronization: the metrics stay tensors."""
        args = self.args
        self.num_updates += 1
        y = td_target(batch, self.actor, self.critic_target, args.gamma)
        loss_q, q_mean = critic_loss(self.critic, batch, y)
        self.critic_optim.zero_grad(set_to_none=True)
        loss_q.backward()
        self.critic_optim.step()
        # The critics enter the actor loss only through the weights, computed without gradient.
        loss_pi, weight_max, policy_std = actor_loss(
            self.actor, self.critic, batch, args.lam, args.normalize_weights, args.max_weight, args.num_action_samples
        )
        self.actor_optim.zero_grad(set_to_none=True)
        loss_pi.backward()
        self.actor_optim.step()
        if self.num_updates % args.target_update_period == 0:
            soft_update(self.critic_target, self.critic, args.tau)
        return {
            "critic_loss": loss_q.detach(),
            "actor_loss": loss_pi.detach(),
            "q_mean": q_mean,
            "weight_max": weight_max,
            "policy_std": policy_std,
        }

    def state_dict(self):
        names = ("actor", "critic", "critic_target", "actor_optim", "critic_optim")
        return {name: getattr(self, name).state_dict() for name in names}

    def load_state_dict(self, state):
        for name, value in state.items():
            getattr(self, name).load_state_dict(value)


def actor_kwargs(args: Args) -> dict:
    return dict(
        hidden_dim=args.hidden_dim,
        hidden_layers=args.actor_hidden_layers,
        activation=args.activation,
        state_dependent_std=args.state_dependent_std,
        log_std_min=args.log_std_min,
        log_std_max=args.log_std_max,
    )


# ---- Evaluation -----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(agent, env, episodes: int, seed: int) -> np.ndarray | None:
    """Undiscounted returns of the deterministic policy (the Gaussian's mean) in `episodes` episodes, the first
    reset with `seed` so every evaluation sees the same starts. None when a stop signal (SIGTERM) cut it short."""
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


# weight_max and policy_std: AWAC's own, averaged over the gradient steps since the last row like the losses.
COLUMNS = PROGRESS_COLUMNS + ["episode_normalized_return", "weight_max", "policy_std"]
EPISODE_COLUMNS = ["step", "length", "return", "normalized_return"]


def checkpoint(agent, phase, step, buffer=None, num_offline=0, **state) -> dict:
    """What latest.pt holds besides the random streams: enough to continue this run exactly (--resume). The
    buffer leaves out the dataset's num_offline transitions, which --resume reads again."""
    buffer_state = {} if buffer is None else {"buffer": buffer.state_dict(rebuilt=num_offline)}
    return dict(
        phase=phase, step=step, agent=agent.state_dict(), num_updates=agent.num_updates, **buffer_state, **state
    )


def log_evaluation(run, agent, task, args, rng, phase, step, resume: dict, env=None, **extra) -> np.ndarray:
    """evaluate(), then a progress.csv row (alpha empty: AWAC has no BC weight) with the losses averaged since the
    previous row. When a stop signal cuts the evaluation short, save `resume` (the state before it, so --resume
    redoes it)."""
    returns = evaluate(agent, task.eval_env, args.eval_episodes, args.seed + 100)
    if returns is None:
        run.save_latest(dict(resume, evaluation_due=True), rng, env)  # raises Preempted
    scores = 100 * task.normalized(returns)
    run.log_evaluation(phase, step, returns, scores, run.means.pop(), agent.num_updates, alpha="", **extra)
    return returns


# ---- The phases: pre-training, the start of fine-tuning (no switch), fine-tuning ------------------------------
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
    """K gradient steps on the dataset."""
    if evaluation_due:  # the untrained agent's, or the one a stop signal cut short
        log_evaluation(run, agent, task, args, rng, "offline", start, checkpoint(agent, "offline", start))
    with progress_bar(args.offline_steps, start, desc="offline", unit="upd") as bar:
        for step in range(start + 1, args.offline_steps + 1):
            run.means.add(agent.update(buffer.sample(args.batch_size)))
            if step % args.eval_every == 0 or step == args.offline_steps:
                log_evaluation(run, agent, task, args, rng, "offline", step, checkpoint(agent, "offline", step))
            if step < args.offline_steps and run.checkpoint_due(step):
                run.save_latest(checkpoint(agent, "offline", step), rng)
            bar.update()
    run.save_offline(agent.state_dict(), agent.num_updates, rng)


def start_online(agent, buffer, args, run, task, rng, num_offline):
    """AWAC has no switch: the dataset stays in the buffer and online data are appended after it. Fine-tuning
    starts by evaluating the pre-trained agent."""
    kept = f"all {buffer.size} offline transitions, FIFO capacity {buffer.capacity}"
    print(f"switch to online: the buffer keeps {kept}", file=sys.stderr)
    state = dict(R_current=None, evaluation_due=True)  # saved before that evaluation, so --resume does it
    run.save_latest(checkpoint(agent, "online", 0, buffer, num_offline, **state), rng, task.env)
    return dict(state, step=0)


def evaluate_online(run, agent, task, args, rng, buffer, num_offline, step, R_current):
    """An online progress.csv row, with the last training episode's normalized return (x100) beside the score."""
    resume = checkpoint(agent, "online", step, buffer, num_offline, R_current=R_current)
    score = "" if R_current is None else 100 * R_current
    log_evaluation(
        run, agent, task, args, rng, "online", step, resume, task.env, env_steps=step, episode_normalized_return=score
    )


def finetune(agent, buffer, args, run, task, rng, state, num_offline):
    """T environment steps acting by sampling pi, G gradient steps each; one episodes.csv row per episode."""
    R_current = state["R_current"]
    env, low, high = task.env, task.env.action_space.low, task.env.action_space.high
    if state.get("evaluation_due"):  # the pre-trained agent's, or the one a stop signal cut short
        evaluate_online(run, agent, task, args, rng, buffer, num_offline, state["step"], R_current)
    obs, _ = env.reset(seed=args.seed if state["step"] == 0 else None)
    episode_return, episode_length = 0.0, 0
    with progress_bar(args.online_steps, state["step"], desc="online", unit="step") as bar:
        for step in range(state["step"] + 1, args.online_steps + 1):
            with torch.no_grad():
                obs_t = torch.as_tensor(obs, dtype=torch.float32, device=agent.device)[None]
                action = np.clip(agent.actor.distribution(obs_t).sample()[0].cpu().numpy(), low, high)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            buffer.add(obs[None], action[None], [reward], next_obs[None], [float(terminated)])
            obs = next_obs
            episode_return += float(reward)
            episode_length += 1
            for _ in range(args.utd):
                run.means.add(agent.update(buffer.sample(args.batch_size)))
            if terminated or truncated:
                R_current = float(task.normalized(episode_return))
                row = dict(step=step, length=episode_length, normalized_return=100 * R_current)
                run.logs["episodes"].write(row | {"return": episode_return})
            if step % args.eval_every == 0 or step == args.online_steps:
                evaluate_online(run, agent, task, args, rng, buffer, num_offline, step, R_current)
            # A stop signal saves at once (the episode is cut); periodic checkpoints wait for an episode's end.
            if step < args.online_steps and run.checkpoint_due(step, safe=terminated or truncated):
                resume = checkpoint(agent, "online", step, buffer, num_offline, R_current=R_current)
                run.save_latest(resume, rng, env)
            if terminated or truncated:
                obs, _ = env.reset()
                episode_return, episode_length = 0.0, 0
            bar.update()


# ---- Main: load the data, open the run folder, run the phases (resuming where latest.pt left off) -----------
NETWORK_KEYS = [
    "hidden_dim",
    "hidden_layers",
    "actor_hidden_layers",
    "activation",
    "num_critics",
    "state_dependent_std",
    "log_std_min",
    "log_std_max",
]


def main(args: Args):
    pretrained = load_pretrained(args, METHOD, NETWORK_KEYS) if args.load_offline else None
    task = open_task(args)
    data = flatten_episodes(task.dataset)
    check_transitions(data, task.dataset_id, task.env.action_space)
    num_offline = len(data["rewards"])
    resolve_defaults(args, num_offline)
    check_args(args)  # again: the resolved values, and those taken over from a pre-training run
    if args.buffer_size < num_offline:
        raise UsageError(f"--buffer-size {args.buffer_size} cannot hold the {num_offline} transitions of the dataset")
    check_memory(args.buffer_size * sum(v[0].nbytes for v in data.values()), "the replay buffer")
    pretrained_from = pretrained and pretrained["path"]
    run = open_run(args, METHOD, task, dataset_transitions=num_offline, pretrained_from=pretrained_from)

    device, rng = pick_device(args.device), seed_everything(args.seed)  # AWAC samples with torch, not with rng
    obs_dim, space = data["obs"].shape[1], task.env.action_space
    agent = Agent(obs_dim, space.shape[0], space.low, space.high, args, device)
    bounds = dict(action_low=space.low.tolist(), action_high=space.high.tolist())
    run.describe_actor("GaussianActor", obs_dim=obs_dim, act_dim=space.shape[0], **bounds, **actor_kwargs(args))
    run.log("progress", COLUMNS, echo=True)
    run.log("episodes", EPISODE_COLUMNS)
    latest = run.restore(agent, rng, task.env, pretrained)  # --resume: latest.pt; --load-offline: offline.pt

    with run:
        buffer = ReplayBuffer(args.buffer_size, obs_dim, space.shape[0], device)
        buffer.add(**data)  # the dataset, on --resume too: latest.pt leaves it out
        del data  # the buffer holds the only copy
        if latest is None or latest["phase"] == "offline":
            if pretrained is None:
                start = latest["step"] if latest else 0
                evaluation_due = latest is None or latest.get("evaluation_due", False)
                pretrain(agent, buffer, args, run, task, rng, start, evaluation_due)
            if args.online_steps > 0:
                state = start_online(agent, buffer, args, run, task, rng, num_offline)
        else:
            buffer.load_state_dict(latest["buffer"])
            state = latest
        if args.online_steps > 0:
            finetune(agent, buffer, args, run, task, rng, state, num_offline)
        run.finish(agent.state_dict(), agent.actor.state_dict())


if __name__ == "__main__":
    run_main(main, Args, METHOD, check_args, description=__doc__.split("\n\n")[0])
