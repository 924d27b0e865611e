"""Recording environment steps and writing them as a Minari dataset: how a script builds D4RL's recipes
(baselines/redq.py --export-replay / --export-rollouts). Training never reads what is recorded here."""

from __future__ import annotations

import numpy as np
import torch

from plumbing.datasets import write_dataset
from plumbing.errors import Preempted, stop_requested


class EpisodeRecorder:
    """Every environment step in order, in the env's own dtypes (float64 observations). An observation is
    stored once: within an episode, next_obs of step t is obs of step t + 1; only each episode's last
    next_obs is kept aside."""

    FIELDS = ("obs", "actions", "rewards", "terminations", "truncations")

    def __init__(self, capacity, observation_space, action_space, stoppable=False):
        """stoppable: a recording made only to be written (rollouts), so a stop signal ends it at the next step
        (Preempted, nothing written); during training the run's checkpoint decides when to stop instead."""
        self.stoppable = stoppable
        self.obs = np.zeros((capacity, *observation_space.shape), observation_space.dtype)
        self.actions = np.zeros((capacity, *action_space.shape), action_space.dtype)
        self.rewards = np.zeros(capacity)
        self.terminations, self.truncations = np.zeros(capacity, bool), np.zeros(capacity, bool)
        self.final_obs = {}  # index of an episode's last step -> the observation after it
        self.next_obs, self.size = None, 0  # the observation after the latest step

    def add(self, obs, action, reward, terminated, truncated, next_obs) -> None:
        if self.stoppable and stop_requested:
            raise Preempted(
                stop_requested[0],
                "the recording stopped before it was written, no dataset was made; latest.pt is saved: "
                "continue with --resume <run folder>",
            )
        i = self.size
        self.obs[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.terminations[i], self.truncations[i] = terminated, truncated
        self.next_obs = np.array(next_obs)
        if terminated or truncated:
            self.final_obs[i] = self.next_obs
        self.size += 1

    def episodes(self) -> list[dict]:
        """Minari episodes: T + 1 observations, T actions, rewards, terminations, truncations. An episode
        still running at the end is cut there: its last step is marked truncated (the record is unchanged)."""
        n = self.size
        truncations = self.truncations[:n].copy()
        if n and not (self.terminations[n - 1] or truncations[n - 1]):
            truncations[n - 1] = True  # a time-out, not a termination: it keeps bootstrapping
        episodes, start = [], 0
        for end in np.flatnonzero(self.terminations[:n] | truncations):
            steps = slice(start, end + 1)
            last = self.final_obs.get(end, self.next_obs)  # not there: the cut episode
            episodes.append(
                dict(
                    observations=np.concatenate([self.obs[steps], last[None]]),
                    actions=self.actions[steps],
                    rewards=self.rewards[steps],
                    terminations=self.terminations[steps],
                    truncations=truncations[steps],
                )
            )
            start = end + 1
        return episodes

    def write(self, dataset_id, env_id, algorithm_name, description, ref_min=None, ref_max=None) -> None:
        """The episodes as Minari dataset dataset_id (through a staging folder), with the env id and the
        reference scores in its metadata."""
        from minari.data_collector import EpisodeBuffer

        buffers = [EpisodeBuffer(id=i, **ep) for i, ep in enumerate(self.episodes())]
        write_dataset(dataset_id, buffers, env_id, algorithm_name, description, ref_min, ref_max)

    def state_dict(self) -> dict:
        """The steps so far as tensors (torch.load(weights_only=True) reads no numpy arrays)."""
        n, ends = self.size, sorted(self.final_obs)
        return {
            "size": n,
            **{name: torch.from_numpy(getattr(self, name)[:n].copy()) for name in self.FIELDS},
            "final_obs_index": ends,
            "final_obs": torch.from_numpy(
                np.array([self.final_obs[i] for i in ends], self.obs.dtype).reshape(len(ends), *self.obs.shape[1:])
            ),
            "next_obs": None if self.next_obs is None else torch.from_numpy(self.next_obs.copy()),
        }

    def load_state_dict(self, state: dict) -> None:
        n = self.size = state["size"]
        for name in self.FIELDS:
            getattr(self, name)[:n] = state[name].numpy()
        self.final_obs = {i: obs.numpy() for i, obs in zip(state["final_obs_index"], state["final_obs"])}
        self.next_obs = None if state["next_obs"] is None else state["next_obs"].numpy()
