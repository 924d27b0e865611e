"""Unit tests of each mechanism of redq_adaptive_bc.py, against numbers worked out by hand."""

import types

import numpy as np
import pytest
import torch
import torch.nn as nn

import redq_adaptive_bc as m
from conftest import FixedActor, make_minari_dataset, spaces

GAINS = dict(kp=3e-5, kd=8e-5, target_return=1.0, alpha_max=0.4)


# ---------------------------------------------------------------------------------------
# Eq. 2: the PD controller
# ---------------------------------------------------------------------------------------
def test_eq2_over_three_episodes_with_length_scaling():
    # Episode 1: R_last 0.5 (the first evaluation), R_current 0.6, 100 steps.
    #   delta = 3e-5 (0.6 - 1) + 8e-5 max(0, 0.5 - 0.6) = -1.2e-5; x100 = -1.2e-3 -> alpha 0.3988
    alpha, R_last = m.adapt_alpha(0.4, 0.6, 0.5, episode_length=100, **GAINS)
    assert alpha == pytest.approx(0.3988, abs=1e-12) and R_last == 0.6
    # Episode 2: the return drops to 0.3 in 50 steps: the D term outweighs the P term.
    #   delta = 3e-5 (-0.7) + 8e-5 (0.3) = -2.1e-5 + 2.4e-5 = 3e-6; x50 = 1.5e-4 -> alpha 0.39895
    alpha, R_last = m.adapt_alpha(alpha, 0.3, R_last, episode_length=50, **GAINS)
    assert alpha == pytest.approx(0.39895, abs=1e-12) and R_last == 0.3
    # Episode 3: 0.35 in 1000 steps, no drop: delta = 3e-5 (-0.65) = -1.95e-5; x1000 = -0.0195 -> 0.37945
    alpha, R_last = m.adapt_alpha(alpha, 0.35, R_last, episode_length=1000, **GAINS)
    assert alpha == pytest.approx(0.37945, abs=1e-12) and R_last == 0.35


def test_eq2_per_episode_without_length_scaling():
    # The paper's literal per-episode increment: 0.4 - 1.2e-5 = 0.399988.
    alpha, _ = m.adapt_alpha(0.4, 0.6, 0.5, episode_length=1, **GAINS)
    assert alpha == pytest.approx(0.399988, abs=1e-12)


def test_eq2_clips_alpha_to_zero_and_alpha_offline():
    # Far below target, no drop: -3e-5 x 1000 = -0.03 from 0.01 -> clipped at 0.
    assert m.adapt_alpha(0.01, 0.0, 0.0, episode_length=1000, **GAINS)[0] == 0.0
    # A collapse from 1.0 to 0.0: -3e-5 + 8e-5 = 5e-5; x1000 = 0.05 from 0.399 -> clipped at 0.4.
    assert m.adapt_alpha(0.399, 0.0, 1.0, episode_length=1000, **GAINS)[0] == 0.4
    # At the target return with no drop nothing moves.
    assert m.adapt_alpha(0.2, 1.0, 1.0, episode_length=1000, **GAINS)[0] == pytest.approx(0.2, abs=1e-15)


def test_eq2_with_the_authors_moving_average():
    # s = 0.05. Episode 1: R_avg = 0.05 x 0.9 + 0.95 x 0.5 = 0.52;
    #   delta = 3e-5 (0.52 - 1) + 8e-5 max(0, 0.5 - 0.9) = -1.44e-5; x10 -> alpha 0.4 - 1.44e-4 = 0.399856
    alpha, R_last = m.adapt_alpha(0.4, 0.9, 0.5, episode_length=10, r_last_smoothing=0.05, **GAINS)
    assert alpha == pytest.approx(0.399856, abs=1e-12) and R_last == pytest.approx(0.52)
    # Episode 2: R_avg = 0.05 x 0.2 + 0.95 x 0.52 = 0.504;
    #   delta = 3e-5 (0.504 - 1) + 8e-5 (0.52 - 0.2) = -1.488e-5 + 2.56e-5 = 1.072e-5; x10 -> 0.3999632
    alpha, R_last = m.adapt_alpha(alpha, 0.2, R_last, episode_length=10, r_last_smoothing=0.05, **GAINS)
    assert alpha == pytest.approx(0.3999632, abs=1e-12) and R_last == pytest.approx(0.504)


