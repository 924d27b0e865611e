"""baselines/awac.py and baselines/balanced_replay.py: their mechanisms against numbers worked out
by hand, then each script end to end as a subprocess with tiny budgets on the test's own dataset."""

import csv
import importlib.util
import json
import math
import runpy
import sys

import pytest
import torch

import redq_adaptive_bc as main_script
from conftest import FixedActor, ROOT, hopper_episodes, make_minari_dataset, run_script


def load(name):
    """Import baselines/<name>.py as a module (baselines/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"baseline_{name}", ROOT / "baselines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # tyro resolves the Args annotations through sys.modules
    spec.loader.exec_module(module)
    return module


awac = load("awac")
br = load("balanced_replay")

AWAC = "baselines/awac.py"
BR = "baselines/balanced_replay.py"
# conftest's 400-step random dataset: 3 offline and 4 online evaluations, nets of 16 units.
SCHEDULE = ["--dataset", "random", "--random-dataset-steps", 400, "--offline-steps", 40, "--online-steps", 60,
            "--eval-every", 20, "--eval-episodes", 1, "--utd", 2, "--hidden-dim", 16, "--batch-size", 32]
AWAC_TINY = SCHEDULE + ["--actor-hidden-layers", 1]
BR_TINY = SCHEDULE + ["--ratio-hidden-dim", 16, "--ratio-batch-size", 32]


def read_progress(run_dir):
    with open(run_dir / "progress.csv", newline="") as f:
        return list(csv.DictReader(f))


def run_in_process(script, flags, datasets_path, monkeypatch, capsys):
    """Run a script's __main__ block in this process (for runs that must stop with an exit status)."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(datasets_path))
    monkeypatch.setattr(sys, "argv", [script, *map(str, flags)])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    captured = capsys.readouterr()
    return stopped.value.code, captured.err


def one_error_line(stderr):
    lines = stderr.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error: ")


# ---------------------------------------------------------------------------------------
# AWAC: advantage weights, V(s), the TD target, the actor loss
# ---------------------------------------------------------------------------------------
LN2 = math.log(2)


def test_awac_defaults_follow_the_papers_and_jaxrl():
    a = awac.parse_args([])
    assert (a.batch_size, a.lam, a.normalize_weights, a.max_weight) == (1024, 1.0, True, None)
    assert (a.num_critics, a.hidden_layers, a.actor_hidden_layers, a.hidden_dim, a.utd) == (2, 2, 4, 256, 1)
    assert (a.offline_steps, a.online_steps, a.eval_every, a.eval_episodes) == (1_000_000, 250_000, 5000, 10)
    assert (a.actor_weight_decay, a.log_std_min, a.log_std_max, a.num_action_samples) == (1e-4, -10.0, 2.0, 1)


def test_advantage_weights_are_exp_a_over_lambda_divided_by_the_batch_mean():
    # A = (0, ln 2, ln 4, -ln 2), lambda 1: exp(A) = (1, 2, 4, 0.5), batch mean 7.5 / 4 = 1.875
    # -> w = (1, 2, 4, 0.5) / 1.875 = (8/15, 16/15, 32/15, 4/15).
    adv = torch.tensor([0.0, LN2, 2 * LN2, -LN2])
    assert torch.allclose(awac.advantage_weights(adv, 1.0), torch.tensor([8, 16, 32, 4]) / 15, atol=1e-6)
    # lambda 2 halves the exponent: A = (0, 2 ln 2) -> exp(A/2) = (1, 2), mean 1.5 -> (2/3, 4/3).
    adv = torch.tensor([0.0, 2 * LN2])
    assert torch.allclose(awac.advantage_weights(adv, 2.0), torch.tensor([2 / 3, 4 / 3]), atol=1e-6)
    # Raw exp(A / lambda) without the normalization (the AWAC paper's equation).
    assert torch.allclose(awac.advantage_weights(torch.tensor([0.0, LN2]), 1.0, normalize=False),
                          torch.tensor([1.0, 2.0]), atol=1e-6)


