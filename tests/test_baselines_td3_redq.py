"""baselines/td3_bc.py and baselines/redq.py: what differs from the main script, checked by hand-worked
numbers, then each script run end to end as a subprocess with tiny budgets, and the datasets that
redq.py exports loaded back with Minari and replayed through the environment."""

import csv
import json
import os
import subprocess
import sys
from dataclasses import fields

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import FixedActor, ROOT, TINY

sys.path.insert(0, str(ROOT / "baselines"))
import redq  # noqa: E402
import redq_adaptive_bc as m  # noqa: E402
import td3_bc  # noqa: E402

# Tiny budgets: 3 offline and 4 online evaluations for td3_bc; 4 evaluations for redq.
TD3_TINY = ["--offline-steps", 40, "--online-steps", 60, "--eval-every", 20, "--eval-episodes", 1,
            "--hidden-dim", 16, "--batch-size", 32, "--random-dataset-steps", 400]  # conftest's dataset
REDQ_TINY = ["--online-steps", 300, "--learning-starts", 100, "--eval-every", 100, "--eval-episodes", 1,
             "--utd", 2, "--num-critics", 3, "--hidden-dim", 16, "--batch-size", 32]


def run(script, *flags, datasets_path, cwd, prefix=(), timeout=300):
    """Run a script as a user would. One torch thread: on a shared 2-core machine two threads of tiny
    matrix multiplies can wait on each other a hundred times longer than they compute."""
    env = {**os.environ, "MINARI_DATASETS_PATH": str(datasets_path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, *prefix, str(ROOT / script), *map(str, flags)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def read_progress(run_dir):
    with open(run_dir / "progress.csv", newline="") as f:
        return list(csv.DictReader(f))


def one_error_line(proc):
    lines = proc.stderr.strip().splitlines()
    return proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")


# ---------------------------------------------------------------------------------------
# td3_bc.py: twin critics, min of both in the target, Q_1 in the actor, the whole dataset kept
# ---------------------------------------------------------------------------------------
def td3_batch(rewards, terminals, actions):
    n = len(rewards)
    return td3_bc.Batch(torch.zeros(n, 2), actions, torch.tensor(rewards), torch.zeros(n, 2), torch.tensor(terminals))


def test_td3_target_takes_the_min_of_both_critics():
    q_next = torch.tensor([[5.0, 1.0], [2.0, 6.0]])  # Q'_1 and Q'_2 on a batch of 2
    calls = []

    def critic_target(obs, action, critic_idx=None):
        calls.append(critic_idx)
        return q_next

    # min(5, 2) = 2 -> y1 = 1 + 0.9 x 2 = 2.8; min(1, 6) = 1 but terminal -> y2 = 0.5.
    y = td3_bc.td_target(td3_batch([1.0, 0.5], [0.0, 1.0], torch.zeros(2, 1)), FixedActor(torch.zeros(2, 1)),
                         critic_target, gamma=0.9, policy_noise=0.0, noise_clip=0.5)
    assert torch.allclose(y, torch.tensor([2.8, 0.5])) and calls == [None]  # both critics, no random subset
    agent = td3_bc.Agent(2, 1, np.array([-1.0]), np.array([1.0]), td3_bc.Args(hidden_dim=8), torch.device("cpu"))
    assert agent.critic(torch.zeros(4, 2), torch.zeros(4, 1)).shape == (2, 4)  # N = 2 in one batched module


def test_td3_actor_follows_q1_alone_and_critic_loss_sums_both():
    q = torch.tensor([[1.0, 3.0], [100.0, -50.0]], requires_grad=True)  # Q_1, Q_2 on a batch of 2

    def critic(obs, action, critic_idx=None):
        return q if critic_idx is None else q[critic_idx]

    b = td3_batch([0.0, 0.0], [0.0, 0.0], torch.tensor([[0.0], [0.5]]))
    # Q_1 = [1, 3]: -2 / 2 = -1; BC ((0.5)^2 + (-1)^2) / 2 = 0.625, x 0.4 = 0.25 -> -0.75.
    # (The ensemble mean [50.5, -23.5] of the main script would give -13.5 / 37 + 0.25 = -0.115.)
    loss = td3_bc.actor_loss(FixedActor(torch.tensor([[0.5], [-0.5]])), critic, b, alpha=0.4)
    assert loss.item() == pytest.approx(-0.75)
    loss.backward()
    assert torch.allclose(q.grad, torch.tensor([[-0.25, -0.25], [0.0, 0.0]]))  # -1 / (B mean|Q_1|); Q_2: none
    # With a real twin-critic module: the actor's gradient reaches critic 1's weights only.
    torch.manual_seed(0)
    ens = td3_bc.CriticEnsemble(2, 2, 1, hidden_dim=8)
    td3_bc.actor_loss(FixedActor(torch.zeros(4, 1)), ens, td3_batch([0.0] * 4, [0.0] * 4, torch.zeros(4, 1)),
                      alpha=0.4).backward()
    assert ens.weights[-1].grad[0].abs().sum() > 0 and ens.weights[-1].grad[1].abs().sum() == 0
    # Critic loss: per-critic MSE to y = 0 summed: (1 + 9) / 2 + (10000 + 2500) / 2 = 6255.
    loss_q, _ = td3_bc.critic_loss(critic, b, torch.zeros(2))
    assert loss_q.item() == pytest.approx(6255.0)


def test_td3_ft_keeps_the_whole_dataset():
    args = td3_bc.Args()
    assert (args.keep_ratio, args.alpha_online, args.utd) == (1.0, 0.0, 1)
    buf = td3_bc.ReplayBuffer(1000, obs_dim=1, act_dim=1, device=torch.device("cpu"))
    rewards = np.arange(1000, dtype=np.float32)
    buf.add(rewards[:, None], rewards[:, None], rewards, rewards[:, None], np.zeros(1000))
    online = td3_bc.downsample(buf, 1000 + 250, args.keep_ratio, args.keep_min, args.keep_with_replacement,
                               torch.Generator().manual_seed(0))
    assert len(online) == 1000 and sorted(online.data.rewards[:1000].tolist()) == rewards.tolist()
    assert torch.equal(online.data.obs[:1000, 0], online.data.rewards[:1000])  # rows stay whole transitions
    # Fig. 4's downsampled variant: 5%, no floor.
    assert len(td3_bc.downsample(buf, 1250, 0.05, 0, False, torch.Generator().manual_seed(0))) == 50


@pytest.fixture(scope="module")
def td3_run(datasets_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("td3_runs")
    proc = run("baselines/td3_bc.py", "--dataset", "random", *TD3_TINY, "--output-dir", out,
               datasets_path=datasets_path, cwd=out)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = out.iterdir()
    return run_dir, proc


def test_td3_bc_end_to_end(td3_run):
    run_dir, proc = td3_run
    assert run_dir.name.startswith("hopper-random-400steps__td3_bc__0__")
    assert {p.name for p in run_dir.iterdir()} == {"config.json", "progress.csv", "offline.pt", "final.pt"}
    config = json.loads((run_dir / "config.json").read_text())
    assert {f.name for f in fields(td3_bc.Args)} <= set(config)
    assert config["method"] == "td3_bc" and config["dataset_id"] == "local/hopper/random-400steps-v0"
    assert (config["env"], config["dataset"], config["env_id"]) == ("hopper", "random-400steps", "Hopper-v5")
    assert (config["ref_min_score"], config["ref_max_score"], config["ref_source"]) == (-20.272305, 3234.3, "D4RL table")
    assert {"torch", "minari", "gymnasium"} <= set(config["versions"])
    # The whole 400-step dataset is kept, and the buffer holds it plus every online step.
    assert config["dataset_transitions"] == config["offline_kept"] == 400 and config["buffer_size"] == 460
    assert "kept 400 offline transitions, FIFO capacity 460" in proc.stderr
    with open(run_dir / "progress.csv") as f:
        assert f.readline().strip().split(",") == m.COLUMNS  # plot.py reads every method the same way
    rows = read_progress(run_dir)
    assert [(r["phase"], int(r["step"])) for r in rows] == [
        ("offline", 0), ("offline", 20), ("offline", 40), ("online", 0), ("online", 20), ("online", 40), ("online", 60)]
    assert [float(r["alpha"]) for r in rows] == [0.4] * 3 + [0.0] * 4  # alpha_offline, then TD3-ft's 0
    assert all(float(r["critic_loss"]) > 0 for r in rows if int(r["step"]) > 0)
    assert proc.stdout.strip().splitlines()[-1].startswith("final normalized score")
    for name in ("offline.pt", "final.pt"):
        checkpoint = torch.load(run_dir / name, weights_only=True)
        assert checkpoint["meta"]["method"] == "td3_bc"
        assert checkpoint["agent"]["critic"]["weights.0"].shape[0] == 2


def test_td3_bc_fixed_alpha_and_downsampling_from_a_loaded_agent(td3_run, datasets_path, tmp_path):
    run_dir, _ = td3_run
    proc = run("baselines/td3_bc.py", "--dataset", "random", *TD3_TINY, "--load-offline", run_dir / "offline.pt",
               "--alpha-online", 0.3, "--keep-ratio", 0.05, "--keep-min", 0, "--output-dir", tmp_path,
               datasets_path=datasets_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (new_run,) = tmp_path.iterdir()
    rows = read_progress(new_run)
    assert [r["phase"] for r in rows] == ["online"] * 4 and {float(r["alpha"]) for r in rows} == {0.3}
    config = json.loads((new_run / "config.json").read_text())
    assert config["offline_kept"] == 20 and config["buffer_size"] == 80  # ceil(5% of 400), + 60 online
    assert not (new_run / "offline.pt").exists()


def test_td3_bc_bad_input(datasets_path, tmp_path):
    foreign = tmp_path / "main.pt"  # an offline.pt of the main script: 10 critics, another method
    torch.save({"meta": {"method": "redq_adaptive_bc", "env_id": "Hopper-v5", "obs_dim": 11, "act_dim": 3},
                "agent": {}}, foreign)
    proc = run("baselines/td3_bc.py", "--dataset", "random", *TD3_TINY, "--load-offline", foreign,
               "--output-dir", tmp_path / "runs", datasets_path=datasets_path, cwd=tmp_path)
    assert one_error_line(proc) and "written by redq_adaptive_bc, not td3_bc" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flags, message", [
    (["--keep-ratio", "0"], "--keep-ratio must be in (0, 1]"),
    (["--alpha-online", "-0.1"], "--alpha-online must be a non-negative number"),
    (["--utd", "0"], "--utd must be positive"),
])
def test_td3_bc_rejects_bad_values(flags, message):
    with pytest.raises(td3_bc.UsageError, match=message.replace("(", r"\(").replace("]", r"\]")):
        td3_bc.parse_args(flags)


def test_td3_bc_has_no_ensemble_flags(capsys):
    with pytest.raises(SystemExit) as e:
        td3_bc.parse_args(["--num-critics", "10"])
    # (One line on a UTF-8 stderr, as the subprocess tests check; pytest's capture makes tyro draw ASCII.)
    assert e.value.code == 2 and "Unrecognized options: --num-critics" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# redq.py: from scratch, uniform warm-up, the replay and rollout exports
# ---------------------------------------------------------------------------------------
def test_warm_up_actions_are_uniform_and_ignore_the_policy():
    class NoPolicy(nn.Module):
        def forward(self, obs):
            raise AssertionError("the policy was consulted during the warm-up")

    space = gym.spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32))
    space.seed(0)
    rng = np.random.default_rng(0)
    actions = np.array([redq.explore(NoPolicy(), np.zeros(3), step, 5000, space, 0.1, rng, "cpu")
                        for step in range(1, 5001)])
    # Uniform on [-2, 2] x [0, 1]: means 0 and 0.5, stds 4/sqrt(12) = 1.155 and 1/sqrt(12) = 0.289.
    assert np.allclose(actions.mean(0), [0.0, 0.5], atol=0.05)
    assert np.allclose(actions.std(0), [1.155, 0.289], atol=0.02)
    assert actions.min(0)[0] < -1.99 and actions.max(0)[0] > 1.99 and actions.min(0)[1] < 0.01
    # From step learning_starts + 1 on: pi(s) + noise, clipped to the box.
    pi = FixedActor(torch.tensor([[0.5, 0.9]]))
    assert np.allclose(redq.explore(pi, np.zeros(3), 5001, 5000, space, 0.0, rng, "cpu"), [0.5, 0.9])
    noisy = np.array([redq.explore(pi, np.zeros(3), 5001, 5000, space, np.array([0.1, 0.1]), rng, "cpu")
                      for _ in range(2000)])
    assert abs(noisy[:, 0].std() - 0.1) < 0.01 and noisy[:, 1].max() == 1.0  # 0.9 + noise clipped at 1


