"""Tests of redq_adaptive_bc.py: each mechanism against numbers worked out by hand (Eq. 2 episode by episode,
the target with a known subset, downsampling sizes, FIFO order, terminal vs time-out, the critic
initialization), then whole runs on conftest's 400-step Hopper dataset: in this process where a run is compared
with another in-process run (cheap, and both use the same torch threads), as a subprocess where what a user
sees matters (exit statuses, signals, --resume)."""

import functools
import json
import math
import random
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import (
    HOPPER_REF,
    OFFLINE_ROWS,
    TIMINGS,
    TINY,
    FixedActor,
    hopper_episodes,
    make_minari_dataset,
    numbers,
    read_csv,
    run_script,
    run_to_the_end,
    signal_when,
    sigterm_during_an_evaluation,
    spaces,
    start_script,
    write_d4rl_file,
)
from pytest import approx

import redq_adaptive_bc as m
from plumbing.cli import STOP_SIGNALS, TrainingDiverged, check_run_args, parse_args, run_main
from plumbing.compile import compile_step
from plumbing.run_folder import RunningMeans


def tiny(*extra):
    return ["--dataset", "uniform-random", *TINY, *extra]


def in_process(*flags):
    """main() in this process, after the checks run_main makes; returns the run folder."""
    args = parse_args(m.Args, m.METHOD, [str(f) for f in flags])
    check_run_args(args)
    m.check_args(args)
    m.main(args)
    (run_dir,) = Path(args.output_dir).iterdir()
    return run_dir


def cli(monkeypatch, capsys, *flags):
    """run_main in this process as the script's __main__ calls it: (exit status, stderr lines)."""
    monkeypatch.setattr(sys, "argv", ["redq_adaptive_bc.py", *map(str, flags)])
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        with pytest.raises(SystemExit) as stopped:
            run_main(m.main, m.Args, m.METHOD, m.check_args)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return stopped.value.code, capsys.readouterr().err.strip().splitlines()