def test_advantage_weights_clipping():
    adv = torch.tensor([0.0, LN2, 2 * LN2, -LN2])
    # Normalized weights (8/15, 16/15, 32/15, 4/15) clipped at 2: only 32/15 = 2.13 changes.
    clipped = awac.advantage_weights(adv, 1.0, max_weight=2.0)
    assert torch.allclose(clipped, torch.tensor([8 / 15, 16 / 15, 2.0, 4 / 15]), atol=1e-6)
    # Raw weights: exp(1000) overflows to inf and the clip brings it back: (1, 2, 4, inf) -> (1, 2, 3, 3).
    raw = awac.advantage_weights(torch.tensor([0.0, LN2, 2 * LN2, 1000.0]), 1.0, normalize=False, max_weight=3.0)
    assert torch.allclose(raw, torch.tensor([1.0, 2.0, 3.0, 3.0]), atol=1e-6)
    # jaxrl's guard: the normalized weights stay finite and within (0, B] however large A gets.
    w = awac.advantage_weights(torch.tensor([1000.0, 0.0, 0.0, 0.0]), 1.0)
    assert torch.isfinite(w).all() and w[0] == pytest.approx(4.0) and w[1:].max() < 1e-30


def two_critics(obs, actions):
    """Q_1(s, a) = sum(a), Q_2(s, a) = 2 sum(a), shape (2, B)."""
    return torch.stack([actions.sum(-1), 2 * actions.sum(-1)])


def test_state_value_averages_policy_samples_per_critic_then_takes_the_min():
    # State 0, samples a = -1 and 3: Q_1 mean (−1 + 3)/2 = 1, Q_2 mean (−2 + 6)/2 = 2 -> V = 1
    #   (the min per sample first would give mean(-2, 3) = 0.5).
    # State 1, samples 2 and 4: Q_1 mean 3, Q_2 mean 6 -> V = 3.
    policy_actions = torch.tensor([[[-1.0], [2.0]], [[3.0], [4.0]]])  # (K=2, B=2, 1)
    v = awac.state_value(two_critics, torch.zeros(2, 5), policy_actions)
    assert torch.allclose(v, torch.tensor([1.0, 3.0]))


class FixedSampler:
    """An actor whose distribution's sample() returns fixed actions."""

    def __init__(self, actions):
        self.actions = actions

    def distribution(self, obs):
        return type("Dist", (), {"sample": lambda _self, shape=(): self.actions.expand(*shape, *self.actions.shape)})()


def test_awac_td_target_samples_the_current_policy_and_takes_the_min_of_the_targets():
    # a' = (1, -1, 5): min(a', 2a') = (1, -2, 5); r = 1, gamma 0.9, the third transition terminal:
    # y = (1 + 0.9, 1 - 1.8, 1) = (1.9, -0.8, 1).
    batch = awac.Batch(torch.zeros(3, 2), torch.zeros(3, 1), torch.ones(3), torch.zeros(3, 2),
                       torch.tensor([0.0, 0.0, 1.0]))
    y = awac.td_target(batch, FixedSampler(torch.tensor([[1.0], [-1.0], [5.0]])), two_critics, gamma=0.9)
    assert torch.allclose(y, torch.tensor([1.9, -0.8, 1.0]))


def test_awac_actor_loss_is_the_advantage_weighted_log_likelihood():
    # A Gaussian actor with mean 0 and the smallest std e^-10: V(s) = Q(s, ~0) ~ 0, so with
    # Q_1 = Q_2 = a the advantages are the buffer actions themselves, (0, ln 2, 2 ln 2, -ln 2),
    # and the weights are (8, 16, 32, 4) / 15 as above.
    actor = awac.GaussianActor(3, 1, [-2.0], [2.0], hidden_dim=4, hidden_layers=0)
    with torch.no_grad():
        actor.mean.weight.zero_()
        actor.mean.bias.zero_()
        actor.log_std.fill_(-20.0)  # clipped to log_std_min = -10
    actions = torch.tensor([[0.0], [LN2], [2 * LN2], [-LN2]])
    batch = awac.Batch(torch.zeros(4, 3), actions, torch.zeros(4), torch.zeros(4, 3), torch.zeros(4))
    same_twice = lambda obs, a: torch.stack([a.sum(-1), a.sum(-1)])  # noqa: E731
    loss, weight_max, std = awac.actor_loss(actor, same_twice, batch, lam=1.0, normalize=True, max_weight=None,
                                            num_action_samples=1)
    sigma = 2 * math.exp(-10)  # the std is scaled to the action range [-2, 2]
    log_prob = torch.distributions.Normal(0.0, sigma).log_prob(actions[:, 0].double())
    expected = -(torch.tensor([8, 16, 32, 4], dtype=torch.float64) / 15 * log_prob).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-3)
    assert float(weight_max) == pytest.approx(32 / 15, rel=1e-3) and float(std) == pytest.approx(sigma, rel=1e-5)


