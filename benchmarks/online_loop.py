"""Where the online phase's time goes, and memory before and after the switch.

Runs redq_adaptive_bc.main() in-process on a synthetic Hopper-shaped Minari dataset of
--dataset-steps transitions (1M by default, like D4RL's), with short offline and online phases,
and reports:
  - the share of the online phase's wall time spent outside gradient steps and evaluations
    (action selection, environment step, buffer insert, Eq. 2, logging);
  - seconds per evaluation;
  - resident memory (RSS) after loading the dataset, the peak before the switch, and the peak
    after it (the dropped 95% of the offline data must really be freed).

    python benchmarks/online_loop.py                      # about 2 minutes on 2 CPU cores
    python benchmarks/online_loop.py --online-steps 500 --utd 20
"""

import argparse
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def make_dataset(dataset_id, steps, episode_length=1000):
    import minari
    from minari.data_collector import EpisodeBuffer

    rng = np.random.default_rng(0)
    episodes = [
        EpisodeBuffer(
            id=i,
            observations=rng.normal(size=(episode_length + 1, 11)),
            actions=rng.uniform(-1, 1, (episode_length, 3)).astype(np.float32),
            rewards=rng.normal(size=episode_length),
            terminations=np.zeros(episode_length, bool),
            truncations=np.arange(episode_length) == episode_length - 1,
        )
        for i in range(steps // episode_length)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(dataset_id, episodes, env="Hopper-v5")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-steps", type=int, default=1_000_000, help="synthetic dataset size (default: 1M)")
    parser.add_argument("--offline-steps", type=int, default=100, help="offline gradient steps (default: 100)")
    parser.add_argument("--online-steps", type=int, default=250, help="online env steps (default: 250)")
    parser.add_argument("--utd", type=int, default=20, help="G, gradient steps per env step (default: 20)")
    parser.add_argument("--eval-episodes", type=int, default=10, help="episodes per evaluation (default: 10)")
    opts = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="online-loop-")
    os.environ["MINARI_DATASETS_PATH"] = os.path.join(tmp, "datasets")
    import redq_adaptive_bc as m

    start = time.perf_counter()
    make_dataset("bench/hopper/synthetic-v0", opts.dataset_steps)
    print(f"built a {opts.dataset_steps}-step dataset in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    stats = {"update_s": 0.0, "eval_s": [], "online_update_s": 0.0, "online_eval_s": 0.0, "rss_after_switch": 0.0}
    phase = {"online": False}
    original_update, original_evaluate, original_downsample = m.Agent.update, m.evaluate, m.downsample

    def timed_update(self, batch, alpha, num_min_critics):
        t = time.perf_counter()
        out = original_update(self, batch, alpha, num_min_critics)
        if phase["online"]:
            stats["online_update_s"] += time.perf_counter() - t
            if self.num_updates % 200 == 0:
                stats["rss_after_switch"] = max(stats["rss_after_switch"], rss_mb())
        return out

    def timed_evaluate(*a, **k):
        t = time.perf_counter()
        out = original_evaluate(*a, **k)
        stats["eval_s"].append(time.perf_counter() - t)
        if phase["online"]:
            stats["online_eval_s"] += stats["eval_s"][-1]
        return out

    def timed_downsample(*a, **k):
        stats["peak_before_switch"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        stats["rss_before_switch"] = rss_mb()
        out = original_downsample(*a, **k)
        phase["online"], stats["online_start"] = True, time.perf_counter()
        return out

    m.Agent.update, m.evaluate, m.downsample = timed_update, timed_evaluate, timed_downsample
    args = m.Args(
        dataset_id="bench/hopper/synthetic-v0",
        offline_steps=opts.offline_steps,
        online_steps=opts.online_steps,
        utd=opts.utd,
        eval_every=10**9,
        eval_episodes=opts.eval_episodes,
        output_dir=os.path.join(tmp, "runs"),
    )
    m.check_args(args)
    rss_start = rss_mb()
    m.main(args)
    online_s = time.perf_counter() - stats["online_start"]
    other = online_s - stats["online_update_s"] - stats["online_eval_s"]
    print(
        f"\nonline phase: {opts.online_steps} env steps x G={opts.utd}: {online_s:.1f} s wall; "
        f"gradient steps {stats['online_update_s']:.1f} s, evaluations {stats['online_eval_s']:.1f} s, "
        f"everything else {other:.2f} s = {100 * other / online_s:.1f}% of the online phase "
        f"({100 * other / (online_s - stats['online_eval_s']):.1f}% excluding evaluations)"
    )
    print(
        f"evaluation: {np.mean(stats['eval_s']):.2f} s each ({opts.eval_episodes} episodes, "
        f"{len(stats['eval_s'])} evaluations)"
    )
    print(
        f"memory: RSS {rss_start:.0f} MB at start; peak {stats['peak_before_switch']:.0f} MB before the switch "
        f"(RSS {stats['rss_before_switch']:.0f} MB just before it); after the switch RSS at most "
        f"{stats['rss_after_switch']:.0f} MB"
    )


if __name__ == "__main__":
    main()