def assert_same_state(a, b, where=""):
    """Nested checkpoint contents (dicts, lists, tensors, numbers) equal bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def normalized(episode_return):
    return (episode_return - HOPPER_REF[0]) / (HOPPER_REF[1] - HOPPER_REF[0])


# ---------------------------------------------------------------------------------------
# Eq. 2: the PD controller
# ---------------------------------------------------------------------------------------
PAPER = dict(kp=3e-5, kd=8e-5, target_return=1.0, alpha_max=0.4)  # Table 1 and the paper's R_target


@pytest.mark.equations
def test_eq2_over_three_episodes_with_length_scaling():
    # Episode 1: R_last 0.5 (the first evaluation), R_current 0.6, 100 steps.
    #   P = 3e-5 (0.6 - 1) = -1.2e-5, D = 8e-5 max(0, 0.5 - 0.6) = 0; x100 = -1.2e-3 -> alpha 0.3988
    step = m.adapt_alpha(0.4, 0.6, 0.5, episode_length=100, **PAPER)
    assert step.p_term == approx(-1.2e-5, abs=1e-15), "P term = K_P (R_current - R_target)"
    assert step.d_term == 0, "D term = K_D max(0, R_last - R_current): 0 when the return rose"
    assert step.alpha_online == approx(0.3988, abs=1e-12), "alpha_online + (P + D) x episode length"
    assert step.R_last == 0.6, "R_last for the next episode is this episode's R_current"
    # Episode 2: the return drops to 0.3 in 50 steps: the D term outweighs the P term.
    #   P = 3e-5 (0.3 - 1) = -2.1e-5, D = 8e-5 (0.6 - 0.3) = 2.4e-5; sum 3e-6, x50 = 1.5e-4 -> alpha 0.39895
    step = m.adapt_alpha(step.alpha_online, 0.3, step.R_last, episode_length=50, **PAPER)
    assert step.p_term == approx(-2.1e-5, abs=1e-15), "P term = K_P (R_current - R_target)"
    assert step.d_term == approx(2.4e-5, abs=1e-15), "D term = K_D max(0, R_last - R_current) after a drop"
    assert step.alpha_online == approx(0.39895, abs=1e-12), "alpha_online + (P + D) x episode length"
    assert step.R_last == 0.3, "R_last for the next episode is this episode's R_current"
    # Episode 3: 0.35 in 1000 steps, no drop: P = 3e-5 (-0.65) = -1.95e-5; x1000 = -0.0195 -> 0.37945
    step = m.adapt_alpha(step.alpha_online, 0.35, step.R_last, episode_length=1000, **PAPER)
    assert step.d_term == 0, "D term = K_D max(0, R_last - R_current): 0 when the return rose"
    assert step.alpha_online == approx(0.37945, abs=1e-12), "alpha_online + (P + D) x episode length"
    assert step.R_last == 0.35, "R_last for the next episode is this episode's R_current"


@pytest.mark.equations
def test_eq2_per_episode_without_length_scaling():
    # The paper's literal per-episode increment: 0.4 - 1.2e-5 = 0.399988.
    step = m.adapt_alpha(0.4, 0.6, 0.5, episode_length=1, **PAPER)
    assert step.alpha_online == approx(0.399988, abs=1e-12), "alpha_online + P + D, once per episode"


@pytest.mark.equations
def test_eq2_clips_alpha_to_zero_and_alpha_max():
    # Far below target, no drop: -3e-5 x 1000 = -0.03 from 0.01 -> clipped at 0.
    low = m.adapt_alpha(0.01, 0.0, 0.0, episode_length=1000, **PAPER)
    assert low.alpha_online == 0.0, "alpha_online is clipped below at 0"
    # A collapse from 1.0 to 0.0: -3e-5 + 8e-5 = 5e-5; x1000 = 0.05 from 0.399 -> clipped at 0.4.
    high = m.adapt_alpha(0.399, 0.0, 1.0, episode_length=1000, **PAPER)
    assert high.alpha_online == 0.4, "alpha_online is clipped above at alpha_max"
    # At the target return with no drop nothing moves.
    still = m.adapt_alpha(0.2, 1.0, 1.0, episode_length=1000, **PAPER)
    assert still.alpha_online == approx(0.2, abs=1e-15), "at R_target with no drop, alpha_online stays"


@pytest.mark.equations
def test_eq2_with_the_authors_moving_average():
    # The authors' main.py:221-227, with the paper's gains here:
    #     policy.alpha += episode_timesteps * (- args.Kp * (target_R - last_R)
    #                     + args.Kd * max(0, last_R - current_R))
    #     policy.alpha = max(0., min(policy.alpha, args.alpha_finetune))
    #     last_R = 0.05 * current_R + 0.95 * last_R
    # The P term is on the OLD last_R, and the average moves after alpha.
    # Episode 1: R_last 0.5, R_current 0.9, 10 steps: P = 3e-5 (0.5 - 1) = -1.5e-5, D = 8e-5 max(0, 0.5 - 0.9) = 0;
    #   x10 -> 0.4 - 1.5e-4 = 0.39985; R_last = 0.05 x 0.9 + 0.95 x 0.5 = 0.045 + 0.475 = 0.52.
    #   (P on the updated average would give 0.4 + 10 x 3e-5 (0.52 - 1) = 0.399856: the old test's misreading.)
    step = m.adapt_alpha(0.4, 0.9, 0.5, episode_length=10, moving_average=0.05, **PAPER)
    assert step.p_term == approx(-1.5e-5, abs=1e-15), "P term on the old R_last (the authors' code)"
    assert step.d_term == 0, "D term = K_D max(0, R_last - R_current): 0 when the return rose"
    assert step.alpha_online == approx(0.39985, abs=1e-12), "alpha_online + (P + D) x episode length"
    assert step.R_last == approx(0.52, abs=1e-15), "R_last <- s R_current + (1 - s) R_last, after alpha"
    # Episode 2: R_current 0.2: P = 3e-5 (0.52 - 1) = -1.44e-5, D = 8e-5 (0.52 - 0.2) = 2.56e-5; sum 1.12e-5,
    #   x10 -> 0.39985 + 1.12e-4 = 0.399962; R_last = 0.05 x 0.2 + 0.95 x 0.52 = 0.01 + 0.494 = 0.504.
    step = m.adapt_alpha(step.alpha_online, 0.2, step.R_last, episode_length=10, moving_average=0.05, **PAPER)
    assert step.p_term == approx(-1.44e-5, abs=1e-15), "P term on the old R_last (the authors' code)"
    assert step.d_term == approx(2.56e-5, abs=1e-15), "D term = K_D max(0, R_last - R_current) after a drop"
    assert step.alpha_online == approx(0.399962, abs=1e-12), "alpha_online + (P + D) x episode length"
    assert step.R_last == approx(0.504, abs=1e-15), "R_last <- s R_current + (1 - s) R_last, after alpha"


@pytest.mark.equations
def test_six_episodes_of_the_authors_controller_hit_both_clips():
    # --authors-code: Kp 3e-5, Kd 1e-4, target_R 1.05, average s = 0.05 (main.py:221-227, quoted above), clip to
    # [0, alpha_finetune = 0.4]. A policy at the expert level (R_last = 1.0 from the first evaluation), alpha
    # 0.0005, scores 1.2 once, then collapses to 0 for five 1000-step episodes.
    gains = dict(kp=3e-5, kd=1e-4, target_return=1.05, alpha_max=0.4, moving_average=0.05)
    episodes = [  # (R_current, length, expected alpha, expected next R_last)
        # 1: P = 3e-5 (1.0 - 1.05) = -1.5e-6, D = 0 (1.2 > 1.0); 0.0005 - 600 x 1.5e-6 = -0.0004 -> clipped to 0.
        #    (P on R_current would give 0.0005 + 600 x 3e-5 x 0.15 = 0.0032.) R_last = 0.06 + 0.95 = 1.01
        (1.2, 600, 0.0, 1.01),
        # 2: P = 3e-5 (1.01 - 1.05) = -1.2e-6, D = 1e-4 x 1.01 = 1.01e-4; 0 + 1000 x 9.98e-5 = 0.0998
        #    (from -0.0004 unclipped it would be 0.0994). R_last = 0.95 x 1.01 = 0.9595
        (0.0, 1000, 0.0998, 0.9595),
        # 3: P = 3e-5 (0.9595 - 1.05) = -2.715e-6, D = 9.595e-5; + 1000 x 9.3235e-5 -> 0.193035. R_last = 0.911525
        (0.0, 1000, 0.193035, 0.911525),
        # 4: P = 3e-5 (-0.138475) = -4.15425e-6, D = 9.11525e-5; + 0.08699825 -> 0.28003325. R_last = 0.86594875
        (0.0, 1000, 0.28003325, 0.86594875),
        # 5: P = 3e-5 (-0.18405125) = -5.5215375e-6, D = 8.6594875e-5; + 0.0810733375 -> 0.3611065875.
        #    R_last = 0.8226513125
        (0.0, 1000, 0.3611065875, 0.8226513125),
        # 6: P = 3e-5 (-0.2273486875) = -6.820460625e-6, D = 8.226513125e-5; + 0.075444670625 -> 0.436551258125,
        #    clipped to 0.4. R_last = 0.781518746875
        (0.0, 1000, 0.4, 0.781518746875),
    ]
    alpha, R_last = 0.0005, 1.0
    for k, (R_current, length, expected_alpha, expected_R_last) in enumerate(episodes, 1):
        step = m.adapt_alpha(alpha, R_current, R_last, episode_length=length, **gains)
        alpha, R_last = step.alpha_online, step.R_last
        assert alpha == approx(expected_alpha, abs=1e-12), f"alpha_online after episode {k}"
        assert R_last == approx(expected_R_last, abs=1e-12), f"R_last (the moving average) after episode {k}"


# ---------------------------------------------------------------------------------------
# The target (Eq. 3), critic loss, actor loss (Eq. 1 and 4), soft updates, networks
# ---------------------------------------------------------------------------------------
LOW, HIGH = [-2.0, -0.5], [2.0, 1.5]  # non-unit bounds: action_scale (2, 1), action_bias (0, 0.5)


def batch(rewards, terminals, actions=None):
    n = len(rewards)
    actions = torch.zeros(n, 1) if actions is None else actions
    return m.Batch(torch.zeros(n, 2), actions, torch.tensor(rewards), torch.zeros(n, 2), torch.tensor(terminals))


@pytest.mark.equations
def test_target_takes_min_over_exactly_the_drawn_critics_and_stops_at_terminals():
    q_next = torch.tensor([[5.0, 1.0], [1.5, 4.0], [2.0, 6.0], [7.0, 0.0]])  # 4 target critics, batch of 2

    def critic_target(obs, action, critic_idx):
        return q_next if critic_idx is None else q_next[critic_idx]

    # Drawn critics {0, 2}: min(5, 2) = 2 and min(1, 6) = 1 (all four would give 1.5 and 0; the mean 3.5 and 3.5).
    # y1 = 1 + 0.9 x 2 = 2.8; y2 = 0.5 (terminal: no bootstrap; 1.4 if it bootstrapped).
    target = functools.partial(m.td_target, gamma=0.9, policy_noise=0.0, noise_clip=0.5)
    pi = FixedActor(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]), LOW, HIGH)
    y = target(batch([1.0, 0.5], [0.0, 1.0], torch.zeros(2, 2)), pi, critic_target, torch.tensor([0, 2]))
    assert y[0].item() == approx(2.8), "y = r + gamma min over the drawn critics {0, 2} of Q'(s', a')"
    assert y[1].item() == approx(0.5), "y = r at a terminal transition: (1 - terminal) stops the bootstrap"
    # critic_idx None (M = N): the min over all four, 1.5 -> y1 = 1 + 0.9 x 1.5 = 2.35.
    y = target(batch([1.0, 0.5], [0.0, 1.0], torch.zeros(2, 2)), pi, critic_target, None)
    assert y[0].item() == approx(2.35), "y = r + gamma min over all N critics when critic_idx is None (M = N)"


def smoothed_target_actions(pi, policy_noise, noise_clip, n):
    """The a' that td_target hands the target critics, for n copies of the transition (pi'(s') = pi's row)."""
    seen = {}

    def critic_target(obs, action, critic_idx):
        seen["a"] = action
        return torch.zeros(1, len(action))

    b = batch([0.0] * n, [0.0] * n, torch.zeros(n, pi.actions.shape[1]))
    m.td_target(b, pi, critic_target, torch.tensor([0]), 0.99, policy_noise, noise_clip)
    return seen["a"]


@pytest.mark.equations
def test_target_action_noise_is_clipped_then_the_action_is_clipped_to_bounds():
    # pi'(s') = 0.9; huge noise clipped to +-0.5 gives 0.4 or 1.4, and 1.4 is clipped to the bound 1.0.
    a = smoothed_target_actions(FixedActor(torch.full((1000, 1), 0.9)), 1e6, 0.5, 1000)
    values = set(np.round(a.flatten().double().numpy(), 5).tolist())
    assert values == {0.4, 1.0}, "a' = clip(pi'(s') + clip(noise, -c, c), low, high)"


@pytest.mark.equations
def test_target_noise_and_its_clip_are_in_units_of_the_action_scale():
    # Bounds [-2, 2] x [-0.5, 1.5]: action_scale (2, 1), action_bias (0, 0.5). pi'(s') = (1.8, -0.3).
    # Huge noise is clipped to +-0.5, then scaled: +-1.0 on the first dimension, +-0.5 on the second.
    # Dimension 1: 1.8 - 1 = 0.8, 1.8 + 1 = 2.8 -> 2.0 (without the scale: 1.3 and 2.0).
    # Dimension 2: -0.3 - 0.5 = -0.8 -> -0.5 (the low bound, not -1), -0.3 + 0.5 = 0.2.
    pi = FixedActor(torch.tensor([[1.8, -0.3]]).repeat(1000, 1), LOW, HIGH)
    a = smoothed_target_actions(pi, 1e6, 0.5, 1000).double().numpy()
    first, second = set(np.round(a[:, 0], 5).tolist()), set(np.round(a[:, 1], 5).tolist())
    assert first == {0.8, 2.0}, "the clipped noise is multiplied by action_scale (2 here), then a' is clipped"
    assert second == {-0.5, 0.2}, "a' is clipped to the env's bounds [low, high], here [-0.5, 1.5], not [-1, 1]"
    # Unclipped in practice (clip 100): the noise std is policy_noise x action_scale = 0.2 x (2, 1).
    pi = FixedActor(torch.tensor([[0.0, 0.5]]).repeat(20_000, 1), LOW, HIGH)
    a = smoothed_target_actions(pi, 0.2, 100.0, 20_000).double()
    # The sample std of 20,000 normal draws has relative standard error 0.5%: 5% is 10 of them.
    assert a[:, 0].std().item() == approx(0.4, rel=0.05), "noise std = policy_noise x action_scale (dimension 1)"
    assert a[:, 1].std().item() == approx(0.2, rel=0.05), "noise std = policy_noise x action_scale (dimension 2)"


@pytest.mark.equations
def test_critic_loss_sums_or_averages_the_per_critic_mse():
    q = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    seen = {}

    def critic(obs, action):
        seen["a"] = action
        return q

    actions = torch.tensor([[-2.0, 1.5], [1.0, -0.5]])  # the dataset's actions, within non-unit bounds
    # Per-critic MSE to y = 0: (1 + 4) / 2 = 2.5 and (9 + 16) / 2 = 12.5.
    loss, q_mean = m.critic_loss(critic, batch([0.0, 0.0], [0.0, 0.0], actions), torch.zeros(2), "sum")
    assert torch.equal(seen["a"], actions), "Q(s, a) is evaluated at the batch's own actions"
    assert loss.item() == approx(15.0), "reduction 'sum': the sum over critics of each critic's mean squared error"
    assert q_mean.item() == approx(2.5), "q_mean: the mean of Q over critics and batch"
    loss, _ = m.critic_loss(critic, batch([0.0, 0.0], [0.0, 0.0], actions), torch.zeros(2), "mean")
    assert loss.item() == approx(7.5), "reduction 'mean': the mean over critics of each critic's mean squared error"


@pytest.mark.equations
def test_actor_loss_normalizes_q_without_gradient_through_the_normalizer():
    q = torch.tensor([[1.0, 3.0], [3.0, 5.0]], requires_grad=True)  # 2 critics x batch of 2
    critic = lambda obs, action: q  # noqa: E731
    pi = FixedActor(torch.tensor([[0.5], [-0.5]]))
    b = batch([0.0, 0.0], [0.0, 0.0], actions=torch.tensor([[0.0], [0.5]]))
    # Qbar = [2, 4]: -mean(Qbar) / mean|Qbar| = -3 / 3 = -1.
    # BC: ((0.5 - 0)^2 + (-0.5 - 0.5)^2) / 2 = 0.625; x alpha 0.4 = 0.25.  Loss = -0.75.
    loss = m.actor_loss(pi, critic, b, alpha=0.4)
    assert loss.item() == approx(-0.75), "-mean(Qbar) / mean|Qbar| + alpha mean((pi(s) - a)^2)"
    # With the normalizer detached, dL/dQ_ij = -1 / (N B mean|Qbar|) = -1/12 for every entry
    # (a normalizer with gradient would make the Q term constant here, gradient 0).
    loss.backward()
    assert torch.allclose(q.grad, torch.full((2, 2), -1 / 12)), "no gradient through the normalizer mean|Qbar|"


@pytest.mark.equations
def test_actor_loss_with_non_unit_bounds_and_two_action_dimensions():
    # pi(s) = (1.5, 1), (-1, 0) within [-2, 2] x [-0.5, 1.5]; dataset actions (0.5, 1), (-2, -0.5).
    # Two critics Q_i(s, a) = a_1 + 2 a_2 + c_i with c = (-3, -1): at pi(s), a_1 + 2 a_2 = 3.5 and -1, so
    # Q_1 = (0.5, -4), Q_2 = (2.5, -2), Qbar = (1.5, -3): -mean(Qbar) / mean|Qbar| = 0.75 / 2.25 = 1/3.
    #   (At the dataset's actions it would be 0.818; with min instead of the mean over critics, 0.778.)
    # BC, the mean over batch and action dimensions: (1 + 0 + 1 + 0.25) / 4 = 0.5625, x alpha 0.4 = 0.225.
    #   (Summed over action dimensions: 1.125.)  Loss = 1/3 + 0.225.
    actions = torch.tensor([[1.5, 1.0], [-1.0, 0.0]], requires_grad=True)
    pi = FixedActor(actions, LOW, HIGH)

    def critic(obs, action):
        base = action[:, 0] + 2 * action[:, 1]
        return torch.stack([base - 3, base - 1])

    b = batch([0.0, 0.0], [0.0, 0.0], actions=torch.tensor([[0.5, 1.0], [-2.0, -0.5]]))
    loss = m.actor_loss(pi, critic, b, alpha=0.4)
    assert loss.item() == approx(1 / 3 + 0.225), "-mean(Qbar(s, pi(s))) / mean|Qbar| + alpha mean((pi(s) - a)^2)"
    # dL/dpi(s)_b = -(1/B) (1, 2) / mean|Qbar| + alpha 2 (pi(s)_b - a_b) / (B A):
    #   (-2/9, -4/9) + 0.2 (pi(s)_b - a_b), i.e. (-2/9 + 0.2, -4/9) and (-2/9 + 0.2, -4/9 + 0.1).
    loss.backward()
    expected = torch.tensor([[-2 / 9 + 0.2, -4 / 9], [-2 / 9 + 0.2, -4 / 9 + 0.1]])
    assert torch.allclose(actions.grad, expected), "the gradient reaches pi(s) through Q and the BC term only"


@pytest.mark.equations
def test_soft_update():
    target, source = nn.Linear(2, 2), nn.Linear(2, 2)
    nn.init.zeros_(target.weight)
    nn.init.zeros_(target.bias)
    nn.init.ones_(source.weight)
    nn.init.ones_(source.bias)
    m.soft_update(target, source, 0.1)
    assert torch.allclose(target.weight, torch.full((2, 2), 0.1)), "theta' <- tau theta + (1 - tau) theta'"
    m.soft_update(target, source, 0.1)  # 0.1 + 0.1 (1 - 0.1) = 0.19
    assert torch.allclose(target.bias, torch.full((2,), 0.19)), "theta' <- tau theta + (1 - tau) theta', twice"


@pytest.mark.equations
def test_soft_update_of_an_actor_with_non_unit_bounds_moves_weights_not_bounds():
    torch.manual_seed(0)
    source, target = m.Actor(2, 2, LOW, HIGH, hidden_dim=4), m.Actor(2, 2, LOW, HIGH, hidden_dim=4)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    m.soft_update(target, source, 0.25)
    weight, source_weight = target.net[0].weight, source.net[0].weight
    assert torch.allclose(weight, 0.25 * source_weight + 0.75 * before["net.0.weight"]), "theta' moves by tau"
    assert torch.equal(target.action_scale, torch.tensor([2.0, 1.0])), "action_scale is a bound, not a weight"
    assert torch.equal(target.action_bias, torch.tensor([0.0, 0.5])), "action_bias is a bound, not a weight"


@pytest.mark.equations
def test_actor_output_is_tanh_scaled_to_the_action_bounds():
    actor = m.Actor(2, 2, LOW, HIGH, hidden_dim=4)
    nn.init.zeros_(actor.net[-2].weight)
    with torch.no_grad():
        actor.net[-2].bias.copy_(torch.tensor([0.0, 0.0]))
        middle = actor(torch.randn(3, 2))
        actor.net[-2].bias.copy_(torch.tensor([100.0, -100.0]))  # tanh saturates at +1 and -1
        edge = actor(torch.randn(3, 2))
    assert torch.allclose(middle, torch.tensor([0.0, 0.5]).expand(3, 2)), "tanh 0 maps to the middle of the bounds"
    assert torch.allclose(edge, torch.tensor([2.0, -0.5]).expand(3, 2)), "tanh +-1 maps to high and low"


@pytest.mark.equations
def test_critic_ensemble_is_n_independent_mlps_and_selects_subsets():
    torch.manual_seed(0)
    ens = m.CriticEnsemble(4, obs_dim=3, act_dim=2, hidden_dim=8, hidden_layers=2, init="pytorch")
    obs, act = torch.randn(5, 3), torch.randn(5, 2)
    out = ens(obs, act)
    assert out.shape == (4, 5)
    for i in range(4):  # the same critic written as a plain MLP
        x = torch.cat([obs, act], 1)
        x = torch.relu(x @ ens.weights[0][i] + ens.biases[0][i])
        x = torch.relu(x @ ens.weights[1][i] + ens.biases[1][i])
        assert torch.allclose(out[i], (x @ ens.weights[2][i] + ens.biases[2][i]).squeeze(-1), atol=1e-6)
    assert torch.allclose(ens(obs, act, torch.tensor([2, 0])), out[[2, 0]])
    assert not torch.allclose(out[0], out[1])  # initialized independently


def test_authors_critic_init_is_a_normal_with_std_half_over_sqrt_fan_in_and_zero_biases():
    # redq_bc.py:16-19:
    #     self.register_parameter('bias', nn.Parameter(torch.zeros(ensemble_size, 1, out_features)))
    #     nn.init.trunc_normal_(self.weight, std=1/(2*in_features**0.5))
    # (truncated at +-2 absolute, ~15 std even for fan_in 14: a normal in practice.)
    torch.manual_seed(0)
    ens = m.CriticEnsemble(40, obs_dim=11, act_dim=3, hidden_dim=256, hidden_layers=2, init="authors")
    for weight, bias, fan_in in zip(ens.weights, ens.biases, (14, 256, 256)):
        w, std = weight.detach().double().flatten(), 1 / (2 * math.sqrt(fan_in))
        # The sample std of n normal draws has relative standard error 1/sqrt(2n): 0.19% for the 143,360 weights
        # of layer 1, 0.7% for the 10,240 of the last layer. 5% is >= 7 standard errors, and 3x closer than
        # nn.Linear's uniform init, whose std is 1/sqrt(3 fan_in) = 1.155 x this one.
        assert w.std().item() == approx(std, rel=0.05), fan_in
        assert abs(w.mean().item()) < 5 * std / math.sqrt(len(w))
        # A normal puts P(|z| > 2) = 4.55% beyond 2 std = 1/sqrt(fan_in): nn.Linear's bound, which it never leaves.
        beyond = (w.abs() > 1 / math.sqrt(fan_in)).double().mean().item()
        assert 0.035 < beyond < 0.056, fan_in
        assert torch.count_nonzero(bias) == 0


def test_pytorch_critic_init_is_nn_linear_s_uniform_with_nonzero_biases():
    torch.manual_seed(0)
    ens = m.CriticEnsemble(40, obs_dim=11, act_dim=3, hidden_dim=256, hidden_layers=2, init="pytorch")
    for weight, bias, fan_in in zip(ens.weights, ens.biases, (14, 256, 256)):
        bound, w = 1 / math.sqrt(fan_in), weight.detach().double()
        assert w.abs().max().item() <= bound
        assert bias.abs().max().item() <= bound
        assert w.std().item() == approx(bound / math.sqrt(3), rel=0.05)  # U(-b, b) has std b / sqrt(3)
        assert torch.count_nonzero(bias) == bias.numel()
        assert not torch.equal(w[0], w[1])  # each critic drawn independently


@pytest.mark.parametrize("critic_init", ["authors", "pytorch"])
def test_actor_keeps_nn_linear_s_init_with_either_critic_init(critic_init):
    # The authors' Actor is nn.Linear layers (redq_bc.py:36-40): --critic-init leaves the actor alone.
    torch.manual_seed(0)
    agent = tiny_agent(critic_init=critic_init, hidden_dim=256)
    torch.manual_seed(0)
    other = tiny_agent(critic_init="pytorch" if critic_init == "authors" else "authors", hidden_dim=256)
    linears = [layer for layer in agent.actor.net if isinstance(layer, nn.Linear)]
    assert len(linears) == 3
    for layer in linears:
        bound = 1 / math.sqrt(layer.in_features)
        assert layer.weight.abs().max().item() <= bound
        assert layer.bias.abs().max().item() <= bound
        assert torch.count_nonzero(layer.bias) == layer.bias.numel()
    assert linears[1].weight.std().item() == approx(1 / math.sqrt(3 * 256), rel=0.05)  # 65,536 draws: SE 0.3%
    # The actor is built before the critics: the same seed gives the same actor whatever the critic init.
    for p, q in zip(agent.actor.parameters(), other.actor.parameters()):
        assert torch.equal(p, q)
    biases = [b for b in agent.critic.biases]
    assert all(torch.count_nonzero(b) == 0 for b in biases) == (critic_init == "authors")


# ---------------------------------------------------------------------------------------
# The agent's gradient step
# ---------------------------------------------------------------------------------------
def tiny_agent(**overrides):
    args = m.Args(**{"hidden_dim": 8, "num_critics": 3, "batch_size": 4, **overrides})
    m.resolve_defaults(args, "hopper", "medium", dataset_size=100)
    m.check_args(args)
    return m.Agent(2, 1, np.array([-0.5]), np.array([1.5]), args, torch.device("cpu"))  # non-unit bounds


def random_batch(generator=None):
    g = generator
    return m.Batch(
        torch.randn(4, 2, generator=g),
        torch.rand(4, 1, generator=g) * 2 - 0.5,  # within tiny_agent's bounds [-0.5, 1.5]
        torch.randn(4, generator=g),
        torch.randn(4, 2, generator=g),
        torch.tensor([0.0, 0.0, 1.0, 0.0]),
    )


@pytest.mark.equations
def test_agent_updates_actor_every_policy_freq_steps_and_targets_every_step_when_not_delayed():
    torch.manual_seed(0)
    agent, b = tiny_agent(policy_freq=2, delay_target_updates=False), random_batch()
    actor0 = [p.clone() for p in agent.actor.parameters()]
    critic_target0 = [p.clone() for p in agent.critic_target.parameters()]
    metrics = agent.update(b, torch.tensor(0.4), 2)
    # No actor step on update 1 of policy_freq 2, so no actor_loss to average in.
    assert set(metrics) == {"critic_loss", "q_mean"}, "update 1 of policy_freq 2: a critic step only"
    assert all(torch.equal(p, q) for p, q in zip(agent.actor.parameters(), actor0)), "actor still on update 1"
    unchanged = all(torch.equal(p, q) for p, q in zip(agent.critic_target.parameters(), critic_target0))
    assert not unchanged, "critic targets soft-updated after every critic step"
    metrics = agent.update(b, torch.tensor(0.4), 2)
    assert set(metrics) == {"critic_loss", "q_mean", "actor_loss"}, "update 2 of policy_freq 2: an actor step too"
    unchanged = all(torch.equal(p, q) for p, q in zip(agent.actor.parameters(), actor0))
    assert not unchanged, "the actor moved on update 2"
    unchanged = all(torch.equal(p, q) for p, q in zip(agent.actor_target.parameters(), actor0))
    assert not unchanged, "the actor target soft-updated toward the moved actor"
    assert all(p.requires_grad for p in agent.critic.parameters()), "critics unfrozen after the actor step"


@pytest.mark.equations
def test_delayed_target_updates_wait_for_the_actor_step_by_default():
    torch.manual_seed(0)
    agent, b = tiny_agent(policy_freq=2), random_batch()  # Table 1's TD3 'policy update frequency 2'
    assert agent.args.delay_target_updates, "targets wait for the actor step by default (paper and authors)"
    critic_target0 = [p.clone() for p in agent.critic_target.parameters()]
    agent.update(b, torch.tensor(0.4), 2)
    unchanged = all(torch.equal(p, q) for p, q in zip(agent.critic_target.parameters(), critic_target0))
    assert unchanged, "--delay-target-updates: no soft update without an actor step"
    agent.update(b, torch.tensor(0.4), 2)
    unchanged = all(torch.equal(p, q) for p, q in zip(agent.critic_target.parameters(), critic_target0))
    assert not unchanged, "--delay-target-updates: a soft update with the actor step"


@pytest.mark.equations
def test_critic_step_draws_m_distinct_critics_or_takes_all_when_m_equals_n(monkeypatch):
    drawn, td_target = [], m.td_target
    monkeypatch.setattr(
        m,
        "td_target",
        lambda b, actor, critic, idx, *rest: drawn.append(idx) or td_target(b, actor, critic, idx, *rest),
    )
    agent, b = tiny_agent(), random_batch()
    agent.critic_step(b, 3)  # M = N = 3: the min over all critics
    for _ in range(20):
        agent.critic_step(b, 2)
    assert drawn[0] is None, "M = N: no subset, the min over all critics"
    assert all(len(set(idx.tolist())) == 2 for idx in drawn[1:]), "M = 2 distinct critics (drawn without replacement)"
    assert all(set(idx.tolist()) <= {0, 1, 2} for idx in drawn[1:]), "the subset indexes the N = 3 critics"
    assert len({tuple(sorted(idx.tolist())) for idx in drawn[1:]}) > 1, "a fresh subset each critic step"


@pytest.mark.equations
def test_critic_step_bootstraps_from_the_target_networks(monkeypatch):
    seen, td_target = {}, m.td_target

    def spy(b, actor, critic, *rest):
        seen["actor"], seen["critic"] = actor, critic
        return td_target(b, actor, critic, *rest)

    monkeypatch.setattr(m, "td_target", spy)
    agent = tiny_agent()
    agent.critic_step(random_batch(), 2)
    assert seen["actor"] is agent.actor_target, "a' comes from the target actor pi', not the actor"
    assert seen["critic"] is agent.critic_target, "y bootstraps from the target critics Q', not the critics"


def test_agent_state_dict_round_trip():
    torch.manual_seed(0)
    agent, other = tiny_agent(), tiny_agent()
    agent.update(random_batch(), torch.tensor(0.4), 2)
    agent.update(random_batch(), torch.tensor(0.4), 2)  # optimizer states exist for both parts
    other.load_state_dict(agent.state_dict())
    for name in ("actor", "critic", "actor_target", "critic_target"):
        for p, q in zip(getattr(agent, name).parameters(), getattr(other, name).parameters()):
            assert torch.equal(p, q), name
    assert other.critic_optim.state_dict()["state"][0]["step"] == 2


@pytest.mark.slow
def test_compiled_step_matches_eager_step(monkeypatch):
    # M = N and no target noise make the step deterministic given the batch, whatever the RNG. Inductor's C++
    # code generation costs ~30 s cold on a 2-core CPU; aot_eager traces the same graphs (Dynamo and AOTAutograd:
    # graph breaks, the critics' requires_grad_ toggles, the optimizer steps) without it.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch.manual_seed(0)
    eager = tiny_agent(num_min_critics=3, policy_noise=0.0)
    compiled = tiny_agent(num_min_critics=3, policy_noise=0.0)
    compiled.load_state_dict(eager.state_dict())
    try:
        compile_step(compiled)
        g = torch.Generator().manual_seed(1)
        for _ in range(2):  # a critic-only step, then a step with the actor
            b = random_batch(g)
            out_e, out_c = eager.update(b, torch.tensor(0.4), 3), compiled.update(b, torch.tensor(0.4), 3)
            assert set(out_e) == set(out_c)
            for key in out_e:
                assert torch.allclose(out_e[key], out_c[key], atol=1e-5), key
    finally:
        torch._dynamo.reset()
    for name in ("actor", "critic", "actor_target", "critic_target"):
        for p, q in zip(getattr(eager, name).parameters(), getattr(compiled, name).parameters()):
            assert torch.allclose(p, q, atol=1e-5), name
    assert not torch.equal(eager.actor.net[0].weight, tiny_agent().actor.net[0].weight)  # something was trained


# ---------------------------------------------------------------------------------------
# Replay: FIFO order and downsampling
# ---------------------------------------------------------------------------------------
def filled_buffer(rewards, capacity):
    """Transition r holds r everywhere: its observation, its action (outside any unit bounds), its reward."""
    buf = m.ReplayBuffer(capacity, obs_dim=1, act_dim=1, device=torch.device("cpu"))
    for r in rewards:
        buf.add([[r]], [[r]], [r], [[r]], [0.0])
    return buf


@pytest.mark.equations
def test_fifo_overwrites_the_oldest_transitions():
    buf = filled_buffer([0, 1, 2], capacity=4)
    assert buf.size == 3, "size counts the transitions added"
    assert buf.data.rewards.tolist() == [0, 1, 2, 0], "the first transitions fill slots 0, 1, 2 in order"
    buf.add([[3], [4], [5]], [[3], [4], [5]], [3, 4, 5], [[3], [4], [5]], [0, 0, 0])
    # 3 fills slot 3; 4 and 5 overwrite the two oldest (0 and 1).
    assert buf.size == 4, "size stops at the capacity"
    assert buf.ptr == 2, "the pointer wraps around: the next write goes to slot 2, the oldest"
    assert buf.data.rewards.tolist() == [4, 5, 2, 3], "new transitions overwrite the oldest ones (FIFO)"
    assert set(buf.sample(200).rewards.tolist()) == {2, 3, 4, 5}, "sampling draws from the filled slots only"


@pytest.mark.equations
def test_fifo_stores_actions_of_non_unit_bounds_as_they_are():
    buf = m.ReplayBuffer(3, obs_dim=1, act_dim=2, device=torch.device("cpu"))
    actions = [[-2.0, 1.5], [2.0, -0.5], [0.5, 0.25], [-1.5, 1.0]]  # within [-2, 2] x [-0.5, 1.5]
    buf.add([[0], [1], [2], [3]], actions, [0, 1, 2, 3], [[1], [2], [3], [4]], [0, 0, 0, 1])
    # 4 transitions into 3 slots: the 4th overwrites slot 0.
    assert buf.data.actions.tolist() == [actions[3], actions[1], actions[2]], "actions kept whole and unclipped"
    assert buf.data.terminals.tolist() == [1, 0, 0], "each field of a transition lands in the same slot"


@pytest.mark.equations
def test_replay_buffer_state_dict_round_trip():
    buf, copy = filled_buffer([0, 1, 2, 3, 4], capacity=4), m.ReplayBuffer(4, 1, 1, torch.device("cpu"))
    copy.load_state_dict(buf.state_dict())
    assert copy.ptr == 1, "the pointer is restored"
    assert copy.size == 4, "the size is restored"
    assert copy.data.rewards.tolist() == [4, 1, 2, 3], "the stored transitions are restored"


@pytest.mark.equations
def test_number_of_kept_offline_transitions():
    assert m.num_kept(1_000_000, 0.05, 50_000) == 50_000, "5% of 1M = 50k"
    assert m.num_kept(2_000_000, 0.05, 50_000) == 100_000, "the ratio wins above the floor keep_min"
    assert m.num_kept(200_000, 0.05, 50_000) == 50_000, "the floor keep_min wins: 5% would be 10k"
    assert m.num_kept(10_000, 0.05, 50_000) == 10_000, "capped at the dataset size"
    assert m.num_kept(1001, 0.05, 0) == 51, "rounded up: ceil(50.05)"


@pytest.mark.equations
def test_downsample_keeps_a_uniform_subset_without_duplicates():
    buf = filled_buffer(range(1000), capacity=1000)
    gen = torch.Generator().manual_seed(0)
    online = m.downsample(buf, capacity=500, keep_ratio=0.1, keep_min=0, with_replacement=False, generator=gen)
    kept = online.data.rewards[: online.size]
    assert online.size == 100, "keeps num_kept = 10% of 1000 transitions"
    assert online.capacity == 500, "the online buffer has its own capacity"
    assert online.ptr == 100, "online transitions go after the kept ones"
    assert len(set(kept.tolist())) == 100, "without replacement: no transition twice"
    assert set(kept.tolist()) <= set(range(1000)), "only offline transitions"
    assert torch.equal(online.data.obs[:100, 0], kept), "rows stay whole transitions"
    assert 300 < kept.mean() < 700, "a spread-out random subset, not the first rows"
    # With replacement (utils.py:71, np.random.randint): 100 draws from 1000 repeat one with
    # probability 1 - prod(1 - k/1000, k < 100) = 99.3%; this seed does.
    with_repl = m.downsample(buf, 500, 0.1, 0, True, torch.Generator().manual_seed(0))
    assert with_repl.size == 100, "keeps num_kept transitions with replacement too"
    assert len(set(with_repl.data.rewards[:100].tolist())) < 100, "with replacement: some transition twice"


@pytest.mark.equations
def test_downsample_never_routes_device_tensors_through_numpy():
    # A CUDA buffer's tensors cannot become numpy arrays; the meta device fails the same way on a CPU machine.
    buf = m.ReplayBuffer(100, obs_dim=2, act_dim=1, device=torch.device("meta"))
    buf.add(
        torch.zeros(100, 2, device="meta"),
        torch.zeros(100, 1, device="meta"),
        torch.zeros(100, device="meta"),
        torch.zeros(100, 2, device="meta"),
        torch.zeros(100, device="meta"),
    )
    online = m.downsample(buf, 50, 0.2, 0, False, torch.Generator().manual_seed(0))
    assert online.size == 20
    assert online.data.obs.device.type == "meta"


@pytest.mark.equations
def test_flatten_aligns_next_obs_and_keeps_truncations_bootstrapping(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    obs0 = np.array([[0, 0], [1, 1], [2, 2], [3, 3]], float)  # 3 steps, ends in a termination
    obs1 = np.array([[10, 10], [11, 11], [12, 12]], float)  # 2 steps, cut by a time limit
    episodes = [
        dict(
            observations=obs0,
            actions=np.zeros((3, 1), np.float32),
            rewards=[1.0, 2.0, 3.0],
            terminations=[False, False, True],
            truncations=[False, False, False],
        ),
        dict(
            observations=obs1,
            actions=np.zeros((2, 1), np.float32),
            rewards=[4.0, 5.0],
            terminations=[False, False],
            truncations=[False, True],
        ),
    ]
    ds = make_minari_dataset("test/flat-v0", episodes, **spaces(2, 1))
    data = m.flatten_episodes(ds)
    assert data["obs"][:, 0].tolist() == [0, 1, 2, 10, 11]
    assert data["next_obs"][:, 0].tolist() == [1, 2, 3, 11, 12]  # no transition 3 -> 10
    assert data["rewards"].tolist() == [1, 2, 3, 4, 5]
    assert data["terminals"].tolist() == [0, 0, 1, 0, 0]  # the time-out is not terminal


# ---------------------------------------------------------------------------------------
# Evaluation and the logged means
# ---------------------------------------------------------------------------------------
def rollout(actor, seed):
    """One deterministic Hopper-v5 episode of actor from reset(seed=seed): its return."""
    env = gym.make("Hopper-v5")
    obs, _ = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        with torch.no_grad():
            action = actor(torch.as_tensor(obs, dtype=torch.float32)[None])[0]
        obs, reward, terminated, truncated, _ = env.step(action.numpy())
        total, done = total + float(reward), terminated or truncated
    return total


def test_every_evaluation_starts_from_the_same_seed():
    env = gym.make("Hopper-v5")
    torch.manual_seed(0)
    actor = m.Actor(11, 3, env.action_space.low, env.action_space.high, hidden_dim=8)
    agent = SimpleNamespace(actor=actor, device=torch.device("cpu"), num_updates=7)
    task = SimpleNamespace(eval_env=env, normalized=lambda r: r / 1000)
    logged = []
    run = SimpleNamespace(log_evaluation=lambda *a, **k: logged.append((a, k)), means=RunningMeans())
    args = SimpleNamespace(eval_episodes=3, seed=0)
    first = m.evaluate(agent, env, 3, seed=100)
    second = m.evaluate(agent, env, 3, seed=100)
    assert first.tolist() == second.tolist(), "the same policy scores the same at any point of a run"
    assert len(set(first.tolist())) == 3, "the episodes within one evaluation start differently"
    assert first[0] == rollout(actor, seed=100), "the first episode starts from the seed given"
    rng = np.random.default_rng(0)
    logged_returns = m.log_evaluation(run, agent, task, args, rng, "online", 20, 0.3, {}, env_steps=20, extra=1)
    assert logged_returns.tolist() == first.tolist(), "log_evaluation evaluates from seed + 100"
    (phase, step, returns, scores, losses, updates), extra = logged[0]
    assert (phase, step, updates, losses) == ("online", 20, 7, {})
    assert extra == {"alpha": 0.3, "env_steps": 20, "extra": 1}
    assert scores.tolist() == approx((first / 10).tolist()), "scores are 100 x normalized"


def test_running_means_average_each_key_over_its_own_count():
    means = RunningMeans()
    for a in (1.0, 2.0, 6.0):  # (1 + 2 + 6) / 3 = 3
        means.add({"a": torch.tensor(a)})
    assert means.pop() == {"a": 3.0}
    means.add({"critic_loss": torch.tensor(1.0), "actor_loss": torch.tensor(10.0)})
    means.add({"critic_loss": torch.tensor(3.0)})  # no actor step: actor_loss keeps its count of 1
    assert means.pop() == {"critic_loss": 2.0, "actor_loss": 10.0}
    assert means.pop() == {}  # an interval without updates (the step-0 rows) logs empty loss columns


# ---------------------------------------------------------------------------------------
# Arguments: paper vs authors' defaults, bad values
# ---------------------------------------------------------------------------------------
def resolved(*flags):
    args = parse_args(m.Args, m.METHOD, [str(f) for f in flags])
    m.check_args(args)
    m.resolve_defaults(args, "hopper", "medium", dataset_size=1000)
    m.check_args(args)
    return args


RESOLVED = ("utd", "kd", "target_return", "r_last", "keep_min", "keep_with_replacement", "policy_noise")


def test_paper_defaults_and_authors_code_resolution():
    values = lambda args: tuple(getattr(args, k) for k in RESOLVED)  # noqa: E731
    assert values(resolved()) == (20, 8e-5, 1.0, "previous", 0, False, 0.1)  # the paper, Table 1
    assert values(resolved("--authors-code")) == (10, 1e-4, 1.05, "moving-average", 50_000, True, 0.2)
    # An explicit flag wins over either set of defaults.
    assert values(resolved("--authors-code", "--utd", 20)) == (20, 1e-4, 1.05, "moving-average", 50_000, True, 0.2)
    assert values(resolved("--authors-code", "--keep-with-replacement", "False", "--policy-noise", 0.1)) == (
        10,
        1e-4,
        1.05,
        "moving-average",
        50_000,
        False,
        0.1,
    )
    assert values(resolved("--kd", 1e-4, "--r-last", "moving-average")) == (
        20,
        1e-4,
        1.0,
        "moving-average",
        0,
        False,
        0.1,
    )
    # The remaining knobs keep one default: the authors' code agrees with the paper there.
    for args in (resolved(), resolved("--authors-code")):
        assert (
            args.kp,
            args.alpha_online_max,
            args.r_last_smoothing,
            args.r_last_start,
            args.keep_ratio,
            args.critic_init,
            args.num_critics,
            args.num_min_critics,
            args.delay_target_updates,
        ) == (3e-5, 0.4, 0.05, "one-episode", 0.05, "authors", 10, 2, True)
    assert resolved("--target-return", 0).target_return == 0
    assert resolved("--target-return", 2).target_return == 2


TARGET = "--target-return (a fraction, 1 = expert) must be in [0, 2]"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--target-return", "nan"], "--target-return must be finite, got nan"),
        (["--target-return", "inf"], "--target-return must be finite, got inf"),
        (["--target-return", "-0.5"], f"{TARGET}, got -0.5"),
        (["--target-return", "3"], f"{TARGET}, got 3.0"),
        (["--gamma", "1.5"], "--gamma must be in [0, 1], got 1.5"),
        (["--num-min-critics-offline", "11"], "--num-min-critics-offline M=11 exceeds --num-critics N=10"),
        (["--batch-size", "0"], "--batch-size must be positive, got 0"),
        (["--offline-steps", "-5"], "--offline-steps must be positive, got -5"),
        (["--online-steps", "-1"], "--online-steps must be non-negative, got -1"),
        (["--num-min-critics", "11"], "--num-min-critics M=11 exceeds --num-critics N=10"),
        (["--keep-ratio", "0"], "--keep-ratio must be in (0, 1], got 0.0"),
        (["--keep-ratio", "1.5"], "--keep-ratio must be in (0, 1], got 1.5"),
        (["--r-last-smoothing", "0"], "--r-last-smoothing must be in (0, 1], got 0.0"),
        (["--kd", "-1e-4"], "--kd must be non-negative, got -0.0001"),
    ],
)
def test_bad_values_give_one_line_and_exit_2_before_any_work(flags, message, monkeypatch, capsys, tmp_path):
    status, lines = cli(monkeypatch, capsys, *flags, "--output-dir", tmp_path / "runs")
    assert status == 2
    assert lines == [f"error: {message}"]
    assert list(tmp_path.glob("runs/*")) == []  # no run folder


def test_a_buffer_too_small_for_the_kept_data_is_refused_before_the_run_starts(
    datasets_path, monkeypatch, capsys, tmp_path
):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(datasets_path))
    status, lines = cli(monkeypatch, capsys, *tiny("--buffer-size", 50, "--output-dir", tmp_path / "runs"))
    # keep-min 100 of 400 transitions survive the switch: a 50-slot buffer cannot hold them.
    assert status == 2
    assert lines[-1] == "error: --buffer-size 50 cannot hold the 100 offline transitions kept"
    assert sum(line.startswith("error") for line in lines) == 1
    assert list(tmp_path.glob("runs/*")) == []


# ---------------------------------------------------------------------------------------
# A run as a user starts it (subprocess, the paper's defaults)
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(datasets_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    proc = run_script("redq_adaptive_bc.py", *tiny("--output-dir", out), datasets_path=datasets_path, cwd=out)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = out.iterdir()
    return run_dir, proc


@pytest.mark.slow
def test_run_writes_config_progress_episodes_and_checkpoints(finished_run):
    run_dir, proc = finished_run
    assert run_dir.name.startswith("hopper-uniform-random-400steps__redq_adaptive_bc__0__")
    assert {p.name for p in run_dir.iterdir() if not p.name.startswith(".")} == {
        "config.json",
        "progress.csv",
        "episodes.csv",
        "offline.pt",
        "final.pt",
        "actor.pt",
    }
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset_id"] == "local/hopper/uniform-random-400steps-v0"
    assert config["method"] == "redq_adaptive_bc"
    assert (config["ref_min_score"], config["ref_max_score"], config["ref_source"]) == (*HOPPER_REF, "D4RL table")
    assert config["alpha_offline"] == 0.4
    assert config["alpha_online"] == 0.4
    assert config["offline_kept"] == 100
    assert config["dataset_transitions"] == 400
    assert config["buffer_size"] == 100  # max(60 online steps, 100 kept)
    # The paper's values, resolved before config.json is written (utd and keep_min come from TINY).
    assert [config[k] for k in RESOLVED] == [2, 8e-5, 1.0, "previous", 100, False, 0.1]
    assert config["pretrained_from"] is None
    with open(run_dir / "progress.csv") as f:
        assert f.readline().strip().split(",") == m.COLUMNS
    rows = read_csv(run_dir / "progress.csv")
    assert [(r["phase"], int(r["step"])) for r in rows] == [
        ("offline", 0),
        ("offline", 20),
        ("offline", 40),
        ("online", 0),
        ("online", 20),
        ("online", 40),
        ("online", 60),
    ]
    assert all(float(r["critic_loss"]) > 0 for r in rows if int(r["step"]) > 0)
    assert all(r["critic_loss"] == r["actor_loss"] == r["q_mean"] == "" for r in rows if int(r["step"]) == 0)
    assert proc.stdout.strip().splitlines()[-1].startswith("final normalized score")


@pytest.mark.slow
def test_alpha_moves_online_and_stays_in_bounds(finished_run):
    rows = [r for r in read_csv(finished_run[0] / "progress.csv") if r["phase"] == "online"]
    alphas = [float(r["alpha"]) for r in rows]
    # A random-data agent scores far below R_target = 1, so the P term lowers alpha from 0.4 after
    # every episode, by about 3e-5 x (R - 1) x length per episode (60 steps: roughly -2e-3).
    assert alphas[0] == 0.4
    assert 0.39 < alphas[-1] < 0.4
    assert all(b <= a for a, b in zip(alphas, alphas[1:]))


@pytest.mark.slow
def test_every_episode_row_satisfies_eq2(finished_run):
    run_dir = finished_run[0]
    episodes, progress = read_csv(run_dir / "episodes.csv"), read_csv(run_dir / "progress.csv")
    assert list(episodes[0]) == m.EPISODE_COLUMNS
    assert len(episodes) >= 2
    switch = next(r for r in progress if r["phase"] == "online")
    # R_last starts from the first evaluation episode of the pre-trained agent (one episode here).
    assert float(episodes[0]["R_last"]) == approx(float(switch["normalized_score"]) / 100, rel=1e-5)
    alpha, step = 0.4, 0  # alpha_online at the switch
    for k, row in enumerate(episodes):
        R_current, R_last, p, d, length = (float(row[c]) for c in ("R_current", "R_last", "p_term", "d_term", "length"))
        assert int(row["step"]) == step + int(length)  # episodes follow each other: one row for each
        assert R_current == approx(normalized(float(row["return"])), rel=1e-4)
        assert p == approx(3e-5 * (R_current - 1.0), rel=1e-4)  # the paper: P on R_current, R_target 1
        assert d == approx(8e-5 * max(0.0, R_last - R_current), rel=1e-3, abs=1e-12)
        # alpha = clip(alpha_prev + (P + D) x length, 0, 0.4); the values are logged with 6 digits.
        assert float(row["alpha"]) == approx(min(max(alpha + (p + d) * length, 0.0), 0.4), abs=2e-6)
        if k + 1 < len(episodes):
            assert episodes[k + 1]["R_last"] == row["R_current"]  # R_last <- R_current
        alpha, step = float(row["alpha"]), int(row["step"])
    # A progress row shows the alpha and the return of the last episode that ended by its step.
    for r in progress[progress.index(switch) + 1 :]:
        ended = [e for e in episodes if int(e["step"]) <= int(r["step"])]
        if not ended:  # no episode has ended yet: alpha_online is still its start value
            assert (r["alpha"], r["episode_normalized_return"]) == ("0.4", "")
            continue
        assert r["alpha"] == ended[-1]["alpha"]
        assert float(r["episode_normalized_return"]) == approx(100 * float(ended[-1]["R_current"]), rel=1e-5)


# ---------------------------------------------------------------------------------------
# In-process runs: who takes the min over which critics, the logged means, --load-offline, --online-steps 0
# ---------------------------------------------------------------------------------------
def recording_updates(monkeypatch, calls):
    """Wrap Agent.update: each call appends its M, alpha and metrics to calls."""
    update = m.Agent.update

    def recorded(agent, b, alpha, num_min_critics):
        metrics = update(agent, b, alpha, num_min_critics)
        calls.append(dict(M=num_min_critics, alpha=float(alpha), **{k: float(v) for k, v in metrics.items()}))
        return metrics

    monkeypatch.setattr(m.Agent, "update", recorded)


FIXED_ALPHA = ["--no-adaptive-bc", "--alpha-online", 0.1]
ONLINE = [
    "--online-steps",
    60,
    "--eval-every",
    20,
    "--eval-episodes",
    1,
    "--utd",
    2,
    "--batch-size",
    32,
    "--keep-min",
    100,
    "--num-min-critics",
    3,
]


@pytest.fixture(scope="module")
def paired(datasets_path, tmp_path_factory):
    """full: pre-trains and fine-tunes (M = N = 3, fixed alpha_online 0.1) with Agent.update recorded;
    pre: the same pre-training alone (--online-steps 0); loaded: pre's offline.pt fine-tuned like full."""
    out, calls = tmp_path_factory.mktemp("paired"), []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(datasets_path))
        recording_updates(mp, calls)
        full = in_process(*tiny(*ONLINE, *FIXED_ALPHA, "--output-dir", out / "full"))
        full_calls = list(calls)
        pre = in_process(*tiny("--num-min-critics", 3, "--online-steps", 0, "--output-dir", out / "pre"))
        loaded = in_process("--load-offline", pre, *ONLINE, *FIXED_ALPHA, "--output-dir", out / "loaded")
    return SimpleNamespace(full=full, pre=pre, loaded=loaded, calls=full_calls)


