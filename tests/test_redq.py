"""baselines/redq.py: the warm-up, the actor update rate (issue 14, item 5) and the REDQ actor loss with
hand-worked numbers; then the script run end to end as a subprocess (a run that exports both datasets, loaded
back with Minari and replayed through the environment; --stop-at-score; resume after SIGKILL)."""

import functools
import json

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import (
    FixedActor,
    assert_same_networks,
    numbers,
    optimizer_steps,
    read_csv,
    run_script,
    run_to_the_end,
    signal_when,
    sigterm_during_an_evaluation,
    start_script,
)

import redq
from plumbing.cli import UsageError, parse_args
from plumbing.recording import EpisodeRecorder

# A long warm-up (uniform actions: fast) in which the resume test's kill lands, then 100 steps with updates at
# G = 3 and REDQ's actor rate. This run is also the uninterrupted run the resume test compares with.
RUN = [
    "--online-steps",
    900,
    "--learning-starts",
    800,
    "--eval-every",
    300,
    "--eval-episodes",
    1,
    "--utd",
    3,
    "--actor-update-rate",
    "per-env-step",
    "--num-critics",
    3,
    "--hidden-dim",
    16,
    "--batch-size",
    32,
    "--checkpoint-every",
    100,
    "--rollout-steps",
    300,
]

start = functools.partial(start_script, "baselines/redq.py")  # start(*flags, datasets_path=, cwd=)


# ---- Mechanisms ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "env_steps, utd, policy_freq, rate, expected",
    [
        (3, 20, 2, "policy-freq", 30),  # Table 1: every 2nd of 3 x 20 = 60 gradient steps -> 10 per env step
        (3, 20, 2, "per-env-step", 3),  # REDQ's code: one per env step, on the 20th gradient step
        (4, 3, 2, "policy-freq", 6),  # the count runs across env steps: updates 2, 4, ..., 12 of 12
        (4, 3, 2, "per-env-step", 4),
        (5, 1, 2, "per-env-step", 5),  # G = 1: every gradient step is an env step's last
    ],
)
def test_actor_updates_in_k_env_steps(env_steps, utd, policy_freq, rate, expected):
    due, n = [], 0
    for _ in range(env_steps):
        for g in range(utd):
            n += 1
            due.append(redq.actor_update_due(n, g, utd, rate, policy_freq))
    assert sum(due) == expected
    if rate == "per-env-step":  # on the last of each env step's G gradient steps (redq_sac.py:214)
        assert [i for i, d in enumerate(due) if d] == [k * utd + utd - 1 for k in range(env_steps)]


@pytest.mark.parametrize("rate, actor_steps", [("policy-freq", 6), ("per-env-step", 2)])
def test_the_agent_updates_its_actor_at_that_rate(rate, actor_steps):
    # 2 env steps at G = 6: 12 critic steps; the actor 12 / 2 = 6 times, or 2 times. With --delay-target-updates
    # the targets move on actor steps only, so they move as often as the actor.
    args = redq.Args(
        hidden_dim=8, num_critics=3, utd=6, batch_size=4, actor_update_rate=rate, delay_target_updates=True
    )
    torch.manual_seed(0)
    agent = redq.Agent(2, 1, np.array([-1.0]), np.array([1.0]), args, torch.device("cpu"))
    batch = redq.Batch(torch.randn(4, 2), torch.rand(4, 1), torch.randn(4), torch.randn(4, 2), torch.zeros(4))
    target_moves, actor_losses = 0, 0
    for _ in range(2):
        for g in range(args.utd):
            before = agent.actor_target.net[0].weight.clone()
            actor_losses += "actor_loss" in agent.update(batch, g)
            target_moves += not torch.equal(before, agent.actor_target.net[0].weight)
    assert optimizer_steps(agent.state_dict()) == (12, actor_steps)
    assert actor_losses == target_moves == actor_steps


