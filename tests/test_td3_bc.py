"""baselines/td3_bc.py: what differs from the main script, checked with hand-worked numbers, then the script run
end to end as a subprocess with tiny budgets (a run, --load-offline, resume after SIGKILL)."""

import functools
import json

import numpy as np
import pytest
import torch
from conftest import (
    BASELINE_CUT_EVALUATIONS,
    HOPPER_REF,
    FixedActor,
    assert_same_networks,
    check_a_stop_signal_during_an_evaluation,
    optimizer_steps,
    read_csv,
    run_script,
    signal_when,
    start_script,
)

import td3_bc
from plumbing.cli import UsageError, parse_args

# conftest's 400-step dataset; 3 offline and 2 online evaluations. Long enough (a few seconds) for the resume
# test to catch each phase's checkpoints: this run is also the uninterrupted run it compares with.
RUN = [
    "--dataset",
    "uniform-random",
    "--random-dataset-steps",
    400,
    "--offline-steps",
    400,
    "--online-steps",
    200,
    "--eval-every",
    200,
    "--eval-episodes",
    1,
    "--hidden-dim",
    16,
    "--batch-size",
    32,
    "--utd",
    2,
    "--checkpoint-every",
    50,
]

SCRIPT = "baselines/td3_bc.py"
start = functools.partial(start_script, SCRIPT)  # start(*flags, datasets_path=, cwd=)


# ---- Mechanisms ---------------------------------------------------------------------------------------------
def batch(rewards, terminals, actions):
    n = len(rewards)
    return td3_bc.Batch(torch.zeros(n, 2), actions, torch.tensor(rewards), torch.zeros(n, 2), torch.tensor(terminals))


def test_target_takes_the_min_of_both_critics():
    q_next = torch.tensor([[5.0, 1.0], [2.0, 6.0]])  # Q'_1 and Q'_2 on a batch of 2
    calls = []

    def critic_target(obs, action, critic_idx=None):
        calls.append(critic_idx)
        return q_next

    # min(5, 2) = 2 -> y1 = 1 + 0.9 x 2 = 2.8; min(1, 6) = 1 but terminal -> y2 = 0.5.
    y = td3_bc.td_target(
        batch([1.0, 0.5], [0.0, 1.0], torch.zeros(2, 1)),
        FixedActor(torch.zeros(2, 1)),
        critic_target,
        gamma=0.9,
        policy_noise=0.0,
        noise_clip=0.5,
    )
    assert torch.allclose(y, torch.tensor([2.8, 0.5]))
    assert calls == [None]  # both critics, no random subset
    agent = td3_bc.Agent(2, 1, np.array([-1.0]), np.array([1.0]), td3_bc.Args(hidden_dim=8), torch.device("cpu"))
    assert agent.critic(torch.zeros(4, 2), torch.zeros(4, 1)).shape == (2, 4)  # N = 2 in one batched module


def test_actor_follows_q1_alone_and_the_critic_loss_sums_both():
    q = torch.tensor([[1.0, 3.0], [100.0, -50.0]], requires_grad=True)  # Q_1, Q_2 on a batch of 2

    def critic(obs, action, critic_idx=None):
        return q if critic_idx is None else q[critic_idx]

    b = batch([0.0, 0.0], [0.0, 0.0], torch.tensor([[0.0], [0.5]]))
    # Q_1 = [1, 3]: -2 / 2 = -1; BC ((0.5)^2 + (-1)^2) / 2 = 0.625, x 0.4 = 0.25 -> -0.75.
    # (The ensemble mean [50.5, -23.5] of the main script would give -13.5 / 37 + 0.25 = -0.115.)
    loss = td3_bc.actor_loss(FixedActor(torch.tensor([[0.5], [-0.5]])), critic, b, alpha=0.4)
    assert loss.item() == pytest.approx(-0.75)
    loss.backward()
    assert torch.allclose(q.grad, torch.tensor([[-0.25, -0.25], [0.0, 0.0]]))  # -1 / (B mean|Q_1|); Q_2: none
    torch.manual_seed(0)  # with the real twin-critic module: the actor's gradient reaches critic 1 only
    ens = td3_bc.CriticEnsemble(2, 2, 1, hidden_dim=8)
    td3_bc.actor_loss(
        FixedActor(torch.zeros(4, 1)), ens, batch([0.0] * 4, [0.0] * 4, torch.zeros(4, 1)), alpha=0.4
    ).backward()
    assert ens.weights[-1].grad[0].abs().sum() > 0
    assert ens.weights[-1].grad[1].abs().sum() == 0
    # Critic loss: per-critic MSE to y = 0, summed: (1 + 9) / 2 + (10000 + 2500) / 2 = 6255.
    assert td3_bc.critic_loss(critic, b, torch.zeros(2))[0].item() == pytest.approx(6255.0)


