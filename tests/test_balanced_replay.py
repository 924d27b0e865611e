"""baselines/balanced_replay.py: the ensemble (the paper's group means and Lee et al.'s per-pair targets), the
density ratio, the priorities, the buffers and the update schedule against numbers worked out by hand, then the
script end to end as a subprocess with tiny budgets (a run, --load-offline, resume after SIGKILL)."""

import functools
import json
import math

import pytest
import torch
from conftest import (
    BASELINE_CUT_EVALUATIONS,
    TINY_BUDGETS,
    FixedActor,
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

import balanced_replay as br
from plumbing.cli import TrainingDiverged, UsageError, parse_args

SCRIPT = "baselines/balanced_replay.py"
# conftest's 400-step dataset: 3 offline and 4 online evaluations, nets of 16 units.
TINY = ["--dataset", "uniform-random", *TINY_BUDGETS, "--ratio-hidden-dim", 16, "--ratio-batch-size", 32]
PARTS = ("critic", "actor", "ratio")  # the parts with an optimizer

start = functools.partial(start_script, SCRIPT)  # start(*flags, datasets_path=, cwd=)


def args_with(*flags):
    return parse_args(br.Args, br.METHOD, list(map(str, flags)))


# ---- The ensemble -------------------------------------------------------------------------------------------
def test_defaults():
    a = args_with()
    assert (a.num_groups, a.group_size, a.ensemble, a.temperature, a.batch_size, a.alpha_online, a.utd) == (
        2,
        5,
        "group-means",
        5.0,
        256,
        0.0,
        1,
    )
    assert (a.update_schedule, a.block_steps, a.first_block_multiplier) == ("every-step", 1000, 10)
    assert (a.priority_min, a.priority_max, a.init_online_fraction, a.online_fraction_horizon) == (1e-3, 1e3, 0.5, 1000)


# Ten critics, two samples. Sample 0: group 1 = (1, 2, 3, 4, 5), group 2 = (0, 0, 0, 0, 10);
# sample 1: group 1 all 1, group 2 all 4.
Q = torch.tensor([[1, 1], [2, 1], [3, 1], [4, 1], [5, 1], [0, 4], [0, 4], [0, 4], [0, 4], [10, 4]], dtype=torch.float32)


def test_the_papers_ensemble_is_the_min_over_groups_of_the_mean_within_each():
    # Sample 0: means 3 and 2 -> 2 (the min of all ten would be 0, their mean 2.5); sample 1: means 1 and 4 -> 1.
    assert torch.equal(br.pessimistic_q(Q, num_groups=2), torch.tensor([2.0, 1.0]))
    # Three groups of two: means (1.5, 0, 6) and (1, 4, 4) -> (0, 1).
    q3 = torch.tensor([[1, 1], [2, 1], [0, 4], [0, 4], [2, 4], [10, 4]], dtype=torch.float32)
    assert torch.equal(br.pessimistic_q(q3, num_groups=3), torch.tensor([0.0, 1.0]))


def test_lee_et_als_ensemble_is_the_min_of_each_pair():
    # Pairs (Q_1i, Q_2i) of sample 0: (1, 0), (2, 0), (3, 0), (4, 0), (5, 10) -> (0, 0, 0, 0, 5), mean 1;
    # sample 1: (1, 4) five times -> 1 each.
    assert torch.equal(br.pairwise_min(Q, num_groups=2), torch.tensor([[0.0, 1], [0, 1], [0, 1], [0, 1], [5, 1]]))


def test_per_pair_aggregation_is_more_pessimistic_under_critic_noise():
    # With i.i.d. N(0, 1) noise on ten critics: E[min of two means of 5] = -1 / sqrt(5 pi) = -0.252 and
    # E[mean of five minima of 2] = -1 / sqrt(pi) = -0.564 (E min of two N(0, s^2) = -s / sqrt(pi)).
    # 200,000 samples: standard errors about 0.001 and 0.0013, so 0.01 is over 7 of them.
    noise = torch.randn(10, 200_000, generator=torch.Generator().manual_seed(0))
    assert br.pessimistic_q(noise, 2).mean().item() == pytest.approx(-1 / math.sqrt(5 * math.pi), abs=0.01)
    assert br.pairwise_min(noise, 2).mean().item() == pytest.approx(-1 / math.sqrt(math.pi), abs=0.01)


def target_batch():
    # r = (1, 1), gamma 0.5, the second transition terminal; target critics constant in (s', a').
    return br.Batch(torch.zeros(2, 2), torch.zeros(2, 1), torch.ones(2), torch.zeros(2, 2), torch.tensor([0.0, 1.0]))


TARGET_Q = torch.tensor([0.0, 0, 0, 0, 10, 3, 3, 3, 3, 3])[:, None].expand(10, 2)  # (0, 0, 0, 0, 10 | 3 x 5)


def test_group_means_target_is_one_y_for_every_critic():
    # Group means 2 and 3 -> Qp' = 2: y = (1 + 0.5 x 2, 1) = (2, 1).
    y = br.td_target(
        target_batch(),
        FixedActor(torch.zeros(2, 1)),
        lambda obs, a: TARGET_Q,
        num_groups=2,
        gamma=0.5,
        policy_noise=0.0,
        noise_clip=0.5,
    )
    assert torch.equal(y, torch.tensor([2.0, 1.0]))


def test_per_pair_targets_are_one_y_per_member():
    # Pairs (0, 3) x 4 and (10, 3): minima (0, 0, 0, 0, 3), so y_i = 1 + 0.5 min_i = (1, 1, 1, 1, 2.5) for the
    # non-terminal sample and 1 for the terminal one; critic i of either group gets y_i (trainer:253-273).
    y = br.td_target(
        target_batch(),
        FixedActor(torch.zeros(2, 1)),
        lambda obs, a: TARGET_Q,
        num_groups=2,
        gamma=0.5,
        policy_noise=0.0,
        noise_clip=0.5,
        ensemble="per-pair",
    )
    member = torch.tensor([[1.0, 1], [1, 1], [1, 1], [1, 1], [2.5, 1]])
    assert torch.equal(y, torch.cat([member, member]))
    # Critics at 0: squared errors summed over critics, averaged over the batch:
    # 8 critics at (1 + 1) / 2 = 1 and 2 at (6.25 + 1) / 2 = 3.625 -> 15.25.
    loss, _ = br.critic_loss(lambda obs, a: torch.zeros(10, 2), target_batch(), y)
    assert loss.item() == pytest.approx(15.25)


def test_the_actor_follows_the_chosen_aggregation():
    # Q of sample 0 as above; sample 1: group 1 all -1, group 2 all -4. alpha = 0, so L = -mean(q) / mean|q|.
    q = torch.tensor([[1.0, -1], [2, -1], [3, -1], [4, -1], [5, -1], [0, -4], [0, -4], [0, -4], [0, -4], [10, -4]])
    batch = br.Batch(torch.zeros(2, 2), torch.zeros(2, 1), torch.zeros(2), torch.zeros(2, 2), torch.zeros(2))
    critic = lambda obs, a: q  # noqa: E731
    # Group means: q = (min(3, 2), min(-1, -4)) = (2, -4): -(-1) / 3 = 1/3.
    loss = br.actor_loss(FixedActor(torch.zeros(2, 1)), critic, batch, alpha=0.0, num_groups=2)
    assert loss.item() == pytest.approx(1 / 3)
    # Per pair (trainer:218-229): q = (mean(0, 0, 0, 0, 5), mean of five min(-1, -4)) = (1, -4): 1.5 / 2.5 = 0.6.
    loss = br.actor_loss(FixedActor(torch.zeros(2, 1)), critic, batch, alpha=0.0, num_groups=2, ensemble="per-pair")
    assert loss.item() == pytest.approx(0.6)


# ---- The schedule -------------------------------------------------------------------------------------------
def test_blocks_schedule_waits_for_the_first_block_then_updates_ten_times_its_length():
    # Lee et al. (ours.py:382, 410-411; batch_rl_algorithm.py:183-201): 1,000 environment steps, then 1,000
    # updates, the first block's x10. T = 2,500, G = 1: nothing before step 1,000, then 10,000; 1,000 after
    # step 2,000; the last, partial block of 500 steps gets 500 at step T.
    a = args_with("--update-schedule", "blocks", "--online-steps", 2500)
    counts = {step: br.updates_after(step, a) for step in range(1, 2501)}
    assert {s: n for s, n in counts.items() if n} == {1000: 10_000, 2000: 1000, 2500: 500}
    # G scales every block: G = 2 gives 20,000 after the first.
    assert br.updates_after(1000, args_with("--update-schedule", "blocks", "--utd", 2)) == 20_000
    # The default: G after every environment step from the first, as the paper's TD3 codebase.
    assert [br.updates_after(s, args_with("--utd", 3)) for s in (1, 2, 1000)] == [3, 3, 3]


# ---- Density ratio, priorities, buffers ---------------------------------------------------------------------
def test_priorities_are_tempered_self_normalized_density_ratios():
    # temp 5: 32^(1/5) = 2, 1e20^(1/5) = 1e4 -> clipped to 1e3, 0 -> clipped to 1e-3.
    w = torch.tensor([1.0, 32.0, 0.0, 1e20])
    p = br.ratio_priorities(w, torch.ones(4), temperature=5.0, priority_min=1e-3, priority_max=1e3)
    assert torch.allclose(p, torch.tensor([1.0, 2.0, 1e-3, 1e3]), rtol=1e-5)
    # Offline ratios of 32: their tempered mean is 2, which halves every priority.
    p = br.ratio_priorities(w, torch.full((4,), 32.0), temperature=5.0, priority_min=1e-3, priority_max=1e3)
    assert torch.allclose(p, torch.tensor([0.5, 1.0, 1e-3, 1e3]), rtol=1e-5)


def transitions(n, start=0):
    x = torch.arange(start, start + n, dtype=torch.float32)
    return x[:, None].repeat(1, 2), x[:, None], x, x[:, None].repeat(1, 2) + 0.5, x * 0


def test_a_transition_with_a_higher_density_ratio_is_drawn_more_often():
    # Ratios (1, 1, 1, 32) against offline ratios of 1 give priorities (1, 1, 1, 2): the last transition comes up
    # with probability 2/5 = 0.4, the others 0.2 each. 20,000 draws: the standard deviation of a share is about
    # 0.0035, so the 0.02 tolerances are over 5 sigma.
    buffer = br.PrioritizedReplayBuffer(4, 2, 1, torch.device("cpu"))
    buffer.add(*transitions(4), priority=1.0)  # obs = the slot number
    buffer.update_priorities(
        torch.arange(4), br.ratio_priorities(torch.tensor([1.0, 1, 1, 32]), torch.ones(4), 5.0, 1e-3, 1e3)
    )
    torch.manual_seed(0)
    draws = []
    for _ in range(20):
        batch, idx = buffer.sample(1000)
        assert torch.equal(batch.obs[:, 0], idx.float())  # the batch holds the drawn slots
        draws.append(idx)
    shares = torch.bincount(torch.cat(draws), minlength=4).double() / 20_000
    assert abs(shares[3] - 0.4) < 0.02
    assert all(abs(shares[i] - 0.2) < 0.02 for i in range(3))


def test_online_transitions_enter_at_the_running_max_priority_and_a_checkpoint_keeps_them():
    # 400 offline transitions at priority 1; the first online priority is 400 x 0.5 / (0.5 x 1000) = 0.4, so
    # N = 1000 online transitions would hold 400 of 800: half the mass (f = 0.5, batch_rl_algorithm.py:146).
    offline = br.ReplayBuffer(400, 2, 1, torch.device("cpu"))
    offline.add(*transitions(400))
    args = args_with("--online-steps", 1000)
    online, joint = br.online_buffers(offline, args)
    assert float(joint.max_priority) == pytest.approx(0.4)
    for buffer in (online, joint):
        buffer.add(*transitions(1000, start=400))
    assert float(joint.priorities[400:].sum() / joint.priorities.sum()) == pytest.approx(0.5, rel=1e-5)
    # An update above the running max raises it; the next online transition starts there.
    joint.update_priorities(torch.tensor([3, 405]), torch.tensor([7.0, 0.1]))
    assert (float(joint.priorities[3]), float(joint.priorities[405]), float(joint.max_priority)) == pytest.approx(
        (7.0, 0.1, 7.0)
    )
    # latest.pt holds the online transitions and the joint buffer's priorities; the rest is rebuilt.
    state = {"online": online.transitions(), "joint": joint.state_dict()}
    online2, joint2 = br.online_buffers(offline, args, state)
    assert (online2.size, joint2.size, float(joint2.max_priority)) == (1000, 1400, 7.0)
    assert torch.equal(joint2.priorities, joint.priorities)
    for a, b in zip(joint.data + online.data, joint2.data + online2.data):
        assert torch.equal(a, b)


def test_ratio_loss_is_minimized_by_the_density_ratio():
    # Two states; offline data visit them 1:1, online data 4:1, so d_on / d_off = (0.8/0.5, 0.2/0.5) = (1.6, 0.4).
    log_w = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.Adam([log_w], lr=0.1)
    offline, online = torch.tensor([0, 1]), torch.tensor([0, 0, 0, 0, 1])
    for _ in range(400):
        w = log_w.exp()
        loss = br.ratio_loss(w[offline], w[online])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.allclose(log_w.exp(), torch.tensor([1.6, 0.4]), atol=1e-2)


def test_buffer_memory_matches_the_hand_count():
    # Hopper: 11-dim observations, 3-dim actions: 4 x (11 + 3 + 1 + 11 + 1) = 108 bytes a transition;
    # 400 offline = 43,200; 60 online = 6,480; joint 460 x (108 + 4 for the priority) = 51,520.
    assert br.buffer_bytes(400, 60, 11, 3) == {
        "offline": 43_200,
        "online": 6_480,
        "prioritized": 51_520,
        "total": 101_200,
    }
    joint = br.PrioritizedReplayBuffer(460, 11, 3, torch.device("cpu"))
    assert sum(f.nbytes for f in joint.data) + joint.priorities.nbytes == 51_520


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--init-online-fraction", "1"], "--init-online-fraction must be in (0, 1)"),
        (["--priority-min", "10", "--priority-max", "1"], "--priority-min 10.0 must be below --priority-max 1.0"),
        (["--temperature", "0"], "--temperature must be positive"),
        (["--group-size", "0"], "--group-size must be positive"),
        (["--block-steps", "0"], "--block-steps must be positive"),
    ],
)
def test_bad_values(flags, message):
    with pytest.raises(UsageError) as e:
        br.check_args(args_with(*flags))
    assert str(e.value).startswith(message)