@pytest.mark.equations
def test_with_m_equal_n_pretraining_draws_a_random_pair_and_fine_tuning_takes_all(paired):
    # redq_bc.py:141: `if self.use_q_min and not self.pretrain:` the min over all critics, else a random pair.
    calls = paired.calls
    assert len(calls) == 40 + 60 * 2  # 40 offline steps, then 60 env steps x utd 2
    assert [c["M"] for c in calls[:40]] == [2] * 40
    assert [c["M"] for c in calls[40:]] == [3] * 120
    assert [c["alpha"] for c in calls] == approx([0.4] * 40 + [0.1] * 120)  # alpha_offline, then alpha_online


@pytest.mark.parametrize(
    "flags, offline_M, online_M",
    [
        (["--num-min-critics", 3, "--min-over-all-offline"], 3, 3),  # the Fig. 5 ablation in both phases
        (["--num-min-critics", 2], 2, 2),  # REDQ's random pair throughout
    ],
)
def test_min_over_all_offline_and_the_plain_pair(flags, offline_M, online_M, datasets_path, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(datasets_path))
    recording_updates(monkeypatch, calls)
    in_process(
        *tiny(
            "--offline-steps", 4, "--online-steps", 4, "--eval-every", 4, "--utd", 1, *flags, "--output-dir", tmp_path
        )
    )
    assert [c["M"] for c in calls] == [offline_M] * 4 + [online_M] * 4