def test_td3_ft_keeps_the_whole_dataset_and_fig4_keeps_five_percent():
    args = td3_bc.Args()
    assert (args.keep_ratio, args.alpha_online, args.utd) == (1.0, 0.0, 1)  # TD3-ft at TD3's G = 1
    buf = td3_bc.ReplayBuffer(1000, obs_dim=1, act_dim=1, device=torch.device("cpu"))
    rewards = np.arange(1000, dtype=np.float32)
    buf.add(rewards[:, None], rewards[:, None], rewards, rewards[:, None], np.zeros(1000))
    online = td3_bc.downsample(
        buf, 1000 + 250, args.keep_ratio, args.keep_min, args.keep_with_replacement, torch.Generator().manual_seed(0)
    )
    assert online.size == 1000
    assert sorted(online.data.rewards[:1000].tolist()) == rewards.tolist()
    assert torch.equal(online.data.obs[:1000, 0], online.data.rewards[:1000])  # rows stay whole transitions
    assert td3_bc.downsample(buf, 1250, 0.05, 0, False, torch.Generator().manual_seed(0)).size == 50
    assert td3_bc.num_kept(1000, 0.05, 50_000) == 1000
    assert td3_bc.num_kept(2_000_000, 0.05, 50_000) == 100_000


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--keep-ratio", "0"], "--keep-ratio must be in (0, 1]"),
        (["--alpha-online", "-0.1"], "--alpha-online must be non-negative"),
        (["--utd", "0"], "--utd must be positive"),
        (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
    ],
)
def test_bad_values(flags, message):
    with pytest.raises(UsageError) as e:
        td3_bc.check_args(parse_args(td3_bc.Args, td3_bc.METHOD, flags))
    assert str(e.value).startswith(message)