def test_too_many_transitions_and_a_diverging_loss(datasets_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MuJoCo writes MUJOCO_LOG.TXT into the working folder on NaN actions
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(datasets_path))
    with pytest.raises(UsageError, match="more than the 16777216 torch.multinomial can sample from"):
        br.main(args_with(*TINY, "--online-steps", 2**24, "--output-dir", "runs"))
    assert not (tmp_path / "runs").exists()  # rejected before any work
    # Finite rewards whose squares overflow float32: the critic loss becomes inf.
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    make_minari_dataset("local/hopper/huge-v0", hopper_episodes(4, 50, reward=1e30), env_id="Hopper-v5")
    flags = [f for f in TINY if f not in ("--dataset", "uniform-random")]
    with pytest.raises(TrainingDiverged, match="offline step 20"):
        br.main(args_with("--dataset-id", "local/hopper/huge-v0", *flags, "--output-dir", "runs"))
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert len(read_csv(run_dir / "progress.csv")) == 2  # the rows up to the failure are kept


# ---- End to end ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def br_run(datasets_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("br_runs")
    proc = run_script(SCRIPT, *TINY, "--output-dir", out, datasets_path=datasets_path, cwd=out)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = out.iterdir()
    return run_dir, proc


@pytest.mark.slow
def test_run_writes_its_folder(br_run):
    run_dir, proc = br_run
    assert run_dir.name.startswith("hopper-uniform-random-400steps__balanced_replay__0__")
    assert {p.name for p in run_dir.iterdir()} >= {
        "config.json",
        "progress.csv",
        "episodes.csv",
        "offline.pt",
        "final.pt",
        "actor.pt",
    }
    config = json.loads((run_dir / "config.json").read_text())
    assert config["buffer_capacity"] == {"offline": 400, "online": 60, "prioritized": 460}
    assert config["buffer_bytes"] == {"offline": 43_200, "online": 6_480, "prioritized": 51_520, "total": 101_200}
    assert "switch to online: replay buffers take" in proc.stderr
    with open(run_dir / "progress.csv") as f:
        assert f.readline().strip().split(",") == br.COLUMNS
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
    offline_rows, online_rows = rows[:3], rows[3:]
    assert all(float(r["alpha"]) == 0.4 for r in offline_rows)
    assert all(int(r["buffer_bytes"]) == 43_200 for r in offline_rows)
    assert all(float(r["alpha"]) == 0.0 for r in online_rows)
    assert all(int(r["buffer_bytes"]) == 101_200 for r in online_rows)
    fractions = [float(r["online_fraction"]) for r in online_rows[1:]]
    assert all(0 <= f <= 1 for f in fractions)
    assert max(fractions) > 0
    assert all(math.isfinite(float(r["ratio_loss"])) for r in online_rows[1:])
    assert all(r["online_fraction"] == "" for r in offline_rows + online_rows[:1])
    # G = 2 after every step: 40 + 120 critic steps, half of them actor steps; 120 ratio steps, online only.
    assert optimizer_steps(run_dir, parts=PARTS) == (160, 80, 120)
    episodes = read_csv(run_dir / "episodes.csv")
    assert list(episodes[0]) == ["step", "length", "return", "normalized_return"]
    assert sum(int(e["length"]) for e in episodes) == int(episodes[-1]["step"]) <= 60