# ---------------------------------------------------------------------------------------
# The target (Eq. 3), critic loss, actor loss (Eq. 1 and 4), soft updates
# ---------------------------------------------------------------------------------------
def batch(rewards, terminals, actions=None):
    n = len(rewards)
    actions = torch.zeros(n, 1) if actions is None else actions
    return m.Batch(torch.zeros(n, 2), actions, torch.tensor(rewards), torch.zeros(n, 2), torch.tensor(terminals))


def test_target_takes_min_over_exactly_the_drawn_critics_and_stops_at_terminals():
    q_next = torch.tensor([[5.0, 1.0], [1.5, 4.0], [2.0, 6.0], [7.0, 0.0]])  # 4 target critics, batch of 2

    def critic_target(obs, action, critic_idx):
        return q_next[critic_idx]

    # Drawn critics {0, 2}: min(5, 2) = 2 and min(1, 6) = 1 (all four would give 1.5 and 0).
    # y1 = 1 + 0.9 x 2 = 2.8; y2 = 0.5 (terminal: no bootstrap; 1.4 if it bootstrapped).
    y = m.td_target(batch([1.0, 0.5], [0.0, 1.0]), FixedActor(torch.zeros(2, 1)), critic_target,
                    torch.tensor([0, 2]), gamma=0.9, policy_noise=0.0, noise_clip=0.5)
    assert torch.allclose(y, torch.tensor([2.8, 0.5]))


def test_target_action_noise_is_clipped_then_the_action_is_clipped_to_bounds():
    seen = {}

    def critic_target(obs, action, critic_idx):
        seen["a"] = action
        return torch.zeros(1, len(action))

    # pi'(s') = 0.9; huge noise clipped to +-0.5 gives 0.4 or 1.4, and 1.4 is clipped to the bound 1.0.
    m.td_target(batch([0.0] * 1000, [0.0] * 1000), FixedActor(torch.full((1000, 1), 0.9)), critic_target,
                torch.tensor([0]), gamma=0.99, policy_noise=1e6, noise_clip=0.5)
    values = set(np.round(seen["a"].flatten().double().numpy(), 5).tolist())
    assert values == {0.4, 1.0}


def test_critic_loss_sums_or_averages_the_per_critic_mse():
    q = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    critic = lambda obs, action: q  # noqa: E731
    # Per-critic MSE to y = 0: (1 + 4) / 2 = 2.5 and (9 + 16) / 2 = 12.5.
    loss, q_mean = m.critic_loss(critic, batch([0.0, 0.0], [0.0, 0.0]), torch.zeros(2), "sum")
    assert loss.item() == pytest.approx(15.0) and q_mean.item() == pytest.approx(2.5)
    loss, _ = m.critic_loss(critic, batch([0.0, 0.0], [0.0, 0.0]), torch.zeros(2), "mean")
    assert loss.item() == pytest.approx(7.5)


def test_actor_loss_normalizes_q_without_gradient_through_the_normalizer():
    q = torch.tensor([[1.0, 3.0], [3.0, 5.0]], requires_grad=True)  # 2 critics x batch of 2
    critic = lambda obs, action: q  # noqa: E731
    pi = FixedActor(torch.tensor([[0.5], [-0.5]]))
    b = batch([0.0, 0.0], [0.0, 0.0], actions=torch.tensor([[0.0], [0.5]]))
    # Qbar = [2, 4]: -mean(Qbar) / mean|Qbar| = -3 / 3 = -1.
    # BC: ((0.5 - 0)^2 + (-0.5 - 0.5)^2) / 2 = 0.625; x alpha 0.4 = 0.25.  Loss = -0.75.
    loss = m.actor_loss(pi, critic, b, alpha=0.4)
    assert loss.item() == pytest.approx(-0.75)
    # With the normalizer detached, dL/dQ_ij = -1 / (N B mean|Qbar|) = -1/12 for every entry
    # (a normalizer with gradient would make the Q term constant here, gradient 0).
    loss.backward()
    assert torch.allclose(q.grad, torch.full((2, 2), -1 / 12))


def test_soft_update():
    target, source = nn.Linear(2, 2), nn.Linear(2, 2)
    nn.init.zeros_(target.weight), nn.init.zeros_(target.bias)
    nn.init.ones_(source.weight), nn.init.ones_(source.bias)
    m.soft_update(target, source, 0.1)
    assert torch.allclose(target.weight, torch.full((2, 2), 0.1))
    m.soft_update(target, source, 0.1)  # 0.1 + 0.1 (1 - 0.1) = 0.19
    assert torch.allclose(target.bias, torch.full((2,), 0.19))