def test_update_returns_actor_loss_only_on_actor_steps(paired):
    # policy_freq 2: updates 2, 4, 6, ... (counted across both phases) step the actor.
    assert [("actor_loss" in c) for c in paired.calls] == [i % 2 == 0 for i in range(1, 161)]


def test_loss_columns_are_means_over_the_interval_since_the_previous_row(paired):
    rows, calls = read_csv(paired.full / "progress.csv"), paired.calls
    # (phase, step) -> the updates since the previous row: 20 offline steps, or 20 env steps x utd 2.
    intervals = {
        ("offline", 20): calls[0:20],
        ("offline", 40): calls[20:40],
        ("online", 20): calls[40:80],
        ("online", 40): calls[80:120],
        ("online", 60): calls[120:160],
    }
    for r in rows:
        interval = intervals.get((r["phase"], int(r["step"])))
        if interval is None:  # the step-0 rows: no updates since the previous row
            assert r["critic_loss"] == r["actor_loss"] == r["q_mean"] == ""
            continue
        actor = [c["actor_loss"] for c in interval if "actor_loss" in c]
        assert len(actor) == len(interval) // 2
        assert float(r["critic_loss"]) == approx(np.mean([c["critic_loss"] for c in interval]), rel=1e-5)
        assert float(r["q_mean"]) == approx(np.mean([c["q_mean"] for c in interval]), rel=1e-5, abs=1e-7)
        assert float(r["actor_loss"]) == approx(np.mean(actor), rel=1e-5)
        assert float(r["critic_loss"]) != approx(interval[-1]["critic_loss"], rel=1e-3)  # not the last value