def test_redq_actor_maximizes_the_ensemble_mean_without_bc():
    q = torch.tensor([[1.0, 3.0], [3.0, 5.0]])  # 2 critics x batch of 2: Qbar = [2, 4]
    b = redq.Batch(torch.zeros(2, 2), torch.zeros(2, 1), torch.zeros(2), torch.zeros(2, 2), torch.zeros(2))
    assert redq.actor_loss(FixedActor(torch.ones(2, 1)), lambda obs, action: q, b).item() == pytest.approx(-3.0)


def test_trajectories_split_into_episodes_and_cut_the_last_one():
    space = gym.spaces.Box(-np.inf, np.inf, (1,), np.float64)
    traj = redq.Trajectories(6, space, gym.spaces.Box(-1, 1, (1,), np.float32))
    # Episode A: 0 -> 1 -> 2, terminates. Episode B: 10 -> 11 -> 12, time limit. Episode C: 20 -> 21, still running.
    for obs, next_obs, term, trunc in [(0, 1, 0, 0), (1, 2, 1, 0), (10, 11, 0, 0), (11, 12, 0, 1), (20, 21, 0, 0)]:
        traj.add([obs], [0.5], obs / 10, term, trunc, [next_obs])
    a, b, c = traj.episodes()
    assert a["observations"][:, 0].tolist() == [0, 1, 2] and b["observations"][:, 0].tolist() == [10, 11, 12]
    assert c["observations"][:, 0].tolist() == [20, 21] and b["rewards"].tolist() == [1.0, 1.1]
    assert (a["terminations"].tolist(), a["truncations"].tolist()) == ([False, True], [False, False])
    assert (b["terminations"].tolist(), b["truncations"].tolist()) == ([False, False], [False, True])
    assert (c["terminations"].tolist(), c["truncations"].tolist()) == ([False], [True])  # cut: a time-out
    assert not traj.truncations[4]  # the record itself is left as it was: training may go on


