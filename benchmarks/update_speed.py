"""Speed of one REDQ+AdaptiveBC gradient step: redq_adaptive_bc.py against a plain implementation.

The gradient step runs about 5 million times per fine-tuning run (250k env steps x G=20), so its
speed decides whether the method can be run at all. This benchmark times, in one process and
alternating so both see the same machine load:

  script : Agent.update from redq_adaptive_bc.py (batched ensemble, M-critic target, frozen critics
           in the actor step, fused target updates), optionally with --compile;
  plain  : the straightforward version written below: ten nn.Sequential critics in a Python list,
           looped, all ten target critics evaluated and two of them picked, default Adam, a
           parameter loop for the target updates.

Both do the same work per step: critic update, actor update every policy-freq (2) steps, target
updates. It prints updates/s (median over repetitions), the ratio, and achieved GFLOP/s next to the
machine's fp32 matrix-multiply rate measured in the same run.

    python benchmarks/update_speed.py                 # CPU, about a minute
    python benchmarks/update_speed.py --device cuda --compile
    python benchmarks/update_speed.py --against c151b98   # also the script as it was at a commit (git show)

The script's step is timed as its training loops call it: Agent.update, plus adding the step's metrics
to the running means of the loss columns.
"""

import argparse
import copy
import dataclasses
import importlib.util
import inspect
import itertools
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import redq_adaptive_bc as m  # noqa: E402
from plumbing.compile import compile_step  # noqa: E402
from plumbing.run_folder import RunningMeans  # noqa: E402

OBS_DIM, ACT_DIM = 11, 3  # Hopper-v5


class PlainREDQBC:
    """REDQ+BC as straightforward code would write it."""

    def __init__(self, obs_dim, act_dim, num_critics, num_min, hidden, device, lr=3e-4):
        def mlp(inp, out, final=None):
            layers = [nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out)]
            return nn.Sequential(*layers, *([final] if final else [])).to(device)

        self.critics = [mlp(obs_dim + act_dim, 1) for _ in range(num_critics)]
        self.critic_targets = copy.deepcopy(self.critics)
        self.actor = mlp(obs_dim, act_dim, nn.Tanh())
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_optim = torch.optim.Adam(itertools.chain(*(c.parameters() for c in self.critics)), lr=lr)
        self.actor_optim = torch.optim.Adam(self.actor.parameters(), lr=lr)
        self.num_min, self.num_updates = num_min, 0

    def update(self, b, alpha, gamma=0.99, tau=5e-3, policy_noise=0.2, noise_clip=0.5, policy_freq=2):
        self.num_updates += 1
        with torch.no_grad():
            noise = (torch.randn_like(b.actions) * policy_noise).clamp(-noise_clip, noise_clip)
            next_a = (self.actor_target(b.next_obs) + noise).clamp(-1, 1)
            sa_next = torch.cat([b.next_obs, next_a], 1)
            q_all = torch.stack([t(sa_next).squeeze(-1) for t in self.critic_targets])
            idx = random.sample(range(len(self.critics)), self.num_min)
            y = b.rewards + gamma * (1 - b.terminals) * q_all[idx].min(0).values
        sa = torch.cat([b.obs, b.actions], 1)
        loss = sum(F.mse_loss(c(sa).squeeze(-1), y) for c in self.critics)
        self.critic_optim.zero_grad()
        loss.backward()
        self.critic_optim.step()
        if self.num_updates % policy_freq == 0:
            pi = self.actor(b.obs)
            sa_pi = torch.cat([b.obs, pi], 1)
            q = torch.stack([c(sa_pi).squeeze(-1) for c in self.critics]).mean(0)
            actor_loss = -q.mean() / q.abs().mean().detach() + alpha * F.mse_loss(pi, b.actions)
            self.actor_optim.zero_grad()
            actor_loss.backward()
            self.actor_optim.step()
        with torch.no_grad():
            for net, target in [*zip(self.critics, self.critic_targets), (self.actor, self.actor_target)]:
                for p, tp in zip(net.parameters(), target.parameters()):
                    tp.mul_(1 - tau).add_(tau * p)


def flops_per_update(num_critics, num_min, hidden, batch, policy_freq=2):
    """Multiply-adds x 2 of the matrix multiplies in one step of the script (a backward = 2 forwards)."""
    critic = (OBS_DIM + ACT_DIM) * hidden + hidden * hidden + hidden
    actor = OBS_DIM * hidden + hidden * hidden + hidden * ACT_DIM
    macs = batch * (
        actor
        + num_min * critic  # target: pi'(s') and M target critics
        + 3 * num_critics * critic
    )  # critic forward + backward
    macs += batch * (3 * actor + 2 * num_critics * critic) / policy_freq  # actor step: Q backward to inputs only
    return 2 * macs