def test_load_offline_fine_tunes_exactly_as_the_pretraining_process_would(paired, datasets_path):
    # Pre-training does not depend on the online flags: pre's offline.pt is full's.
    pre_agent = torch.load(paired.pre / "offline.pt", weights_only=True)["agent"]
    full_agent = torch.load(paired.full / "offline.pt", weights_only=True)["agent"]
    for part in ("actor", "critic", "critic_target"):
        assert all(torch.equal(v, full_agent[part][k]) for k, v in pre_agent[part].items()), part
    # The offline.pt's random streams pair the two runs: the online rows are the same numbers.
    same = [c for c in m.COLUMNS if c not in TIMINGS]
    full_rows = [[r[c] for c in same] for r in read_csv(paired.full / "progress.csv") if r["phase"] == "online"]
    loaded_rows = [[r[c] for c in same] for r in read_csv(paired.loaded / "progress.csv")]
    assert loaded_rows == full_rows
    assert [r[0] for r in loaded_rows] == ["online"] * 4
    assert {r[same.index("alpha")] for r in loaded_rows} == {"0.1"}  # --no-adaptive-bc --alpha-online 0.1
    assert read_csv(paired.loaded / "episodes.csv") == read_csv(paired.full / "episodes.csv")
    final_full = torch.load(paired.full / "final.pt", weights_only=True)["agent"]
    final_loaded = torch.load(paired.loaded / "final.pt", weights_only=True)["agent"]
    assert_same_state(final_loaded, final_full)
    # Dataset and networks came from the pre-training run, without their flags (and no other dataset was built).
    config = json.loads((paired.loaded / "config.json").read_text())
    assert config["pretrained_from"] == str(paired.pre / "offline.pt")
    assert config["offline_steps"] == 40
    assert (config["dataset_id"], config["random_dataset_steps"], config["hidden_dim"], config["num_critics"]) == (
        "local/hopper/uniform-random-400steps-v0",
        400,
        16,
        3,
    )
    assert [p.name for p in (Path(datasets_path) / "local" / "hopper").iterdir()] == ["uniform-random-400steps-v0"]
    assert not (paired.loaded / "offline.pt").exists()