def test_critic_ensemble_is_n_independent_mlps_and_selects_subsets():
    torch.manual_seed(0)
    ens = m.CriticEnsemble(4, obs_dim=3, act_dim=2, hidden_dim=8, hidden_layers=2)
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


def tiny_agent(**overrides):
    args = m.Args(hidden_dim=8, num_critics=3, batch_size=4, **overrides)
    args.alpha_offline = 0.4
    return m.Agent(2, 1, np.array([-1.0]), np.array([1.0]), args, torch.device("cpu"))


def test_agent_updates_actor_every_policy_freq_steps_and_targets_every_step():
    torch.manual_seed(0)
    agent = tiny_agent(policy_freq=2)
    b = m.Batch(torch.randn(4, 2), torch.rand(4, 1) * 2 - 1, torch.randn(4), torch.randn(4, 2), torch.zeros(4))
    actor0 = [p.clone() for p in agent.actor.parameters()]
    critic_target0 = [p.clone() for p in agent.critic_target.parameters()]
    agent.update(b, torch.tensor(0.4))
    assert all(torch.equal(p, q) for p, q in zip(agent.actor.parameters(), actor0))
    assert not all(torch.equal(p, q) for p, q in zip(agent.critic_target.parameters(), critic_target0))
    agent.update(b, torch.tensor(0.4))
    assert not all(torch.equal(p, q) for p, q in zip(agent.actor.parameters(), actor0))
    assert all(p.requires_grad for p in agent.critic.parameters())  # unfrozen after the actor step


def test_delayed_target_updates_wait_for_the_actor_step():
    torch.manual_seed(0)
    agent = tiny_agent(policy_freq=2, delay_target_updates=True)
    b = m.Batch(torch.randn(4, 2), torch.rand(4, 1) * 2 - 1, torch.randn(4), torch.randn(4, 2), torch.zeros(4))
    critic_target0 = [p.clone() for p in agent.critic_target.parameters()]
    agent.update(b, torch.tensor(0.4))
    assert all(torch.equal(p, q) for p, q in zip(agent.critic_target.parameters(), critic_target0))
    agent.update(b, torch.tensor(0.4))
    assert not all(torch.equal(p, q) for p, q in zip(agent.critic_target.parameters(), critic_target0))


# ---------------------------------------------------------------------------------------
# Replay: FIFO order and downsampling
# ---------------------------------------------------------------------------------------
def filled_buffer(rewards, capacity):
    buf = m.ReplayBuffer(capacity, obs_dim=1, act_dim=1, device=torch.device("cpu"))
    for r in rewards:
        buf.add([[r]], [[r]], [r], [[r]], [0.0])
    return buf


def test_fifo_overwrites_the_oldest_transitions():
    buf = filled_buffer([0, 1, 2], capacity=4)
    assert len(buf) == 3 and buf.data.rewards.tolist() == [0, 1, 2, 0]
    buf.add([[3], [4], [5]], [[3], [4], [5]], [3, 4, 5], [[3], [4], [5]], [0, 0, 0])
    # 3 fills slot 3; 4 and 5 overwrite the two oldest (0 and 1).
    assert len(buf) == 4 and buf.ptr == 2 and buf.data.rewards.tolist() == [4, 5, 2, 3]
    assert set(buf.sample(200).rewards.tolist()) == {2, 3, 4, 5}


def test_number_of_kept_offline_transitions():
    assert m.num_kept(1_000_000, 0.05, 50_000) == 50_000  # 5% = 50k
    assert m.num_kept(2_000_000, 0.05, 50_000) == 100_000  # the ratio wins above the floor
    assert m.num_kept(200_000, 0.05, 50_000) == 50_000  # the floor wins: 5% would be 10k
    assert m.num_kept(10_000, 0.05, 50_000) == 10_000  # capped at the dataset size
    assert m.num_kept(1001, 0.05, 0) == 51  # ceil(50.05)


def test_downsample_keeps_a_uniform_subset_without_duplicates():
    buf = filled_buffer(range(1000), capacity=1000)
    gen = torch.Generator().manual_seed(0)
    online = m.downsample(buf, capacity=500, keep_ratio=0.1, keep_min=0, with_replacement=False, generator=gen)
    kept = online.data.rewards[: len(online)]
    assert len(online) == 100 and online.capacity == 500 and online.ptr == 100
    assert len(set(kept.tolist())) == 100 and set(kept.tolist()) <= set(range(1000))
    assert torch.equal(online.data.obs[:100, 0], kept)  # rows stay whole transitions
    assert 300 < kept.mean() < 700  # a spread-out subset, not the first rows
    with_repl = m.downsample(buf, 500, 0.1, 0, True, torch.Generator().manual_seed(0))
    assert len(with_repl) == 100


