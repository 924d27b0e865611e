"""baselines/awac.py: the advantage weights, V(s), the target and the actor loss against numbers worked out by
hand, then the script end to end as a subprocess with tiny budgets (a run, --load-offline, resume after SIGKILL)."""

import functools
import json
import math

import pytest
import torch
from conftest import (
    BASELINE_CUT_EVALUATIONS,
    HOPPER_REF,
    TINY_BUDGETS,
    assert_same_networks,
    check_a_stop_signal_during_an_evaluation,
    hopper_episodes,
    make_minari_dataset,
    optimizer_steps,
    read_csv,
    run_script,
    signal_when,
    start_script,
)

import awac
from plumbing.cli import TrainingDiverged, UsageError, parse_args

SCRIPT = "baselines/awac.py"
# conftest's 400-step dataset: 3 offline and 4 online evaluations, nets of 16 units.
TINY = ["--dataset", "uniform-random", *TINY_BUDGETS, "--actor-hidden-layers", 1]
LN2 = math.log(2)

start = functools.partial(start_script, SCRIPT)  # start(*flags, datasets_path=, cwd=)


# ---- Mechanisms ---------------------------------------------------------------------------------------------
def test_defaults_follow_jaxrls_finetuning_config():
    a = parse_args(awac.Args, awac.METHOD, [])
    # examples/configs/awac_default.py:13, 23: a 4 x 256 actor and beta = 2.0; batch 1024 (the paper)
    assert (a.lam, a.batch_size, a.normalize_weights, a.max_weight) == (2.0, 1024, True, None)
    assert (a.num_critics, a.hidden_layers, a.actor_hidden_layers, a.hidden_dim, a.utd) == (2, 2, 4, 256, 1)
    assert (a.offline_steps, a.online_steps) == (1_000_000, 250_000)
    assert (a.eval_every, a.eval_episodes) == (None, None)  # run_main fills 5,000 and 10, or the pre-training's
    assert (a.actor_weight_decay, a.log_std_min, a.log_std_max, a.num_action_samples) == (1e-4, -10.0, 2.0, 1)


def test_advantage_weights_are_exp_a_over_lambda_divided_by_the_batch_mean():
    # lambda 2 (the default): A = (0, 2 ln 2, 4 ln 2, -2 ln 2) -> exp(A / 2) = (1, 2, 4, 0.5), batch mean
    # 7.5 / 4 = 1.875 -> w = (1, 2, 4, 0.5) / 1.875 = (8, 16, 32, 4) / 15.
    adv = torch.tensor([0.0, 2 * LN2, 4 * LN2, -2 * LN2])
    assert torch.allclose(awac.advantage_weights(adv, 2.0), torch.tensor([8, 16, 32, 4]) / 15, atol=1e-6)
    # The same advantages at lambda 1: exp(A) = (1, 4, 16, 0.25), mean 21.25 / 4 -> (16, 64, 256, 4) / 85:
    # the largest weight 3.01 against 2.13, the smallest 0.047 against 0.27, a sharper update.
    assert torch.allclose(awac.advantage_weights(adv, 1.0), torch.tensor([16, 64, 256, 4]) / 85, atol=1e-6)
    # Raw exp(A / lambda) without the normalization (the AWAC paper's equation): (1, 2) at lambda 2.
    assert torch.allclose(
        awac.advantage_weights(torch.tensor([0.0, 2 * LN2]), 2.0, normalize=False), torch.tensor([1.0, 2.0]), atol=1e-6
    )


def test_advantage_weights_clipping():
    adv = torch.tensor([0.0, LN2, 2 * LN2, -LN2])
    # lambda 1: normalized weights (8, 16, 32, 4) / 15 clipped at 2: only 32/15 = 2.13 changes.
    clipped = awac.advantage_weights(adv, 1.0, max_weight=2.0)
    assert torch.allclose(clipped, torch.tensor([8 / 15, 16 / 15, 2.0, 4 / 15]), atol=1e-6)
    # Raw weights: exp(1000) overflows to inf and the clip brings it back: (1, 2, 4, inf) -> (1, 2, 3, 3).
    raw = awac.advantage_weights(torch.tensor([0.0, LN2, 2 * LN2, 1000.0]), 1.0, normalize=False, max_weight=3.0)
    assert torch.allclose(raw, torch.tensor([1.0, 2.0, 3.0, 3.0]), atol=1e-6)
    # jaxrl's guard: the normalized weights stay finite and within (0, B] however large A gets.
    w = awac.advantage_weights(torch.tensor([1000.0, 0.0, 0.0, 0.0]), 1.0)
    assert torch.isfinite(w).all()
    assert w[0] == pytest.approx(4.0)
    assert w[1:].max() < 1e-30