@pytest.fixture(scope="module")
def redq_run(tmp_path_factory):
    out, datasets = tmp_path_factory.mktemp("redq_runs"), tmp_path_factory.mktemp("redq_minari")
    proc = run("baselines/redq.py", *REDQ_TINY, "--export-replay", "local/hopper/medium-replay-v0",
               "--export-rollouts", "local/hopper/medium-v0", "--rollout-steps", 500, "--output-dir", out,
               datasets_path=datasets, cwd=out)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = out.iterdir()
    return run_dir, proc, datasets


def test_redq_from_scratch_end_to_end(redq_run):
    run_dir, proc, _ = redq_run
    assert run_dir.name.startswith("hopper-scratch__redq__0__")
    assert {p.name for p in run_dir.iterdir()} == {"config.json", "progress.csv", "final.pt"}
    config = json.loads((run_dir / "config.json").read_text())
    assert {f.name for f in fields(redq.Args)} <= set(config) and config["method"] == "redq"
    assert (config["dataset_id"], config["env_id"], config["env"], config["dataset"]) == (
        None, "Hopper-v5", "hopper", "scratch")
    assert (config["ref_min_score"], config["ref_max_score"], config["ref_source"]) == (-20.272305, 3234.3, "D4RL table")
    with open(run_dir / "progress.csv") as f:
        assert f.readline().strip().split(",") == m.COLUMNS
    rows = read_progress(run_dir)
    assert [(r["phase"], int(r["step"])) for r in rows] == [("online", s) for s in (0, 100, 200, 300)]
    assert all(r["alpha"] == "" for r in rows)  # no BC weight
    assert [r["critic_loss"] == "" for r in rows] == [True, True, False, False]  # no updates in the warm-up
    meta = torch.load(run_dir / "final.pt", weights_only=True)["meta"]
    assert meta["num_updates"] == (300 - 100) * 2 and meta["online_steps"] == 300
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
            assert np.array_equal(obs, ep.observations[t + 1]) and reward == ep.rewards[t]
            assert terminated == ep.terminations[t]
            if i < len(episodes) - 1 or t < len(ep.actions) - 1:
                assert truncated == ep.truncations[t]
    return episodes