# ---------------------------------------------------------------------------------------
# Balanced Replay: ensemble aggregation, density ratio, priorities, buffers
# ---------------------------------------------------------------------------------------
def test_balanced_replay_defaults():
    a = br.parse_args([])
    assert (a.num_groups, a.group_size, a.temperature, a.batch_size, a.alpha_online, a.utd) == (2, 5, 5.0, 256, 0.0, 1)
    assert (a.priority_min, a.priority_max, a.init_online_fraction, a.online_fraction_horizon) == (1e-3, 1e3, 0.5, 1000)


def test_pessimistic_ensemble_is_the_min_over_groups_of_the_mean_within_each():
    # Sample 0: group 1 = (1, 2, 3, 4, 5), mean 3; group 2 = (0, 0, 0, 0, 10), mean 2 -> 2
    #   (the min of all ten would be 0, their mean 2.5).
    # Sample 1: group 1 = (1, 1, 1, 1, 1), mean 1; group 2 = (4, 4, 4, 4, 4), mean 4 -> 1.
    q = torch.tensor([[1, 1], [2, 1], [3, 1], [4, 1], [5, 1], [0, 4], [0, 4], [0, 4], [0, 4], [10, 4]],
                     dtype=torch.float32)
    assert torch.equal(br.pessimistic_q(q, num_groups=2), torch.tensor([2.0, 1.0]))
    # Three groups of two: means (1.5, 0, 6) and (1, 4, 4) -> (0, 1).
    q3 = torch.tensor([[1, 1], [2, 1], [0, 4], [0, 4], [2, 4], [10, 4]], dtype=torch.float32)
    assert torch.equal(br.pessimistic_q(q3, num_groups=3), torch.tensor([0.0, 1.0]))


def test_balanced_replay_target_uses_the_pessimistic_ensemble():
    # Target critics (0, 0, 0, 0, 10 | 3, 3, 3, 3, 3): group means 2 and 3 -> Qp' = 2 for every sample
    # (Lee et al.'s min per pair, then mean, would give 0.6; the min of all ten 0).
    # r = (1, 1), gamma 0.5, the second terminal: y = (1 + 0.5 * 2, 1) = (2, 1).
    values = torch.tensor([0.0, 0, 0, 0, 10, 3, 3, 3, 3, 3])
    critic_target = lambda obs, a: values[:, None].expand(10, 2)  # noqa: E731
    batch = br.Batch(torch.zeros(2, 2), torch.zeros(2, 1), torch.ones(2), torch.zeros(2, 2), torch.tensor([0.0, 1.0]))
    y = br.td_target(batch, FixedActor(torch.zeros(2, 1)), critic_target, num_groups=2, gamma=0.5,
                     policy_noise=0.0, noise_clip=0.5)
    assert torch.equal(y, torch.tensor([2.0, 1.0]))


def test_priorities_are_tempered_self_normalized_density_ratios():
    # T = 5: 32^(1/5) = 2, 1e20^(1/5) = 1e4 -> clipped to 1e3, 0 -> clipped to 1e-3.
    w = torch.tensor([1.0, 32.0, 0.0, 1e20])
    p = br.ratio_priorities(w, torch.ones(4), temperature=5.0, priority_min=1e-3, priority_max=1e3)
    assert torch.allclose(p, torch.tensor([1.0, 2.0, 1e-3, 1e3]), rtol=1e-5)
    # Offline ratios of 32: their tempered mean is 2, which halves every priority.
    p = br.ratio_priorities(w, torch.full((4,), 32.0), temperature=5.0, priority_min=1e-3, priority_max=1e3)
    assert torch.allclose(p, torch.tensor([0.5, 1.0, 1e-3, 1e3]), rtol=1e-5)