def test_pre_training_only_writes_offline_final_and_actor(paired):
    run_dir = paired.pre
    assert {p.name for p in run_dir.iterdir() if not p.name.startswith(".")} == {
        "config.json",
        "progress.csv",
        "episodes.csv",
        "offline.pt",
        "final.pt",
        "actor.pt",
    }
    assert [(r["phase"], r["step"]) for r in read_csv(run_dir / "progress.csv")] == [
        ("offline", "0"),
        ("offline", "20"),
        ("offline", "40"),
    ]
    assert read_csv(run_dir / "episodes.csv") == []
    offline = torch.load(run_dir / "offline.pt", weights_only=True)
    final = torch.load(run_dir / "final.pt", weights_only=True)
    assert all(torch.equal(v, final["agent"]["actor"][k]) for k, v in offline["agent"]["actor"].items())
    assert offline["num_updates"] == 40
    assert offline["meta"]["config"]["offline_steps"] == 40
    # actor.pt: the policy alone, rebuilt from its metadata without this run's config.
    saved = torch.load(run_dir / "actor.pt", weights_only=True)
    assert saved["meta"]["actor"]["class"] == "Actor"
    kwargs = saved["meta"]["actor"]["kwargs"]
    assert (kwargs["obs_dim"], kwargs["act_dim"], kwargs["hidden_dim"], kwargs["hidden_layers"]) == (11, 3, 16, 2)
    actor = getattr(m, saved["meta"]["actor"]["class"])(**kwargs)
    actor.load_state_dict(saved["actor"])  # strict: every key, every shape
    assert all(torch.equal(v, final["agent"]["actor"][k]) for k, v in actor.state_dict().items())