def check_dataset(dataset_id, datasets, num_steps, seed, monkeypatch):
    import minari
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(datasets))
    ds = minari.load_dataset(dataset_id)
    assert ds.total_steps == num_steps and ds.spec.env_spec.id == "Hopper-v5"
    episodes = replay_through_env(ds, seed)
    assert sum(len(ep.rewards) for ep in episodes) == num_steps and len(episodes) == ds.total_episodes
    for ep in episodes[:-1]:  # each episode ends at its last step, by exactly one kind of end
        ends = ep.terminations | ep.truncations
        assert not ends[:-1].any() and ends[-1]
    last = episodes[-1]  # cut by the budget: a time-out, unless it happened to terminate on its last step
    assert last.terminations[-1] != last.truncations[-1]
    assert any(ep.terminations[-1] for ep in episodes)  # hopper falls: real terminations are kept
    assert np.allclose(minari.get_normalized_score(ds, np.array([-20.272305, 3234.3])), [0.0, 1.0])
    return episodes


def test_exported_replay_is_every_transition_the_agent_saw(redq_run, monkeypatch):
    episodes = check_dataset("local/hopper/medium-replay-v0", redq_run[2], 300, seed=0, monkeypatch=monkeypatch)
    actions = np.concatenate([ep.actions for ep in episodes])
    # The warm-up's uniform actions fill [-1, 1]; the untrained tiny policy's stay near its tanh output.
    assert actions[:100].std() > 0.5 and actions[:100].min() < -0.9 and actions[:100].max() > 0.9