@pytest.mark.slow
def test_load_offline_with_lee_et_als_schedule(br_run, datasets_path, tmp_path):
    # Blocks of 20 steps, the first block's updates x3, G = 1: 60 + 20 + 20 = 100 updates after the pre-trained
    # agent's 40, none before online step 20.
    run_dir, _ = br_run
    flags = [f for f in TINY if f not in ("--dataset", "uniform-random")]
    flags[flags.index("--utd") + 1] = 1
    proc = run_script(
        SCRIPT,
        *flags,
        "--load-offline",
        run_dir,
        "--update-schedule",
        "blocks",
        "--block-steps",
        20,
        "--first-block-multiplier",
        3,
        "--output-dir",
        tmp_path,
        datasets_path=datasets_path,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    (new_run,) = tmp_path.iterdir()
    rows = read_csv(new_run / "progress.csv")
    assert [(r["phase"], int(r["step"])) for r in rows] == [
        ("online", 0),
        ("online", 20),
        ("online", 40),
        ("online", 60),
    ]
    assert not (new_run / "offline.pt").exists()
    assert optimizer_steps(new_run, parts=PARTS) == (140, 70, 100)
    # The first row after the switch averages the first block's 60 updates, when 20 online transitions exist.
    assert float(rows[1]["online_fraction"]) > 0
    assert rows[1]["critic_loss"] != ""


# ---- Resume after SIGKILL -----------------------------------------------------------------------------------
# Lee et al.'s ensemble and schedule here, so that their resume is covered too.
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
    "--ratio-hidden-dim",
    16,
    "--ratio-batch-size",
    32,
    "--checkpoint-every",
    100,
    "--ensemble",
    "per-pair",
    "--update-schedule",
    "blocks",
    "--block-steps",
    50,
]
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
    assert_same_networks(run_a, run_b, ("actor", "critic", "actor_target", "critic_target", "ratio"))
    # Blocks of 50 over 300 steps, the first x10: 500 + 5 x 50 = 750 updates after 600 offline ones.
    assert optimizer_steps(run_b, parts=PARTS) == optimizer_steps(run_a, parts=PARTS) == (1350, 675, 750)


# ---- A stop signal during an evaluation ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("where", BASELINE_CUT_EVALUATIONS)
def test_a_stop_signal_during_an_evaluation_ends_it_and_resume_redoes_it(where, datasets_path, tmp_path):
    parts = ("actor", "critic", "actor_target", "critic_target", "ratio")
    check_a_stop_signal_during_an_evaluation(
        SCRIPT, where, ["--ratio-hidden-dim", 16], br.COLUMNS, parts, datasets_path=datasets_path, tmp_path=tmp_path
    )