def test_warm_up_actions_are_uniform_and_ignore_the_policy():
    class NoPolicy(nn.Module):
        def forward(self, obs):
            raise AssertionError("the policy was consulted during the warm-up")

    space = gym.spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32))
    space.seed(0)
    rng = np.random.default_rng(0)
    actions = np.array(
        [redq.explore(NoPolicy(), np.zeros(3), step, 5000, space, 0.1, rng, "cpu") for step in range(1, 5001)]
    )
    # Uniform on [-2, 2] x [0, 1]: means 0 and 0.5, stds 4/sqrt(12) = 1.155 and 1/sqrt(12) = 0.289.
    assert np.allclose(actions.mean(0), [0.0, 0.5], atol=0.05)
    assert np.allclose(actions.std(0), [1.155, 0.289], atol=0.02)
    assert actions.min(0)[0] < -1.99
    assert actions.max(0)[0] > 1.99
    assert actions.min(0)[1] < 0.01
    # From step learning_starts + 1 on: pi(s) + noise, clipped to the box.
    pi = FixedActor(torch.tensor([[0.5, 0.9]]))
    assert np.allclose(redq.explore(pi, np.zeros(3), 5001, 5000, space, 0.0, rng, "cpu"), [0.5, 0.9])
    noisy = np.array(
        [redq.explore(pi, np.zeros(3), 5001, 5000, space, np.array([0.1, 0.1]), rng, "cpu") for _ in range(2000)]
    )
    assert abs(noisy[:, 0].std() - 0.1) < 0.01
    assert noisy[:, 1].max() == 1.0  # 0.9 + noise clipped at 1


def test_actor_maximizes_the_ensemble_mean_without_bc():
    q = torch.tensor([[1.0, 3.0], [3.0, 5.0]])  # 2 critics x batch of 2: Qbar = [2, 4]
    b = redq.Batch(torch.zeros(2, 2), torch.zeros(2, 1), torch.zeros(2), torch.zeros(2, 2), torch.zeros(2))
    assert redq.actor_loss(FixedActor(torch.ones(2, 1)), lambda obs, action: q, b).item() == pytest.approx(-3.0)