def test_load_offline_refuses_a_conflicting_network_flag(paired, datasets_path, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(datasets_path))
    status, lines = cli(monkeypatch, capsys, "--load-offline", paired.pre, "--hidden-dim", 32, "--output-dir", tmp_path)
    assert status == 2
    assert lines == [
        f"error: --load-offline: {paired.pre / 'offline.pt'} was pre-trained with --hidden-dim 16, this run asks for "
        f"32; leave the flag out to use the pre-training value"
    ]
    assert list(tmp_path.iterdir()) == []


def test_load_offline_checks_m_against_the_pre_trained_n(paired, datasets_path, monkeypatch, capsys, tmp_path):
    # pre has N = 3 critics (taken over by --load-offline); M = 5 fits the default N = 10 but not the agent's 3.
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(datasets_path))
    status, lines = cli(
        monkeypatch,
        capsys,
        "--load-offline",
        paired.pre,
        "--num-min-critics",
        5,
        "--online-steps",
        5,
        "--eval-episodes",
        1,
        "--keep-min",
        100,
        "--output-dir",
        tmp_path,
    )
    assert status == 2, "a bad value exits with status 2"
    assert lines[-1] == "error: --num-min-critics M=5 exceeds --num-critics N=3", "one line says what is wrong"
    assert not [line for line in lines if "Traceback" in line], "no traceback"
    assert list(tmp_path.iterdir()) == [], "no run folder"


# ---------------------------------------------------------------------------------------
# In-process runs: walker2d-random, R_last's start, a diverging run
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "env, dataset, alpha_offline",
    [
        ("walker2d", "random", 100.0),
        ("walker2d", "random-v2", 100.0),
        ("walker2d", "medium", 0.4),
        ("hopper", "random", 0.4),
    ]
    + [("walker2d", "uniform-random", 0.4), ("walker2d", "uniform-random-300steps", 0.4)],
)
def test_alpha_offline_is_100_on_d4rls_walker2d_random_only(env, dataset, alpha_offline):
    args = m.Args()
    m.resolve_defaults(args, env, dataset, dataset_size=1000)
    assert args.alpha_offline == alpha_offline, f"alpha_offline on {env}-{dataset}"
    assert args.alpha_online == 0.4, "alpha_online starts at min(alpha_offline, alpha_online_max = 0.4)"


def test_pretraining_draws_a_random_pair_where_fine_tuning_takes_the_min_over_all_critics():
    # redq_bc.py:141 (the authors' code): the min over all critics only while fine-tuning.
    args = m.Args(num_min_critics=10)
    m.resolve_defaults(args, "hopper", "medium", dataset_size=1000)
    assert args.num_min_critics_offline == 2, "M = N: pre-training keeps a random pair"
    args = m.Args(num_min_critics=10, min_over_all_offline=True)
    m.resolve_defaults(args, "hopper", "medium", dataset_size=1000)
    assert args.num_min_critics_offline == 10, "--min-over-all-offline: M = N in both phases"
    args = m.Args(num_min_critics=3)
    m.resolve_defaults(args, "hopper", "medium", dataset_size=1000)
    assert args.num_min_critics_offline == 3, "M < N: the same M in both phases"


def test_walker2d_random_pretrains_with_alpha_100_and_caps_alpha_online_at_0_4(tmp_path, monkeypatch):
    # main.py:55-57: `if args.env == "walker2d-random-v0": args.alpha = 100; args.alpha_finetune = 0.4`.
    # --kp 1 --target-return 0 make every episode's P term push alpha far above 0.4, so the cap shows.
    # The paper's walker2d-random is D4RL's (here a tiny file in D4RL's v0 layout: 301 rows, 300 transitions).
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    (tmp_path / "d4rl").mkdir()
    write_d4rl_file(tmp_path / "d4rl" / "walker2d_random.hdf5", np.zeros(301, bool), obs_dim=17, act_dim=6)
    run_dir = in_process(
        "--env",
        "walker2d",
        "--dataset",
        "random",
        "--authors-code",
        "--kp",
        1,
        "--target-return",
        0,
        "--offline-steps",
        20,
        "--online-steps",
        400,
        "--eval-every",
        100,
        "--eval-episodes",
        1,
        "--utd",
        1,
        "--hidden-dim",
        16,
        "--num-critics",
        3,
        "--batch-size",
        32,
        "--output-dir",
        tmp_path / "runs",
    )
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset_id"] == "local/d4rl/walker2d-random-v0"
    assert config["env_id"] == "Walker2d-v4"
    assert (config["alpha_offline"], config["alpha_online"], config["alpha_online_max"]) == (100.0, 0.4, 0.4)
    # --authors-code's values, with the explicit --utd 1 and --target-return 0 kept; all 300 transitions kept
    # (--authors-code keeps at least 50,000).
    assert [config[k] for k in RESOLVED] == [1, 1e-4, 0.0, "moving-average", 50_000, True, 0.2]
    assert config["offline_kept"] == 300
    progress = read_csv(run_dir / "progress.csv")
    assert {r["alpha"] for r in progress if r["phase"] == "offline"} == {"100"}
    assert {r["alpha"] for r in progress if r["phase"] == "online"} == {"0.4"}
    # Every episode follows the authors' controller (main.py:221-227): P on the old average.
    episodes = read_csv(run_dir / "episodes.csv")
    assert len(episodes) >= 2
    switch = next(r for r in progress if r["phase"] == "online")
    assert float(episodes[0]["R_last"]) == approx(float(switch["normalized_score"]) / 100, rel=1e-5)
    alpha = 0.4
    for k, row in enumerate(episodes):
        R_current, R_last, p, d, length = (float(row[c]) for c in ("R_current", "R_last", "p_term", "d_term", "length"))
        assert p == approx(1 * (R_last - 0), rel=1e-5)
        assert d == approx(1e-4 * max(0.0, R_last - R_current), rel=1e-3, abs=1e-12)
        # R_last > 0 here: uncapped, alpha would be 0.4 + (P + D) x length > 0.4 (with a cap at alpha_offline, 100).
        assert alpha + (p + d) * length > 0.41
        assert row["alpha"] == "0.4"
        if k + 1 < len(episodes):  # last_R = 0.05 * current_R + 0.95 * last_R
            assert float(episodes[k + 1]["R_last"]) == approx(0.05 * R_current + 0.95 * R_last, rel=1e-4, abs=1e-9)
        alpha = float(row["alpha"])