def two_critics(obs, actions):
    """Q_1(s, a) = sum(a), Q_2(s, a) = 2 sum(a), shape (2, B)."""
    return torch.stack([actions.sum(-1), 2 * actions.sum(-1)])


def test_state_value_averages_policy_samples_per_critic_then_takes_the_min():
    # State 0, samples a = -1 and 3: Q_1 mean (-1 + 3) / 2 = 1, Q_2 mean (-2 + 6) / 2 = 2 -> V = 1
    #   (the min per sample first would give mean(-2, 3) = 0.5). State 1, samples 2 and 4: Q_1 mean 3 -> V = 3.
    policy_actions = torch.tensor([[[-1.0], [2.0]], [[3.0], [4.0]]])  # (K=2, B=2, 1)
    v = awac.state_value(two_critics, torch.zeros(2, 5), policy_actions)
    assert torch.allclose(v, torch.tensor([1.0, 3.0]))


class FixedSampler:
    """An actor whose distribution's sample() returns fixed actions."""

    def __init__(self, actions):
        self.actions = actions

    def distribution(self, obs):
        return type("Dist", (), {"sample": lambda _self, shape=(): self.actions.expand(*shape, *self.actions.shape)})()


def test_td_target_samples_the_current_policy_and_takes_the_min_of_the_targets():
    # a' = (1, -1, 5): min(a', 2a') = (1, -2, 5); r = 1, gamma 0.9, the third transition terminal:
    # y = (1 + 0.9, 1 - 1.8, 1) = (1.9, -0.8, 1).
    batch = awac.Batch(
        torch.zeros(3, 2), torch.zeros(3, 1), torch.ones(3), torch.zeros(3, 2), torch.tensor([0.0, 0.0, 1.0])
    )
    y = awac.td_target(batch, FixedSampler(torch.tensor([[1.0], [-1.0], [5.0]])), two_critics, gamma=0.9)
    assert torch.allclose(y, torch.tensor([1.9, -0.8, 1.0]))


def test_actor_loss_is_the_advantage_weighted_log_likelihood():
    # A Gaussian actor with mean 0 and the smallest std e^-10: V(s) = Q(s, ~0) ~ 0, so with Q_1 = Q_2 = a the
    # advantages are the buffer actions, (0, 2 ln 2, 4 ln 2, -2 ln 2), and at lambda 2 the weights are
    # (8, 16, 32, 4) / 15 as above.
    actor = awac.GaussianActor(3, 1, [-4.0], [4.0], hidden_dim=4, hidden_layers=0)
    with torch.no_grad():
        actor.mean.weight.zero_()
        actor.mean.bias.zero_()
        actor.log_std.fill_(-20.0)  # clipped to log_std_min = -10
    actions = torch.tensor([[0.0], [2 * LN2], [4 * LN2], [-2 * LN2]])
    batch = awac.Batch(torch.zeros(4, 3), actions, torch.zeros(4), torch.zeros(4, 3), torch.zeros(4))
    same_twice = lambda obs, a: torch.stack([a.sum(-1), a.sum(-1)])  # noqa: E731
    loss, weight_max, std = awac.actor_loss(
        actor, same_twice, batch, lam=2.0, normalize=True, max_weight=None, num_action_samples=1
    )
    sigma = 4 * math.exp(-10)  # the std is scaled to the action range [-4, 4]
    log_prob = torch.distributions.Normal(0.0, sigma).log_prob(actions[:, 0].double())
    expected = -(torch.tensor([8, 16, 32, 4], dtype=torch.float64) / 15 * log_prob).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-3)
    assert float(weight_max) == pytest.approx(32 / 15, rel=1e-3)
    assert float(std) == pytest.approx(sigma, rel=1e-5)


def transitions(n, start=0):
    x = torch.arange(start, start + n, dtype=torch.float32)
    return x[:, None].repeat(1, 2), x[:, None], x, x[:, None].repeat(1, 2) + 0.5, x * 0