def test_recorded_steps_split_into_episodes_and_the_last_one_is_cut():
    space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float64)
    record = EpisodeRecorder(6, space, gym.spaces.Box(-1, 1, (1,), np.float32))
    # Episode A: 0 -> 1 -> 2, terminates. Episode B: 10 -> 11 -> 12, time limit. Episode C: 20 -> 21, still running.
    for obs, next_obs, term, trunc in [(0, 1, 0, 0), (1, 2, 1, 0), (10, 11, 0, 0), (11, 12, 0, 1), (20, 21, 0, 0)]:
        record.add([obs], [0.5], obs / 10, term, trunc, [next_obs])
    a, b, c = record.episodes()
    assert a["observations"][:, 0].tolist() == [0, 1, 2]
    assert b["observations"][:, 0].tolist() == [10, 11, 12]
    assert c["observations"][:, 0].tolist() == [20, 21]
    assert b["rewards"].tolist() == [1.0, 1.1]
    assert (a["terminations"].tolist(), a["truncations"].tolist()) == ([False, True], [False, False])
    assert (b["terminations"].tolist(), b["truncations"].tolist()) == ([False, False], [False, True])
    assert (c["terminations"].tolist(), c["truncations"].tolist()) == ([False], [True])  # cut: a time-out
    assert not record.truncations[4]  # the record itself is left as it was: training may go on
    again = EpisodeRecorder(6, space, gym.spaces.Box(-1, 1, (1,), np.float32))
    again.load_state_dict(record.state_dict())  # what latest.pt holds
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(record.episodes(), again.episodes()) for k in x)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--export-replay", "hopper-medium-replay"], "--export-replay: dataset id 'hopper-medium-replay' is not"),
        (["--export-replay", "local/x-v0", "--export-rollouts", "local/x-v0"], "--export-replay and --export-rollouts"),
        (["--learning-starts", "-1"], "--learning-starts must be non-negative"),
        (["--num-min-critics", "3", "--num-critics", "2"], "--num-min-critics (M=3) must be at most --num-critics"),
        (["--ref-min-score", "5000"], "reference scores must satisfy min < max"),
        (["--stop-at-score", "nan"], "--stop-at-score must be finite"),
    ],
)
def test_bad_values(flags, message, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with pytest.raises(UsageError) as e:
        redq.check_args(parse_args(redq.Args, redq.METHOD, flags))
    assert str(e.value).startswith(message)


def test_refuses_to_overwrite_a_dataset_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    (tmp_path / "local" / "hopper" / "medium-v0").mkdir(parents=True)
    with pytest.raises(UsageError, match="--export-rollouts: dataset local/hopper/medium-v0 already exists"):
        redq.check_args(parse_args(redq.Args, redq.METHOD, ["--export-rollouts", "local/hopper/medium-v0"]))


@pytest.mark.parametrize("flag", ["--dataset-id", "--load-offline", "--random-dataset-steps"])
def test_no_dataset_flags(flag, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(redq.Args, redq.METHOD, [flag, "1"])
    assert e.value.code == 2
    assert f"Unrecognized options: {flag}" in capsys.readouterr().err


# ---- End to end, with both exports --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redq_run(tmp_path_factory):
    out, datasets = tmp_path_factory.mktemp("redq_runs"), tmp_path_factory.mktemp("redq_minari")
    proc = run_script(
        "baselines/redq.py",
        *RUN,
        "--export-replay",
        "local/hopper/medium-replay-v0",
        "--export-rollouts",
        "local/hopper/medium-v0",
        "--output-dir",
        out,
        datasets_path=datasets,
        cwd=out,
    )
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = out.iterdir()
    return run_dir, proc, datasets


@pytest.mark.slow
def test_run_from_scratch(redq_run):
    run_dir, proc, _ = redq_run
    assert run_dir.name.startswith("hopper-scratch__redq__0__")
    assert {"config.json", "progress.csv", "episodes.csv", "final.pt", "actor.pt"} <= {
        p.name for p in run_dir.iterdir()
    }
    assert not (run_dir / "offline.pt").exists()
    assert not (run_dir / "latest.pt").exists()
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["method"], config["dataset_id"], config["env_id"], config["dataset"]) == (
        "redq",
        None,
        "Hopper-v5",
        "scratch",
    )
    assert (config["ref_min_score"], config["ref_max_score"], config["ref_source"]) == (
        -20.272305,
        3234.3,
        "D4RL table",
    )
    with open(run_dir / "progress.csv") as f:
        assert f.readline().strip().split(",") == redq.COLUMNS
    rows = read_csv(run_dir / "progress.csv")
    assert [(r["phase"], int(r["step"])) for r in rows] == [("online", s) for s in (0, 300, 600, 900)]
    assert all(r["alpha"] == "" for r in rows)  # no BC weight
    assert [r["critic_loss"] == "" for r in rows] == [True] * 3 + [False]  # no updates in the warm-up
    # Item 5 of issue 14: 100 env steps after the warm-up at G = 3: 300 critic steps; one actor step per env step
    # (at the default rate, every 2nd gradient step: 150).
    assert optimizer_steps(run_dir) == (300, 100)
    episodes = read_csv(run_dir / "episodes.csv")
    assert [int(e["step"]) for e in episodes] == list(np.cumsum([int(e["length"]) for e in episodes]))
    assert proc.stdout.strip().splitlines()[-1].startswith("final normalized score")


def replay_through_env(dataset, seed):
    """Step a fresh env with the dataset's actions, episode after episode, as the script did: the
    observations, rewards and end flags must be what the env gives. Returns the episodes."""
    env = gym.make("Hopper-v5")
    episodes = list(dataset.iterate_episodes())
    for i, ep in enumerate(episodes):
        obs, _ = env.reset(seed=seed if i == 0 else None)
        assert np.array_equal(obs, ep.observations[0])
        assert len(ep.observations) == len(ep.actions) + 1 == len(ep.rewards) + 1
        for t, action in enumerate(ep.actions):
            obs, reward, terminated, truncated, _ = env.step(action)
            assert np.array_equal(obs, ep.observations[t + 1])
            assert reward == ep.rewards[t]
            assert terminated == ep.terminations[t]
            if i < len(episodes) - 1 or t < len(ep.actions) - 1:
                assert truncated == ep.truncations[t]
    return episodes


def check_dataset(dataset_id, datasets, num_steps, seed, monkeypatch):
    import minari

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(datasets))
    ds = minari.load_dataset(dataset_id)
    assert ds.total_steps == num_steps
    assert ds.spec.env_spec.id == "Hopper-v5"
    episodes = replay_through_env(ds, seed)
    assert sum(len(ep.rewards) for ep in episodes) == num_steps
    assert len(episodes) == ds.total_episodes
    for ep in episodes[:-1]:  # each episode ends at its last step, by exactly one kind of end
        ends = ep.terminations | ep.truncations
        assert not ends[:-1].any()
        assert ends[-1]
    last = episodes[-1]  # cut by the budget: a time-out, unless it happened to terminate on its last step
    assert last.terminations[-1] != last.truncations[-1]
    assert any(ep.terminations[-1] for ep in episodes)  # hopper falls: real terminations are kept
    assert np.allclose(minari.get_normalized_score(ds, np.array([-20.272305, 3234.3])), [0.0, 1.0])
    return episodes