def test_no_ensemble_flags(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(td3_bc.Args, td3_bc.METHOD, ["--num-critics", "10"])
    assert e.value.code == 2
    assert "Unrecognized options: --num-critics" in capsys.readouterr().err


# ---- End to end ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def td3_run(datasets_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("td3_runs")
    proc = run_script("baselines/td3_bc.py", *RUN, "--output-dir", out / "a", datasets_path=datasets_path, cwd=out)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (out / "a").iterdir()
    return run_dir, proc


@pytest.mark.slow
def test_run_writes_its_folder(td3_run):
    run_dir, proc = td3_run
    assert run_dir.name.startswith("hopper-uniform-random-400steps__td3_bc__0__")
    assert {"config.json", "progress.csv", "episodes.csv", "offline.pt", "final.pt", "actor.pt"} <= {
        p.name for p in run_dir.iterdir()
    }
    assert not (run_dir / "latest.pt").exists()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == "td3_bc"
    assert config["dataset_id"] == "local/hopper/uniform-random-400steps-v0"
    assert (config["ref_min_score"], config["ref_max_score"]) == HOPPER_REF
    assert config["alpha_offline"] == 0.4
    # The whole 400-step dataset is kept, and the buffer holds it plus every online step.
    assert config["dataset_transitions"] == config["offline_kept"] == 400
    assert config["buffer_size"] == 600
    assert "kept 400 offline transitions, FIFO capacity 600" in proc.stderr
    with open(run_dir / "progress.csv") as f:
        assert f.readline().strip().split(",") == td3_bc.COLUMNS
    rows = read_csv(run_dir / "progress.csv")
    assert [(r["phase"], int(r["step"])) for r in rows] == [
        ("offline", 0),
        ("offline", 200),
        ("offline", 400),
        ("online", 0),
        ("online", 200),
    ]
    assert [float(r["alpha"]) for r in rows] == [0.4] * 3 + [0.0] * 2  # alpha_offline, then TD3-ft's 0
    assert all(float(r["critic_loss"]) > 0 for r in rows if int(r["step"]) > 0)
    assert proc.stdout.strip().splitlines()[-1].startswith("final normalized score")
    assert torch.load(run_dir / "actor.pt", weights_only=True)["meta"]["actor"]["kwargs"]["hidden_dim"] == 16


@pytest.mark.slow
def test_updates_per_env_step(td3_run):
    # Item 4 of issue 14, G: K + G x T critic steps, half of them actor steps (policy_freq 2).
    # 400 offline + 2 x 200 online = 800 critic steps, 400 actor steps; offline.pt holds the first 400 and 200.
    run_dir, _ = td3_run
    assert optimizer_steps(run_dir, "offline.pt") == (400, 200)
    assert optimizer_steps(run_dir) == (800, 400)


@pytest.mark.slow
def test_episodes_log_one_row_per_training_episode(td3_run):
    run_dir, _ = td3_run
    episodes = read_csv(run_dir / "episodes.csv")
    assert episodes
    assert list(episodes[0]) == ["step", "length", "return", "normalized_return"]
    # Episodes follow each other: each ends length steps after the previous one, within the 60 online steps.
    ends = [int(e["step"]) for e in episodes]
    assert ends == list(np.cumsum([int(e["length"]) for e in episodes]))
    assert ends[-1] <= 200
    for e in episodes:  # D4RL normalization x100: (return - ref_min) / (ref_max - ref_min) x 100
        expected = 100 * (float(e["return"]) - HOPPER_REF[0]) / (HOPPER_REF[1] - HOPPER_REF[0])
        assert float(e["normalized_return"]) == pytest.approx(expected, rel=1e-5)
    online = [r for r in read_csv(run_dir / "progress.csv") if r["phase"] == "online" and r["step"] != "0"]
    last = [
        max((e for e in episodes if int(e["step"]) <= int(r["step"])), key=lambda e: int(e["step"]), default=None)
        for r in online
    ]  # progress.csv repeats the latest finished episode's normalized return
    assert [r["episode_normalized_return"] for r in online] == [
        "" if e is None else e["normalized_return"] for e in last
    ]


@pytest.mark.slow
def test_fixed_alpha_and_downsampling_from_a_loaded_agent(td3_run, datasets_path, tmp_path):
    run_dir, _ = td3_run
    proc = run_script(
        "baselines/td3_bc.py",
        "--load-offline",
        run_dir,
        "--online-steps",
        60,
        "--eval-every",
        20,
        "--eval-episodes",
        1,
        "--batch-size",
        32,
        "--alpha-online",
        0.3,
        "--keep-ratio",
        0.05,
        "--keep-min",
        0,
        "--output-dir",
        tmp_path,
        datasets_path=datasets_path,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    (new_run,) = tmp_path.iterdir()
    rows = read_csv(new_run / "progress.csv")
    assert [r["phase"] for r in rows] == ["online"] * 4
    assert {float(r["alpha"]) for r in rows} == {0.3}
    config = json.loads((new_run / "config.json").read_text())  # dataset and networks come from the loaded run
    assert (config["dataset"], config["random_dataset_steps"], config["hidden_dim"]) == ("uniform-random", 400, 16)
    assert config["offline_kept"] == 20
    assert config["buffer_size"] == 80  # ceil(5% of 400), + 60 online
    assert config["pretrained_from"] == str(run_dir / "offline.pt")
    assert not (new_run / "offline.pt").exists()
    # The loaded optimizers continue: 400 + 1 x 60 critic steps (G = 1, the default), 200 + 30 actor steps.
    assert optimizer_steps(new_run) == (460, 230)


@pytest.mark.slow
def test_online_steps_0_pre_trains_only(datasets_path, tmp_path):
    """--online-steps 0 (a sweep's pre-training stage): offline.pt, final.pt and actor.pt, no online rows."""
    proc = run_script(
        "baselines/td3_bc.py",
        "--dataset",
        "uniform-random",
        "--random-dataset-steps",
        400,
        "--offline-steps",
        40,
        "--online-steps",
        0,
        "--eval-every",
        20,
        "--eval-episodes",
        1,
        "--hidden-dim",
        16,
        "--batch-size",
        32,
        "--output-dir",
        tmp_path,
        datasets_path=datasets_path,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = tmp_path.iterdir()
    assert {"offline.pt", "final.pt", "actor.pt"} <= {p.name for p in run_dir.iterdir()}
    assert [(r["phase"], r["step"]) for r in read_csv(run_dir / "progress.csv")] == [
        ("offline", "0"),
        ("offline", "20"),
        ("offline", "40"),
    ]
    assert not read_csv(run_dir / "episodes.csv")
    assert "switch to online" not in proc.stderr
    assert optimizer_steps(run_dir) == optimizer_steps(run_dir, "offline.pt") == (40, 20)


# ---- Resume after SIGKILL -----------------------------------------------------------------------------------
# The loss columns average the steps since the previous row, and a resumed process starts its average at the
# checkpoint: they are left out. Scores depend on every step before them.
COMPARED = [
    "phase",
    "step",
    "normalized_score",
    "normalized_score_std",
    "return_mean",
    "alpha",
    "episode_normalized_return",
]


@pytest.mark.slow
def test_killed_twice_and_resumed_ends_like_an_uninterrupted_run(td3_run, datasets_path, tmp_path):
    run_a, kw = td3_run[0], dict(datasets_path=datasets_path, cwd=tmp_path)
    signal_when(start(*RUN, "--output-dir", tmp_path, **kw), tmp_path, "offline", 100)  # a real SIGKILL
    (run_b,) = tmp_path.iterdir()
    signal_when(start("--resume", run_b, **kw), tmp_path, "online", 50)  # and again mid fine-tuning
    finished = start("--resume", run_b, **kw)
    _, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err
    rows_a, rows_b = read_csv(run_a / "progress.csv"), read_csv(run_b / "progress.csv")
    assert [[r[c] for c in COMPARED] for r in rows_b] == [[r[c] for c in COMPARED] for r in rows_a]
    assert read_csv(run_b / "episodes.csv") == read_csv(run_a / "episodes.csv")
    assert_same_networks(run_a, run_b, ("actor", "critic", "actor_target", "critic_target"))
    assert optimizer_steps(run_b) == (800, 400)


# ---- A stop signal during an evaluation ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("where", BASELINE_CUT_EVALUATIONS)
def test_a_stop_signal_during_an_evaluation_ends_it_and_resume_redoes_it(where, datasets_path, tmp_path):
    parts = ("actor", "critic", "actor_target", "critic_target")
    check_a_stop_signal_during_an_evaluation(
        SCRIPT, where, [], td3_bc.COLUMNS, parts, datasets_path=datasets_path, tmp_path=tmp_path
    )