@pytest.mark.parametrize("online_steps", [2, 5, 9])  # no overwrite, part of the dataset overwritten, all of it
def test_buffer_checkpoint_leaves_out_the_dataset_it_can_rebuild(online_steps):
    buffer = awac.ReplayBuffer(6, 2, 1, "cpu")
    buffer.add(*transitions(4))  # the dataset
    for step in range(online_steps):
        buffer.add(*(t[None] for t in transitions(1, start=100 + step)))
    state = buffer.state_dict(rebuilt=4)
    # Kept: the dataset slots the FIFO overwrote (4 + n - 6 of them, at most 4), and the online slots (at most 2).
    assert len(state["rewards"]) == min(4, max(0, 4 + online_steps - 6)) + min(online_steps, 2)
    rebuilt = awac.ReplayBuffer(6, 2, 1, "cpu")
    rebuilt.add(*transitions(4))
    rebuilt.load_state_dict(state)
    assert (rebuilt.ptr, rebuilt.size, rebuilt.added) == (buffer.ptr, buffer.size, buffer.added)
    for a, b in zip(buffer.data, rebuilt.data):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--no-normalize-weights"], "--no-normalize-weights needs --max-weight"),
        (["--lam", "0"], "--lam must be positive"),
        (["--max-weight", "-1"], "--max-weight must be positive"),
        (["--log-std-min", "3"], "--log-std-min must be below --log-std-max"),
        (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
    ],
)
def test_bad_values(flags, message):
    with pytest.raises(UsageError) as e:
        awac.check_args(parse_args(awac.Args, awac.METHOD, flags))
    assert str(e.value).startswith(message)


def test_buffer_too_small_for_the_dataset_and_a_diverging_loss(datasets_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MuJoCo writes MUJOCO_LOG.TXT into the working folder on NaN actions
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(datasets_path))
    args = parse_args(awac.Args, awac.METHOD, [*map(str, TINY), "--buffer-size", "100", "--output-dir", "runs"])
    with pytest.raises(UsageError, match="--buffer-size 100 cannot hold the 400 transitions"):
        awac.main(args)
    assert not (tmp_path / "runs").exists()  # rejected before any work
    # Finite rewards whose squares overflow float32: the critic loss becomes inf at the first row after it.
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    make_minari_dataset("local/hopper/huge-v0", hopper_episodes(4, 50, reward=1e30), env_id="Hopper-v5")
    flags = [str(f) for f in TINY if f not in ("--dataset", "uniform-random")]
    args = parse_args(awac.Args, awac.METHOD, ["--dataset-id", "local/hopper/huge-v0", *flags, "--output-dir", "runs"])
    with pytest.raises(TrainingDiverged, match="offline step 20"):
        awac.main(args)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert len(read_csv(run_dir / "progress.csv")) == 2  # the rows up to the failure are kept
    assert not (run_dir / "final.pt").exists()
    assert not (run_dir / "offline.pt").exists()


# ---- End to end ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def awac_run(datasets_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("awac_runs")
    proc = run_script(SCRIPT, *TINY, "--output-dir", out, datasets_path=datasets_path, cwd=out)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = out.iterdir()
    return run_dir, proc


@pytest.mark.slow
def test_run_writes_its_folder(awac_run):
    run_dir, proc = awac_run
    assert run_dir.name.startswith("hopper-uniform-random-400steps__awac__0__")
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.json",
        "progress.csv",
        "episodes.csv",
        "offline.pt",
        "final.pt",
        "actor.pt",
    }
    assert not (run_dir / "latest.pt").exists()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method"] == "awac"
    assert config["lam"] == 2.0
    assert config["buffer_size"] == 460
    assert config["dataset_transitions"] == 400  # one buffer: 400 + 60 online
    with open(run_dir / "progress.csv") as f:
        assert f.readline().strip().split(",") == awac.COLUMNS
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
    assert all(r["alpha"] == "" for r in rows)  # AWAC has no BC weight
    for r in rows:
        if int(r["step"]) > 0:  # normalized weights lie in (0, B] with B = 32; the policy std is positive
            assert float(r["critic_loss"]) > 0
            assert 0 < float(r["weight_max"]) <= 32
            assert float(r["policy_std"]) > 0
    assert optimizer_steps(run_dir) == (40 + 2 * 60, 40 + 2 * 60)  # G = 2; the actor steps with every update
    actor = torch.load(run_dir / "actor.pt", weights_only=True)
    assert actor["meta"]["actor"]["class"] == "GaussianActor"
    assert actor["meta"]["actor"]["kwargs"]["hidden_layers"] == 1
    assert proc.stdout.strip().splitlines()[-1].startswith("final normalized score")