@pytest.mark.equations
def test_r_last_starts_from_the_first_evaluation_episode_or_the_mean(datasets_path, monkeypatch, tmp_path):
    # main.py:178-181: `last_R = utils.eval_policy(policy, args.env, args.seed, eval_episodes=1)['d4rl']*0.01`.
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(datasets_path))
    runs = {}
    for start in ("one-episode", "mean"):
        runs[start] = in_process(
            *tiny(
                "--offline-steps",
                4,
                "--online-steps",
                40,
                "--eval-every",
                40,
                "--eval-episodes",
                2,
                "--r-last-start",
                start,
                "--output-dir",
                tmp_path / start,
            )
        )
    first, mean = (float(read_csv(runs[s] / "episodes.csv")[0]["R_last"]) for s in ("one-episode", "mean"))
    switch = [r for r in read_csv(runs["mean"] / "progress.csv") if r["phase"] == "online"][0]
    assert switch == [r for r in read_csv(runs["one-episode"] / "progress.csv") if r["phase"] == "online"][0] | {
        k: switch[k] for k in TIMINGS
    }  # the same agent up to the switch
    score, std = float(switch["normalized_score"]), float(switch["normalized_score_std"])
    assert std > 0
    assert mean == approx(score / 100, rel=1e-5)
    # The first of the two episodes: the pre-trained actor from the evaluation seed, seed + 100.
    offline = torch.load(runs["one-episode"] / "offline.pt", weights_only=True)
    actor = m.Actor(11, 3, -np.ones(3), np.ones(3), hidden_dim=16)
    actor.load_state_dict(offline["agent"]["actor"])
    assert first == approx(normalized(rollout(actor, seed=100)), rel=1e-5)
    assert first in (approx((score - std) / 100, rel=1e-4), approx((score + std) / 100, rel=1e-4))


def test_a_diverging_loss_stops_the_run_and_keeps_its_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    # Finite rewards whose squares overflow float32: the critic loss becomes inf.
    make_minari_dataset("local/hopper/huge-v0", hopper_episodes(4, 50, reward=1e30), env_id="Hopper-v5")
    with pytest.raises(TrainingDiverged, match="offline step 20"):
        in_process("--dataset-id", "local/hopper/huge-v0", *TINY, "--output-dir", tmp_path / "runs")
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert len(read_csv(run_dir / "progress.csv")) == 2  # the rows up to the failure are kept
    assert not (run_dir / "final.pt").exists()
    assert not (run_dir / "offline.pt").exists()


# ---------------------------------------------------------------------------------------
# Killed, preempted and resumed (subprocesses)
# ---------------------------------------------------------------------------------------
RESUMABLE = [
    "--dataset",
    "uniform-random",
    "--random-dataset-steps",
    400,
    "--offline-steps",
    800,
    "--online-steps",
    400,
    "--eval-every",
    200,
    "--eval-episodes",
    1,
    "--utd",
    1,
    "--hidden-dim",
    16,
    "--num-critics",
    3,
    "--batch-size",
    32,
    "--keep-min",
    100,
    "--checkpoint-every",
    25,
]


MAIN = "redq_adaptive_bc.py"


def start(datasets_path, cwd, *flags):
    return start_script("redq_adaptive_bc.py", *flags, datasets_path=datasets_path, cwd=cwd)


def latest_state(run_dir):
    try:
        return torch.load(run_dir / "latest.pt", weights_only=True)
    except Exception:
        return None  # not written yet, or replaced while we read it


@pytest.mark.slow
def test_killed_preempted_and_resumed_run_ends_like_an_uninterrupted_one(datasets_path, tmp_path):
    seed = random.randrange(10**6)
    draw = random.Random(seed)  # the moments differ from run to run; a failure names the seed of its thresholds
    killed = start(datasets_path, tmp_path, *RESUMABLE, "--output-dir", tmp_path / "b")
    reference = start(datasets_path, tmp_path, *RESUMABLE, "--output-dir", tmp_path / "a")
    signal_when(killed, tmp_path / "b", "offline", draw.randrange(50, 200), signal.SIGKILL)  # mid pre-training
    (run_b,) = (tmp_path / "b").iterdir()
    resumed = start(datasets_path, tmp_path, "--resume", run_b)
    # After the resumed process's first checkpoint, and well before the switch (a stop signal online cuts an episode).
    moment = latest_state(run_b)["step"] + draw.randrange(25, 150)
    _, _, err = signal_when(resumed, tmp_path / "b", "offline", moment, signal.SIGTERM)  # preempted, still offline
    assert resumed.returncode == 143, (seed, err)
    assert "Traceback" not in err, (seed, err)
    assert f"reference scores -20.2723 (0) / 3234.3 (100) from {run_b}/config.json" in err  # not "from flags"
    assert err.strip().splitlines()[-1] == "stopped by SIGTERM: latest.pt is saved; continue with --resume <run folder>"
    assert latest_state(run_b)["phase"] == "offline"
    assert latest_state(run_b)["step"] >= moment
    resumed = start(datasets_path, tmp_path, "--resume", run_b)
    signal_when(resumed, tmp_path / "b", "online", draw.randrange(50, 250), signal.SIGKILL)  # mid fine-tuning
    finished = start(datasets_path, tmp_path, "--resume", run_b)
    _, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, (seed, err)
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    (run_a,) = (tmp_path / "a").iterdir()
    assert not (run_b / "latest.pt").exists()
    assert (run_b / "final.pt").exists()
    # Every row once, with the same numbers (timings aside): scores, returns, alpha, and the loss columns, whose
    # means over the interval since the previous row continue from latest.pt.
    same = [c for c in m.COLUMNS if c not in TIMINGS]
    rows_a, rows_b = read_csv(run_a / "progress.csv"), read_csv(run_b / "progress.csv")
    assert len(rows_a) == 5 + 3  # offline 0..800 and online 0..400, every 200 steps
    assert [[r[c] for c in same] for r in rows_b] == [[r[c] for c in same] for r in rows_a], seed
    assert read_csv(run_b / "episodes.csv") == read_csv(run_a / "episodes.csv"), seed
    # And the same final networks and optimizer states, bit for bit (CPU, one thread).
    final_a = torch.load(run_a / "final.pt", weights_only=True)["agent"]
    final_b = torch.load(run_b / "final.pt", weights_only=True)["agent"]
    assert_same_state(final_a, final_b, where=f"seed {seed}")


# (K, T, rows written before the cut evaluation, latest.pt's (phase, step, evaluation_due), every row at the end)
CUT_EVALUATIONS = {
    "pre-training": (10, 0, 1, ("offline", 5, True), OFFLINE_ROWS + [("offline", "10")]),
    # The switch's evaluation: --resume restarts from the end of pre-training and redoes the seeded switch,
    # without writing pre-training's last row twice.
    "the switch": (
        5,
        10,
        2,
        ("offline", 5, False),
        OFFLINE_ROWS + [("online", "0"), ("online", "5"), ("online", "10")],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("where", CUT_EVALUATIONS)
def test_a_stop_signal_during_an_evaluation_ends_it_and_resume_redoes_it(where, datasets_path, tmp_path):
    # Evaluations of 150 episodes every 5 steps: the run spends nearly all its time evaluating, so a SIGTERM sent
    # just after a row lands in the next evaluation (latest.pt says which).
    K, T, rows_before, saved, rows = CUT_EVALUATIONS[where]
    flags = [*RESUMABLE[:4], "--offline-steps", K, "--online-steps", T, "--eval-every", 5, "--eval-episodes", 150]
    flags += ["--hidden-dim", 16, "--num-critics", 3, "--batch-size", 32, "--keep-min", 100]
    kw = dict(datasets_path=datasets_path, cwd=tmp_path)
    run_b, state = sigterm_during_an_evaluation(MAIN, flags, tmp_path / "b", "progress.csv", rows_before, **kw)
    assert (state["phase"], state["step"], state["evaluation_due"]) == saved, "latest.pt: the state before it"
    assert len(read_csv(run_b / "progress.csv")) == rows_before, "the cut evaluation wrote no row"
    run_to_the_end(MAIN, "--resume", run_b, **kw)
    run_to_the_end(MAIN, *flags, "--output-dir", tmp_path / "a", **kw)
    (run_a,) = (tmp_path / "a").iterdir()
    assert [(r["phase"], r["step"]) for r in read_csv(run_b / "progress.csv")] == rows, "every row once"
    assert numbers(run_b, m.COLUMNS) == numbers(run_a, m.COLUMNS), "same numbers"
    assert read_csv(run_b / "episodes.csv") == read_csv(run_a / "episodes.csv"), "the same training episodes"
    final_a = torch.load(run_a / "final.pt", weights_only=True)["agent"]
    final_b = torch.load(run_b / "final.pt", weights_only=True)["agent"]
    assert_same_state(final_a, final_b, where=f"after a stopped evaluation ({where})")


def test_a_dataset_whose_mean_reaches_r_target_gets_a_warning_that_eq2_cannot_lower_alpha(
    datasets_path, tmp_path, capsys
):
    # The 400-step uniform-random data score about 1 (x100): R_target = 0 is reached, the paper's 1.0 is not.
    flags = ["--dataset", "uniform-random", "--random-dataset-steps", 400, "--offline-steps", 1, "--online-steps", 0]
    flags += ["--eval-every", 1, "--eval-episodes", 1, "--hidden-dim", 8, "--num-critics", 2, "--batch-size", 8]
    in_process(*flags, "--target-return", 0, "--output-dir", tmp_path / "reached")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, "one warning when the data's mean reaches R_target"
    assert "R_target = 0: Eq. 2's P term cannot lower alpha" in warnings[0], warnings[0]
    in_process(*flags, "--output-dir", tmp_path / "not-reached")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [], "no warning under the paper's R_target = 1.0"