def matmul_rate(device, size=1024, seconds=1.0):
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e9


def script_at(rev, args, low, high, device):
    """Agent.update of redq_adaptive_bc.py as it was at commit rev, built with the same arguments."""
    source = subprocess.run(
        ["git", "show", f"{rev}:redq_adaptive_bc.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"redq_adaptive_bc_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    old = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = old  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(old)
    known = {f.name for f in dataclasses.fields(old.Args)}
    old_args = old.Args(**{k: v for k, v in vars(args).items() if k in known and v is not None})
    agent = old.Agent(OBS_DIM, ACT_DIM, low, high, old_args, device)
    takes_m = len(inspect.signature(agent.update).parameters) == 3
    return (lambda batch, alpha: agent.update(batch, alpha, args.num_min_critics)) if takes_m else agent.update


def time_updates(update, batches, alpha, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in batches:
        update(b, alpha)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(batches) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    parser.add_argument("--steps", type=int, default=100, help="gradient steps per timed repetition (default: 100)")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of each implementation (default: 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="time the script's update with --compile too")
    parser.add_argument("--against", metavar="REV", help="also time Agent.update of redq_adaptive_bc.py at this commit")
    parser.add_argument("--num-critics", type=int, default=10, help="N (default: 10)")
    parser.add_argument("--batch-size", type=int, default=256, help="B (default: 256)")
    parser.add_argument("--hidden-dim", type=int, default=256, help="hidden units (default: 256)")
    opts = parser.parse_args()
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if opts.steps <= 0 or opts.repeats <= 0:
        parser.error("--steps and --repeats must be positive")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    torch.manual_seed(0)
    random.seed(0)

    args = m.Args(num_critics=opts.num_critics, batch_size=opts.batch_size, hidden_dim=opts.hidden_dim)
    m.resolve_defaults(args, "hopper", "medium", dataset_size=100_000)
    args.delay_target_updates = False  # targets every step: the same work as the plain implementation
    buffer = m.ReplayBuffer(100_000, OBS_DIM, ACT_DIM, device)
    n = buffer.capacity
    buffer.add(
        torch.randn(n, OBS_DIM),
        torch.rand(n, ACT_DIM) * 2 - 1,
        torch.randn(n),
        torch.randn(n, OBS_DIM),
        (torch.rand(n) < 0.01).float(),
    )
    batches = [buffer.sample(args.batch_size) for _ in range(opts.steps)]
    alpha = torch.tensor(0.4, device=device)

    low, high = -torch.ones(ACT_DIM), torch.ones(ACT_DIM)
    M = args.num_min_critics
    agent = m.Agent(OBS_DIM, ACT_DIM, low, high, args, device)
    means = RunningMeans()
    contenders = {
        "script": lambda batch, alpha: means.add(agent.update(batch, alpha, M)),
        "plain": PlainREDQBC(OBS_DIM, ACT_DIM, args.num_critics, args.num_min_critics, args.hidden_dim, device).update,
    }
    if opts.compile:
        compiled = m.Agent(OBS_DIM, ACT_DIM, low, high, args, device)
        compile_step(compiled)
        contenders["script --compile"] = lambda batch, alpha: compiled.update(batch, alpha, M)
    if opts.against:
        contenders[f"script at {opts.against}"] = script_at(opts.against, args, low, high, device)
    for name, update in contenders.items():  # warm-up (and compilation)
        start = time.perf_counter()
        time_updates(update, batches[:10], alpha, device)
        print(f"warm-up {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)

    rates = {name: [] for name in contenders}
    for _ in range(opts.repeats):
        for name, update in contenders.items():
            rates[name].append(time_updates(update, batches, alpha, device))

    gflop = flops_per_update(args.num_critics, args.num_min_critics, args.hidden_dim, args.batch_size) / 1e9
    peak = matmul_rate(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"device: {name}; torch {torch.__version__}; N={args.num_critics}, M={args.num_min_critics}, "
        f"batch {args.batch_size}, hidden {args.hidden_dim}; {opts.repeats} x {opts.steps} steps"
    )
    print(f"fp32 matmul (1024x1024): {peak:.0f} GFLOP/s; one update = {gflop:.2f} GFLOP (script's matmuls)")
    base = statistics.median(rates["plain"])
    for name, values in rates.items():
        med = statistics.median(values)
        print(
            f"{name:>17}: {med:7.1f} updates/s  (min {min(values):.1f}, max {max(values):.1f})  "
            f"{med * gflop:6.1f} GFLOP/s  x{med / base:.2f} vs plain"
        )


if __name__ == "__main__":
    main()
