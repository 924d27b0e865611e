"""redq_adaptive_bc.py run as a user runs it: a subprocess, tiny budgets, a dataset the test builds."""

import csv
import json

import numpy as np
import pytest
import torch

import redq_adaptive_bc as m
from conftest import TINY, hopper_episodes, make_minari_dataset, run_script, spaces


def read_progress(run_dir):
    with open(run_dir / "progress.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished_run(datasets_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    proc = run_script("redq_adaptive_bc.py", "--dataset", "random", *TINY, "--output-dir", out,
                      datasets_path=datasets_path, cwd=out)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = out.iterdir()
    return run_dir, proc


def test_run_writes_config_progress_and_checkpoints(finished_run):
    run_dir, proc = finished_run
    assert run_dir.name.startswith("hopper-random-400steps__redq_adaptive_bc__0__")
    assert {p.name for p in run_dir.iterdir()} == {"config.json", "progress.csv", "offline.pt", "final.pt"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset_id"] == "local/hopper/random-400steps-v0" and config["method"] == "redq_adaptive_bc"
    assert (config["ref_min_score"], config["ref_max_score"], config["ref_source"]) == (-20.272305, 3234.3, "D4RL table")
    assert config["alpha_offline"] == 0.4 and config["offline_kept"] == 100  # keep-min 100 of 400
    rows = read_progress(run_dir)
    with open(run_dir / "progress.csv") as f:
        assert f.readline().strip().split(",")[:12] == m.COLUMNS[:12]
    assert [(r["phase"], int(r["step"])) for r in rows] == [
        ("offline", 0), ("offline", 20), ("offline", 40), ("online", 0), ("online", 20), ("online", 40), ("online", 60)]
    assert all(float(r["critic_loss"]) > 0 for r in rows if int(r["step"]) > 0)
    assert proc.stdout.strip().splitlines()[-1].startswith("final normalized score")


def test_alpha_moves_online_and_stays_in_bounds(finished_run):
    rows = [r for r in read_progress(finished_run[0]) if r["phase"] == "online"]
    alphas = [float(r["alpha"]) for r in rows]
    # A random-data agent scores far below R_target = 1, so the P term lowers alpha from 0.4 after
    # every episode, by about 3e-5 x (R - 1) x length per episode (60 steps: roughly -2e-3).
    assert alphas[0] == 0.4 and 0.39 < alphas[-1] < 0.4
    assert all(b <= a for a, b in zip(alphas, alphas[1:]))


def test_load_offline_skips_pretraining(finished_run, datasets_path, tmp_path):
    run_dir, _ = finished_run
    proc = run_script("redq_adaptive_bc.py", "--dataset", "random", *TINY, "--load-offline", run_dir / "offline.pt",
                      "--output-dir", tmp_path, datasets_path=datasets_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (new_run,) = tmp_path.iterdir()
    assert {r["phase"] for r in read_progress(new_run)} == {"online"}
    assert not (new_run / "offline.pt").exists() and (new_run / "final.pt").exists()
    # The fine-tuned agent started from the loaded weights: before fine-tuning, its actor was the saved one.
    saved = torch.load(run_dir / "offline.pt", weights_only=True)["agent"]["actor"]
    final = torch.load(new_run / "final.pt", weights_only=True)["agent"]["actor"]
    drift = max((saved[k] - final[k]).abs().max().item() for k in saved if k.startswith("net"))
    assert drift < 0.05  # 30 small Adam steps from the loaded weights; a fresh init would differ by ~0.5


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def bad_checkpoints(tmp_path):
    other_env = tmp_path / "walker.pt"
    torch.save({"meta": {"env_id": "Walker2d-v5", "obs_dim": 17, "act_dim": 6, "method": m.METHOD}, "agent": {}},
               other_env)
    torch.save({"meta": ["not", "a", "dict"], "agent": {}}, tmp_path / "list_meta.pt")
    torch.save({"meta": {"env_id": "Hopper-v5", "obs_dim": 11, "act_dim": 3, "method": "td3_bc"}, "agent": {}},
               tmp_path / "td3_bc.pt")
    evil = tmp_path / "evil.pt"
    torch.save({"meta": Evil(), "agent": {}}, evil)
    return other_env, evil


def one_error_line(proc):
    lines = proc.stderr.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error: ")


@pytest.mark.parametrize("flags, message", [
    (["--env", "pendulum"], "invalid choice 'pendulum' for argument '--env'"),
    (["--dataset", "medium-randomized"], "--dataset"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--offline-steps", "-5"], "--offline-steps must be positive"),
    (["--online-steps", "0"], "--online-steps must be positive"),
    (["--num-min-critics", "11"], "at most --num-critics"),
    (["--keep-ratio", "0"], "--keep-ratio must be in (0, 1]"),
    (["--keep-ratio", "1.5"], "--keep-ratio must be in (0, 1]"),
    (["--utd", "nan"], "--utd"),
    (["--load-offline", "missing.pt"], "no such file: missing.pt"),
    (["--load-offline", "walker.pt"], "trained on Walker2d-v5"),
    (["--load-offline", "evil.pt"], "is not a checkpoint of this script"),
    (["--load-offline", "list_meta.pt"], "is not a checkpoint of this script"),
    (["--load-offline", "td3_bc.pt"], "is not a checkpoint of this script"),
    (["--dataset-id", "local/hopper/nothing-v0"], "local/hopper/nothing-v0 not found"),
    (["--dataset", "medium-replay"], "medium-replay"),
])
def test_bad_input_gives_one_line_and_exit_2(flags, message, datasets_path, tmp_path):
    bad_checkpoints(tmp_path)
    proc = run_script("redq_adaptive_bc.py", "--dataset", "random", *TINY, *flags, "--output-dir", tmp_path / "runs",
                      datasets_path=datasets_path, cwd=tmp_path)
    assert proc.returncode == 2 and one_error_line(proc), proc.stderr
    assert message in proc.stderr
    assert "this must never run" not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists()  # rejected before any work


def test_error_line_when_stderr_cannot_encode_unicode(datasets_path, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONIOENCODING", "ascii")  # tyro then draws its error box in ASCII
    proc = run_script("redq_adaptive_bc.py", "--num-critic", "3", datasets_path=datasets_path, cwd=tmp_path)
    assert proc.returncode == 2 and one_error_line(proc), proc.stderr
    assert proc.stderr.startswith("error: Unrecognized options: --num-critic, 3")


def test_dataset_whose_spaces_do_not_match_the_env(tmp_path):
    import os
    os.environ["MINARI_DATASETS_PATH"] = str(tmp_path)
    try:  # a hopper-named dataset with 5-dim observations and no env spec to recover
        episodes = [dict(observations=np.zeros((4, 5)), actions=np.zeros((3, 3), np.float32), rewards=np.ones(3),
                         terminations=[False, False, True], truncations=[False] * 3)]
        make_minari_dataset("local/hopper/random-400steps-v0", episodes, **spaces(5, 3))
    finally:
        del os.environ["MINARI_DATASETS_PATH"]
    proc = run_script("redq_adaptive_bc.py", "--dataset", "random", *TINY, datasets_path=tmp_path, cwd=tmp_path)
    assert proc.returncode == 2 and one_error_line(proc), proc.stderr
    assert "observation_space" in proc.stderr and "does not match Hopper-v5" in proc.stderr


def test_nan_in_dataset_and_nan_in_loss(tmp_path):
    import os
    os.environ["MINARI_DATASETS_PATH"] = str(tmp_path)
    try:
        nan_eps = hopper_episodes(2, 10)
        nan_eps[1]["observations"][3, 4] = np.nan
        make_minari_dataset("local/hopper/nan-v0", nan_eps, env_id="Hopper-v5")
        # Finite rewards whose squares overflow float32: the critic loss becomes inf.
        make_minari_dataset("local/hopper/huge-v0", hopper_episodes(4, 50, reward=1e30), env_id="Hopper-v5")
    finally:
        del os.environ["MINARI_DATASETS_PATH"]
    proc = run_script("redq_adaptive_bc.py", "--dataset-id", "local/hopper/nan-v0", *TINY, datasets_path=tmp_path,
                      cwd=tmp_path)
    assert proc.returncode == 2 and one_error_line(proc) and "NaN or infinite values in obs" in proc.stderr
    proc = run_script("redq_adaptive_bc.py", "--dataset-id", "local/hopper/huge-v0", *TINY, datasets_path=tmp_path,
                      cwd=tmp_path)
    assert proc.returncode == 1 and "became non-finite" in proc.stderr and "offline step 20" in proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert len(read_progress(run_dir)) == 2  # the rows up to the failure are kept
    assert not (run_dir / "final.pt").exists() and not (run_dir / "offline.pt").exists()


def test_interrupted_run_keeps_what_it_wrote(datasets_path, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    flags = [str(f) for f in TINY] + ["--online-steps", "100000", "--output-dir", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, str(m.__file__), "--dataset", "random", *flags], cwd=tmp_path,
                            env={**os.environ, "MINARI_DATASETS_PATH": str(datasets_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait for the first online evaluation after the step-0 one
            csvs = list(tmp_path.glob("*/progress.csv"))
            if csvs and sum(r["phase"] == "online" for r in read_progress(csvs[0].parent)) >= 2:
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in stderr
    (run_dir,) = tmp_path.iterdir()
    text = (run_dir / "progress.csv").read_text()
    assert text.endswith("\n") and len(read_progress(run_dir)) >= 5  # 3 offline + 2 online rows, all whole
    assert (run_dir / "offline.pt").exists() and not (run_dir / "final.pt").exists()


RESUMABLE = ["--dataset", "random", "--random-dataset-steps", 400, "--offline-steps", 3000, "--online-steps", 1500,
             "--eval-every", 500, "--eval-episodes", 1, "--utd", 1, "--hidden-dim", 16, "--num-critics", 3,
             "--batch-size", 32, "--keep-min", 100, "--checkpoint-every", 100]


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


def test_killed_twice_and_resumed_run_ends_like_an_uninterrupted_one(datasets_path, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "MINARI_DATASETS_PATH": str(datasets_path), "OMP_NUM_THREADS": "1"}

    def start(*flags):
        return subprocess.Popen([sys.executable, str(m.__file__), *map(str, flags)], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    killed = start(*RESUMABLE, "--output-dir", tmp_path / "b")
    kill_when(killed, tmp_path / "b", "offline", 1000)  # a real SIGKILL, mid pre-training
    reference = start(*RESUMABLE, "--output-dir", tmp_path / "a")
    (run_b,) = (tmp_path / "b").iterdir()
    resumed = start("--resume", run_b)
    kill_when(resumed, tmp_path / "b", "online", 300)  # and again mid fine-tuning
    finished = start("--resume", run_b)
    out, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err
    assert reference.wait(timeout=300) == 0
    (run_a,) = (tmp_path / "a").iterdir()
    assert not (run_b / "latest.pt").exists() and (run_b / "final.pt").exists()

    # Every evaluation row once, with the same numbers (timings aside).
    rows_a, rows_b = read_progress(run_a), read_progress(run_b)
    same = [c for c in m.COLUMNS if c not in ("updates_per_s", "env_steps_per_s", "wall_s")]
    assert [(r["phase"], r["step"]) for r in rows_b] == [(r["phase"], r["step"]) for r in rows_a]
    assert [[r[c] for c in same] for r in rows_b] == [[r[c] for c in same] for r in rows_a]
    # And the same final networks and optimizer states, bit for bit (CPU, one thread).
    final_a = torch.load(run_a / "final.pt", weights_only=True)["agent"]
    final_b = torch.load(run_b / "final.pt", weights_only=True)["agent"]
    for part in ("actor", "critic", "critic_target"):
        for key, value in final_a[part].items():
            assert torch.equal(value, final_b[part][key]), (part, key)

    again = run_script("redq_adaptive_bc.py", "--resume", run_b, datasets_path=datasets_path, cwd=tmp_path)
    assert again.returncode == 0 and "finished already" in again.stderr
    bad = run_script("redq_adaptive_bc.py", "--resume", tmp_path, datasets_path=datasets_path, cwd=tmp_path)
    assert bad.returncode == 2 and one_error_line(bad) and "is not a run folder" in bad.stderr