# ---------------------------------------------------------------------------------------
# Datasets: flattening, reference scores, building
# ---------------------------------------------------------------------------------------
def test_flatten_aligns_next_obs_and_keeps_truncations_bootstrapping(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    obs0 = np.array([[0, 0], [1, 1], [2, 2], [3, 3]], float)  # 3 steps, ends in a termination
    obs1 = np.array([[10, 10], [11, 11], [12, 12]], float)  # 2 steps, cut by a time limit
    episodes = [
        dict(observations=obs0, actions=np.zeros((3, 1), np.float32), rewards=[1.0, 2.0, 3.0],
             terminations=[False, False, True], truncations=[False, False, False]),
        dict(observations=obs1, actions=np.zeros((2, 1), np.float32), rewards=[4.0, 5.0],
             terminations=[False, False], truncations=[False, True]),
    ]
    ds = make_minari_dataset("test/flat-v0", episodes, **spaces(2, 1))
    data = m.flatten_episodes(ds)
    assert data["obs"][:, 0].tolist() == [0, 1, 2, 10, 11]
    assert data["next_obs"][:, 0].tolist() == [1, 2, 3, 11, 12]  # no transition 3 -> 10
    assert data["rewards"].tolist() == [1, 2, 3, 4, 5]
    assert data["terminals"].tolist() == [0, 0, 1, 0, 0]  # the time-out is not terminal


def test_flatten_rejects_nan(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    episodes = [dict(observations=np.zeros((3, 2)), actions=np.zeros((2, 1), np.float32), rewards=[1.0, np.nan],
                     terminations=[False, True], truncations=[False, False])]
    ds = make_minari_dataset("test/nan-v0", episodes, **spaces(2, 1))
    with pytest.raises(m.UsageError, match="NaN or infinite values in rewards"):
        m.flatten_episodes(ds)


def fake_dataset(**metadata):
    return types.SimpleNamespace(storage=types.SimpleNamespace(metadata=metadata))


def test_reference_scores_fall_back_from_flags_to_metadata_to_d4rl():
    args = m.Args()
    assert m.reference_scores(fake_dataset(ref_min_score=1.0, ref_max_score=9.0), "hopper", args) == \
        (1.0, 9.0, "dataset metadata")
    assert m.reference_scores(fake_dataset(), "hopper", args) == (-20.272305, 3234.3, "D4RL table")
    args = m.Args(ref_max_score=100.0)  # one flag overrides one end only
    assert m.reference_scores(fake_dataset(), "walker2d", args) == (1.629008, 100.0, "D4RL table (min), flags (max)")
    with pytest.raises(m.UsageError, match="no reference scores"):
        m.reference_scores(fake_dataset(), "pendulum", m.Args())
    assert m.normalized(np.array([-20.272305, 3234.3]), -20.272305, 3234.3).tolist() == [0.0, 1.0]


def test_random_dataset_build_follows_d4rl_recipe(tmp_path, monkeypatch):
    import minari
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    assert m.resolve_dataset_id(m.Args(dataset="random")) == "local/hopper/random-v0"  # D4RL's 1M steps
    assert m.resolve_dataset_id(m.Args(dataset="random", random_dataset_steps=150)) == \
        "local/hopper/random-150steps-v0"
    m.get_dataset("local/hopper/random-150steps-v0", m.Args())  # builds it: the size comes from the id
    ds = minari.load_dataset("local/hopper/random-150steps-v0")
    episodes = list(ds.iterate_episodes())
    assert ds.total_steps == 150 and sum(len(ep.rewards) for ep in episodes) == 150
    for ep in episodes[:-1]:  # random hopper falls within 1000 steps: every full episode terminates
        assert ep.terminations[-1] and not ep.truncations.any() and not ep.terminations[:-1].any()
    last = episodes[-1]  # cut by the budget: a time-out, unless it happened to terminate on the last step
    assert last.terminations[-1] != last.truncations[-1]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".staging")] == []