def test_exported_rollouts_follow_the_final_policy(redq_run, monkeypatch):
    check_dataset("local/hopper/medium-v0", redq_run[2], 500, seed=200, monkeypatch=monkeypatch)
    assert [p.name for p in redq_run[2].iterdir() if p.name.startswith(".staging")] == []


def test_main_script_trains_on_the_exported_replay(redq_run, tmp_path):
    # --dataset medium-replay resolves to local/hopper/medium-replay-v0, which now exists.
    proc = run("redq_adaptive_bc.py", "--dataset", "medium-replay", *TINY, "--output-dir", tmp_path,
               datasets_path=redq_run[2], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = tmp_path.iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset_id"] == "local/hopper/medium-replay-v0" and config["dataset_transitions"] == 300
    assert config["ref_source"] == "dataset metadata" and config["env_id"] == "Hopper-v5"


NO_MINARI = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("minari imported:", "minari" in sys.modules)
"""


def test_redq_touches_no_dataset_and_stops_at_the_score(tmp_path):
    datasets = tmp_path / "minari"  # does not exist, and must not come to exist
    proc = run("baselines/redq.py", *REDQ_TINY, "--stop-at-score", -1e9, "--eval-every", 50,
               "--output-dir", tmp_path / "runs", datasets_path=datasets, cwd=tmp_path, prefix=("-c", NO_MINARI))
    assert proc.returncode == 0, proc.stderr
    assert "minari imported: False" in proc.stdout and not datasets.exists()
    (run_dir,) = (tmp_path / "runs").iterdir()
    # Step 0 never stops the run (nothing was trained); the first evaluation after it does.
    assert [int(r["step"]) for r in read_progress(run_dir)] == [0, 50]
    assert torch.load(run_dir / "final.pt", weights_only=True)["meta"]["online_steps"] == 50
    assert "stopping at step 50" in proc.stderr


def test_redq_refuses_to_overwrite_a_dataset_before_training(redq_run, tmp_path):
    proc = run("baselines/redq.py", *REDQ_TINY, "--export-rollouts", "local/hopper/medium-v0",
               "--output-dir", tmp_path / "runs", datasets_path=redq_run[2], cwd=tmp_path)
    assert one_error_line(proc) and "local/hopper/medium-v0 already exists" in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flags, message", [
    (["--export-replay", "hopper-medium-replay"], "is not a Minari dataset id"),
    (["--export-replay", "local/x-v0", "--export-rollouts", "local/x-v0"], "must name different datasets"),
    (["--learning-starts", "-1"], "--learning-starts must be non-negative"),
    (["--num-min-critics", "3", "--num-critics", "2"], "must be at most --num-critics"),
    (["--ref-min-score", "5000"], "reference scores must satisfy min < max"),
    (["--stop-at-score", "nan"], "--stop-at-score must be a finite number"),
])
def test_redq_rejects_bad_values(flags, message, tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with pytest.raises(redq.UsageError, match=message):
        redq.parse_args(flags)


def test_redq_has_no_dataset_flags(capsys):
    with pytest.raises(SystemExit) as e:
        redq.parse_args(["--dataset-id", "mujoco/hopper/medium-v0"])
    assert e.value.code == 2 and "Unrecognized options: --dataset-id" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Both scripts: resumable after a SIGKILL, bit for bit (as redq_adaptive_bc.py; see its RESUMABLE test)
# ---------------------------------------------------------------------------------------
# Budgets that last a few seconds, so that polling latest.pt can catch the phases before the run ends.
TD3_RESUMABLE = ["--dataset", "random", "--random-dataset-steps", 400, "--offline-steps", 900, "--online-steps", 500,
                 "--eval-every", 200, "--eval-episodes", 1, "--hidden-dim", 16, "--batch-size", 32,
                 "--checkpoint-every", 100]
# A long warm-up (uniform actions only: fast) so that a kill can land in it, then 600 steps with updates.
REDQ_RESUMABLE = ["--online-steps", 2100, "--learning-starts", 1500, "--eval-every", 300, "--eval-episodes", 1,
                  "--utd", 1, "--num-critics", 3, "--hidden-dim", 16, "--batch-size", 32, "--checkpoint-every", 50]
TIMINGS = ("updates_per_s", "env_steps_per_s", "wall_s")


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


def start(script, *flags, datasets_path, cwd):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(datasets_path), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / script), *map(str, flags)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_same_run(run_a, run_b):
    """The same progress.csv rows (timings aside) and the same final networks, bit for bit."""
    rows_a, rows_b = read_progress(run_a), read_progress(run_b)
    assert [(r["phase"], r["step"]) for r in rows_b] == [(r["phase"], r["step"]) for r in rows_a]
    same = [c for c in m.COLUMNS if c not in TIMINGS]
    assert [[r[c] for c in same] for r in rows_b] == [[r[c] for c in same] for r in rows_a]
    final_a = torch.load(run_a / "final.pt", weights_only=True)["agent"]
    final_b = torch.load(run_b / "final.pt", weights_only=True)["agent"]
    for part in ("actor", "critic", "actor_target", "critic_target"):
        for key, value in final_a[part].items():
            assert torch.equal(value, final_b[part][key]), (part, key)
    assert not (run_b / "latest.pt").exists() and (run_b / "final.pt").exists()


def test_td3_bc_killed_twice_and_resumed_ends_like_an_uninterrupted_run(datasets_path, tmp_path, monkeypatch,
                                                                        capsys):
    script = "baselines/td3_bc.py"
    kw = dict(datasets_path=datasets_path, cwd=tmp_path)
    killed = start(script, *TD3_RESUMABLE, "--output-dir", tmp_path / "b", **kw)
    kill_when(killed, tmp_path / "b", "offline", 300)  # a real SIGKILL, mid pre-training
    reference = start(script, *TD3_RESUMABLE, "--output-dir", tmp_path / "a", **kw)
    (run_b,) = (tmp_path / "b").iterdir()
    resumed = start(script, "--resume", run_b, **kw)
    kill_when(resumed, tmp_path / "b", "online", 150)  # and again mid fine-tuning
    finished = start(script, "--resume", run_b, **kw)
    _, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err
    assert "resuming online step" in err
    assert reference.wait(timeout=300) == 0
    (run_a,) = (tmp_path / "a").iterdir()
    assert_same_run(run_a, run_b)
    assert [r["phase"] for r in read_progress(run_b)] == ["offline"] * 6 + ["online"] * 4

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(datasets_path))
    capsys.readouterr()
    assert td3_bc.main(td3_bc.parse_args(["--resume", str(run_b)])) == run_b  # exit status 0
    assert "finished already" in capsys.readouterr().err
    bad = run(script, "--resume", tmp_path, **kw)
    assert one_error_line(bad) and "is not a run folder" in bad.stderr, bad.stderr


def test_redq_killed_in_and_after_the_warm_up_and_resumed_ends_like_an_uninterrupted_run(tmp_path, monkeypatch,
                                                                                          capsys):
    script, datasets = "baselines/redq.py", tmp_path / "minari"
    kw = dict(datasets_path=datasets, cwd=tmp_path)
    killed = start(script, *REDQ_RESUMABLE, "--export-replay", "local/hopper/b-v0", "--output-dir", tmp_path / "b",
                   **kw)
    # In the warm-up: the uniform actions come from the action space's RNG, which latest.pt holds too.
    assert kill_when(killed, tmp_path / "b", "online", 300) < 1500
    reference = start(script, *REDQ_RESUMABLE, "--export-replay", "local/hopper/a-v0", "--output-dir",
                      tmp_path / "a", **kw)
    (run_b,) = (tmp_path / "b").iterdir()
    resumed = start(script, "--resume", run_b, **kw)
    kill_when(resumed, tmp_path / "b", "online", 1700)  # and after it: gradient steps
    finished = start(script, "--resume", run_b, **kw)
    _, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err
    assert reference.wait(timeout=300) == 0
    (run_a,) = (tmp_path / "a").iterdir()
    assert_same_run(run_a, run_b)
    assert [int(r["step"]) for r in read_progress(run_b)] == list(range(0, 2101, 300))

    # The exported replay holds every step exactly once, the same as the uninterrupted run's.
    episodes_b = check_dataset("local/hopper/b-v0", datasets, 2100, seed=0, monkeypatch=monkeypatch)
    episodes_a = check_dataset("local/hopper/a-v0", datasets, 2100, seed=0, monkeypatch=monkeypatch)
    assert len(episodes_a) == len(episodes_b)
    for ep_a, ep_b in zip(episodes_a, episodes_b):
        for name in ("observations", "actions", "rewards", "terminations", "truncations"):
            assert np.array_equal(getattr(ep_a, name), getattr(ep_b, name)), name

    capsys.readouterr()  # its dataset exists now: no error for a finished run (exit status 0)
    assert redq.main(redq.parse_args(["--resume", str(run_b)])) == run_b
    assert "finished already" in capsys.readouterr().err
    bad = run(script, "--resume", tmp_path, **kw)
    assert one_error_line(bad) and "is not a run folder" in bad.stderr, bad.stderr
    with pytest.raises(td3_bc.UsageError, match="is a run of redq, not td3_bc"):
        td3_bc.parse_args(["--resume", str(run_b)])