def small_joint_buffer(num, obs_dim=2):
    buffer = br.PrioritizedReplayBuffer(num, obs_dim, 1, torch.device("cpu"))
    obs = torch.arange(num, dtype=torch.float32)[:, None].expand(num, obs_dim)  # obs = the slot number
    buffer.add(obs, torch.zeros(num, 1), torch.zeros(num), obs, torch.zeros(num), priority=1.0)
    return buffer


def test_a_transition_with_a_higher_density_ratio_is_drawn_more_often():
    # Ratios (1, 1, 1, 32) against offline ratios of 1 give priorities (1, 1, 1, 2): the last
    # transition should come up with probability 2/5 = 0.4, the others 0.2 each. 20,000 draws:
    # standard deviation of a share about 0.0035, so the 0.02 tolerances are over 5 sigma.
    buffer = small_joint_buffer(4)
    priorities = br.ratio_priorities(torch.tensor([1.0, 1.0, 1.0, 32.0]), torch.ones(4), 5.0, 1e-3, 1e3)
    buffer.update_priorities(torch.arange(4), priorities)
    torch.manual_seed(0)
    draws = []
    for _ in range(20):
        batch, idx = buffer.sample(1000)
        assert torch.equal(batch.obs[:, 0], idx.float())  # the batch holds the drawn slots
        draws.append(idx)
    shares = torch.bincount(torch.cat(draws), minlength=4).double() / 20_000
    assert abs(shares[3] - 0.4) < 0.02 and all(abs(shares[i] - 0.2) < 0.02 for i in range(3))
    assert shares[3] > 1.5 * shares[:3].max()


def test_online_transitions_enter_at_the_running_max_priority():
    # 400 offline transitions at priority 1; the first online priority 400 x 0.5 / (0.5 x 1000) = 0.4,
    # so 1000 online transitions hold 400 of a total 800: half the mass (f = 0.5 after N = 1000).
    assert br.initial_max_priority(400, 0.5, 1000) == pytest.approx(0.4)
    assert br.initial_max_priority(1_000_000, 0.5, 1000) == pytest.approx(1000.0)
    buffer = small_joint_buffer(400)
    joint = br.PrioritizedReplayBuffer(1400, 2, 1, torch.device("cpu"))
    joint.add(*buffer.data, priority=1.0)
    joint.max_priority.fill_(br.initial_max_priority(400, 0.5, 1000))
    joint.add(torch.zeros(1000, 2), torch.zeros(1000, 1), torch.zeros(1000), torch.zeros(1000, 2), torch.zeros(1000))
    p = joint.priorities
    assert float(p[400:].sum() / p.sum()) == pytest.approx(0.5, rel=1e-5)
    # An update above the running max raises it; the next online transition starts there.
    joint.update_priorities(torch.tensor([3, 5]), torch.tensor([7.0, 0.1]))
    assert (float(p[3]), float(p[5]), float(joint.max_priority)) == pytest.approx((7.0, 0.1, 7.0))


def test_ratio_loss_is_minimized_by_the_density_ratio():
    # Two states; offline data visit them 1:1, online data 4:1, so d_on / d_off = (0.8/0.5, 0.2/0.5) = (1.6, 0.4).
    log_w = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.Adam([log_w], lr=0.05)
    offline, online = torch.tensor([0, 1]), torch.tensor([0, 0, 0, 0, 1])
    for _ in range(1500):
        w = log_w.exp()
        loss = br.ratio_loss(w[offline], w[online])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.allclose(log_w.exp(), torch.tensor([1.6, 0.4]), atol=1e-2)


def test_buffer_memory_matches_the_hand_count():
    # Hopper: 11-dim observations, 3-dim actions: 4 x (11 + 3 + 1 + 11 + 1) = 108 bytes a transition;
    # 400 offline = 43,200; 60 online = 6,480; joint 460 x (108 + 4 for the priority) = 51,520.
    expected = {"offline": 43_200, "online": 6_480, "prioritized": 51_520, "total": 101_200}
    assert br.buffer_bytes(400, 60, 11, 3) == expected
    cpu = torch.device("cpu")
    assert br.ReplayBuffer(400, 11, 3, cpu).nbytes() == 43_200
    assert br.PrioritizedReplayBuffer(460, 11, 3, cpu).nbytes() == 51_520