def test_medium_expert_is_built_by_combining_medium_and_expert(tmp_path, monkeypatch):
    from conftest import hopper_episodes
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    make_minari_dataset("mujoco/hopper/medium-v0", hopper_episodes(2, 5), env_id="Hopper-v5")
    make_minari_dataset("mujoco/hopper/expert-v0", hopper_episodes(3, 4, seed=1), env_id="Hopper-v5")
    ds = m.get_dataset("local/hopper/medium-expert-v0", m.Args())
    assert ds.total_steps == 10 + 12 and ds.total_episodes == 5
    assert m.dataset_exists("local/hopper/medium-expert-v0")


def test_failed_download_leaves_nothing_behind(tmp_path, monkeypatch):
    import minari
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))

    def partial_download(dataset_id, *a, **k):  # writes half a dataset, then the network fails
        (m.datasets_root() / dataset_id / "data").mkdir(parents=True)
        raise ConnectionError("Max retries exceeded with url: /api/datasets")

    monkeypatch.setattr(minari, "download_dataset", partial_download)
    with pytest.raises(m.UsageError, match=r"mujoco/hopper/medium-v0 .*could not be downloaded.*minari download"):
        m.get_dataset("mujoco/hopper/medium-v0", m.Args())
    assert list(tmp_path.iterdir()) == []  # no dataset, no staging folder


def test_checkpoint_round_trip_and_rejection_of_other_envs(tmp_path):
    torch.manual_seed(0)
    agent, other = tiny_agent(), tiny_agent()
    meta = dict(env_id="Hopper-v5", obs_dim=2, act_dim=1, method=m.METHOD)
    m.save_checkpoint(tmp_path / "offline.pt", agent, meta)
    m.load_checkpoint(tmp_path / "offline.pt", other, meta)
    assert all(torch.equal(p, q) for p, q in zip(agent.critic.parameters(), other.critic.parameters()))
    with pytest.raises(m.UsageError, match="trained on Hopper-v5"):
        m.load_checkpoint(tmp_path / "offline.pt", other, {**meta, "env_id": "Walker2d-v5"})


def test_compiled_step_matches_eager_step():
    # M = N and no target noise make the step deterministic given the batch, whatever the RNG.
    torch.manual_seed(0)
    eager = tiny_agent(num_min_critics=3, policy_noise=0.0)
    compiled = tiny_agent(num_min_critics=3, policy_noise=0.0)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # a critic-only step, then a step with the actor
        b = m.Batch(torch.randn(4, 2, generator=g), torch.rand(4, 1, generator=g) * 2 - 1,
                    torch.randn(4, generator=g), torch.randn(4, 2, generator=g), torch.tensor([0.0, 0.0, 1.0, 0.0]))
        out_e, out_c = eager.update(b, torch.tensor(0.4)), compiled.update(b, torch.tensor(0.4))
        for key in out_e:
            assert torch.allclose(out_e[key], out_c[key], atol=1e-5), key
    for name in ("actor", "critic", "actor_target", "critic_target"):
        for p, q in zip(getattr(eager, name).parameters(), getattr(compiled, name).parameters()):
            assert torch.allclose(p, q, atol=1e-5), name
    assert not torch.equal(eager.actor.net[0].weight, tiny_agent().actor.net[0].weight)  # something was trained


def test_every_evaluation_starts_from_the_same_seed():
    import gymnasium as gym
    torch.manual_seed(0)
    env = gym.make("Hopper-v5")
    actor = m.Actor(11, 3, env.action_space.low, env.action_space.high, hidden_dim=8)
    first = m.evaluate(actor, env, 3, torch.device("cpu"), seed=100)
    second = m.evaluate(actor, env, 3, torch.device("cpu"), seed=100)
    assert first.tolist() == second.tolist()  # the same policy scores the same at any point of a run
    assert len(set(first.tolist())) == 3  # but the episodes within one evaluation start differently


def test_downsample_never_routes_device_tensors_through_numpy():
    # A CUDA buffer's tensors cannot become numpy arrays; the meta device fails the same way on a CPU machine.
    buf = m.ReplayBuffer(100, obs_dim=2, act_dim=1, device=torch.device("meta"))
    buf.add(torch.zeros(100, 2, device="meta"), torch.zeros(100, 1, device="meta"), torch.zeros(100, device="meta"),
            torch.zeros(100, 2, device="meta"), torch.zeros(100, device="meta"))
    online = m.downsample(buf, 50, 0.2, 0, False, torch.Generator().manual_seed(0))
    assert len(online) == 20 and online.data.obs.device.type == "meta"