@pytest.mark.slow
def test_episodes_log_one_row_per_training_episode(awac_run):
    episodes = read_csv(awac_run[0] / "episodes.csv")
    assert list(episodes[0]) == ["step", "length", "return", "normalized_return"]
    steps = [int(e["step"]) for e in episodes]
    assert steps == sorted(steps)
    assert sum(int(e["length"]) for e in episodes) == steps[-1] <= 60
    ref_min, ref_max = HOPPER_REF
    for e in episodes:
        expected = 100 * (float(e["return"]) - ref_min) / (ref_max - ref_min)
        assert float(e["normalized_return"]) == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_load_offline_skips_pretraining(awac_run, datasets_path, tmp_path):
    run_dir, _ = awac_run
    flags = [f for f in TINY if f not in ("--dataset", "uniform-random")]
    proc = run_script(
        SCRIPT, *flags, "--load-offline", run_dir, "--output-dir", tmp_path, datasets_path=datasets_path, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    (new_run,) = tmp_path.iterdir()
    assert [(r["phase"], int(r["step"])) for r in read_csv(new_run / "progress.csv")] == [
        ("online", 0),
        ("online", 20),
        ("online", 40),
        ("online", 60),
    ]
    assert not (new_run / "offline.pt").exists()
    assert json.loads((new_run / "config.json").read_text())["dataset"] == "uniform-random"  # taken from the loaded run
    # The loaded optimizers continue: 40 offline + 2 x 60 online Adam steps.
    assert optimizer_steps(new_run) == (160, 160)
    # Fine-tuning starts with the random streams the pre-training process ended with: the same run as the
    # fixture's, which went on in one process.
    scores = [r["normalized_score"] for r in read_csv(new_run / "progress.csv")]
    assert scores == [r["normalized_score"] for r in read_csv(run_dir / "progress.csv")][3:]


# ---- Resume after SIGKILL -----------------------------------------------------------------------------------
RESUMABLE = [
    "--dataset",
    "uniform-random",
    "--random-dataset-steps",
    400,
    "--offline-steps",
    600,
    "--online-steps",
    300,
    "--eval-every",
    150,
    "--eval-episodes",
    1,
    "--hidden-dim",
    16,
    "--batch-size",
    32,
    "--actor-hidden-layers",
    1,
    "--checkpoint-every",
    100,
]
# The loss columns average the steps since the previous row, and a resumed process starts its average at the
# checkpoint: they are left out. Scores depend on every step before them.
COMPARED = ["phase", "step", "normalized_score", "normalized_score_std", "return_mean", "episode_normalized_return"]


@pytest.mark.slow
def test_killed_twice_and_resumed_ends_like_an_uninterrupted_run(datasets_path, tmp_path):
    kw = dict(datasets_path=datasets_path, cwd=tmp_path)
    killed = start(*RESUMABLE, "--output-dir", tmp_path / "b", **kw)
    signal_when(killed, tmp_path / "b", "offline", 200)  # a real SIGKILL, mid pre-training
    reference = start(*RESUMABLE, "--output-dir", tmp_path / "a", **kw)
    (run_b,) = (tmp_path / "b").iterdir()
    signal_when(start("--resume", run_b, **kw), tmp_path / "b", "online", 100)  # and again mid fine-tuning
    finished = start("--resume", run_b, **kw)
    _, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err
    assert reference.wait(timeout=300) == 0
    (run_a,) = (tmp_path / "a").iterdir()
    rows_a, rows_b = read_csv(run_a / "progress.csv"), read_csv(run_b / "progress.csv")
    assert [r["phase"] for r in rows_b] == ["offline"] * 5 + ["online"] * 3
    assert [[r[c] for c in COMPARED] for r in rows_b] == [[r[c] for c in COMPARED] for r in rows_a]
    assert read_csv(run_b / "episodes.csv") == read_csv(run_a / "episodes.csv")
    assert_same_networks(run_a, run_b, ("actor", "critic", "critic_target"))
    assert optimizer_steps(run_b) == optimizer_steps(run_a) == (900, 900)


# ---- A stop signal during an evaluation ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("where", BASELINE_CUT_EVALUATIONS)
def test_a_stop_signal_during_an_evaluation_ends_it_and_resume_redoes_it(where, datasets_path, tmp_path):
    parts = ("actor", "critic", "critic_target")
    check_a_stop_signal_during_an_evaluation(
        SCRIPT, where, [], awac.COLUMNS, parts, datasets_path=datasets_path, tmp_path=tmp_path
    )