# ---------------------------------------------------------------------------------------
# End to end: subprocesses with tiny budgets on the 400-step dataset built by conftest
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def awac_run(datasets_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("awac_runs")
    proc = run_script(AWAC, *AWAC_TINY, "--output-dir", out, datasets_path=datasets_path, cwd=out)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = out.iterdir()
    return run_dir, proc


@pytest.fixture(scope="module")
def br_run(datasets_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("br_runs")
    proc = run_script(BR, *BR_TINY, "--output-dir", out, datasets_path=datasets_path, cwd=out)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = out.iterdir()
    return run_dir, proc


def check_common_run_layout(run_dir, proc, method, extra_columns):
    assert run_dir.name.startswith(f"hopper-random-400steps__{method}__0__")
    assert {p.name for p in run_dir.iterdir()} == {"config.json", "progress.csv", "offline.pt", "final.pt"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == method and config["dataset_id"] == "local/hopper/random-400steps-v0"
    assert (config["env"], config["dataset"], config["env_id"], config["seed"]) == ("hopper", "random-400steps",
                                                                                    "Hopper-v5", 0)
    assert (config["ref_min_score"], config["ref_max_score"], config["ref_source"]) == (-20.272305, 3234.3, "D4RL table")
    assert {"torch", "gymnasium", "minari", "mujoco"} <= set(config["versions"])
    with open(run_dir / "progress.csv") as f:
        assert f.readline().strip().split(",") == main_script.COLUMNS + extra_columns
    rows = read_progress(run_dir)
    assert [(r["phase"], int(r["step"])) for r in rows] == [
        ("offline", 0), ("offline", 20), ("offline", 40), ("online", 0), ("online", 20), ("online", 40), ("online", 60)]
    assert all(float(r["critic_loss"]) > 0 and math.isfinite(float(r["actor_loss"])) for r in rows if int(r["step"]) > 0)
    assert proc.stdout.strip().splitlines()[-1].startswith("final normalized score")
    for name in ("offline.pt", "final.pt"):
        assert torch.load(run_dir / name, weights_only=True)["meta"]["method"] == method
    return config, rows


def test_awac_end_to_end(awac_run):
    run_dir, proc = awac_run
    config, rows = check_common_run_layout(run_dir, proc, "awac", ["weight_max", "policy_std"])
    assert config["batch_size"] == 32 and config["buffer_size"] == 460  # one buffer: 400 offline + 60 online
    assert all(r["alpha"] == "" for r in rows)  # AWAC has no BC weight
    for r in rows:
        if int(r["step"]) > 0:  # normalized weights lie in (0, B] with B = 32; the policy std is positive
            assert 0 < float(r["weight_max"]) <= 32 and float(r["policy_std"]) > 0


def test_balanced_replay_end_to_end(br_run):
    run_dir, proc = br_run
    config, rows = check_common_run_layout(run_dir, proc, "balanced_replay", ["online_fraction", "ratio_loss",
                                                                             "buffer_bytes"])
    assert config["buffer_capacity"] == {"offline": 400, "online": 60, "prioritized": 460}
    assert config["buffer_bytes"] == {"offline": 43_200, "online": 6_480, "prioritized": 51_520, "total": 101_200}
    assert "switch to online: replay buffers take" in proc.stderr
    offline_rows, online_rows = rows[:3], rows[3:]
    assert all(float(r["alpha"]) == 0.4 and int(r["buffer_bytes"]) == 43_200 for r in offline_rows)
    assert all(float(r["alpha"]) == 0.0 and int(r["buffer_bytes"]) == 101_200 for r in online_rows)
    fractions = [float(r["online_fraction"]) for r in online_rows[1:]]
    assert all(0 <= f <= 1 for f in fractions) and max(fractions) > 0
    assert all(math.isfinite(float(r["ratio_loss"])) for r in online_rows[1:])
    assert all(r["online_fraction"] == "" for r in offline_rows + online_rows[:1])


@pytest.mark.parametrize("script, tiny, run", [(AWAC, AWAC_TINY, "awac_run"), (BR, BR_TINY, "br_run")])
def test_load_offline_skips_pretraining(script, tiny, run, request, datasets_path, tmp_path):
    run_dir, _ = request.getfixturevalue(run)
    flags = list(tiny)
    flags[flags.index("--online-steps") + 1] = 20
    proc = run_script(script, *flags, "--load-offline", run_dir / "offline.pt", "--output-dir", tmp_path,
                      datasets_path=datasets_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (new_run,) = tmp_path.iterdir()
    assert [(r["phase"], int(r["step"])) for r in read_progress(new_run)] == [("online", 0), ("online", 20)]
    assert not (new_run / "offline.pt").exists() and (new_run / "final.pt").exists()
    # 40 small Adam steps from the loaded actor move it by at most ~40 x 3e-4; a fresh one differs by ~0.3.
    saved = torch.load(run_dir / "offline.pt", weights_only=True)["agent"]["actor"]
    final = torch.load(new_run / "final.pt", weights_only=True)["agent"]["actor"]
    drift = max((saved[k] - final[k]).abs().max().item() for k in saved if not k.startswith("action_"))
    assert drift < 0.05


def test_bad_input_as_a_user_sees_it(datasets_path, tmp_path, monkeypatch):
    # tyro draws its error box in ASCII when stderr cannot encode Unicode; the line must be the same.
    for script, flags, encoding, message in [
            (AWAC, ["--env", "pendulum"], "ascii", "error: invalid choice 'pendulum' for argument '--env'"),
            (BR, ["--num-group", "3"], "utf-8", "error: Unrecognized options: --num-group, 3"),
            (BR, ["--batch-size", "0"], "utf-8", "error: --batch-size must be positive, got 0")]:
        monkeypatch.setenv("PYTHONIOENCODING", encoding)
        proc = run_script(script, *SCHEDULE, *flags, "--output-dir", tmp_path / "runs",
                          datasets_path=datasets_path, cwd=tmp_path)
        assert proc.returncode == 2 and one_error_line(proc.stderr) and proc.stderr.startswith(message), proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script, flags, message", [
    (AWAC, ["--no-normalize-weights"], "--no-normalize-weights needs --max-weight"),
    (AWAC, ["--lam", "0"], "--lam must be a positive number"),
    (AWAC, ["--max-weight", "-1"], "--max-weight must be a positive number"),
    (AWAC, ["--buffer-size", "100"], "cannot hold the 400 transitions"),
    (AWAC, ["--load-offline", "missing.pt"], "no such file: missing.pt"),
    (BR, ["--init-online-fraction", "1"], "--init-online-fraction must be in (0, 1)"),
    (BR, ["--priority-min", "10", "--priority-max", "1"], "--priority-min must be below --priority-max"),
    (BR, ["--temperature", "0"], "--temperature must be a positive number"),
    (BR, ["--group-size", "0"], "--group-size must be positive"),
    (BR, ["--online-steps", 2 ** 24], "more than the 16777216 torch.multinomial can sample from"),
    (BR, ["--load-offline", "awac.pt"], "was written by method 'awac', not 'balanced_replay'"),
    (AWAC, ["--load-offline", "br.pt"], "was written by method 'balanced_replay', not 'awac'"),
])
def test_bad_input_is_one_line_and_exit_2(script, flags, message, awac_run, br_run, datasets_path, tmp_path,
                                          monkeypatch, capsys):
    (tmp_path / "awac.pt").write_bytes((awac_run[0] / "offline.pt").read_bytes())
    (tmp_path / "br.pt").write_bytes((br_run[0] / "offline.pt").read_bytes())
    monkeypatch.chdir(tmp_path)
    code, stderr = run_in_process(script, [*SCHEDULE, *flags, "--output-dir", tmp_path / "runs"], datasets_path,
                                  monkeypatch, capsys)
    assert code == 2 and one_error_line(stderr) and message in stderr, stderr
    assert not (tmp_path / "runs").exists()  # rejected before any work


@pytest.mark.parametrize("script", [AWAC, BR])
def test_non_finite_loss_stops_with_exit_1(script, tmp_path, monkeypatch, capsys):
    # Finite rewards whose squares overflow float32: the critic loss becomes inf.
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # MuJoCo writes MUJOCO_LOG.TXT into the working folder on NaN actions
    make_minari_dataset("local/hopper/huge-v0", hopper_episodes(4, 50, reward=1e30), env_id="Hopper-v5")
    flags = [f for f in SCHEDULE if f not in ("--dataset", "random")]
    code, stderr = run_in_process(script, ["--dataset-id", "local/hopper/huge-v0", *flags, "--output-dir",
                                           tmp_path / "runs"], tmp_path, monkeypatch, capsys)
    assert code == 1 and "became non-finite" in stderr and "offline step 20" in stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert len(read_progress(run_dir)) == 2  # the rows up to the failure are kept
    assert not (run_dir / "final.pt").exists() and not (run_dir / "offline.pt").exists()


# ---------------------------------------------------------------------------------------
# Resuming: killed twice with SIGKILL, resumed, and the same as an uninterrupted run
# ---------------------------------------------------------------------------------------
# Budgets that last a few seconds, so that polling latest.pt catches each phase.
RESUMABLE = ["--dataset", "random", "--random-dataset-steps", 400, "--offline-steps", 800, "--online-steps", 400,
             "--eval-every", 200, "--eval-episodes", 1, "--utd", 1, "--hidden-dim", 16, "--batch-size", 32,
             "--checkpoint-every", 100]
RESUMABLE_FLAGS = {AWAC: RESUMABLE + ["--actor-hidden-layers", 1],
                   BR: RESUMABLE + ["--ratio-hidden-dim", 16, "--ratio-batch-size", 32]}
FINAL_PARTS = {AWAC: ("actor", "critic", "critic_target"),
               BR: ("actor", "critic", "actor_target", "critic_target", "ratio")}


def kill_when(proc, run_parent, phase, min_step, timeout=120):
    """SIGKILL the run once its latest.pt is a checkpoint of phase at step >= min_step."""
    import time
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        for latest in run_parent.glob("*/latest.pt"):
            try:
                state = torch.load(latest, weights_only=True)
            except Exception:
                continue  # replaced while we read it
            if state["phase"] == phase and state["step"] >= min_step:
                proc.kill()
                proc.wait()
                return state["step"]
        time.sleep(0.05)
    raise AssertionError(f"the run ended before a {phase} checkpoint at step {min_step}")


def transitions(n, start=0, obs_dim=2, act_dim=1):
    x = torch.arange(start, start + n, dtype=torch.float32)
    return x[:, None].repeat(1, obs_dim), x[:, None].repeat(1, act_dim), x, x[:, None].repeat(1, obs_dim) + 0.5, x * 0


@pytest.mark.parametrize("online_steps", [2, 5, 9])  # no overwrite, part of the dataset overwritten, all of it
def test_awac_buffer_checkpoint_leaves_out_the_dataset_it_can_rebuild(online_steps):
    buffer = awac.ReplayBuffer(6, 2, 1, "cpu")
    buffer.add(*transitions(4))  # the dataset
    for step in range(online_steps):
        buffer.add(*(t[None] for t in transitions(1, start=100 + step)))
    state = buffer.state_dict(rebuilt=4)
    assert len(state["rewards"]) == min(4, max(0, 4 + online_steps - 6)) + min(online_steps, 2)
    rebuilt = awac.ReplayBuffer(6, 2, 1, "cpu")
    rebuilt.add(*transitions(4))
    rebuilt.load_state_dict(state)
    assert (rebuilt.ptr, rebuilt.size, rebuilt.added) == (buffer.ptr, buffer.size, buffer.added)
    for a, b in zip(buffer.data, rebuilt.data):
        assert torch.equal(a, b)


def test_balanced_replay_joint_buffer_checkpoint_keeps_priorities_and_running_max():
    joint = br.PrioritizedReplayBuffer(8, 2, 1, "cpu")
    joint.add(*transitions(3), priority=1.0)
    joint.max_priority.fill_(4.0)
    joint.add(*transitions(2, start=10))
    joint.update_priorities(torch.tensor([0, 4]), torch.tensor([7.0, 0.5]))
    state = joint.state_dict(transitions=False)
    assert "obs" not in state and torch.equal(state["priorities"], torch.tensor([7.0, 1, 1, 4, 0.5]))
    rebuilt = br.PrioritizedReplayBuffer(8, 2, 1, "cpu")
    rebuilt.add(*transitions(3), priority=1.0)
    rebuilt.add(*transitions(2, start=10))
    rebuilt.load_state_dict(state)
    assert (rebuilt.ptr, rebuilt.size, float(rebuilt.max_priority)) == (5, 5, 7.0)
    assert torch.equal(rebuilt.priorities, joint.priorities)
    full = br.PrioritizedReplayBuffer(8, 2, 1, "cpu")
    full.load_state_dict(joint.state_dict())
    for a, b in zip(joint.data, full.data):
        assert torch.equal(a, b)


@pytest.mark.parametrize("script", [AWAC, BR])
def test_killed_twice_and_resumed_run_ends_like_an_uninterrupted_one(script, datasets_path, tmp_path, monkeypatch,
                                                                     capsys):
    import os
    import subprocess

    env = {**os.environ, "MINARI_DATASETS_PATH": str(datasets_path), "OMP_NUM_THREADS": "1"}

    def start(*flags):
        return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, flags)], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    flags = RESUMABLE_FLAGS[script]
    killed = start(*flags, "--output-dir", tmp_path / "b")
    kill_when(killed, tmp_path / "b", "offline", 200)  # a real SIGKILL, mid pre-training
    reference = start(*flags, "--output-dir", tmp_path / "a")
    (run_b,) = (tmp_path / "b").iterdir()
    resumed = start("--resume", run_b)
    kill_when(resumed, tmp_path / "b", "online", 100)  # and again mid fine-tuning
    finished = start("--resume", run_b)
    out, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err
    assert "resuming offline step" in resumed.stderr.read() and "resuming online step" in err
    assert reference.wait(timeout=300) == 0
    (run_a,) = (tmp_path / "a").iterdir()
    assert not (run_b / "latest.pt").exists() and (run_b / "final.pt").exists()

    # Every evaluation row once, with the same numbers (timings aside).
    rows_a, rows_b = read_progress(run_a), read_progress(run_b)
    module = awac if script == AWAC else br
    same = [c for c in module.COLUMNS if c not in ("updates_per_s", "env_steps_per_s", "wall_s")]
    assert [(r["phase"], r["step"]) for r in rows_b] == [(r["phase"], r["step"]) for r in rows_a]
    assert len(rows_a) == 5 + 3  # offline 0..800 and online 0..400, every 200 steps
    assert [[r[c] for c in same] for r in rows_b] == [[r[c] for c in same] for r in rows_a]
    # And the same final networks and optimizer states, bit for bit (CPU, one thread).
    final_a = torch.load(run_a / "final.pt", weights_only=True)["agent"]
    final_b = torch.load(run_b / "final.pt", weights_only=True)["agent"]
    for part in FINAL_PARTS[script]:
        for key, value in final_a[part].items():
            assert torch.equal(value, final_b[part][key]), (part, key)
    for part in [name for name in final_a if name.endswith("_optim")]:
        for key, value in final_a[part]["state"].items():
            for name, tensor in value.items():
                assert torch.equal(tensor, final_b[part]["state"][key][name]), (part, key, name)

    # In this process, to save two interpreter starts: a finished run, and a folder that is no run.
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(datasets_path))
    capsys.readouterr()
    assert module.main(module.parse_args(["--resume", str(run_b)])) == run_b
    assert "finished already" in capsys.readouterr().err
    code, err = run_in_process(script, ["--resume", tmp_path], datasets_path, monkeypatch, capsys)
    assert code == 2 and one_error_line(err) and "is not a run folder" in err
    code, err = run_in_process(BR if script == AWAC else AWAC, ["--resume", run_b], datasets_path, monkeypatch, capsys)
    assert code == 2 and one_error_line(err) and f"is a run of {module.METHOD}" in err