@pytest.mark.slow
def test_exported_replay_is_every_transition_the_agent_saw(redq_run, monkeypatch):
    episodes = check_dataset("local/hopper/medium-replay-v0", redq_run[2], 900, seed=0, monkeypatch=monkeypatch)
    actions = np.concatenate([ep.actions for ep in episodes])
    # The warm-up's uniform actions fill [-1, 1]; the untrained tiny policy's stay near its tanh output.
    assert actions[:800].std() > 0.5
    assert actions[:800].min() < -0.99
    assert actions[:800].max() > 0.99
    logged = read_csv(redq_run[0] / "episodes.csv")  # episodes.csv has the finished ones, in the same order
    assert [float(e["return"]) for e in logged] == pytest.approx(
        [float(ep.rewards.sum()) for ep in episodes[: len(logged)]], rel=1e-5
    )


@pytest.mark.slow
def test_exported_rollouts_follow_the_final_policy(redq_run, monkeypatch):
    check_dataset("local/hopper/medium-v0", redq_run[2], 300, seed=200, monkeypatch=monkeypatch)
    assert [p.name for p in redq_run[2].iterdir() if p.name.startswith(".staging")] == []


@pytest.mark.slow
def test_stops_at_the_score_and_reads_no_dataset(tmp_path):
    datasets = tmp_path / "minari"  # does not exist, and must not come to exist
    proc = run_script(
        "baselines/redq.py",
        "--online-steps",
        300,
        "--learning-starts",
        100,
        "--eval-every",
        50,
        "--eval-episodes",
        1,
        "--hidden-dim",
        16,
        "--stop-at-score",
        -1e9,
        "--output-dir",
        tmp_path / "runs",
        datasets_path=datasets,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert not datasets.exists()
    (run_dir,) = (tmp_path / "runs").iterdir()
    # Step 0 never stops the run (nothing was trained); the first evaluation after it does.
    assert [int(r["step"]) for r in read_csv(run_dir / "progress.csv")] == [0, 50]
    assert "stopping at step 50" in proc.stderr
    assert (run_dir / "final.pt").exists()


# ---- Resume after SIGKILL -----------------------------------------------------------------------------------
# The loss columns average the steps since the previous row, and a resumed process starts its average at the
# checkpoint: they are left out. Scores depend on every step before them.
COMPARED = ["phase", "step", "normalized_score", "normalized_score_std", "return_mean", "episode_normalized_return"]


@pytest.mark.slow
def test_killed_in_the_warm_up_and_resumed_ends_like_an_uninterrupted_run(redq_run, tmp_path, monkeypatch):
    run_a, _, datasets = redq_run
    kw = dict(datasets_path=datasets, cwd=tmp_path)
    killed = start(
        *RUN,
        "--export-replay",
        "local/hopper/b-v0",
        "--export-rollouts",
        "local/hopper/b-rollouts-v0",
        "--output-dir",
        tmp_path,
        **kw,
    )
    # In the warm-up: the uniform actions come from the action space's RNG, which latest.pt holds too.
    assert signal_when(killed, tmp_path, None, 200)[0] < 800
    (run_b,) = tmp_path.iterdir()
    finished = start("--resume", run_b, **kw)
    _, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err
    rows_a, rows_b = read_csv(run_a / "progress.csv"), read_csv(run_b / "progress.csv")
    assert [[r[c] for c in COMPARED] for r in rows_b] == [[r[c] for c in COMPARED] for r in rows_a]
    assert read_csv(run_b / "episodes.csv") == read_csv(run_a / "episodes.csv")
    assert_same_networks(run_a, run_b, ("actor", "critic", "actor_target", "critic_target"))
    # The exported replay holds every step exactly once, the same as the uninterrupted run's.
    episodes_b = check_dataset("local/hopper/b-v0", datasets, 900, seed=0, monkeypatch=monkeypatch)
    episodes_a = check_dataset("local/hopper/medium-replay-v0", datasets, 900, seed=0, monkeypatch=monkeypatch)
    assert len(episodes_a) == len(episodes_b)
    for ep_a, ep_b in zip(episodes_a, episodes_b):
        for name in ("observations", "actions", "rewards", "terminations", "truncations"):
            assert np.array_equal(getattr(ep_a, name), getattr(ep_b, name)), name


# ---- A stop signal during an evaluation ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_stop_signal_during_an_evaluation_ends_it_and_resume_redoes_it(tmp_path):
    # REDQ has no pre-training, and a stop signal cuts the training episode under way, so the evaluation cut here
    # is the one at the end of the first training episode (step s): resuming there cuts nothing. A first run
    # finds s (the evaluations touch no training random stream, so s does not depend on them).
    flags = ["--learning-starts", 5, "--utd", 2, "--num-critics", 3, "--hidden-dim", 16, "--batch-size", 32]
    flags += ["--buffer-size", 200]
    kw = dict(datasets_path=tmp_path / "datasets", cwd=tmp_path)
    probe = start(*flags, "--online-steps", 200, "--eval-every", 200, "--eval-episodes", 1, "--output-dir", "p", **kw)
    _, err = probe.communicate(timeout=300)
    assert probe.returncode == 0, err
    s = int(read_csv(next((tmp_path / "p").iterdir()) / "episodes.csv")[0]["step"])
    # Evaluations of 150 episodes at steps 0, s and 2s: a SIGTERM sent just after the first training episode's
    # row lands in the evaluation at step s (latest.pt says which).
    flags += ["--online-steps", 2 * s, "--eval-every", s, "--eval-episodes", 150]
    run_b, state = sigterm_during_an_evaluation("baselines/redq.py", flags, tmp_path / "b", "episodes.csv", 1, **kw)
    assert state["evaluation_due"], "latest.pt marks the cut evaluation as due"
    assert state["step"] == s, "the state saved is the one before the evaluation at step s"
    assert len(read_csv(run_b / "progress.csv")) == 1, "the cut evaluation wrote no row"
    run_to_the_end("baselines/redq.py", "--resume", run_b, **kw)
    run_to_the_end("baselines/redq.py", *flags, "--output-dir", tmp_path / "a", **kw)
    (run_a,) = (tmp_path / "a").iterdir()
    assert [r["step"] for r in read_csv(run_b / "progress.csv")] == ["0", str(s), str(2 * s)]
    assert numbers(run_b, redq.COLUMNS) == numbers(run_a, redq.COLUMNS), "same numbers"
    assert read_csv(run_b / "episodes.csv") == read_csv(run_a / "episodes.csv")
    assert_same_networks(run_a, run_b, ("actor", "critic", "actor_target", "critic_target"))
