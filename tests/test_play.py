"""scripts/play.py: the score it prints is the one computed by hand from its returns and the run's
reference scores, it replays the run's own last evaluation exactly, bad input is one line and exit 2,
and (where imageio-ffmpeg and headless OpenGL work) it writes a video of the episodes."""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, run_script


def play(*args, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "play.py"), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def parse(stdout):
    returns = [float(x) for x in re.findall(r"^episode \d+: return (\S+)", stdout, re.M)]
    score = float(re.search(r"^mean normalized score \(x100\): (\S+)", stdout, re.M).group(1))
    return returns, score


@pytest.fixture(scope="module")
def run_dir(datasets_path, tmp_path_factory):
    """A finished tiny run of the main script (actor.pt, final.pt, config.json, progress.csv)."""
    out = tmp_path_factory.mktemp("play")
    proc = run_script(
        "redq_adaptive_bc.py",
        "--dataset",
        "uniform-random",
        *TINY,
        "--output-dir",
        out / "runs",
        datasets_path=datasets_path,
        cwd=out,
    )
    assert proc.returncode == 0, proc.stderr
    (folder,) = (out / "runs").iterdir()
    return folder


@pytest.fixture(scope="module")
def played(run_dir):
    """play.py on run_dir, 2 episodes from seed 5, without video."""
    proc = play(run_dir, "--episodes", 2, "--seed", 5)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_score_is_the_mean_normalized_return(run_dir, played):
    proc = played
    returns, score = parse(proc.stdout)
    config = json.loads((run_dir / "config.json").read_text())
    lo, hi = config["ref_min_score"], config["ref_max_score"]  # -20.272305, 3234.3 (D4RL's Hopper)
    assert len(returns) == 2
    # 100 * (mean return - ref_min) / (ref_max - ref_min); returns are printed to 4 decimals
    assert score == pytest.approx(100 * (np.mean(returns) - lo) / (hi - lo), abs=1e-3)


@pytest.mark.slow
def test_replays_the_runs_last_evaluation(run_dir):
    # Default seed = the run's seed + 100, the seed of its evaluations; one episode as in TINY's
    # --eval-episodes 1. The same weights and the deterministic action give the last row's return.
    last = (run_dir / "progress.csv").read_text().splitlines()[-1].split(",")
    proc = play(run_dir, "--episodes", 1)
    assert proc.returncode == 0, proc.stderr
    (ret,), score = parse(proc.stdout)
    assert ret == pytest.approx(float(last[4]), rel=1e-5)  # return_mean, written with 6 significant digits
    assert score == pytest.approx(float(last[2]), abs=1e-4)  # normalized_score
    # final.pt holds the same actor: a run folder without actor.pt plays the same episode
    copy = run_dir.parent / "no-actor"
    shutil.copytree(run_dir, copy)
    (copy / "actor.pt").unlink()
    fallback = play(copy, "--episodes", 1)
    assert fallback.returncode == 0, fallback.stderr
    assert parse(fallback.stdout)[0] == [ret]
    assert "final.pt" in fallback.stdout


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "unfinished", "corrupt", "unknown_method", "bad_episodes", "no_writer"])
def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, case):
    folder = tmp_path / "run"
    shutil.copytree(run_dir, folder, ignore=shutil.ignore_patterns("*.pt"))
    args, expected = [folder], ""
    if case == "missing":
        args, expected = [tmp_path / "nope"], "no such run folder"
    elif case == "unfinished":  # no actor.pt, no final.pt
        expected = "neither actor.pt nor final.pt"
    elif case == "corrupt":
        (folder / "actor.pt").write_bytes((run_dir / "actor.pt").read_bytes()[:100])  # cut short
        expected = "not a readable checkpoint"
    elif case == "unknown_method":
        checkpoint = torch.load(run_dir / "actor.pt", weights_only=False)
        checkpoint["meta"]["method"] = "no_such_method"
        torch.save(checkpoint, folder / "actor.pt")
        expected = "baselines/no_such_method.py"
    elif case == "bad_episodes":
        args, expected = [run_dir, "--episodes", 0], "--episodes"
    if case == "no_writer":  # imageio_ffmpeg made unimportable; the check comes before any rollout
        code = (
            "import runpy, sys; sys.modules['imageio_ffmpeg'] = None; "
            f"sys.argv = ['play.py', {str(run_dir)!r}, '--video', {str(tmp_path / 'v.mp4')!r}]; "
            f"runpy.run_path({str(ROOT / 'scripts' / 'play.py')!r}, run_name='__main__')"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        expected = "pip install imageio-ffmpeg"
    else:
        proc = play(*args)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:"), proc.stderr
    assert expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.slow
def test_video(run_dir, played, tmp_path):
    ffmpeg = pytest.importorskip(
        "imageio_ffmpeg", reason="--video needs imageio-ffmpeg (optional: pip install imageio-ffmpeg)"
    )
    video = tmp_path / "hopper.mp4"
    proc = play(run_dir, "--episodes", 1, "--seed", 5, "--video", video)  # software GL: ~5 frames/s
    if proc.returncode == 2 and "rendering failed" in proc.stderr:
        pytest.skip(f"no headless OpenGL here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    count = int(re.search(r"wrote .* \((\d+) frames at 125 fps\)", proc.stdout).group(1))  # Hopper's render_fps
    reader = ffmpeg.read_frames(str(video))
    meta = next(reader)
    frames = [np.frombuffer(f, np.uint8).reshape(meta["size"][1], meta["size"][0], 3) for f in reader]
    assert meta["size"] == (480, 480)
    assert len(frames) == count
    # the first observation and one frame per step; a rendered scene, not a blank image
    assert count > 2
    assert max(f.std() for f in frames) > 10
    assert parse(proc.stdout)[0] == parse(played.stdout)[0][:1]  # rendering changes nothing


def test_a_task_folder_holding_one_run_plays_that_run(run_dir, played, tmp_path):
    # A sweep keeps each task's run one level down: <sweep>/runs/task_<i>/<run folder>/.
    task = tmp_path / "runs" / "task_1"
    shutil.copytree(run_dir, task / run_dir.name)
    proc = play(task, "--episodes", 2, "--seed", 5)
    assert proc.returncode == 0, proc.stderr
    assert parse(proc.stdout) == parse(played.stdout), "the same episodes as playing the run folder itself"
    shutil.copytree(run_dir, task / "second-run")
    two = play(task, "--episodes", 1)
    assert two.returncode == 2, "two runs in the folder: which to play is ambiguous"
    assert "holds 2 run folders" in two.stderr, two.stderr


def test_sigterm_stops_a_rollout_within_seconds(run_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "play.py"), str(run_dir), "--episodes", "1000000"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip(), "the header line"
        assert proc.stdout.readline().startswith("episode 1:"), "the rollout runs"
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        rc = proc.wait(timeout=30)
        waited = time.monotonic() - sent
    finally:
        proc.kill()
    assert rc == 130, "stopped as by Ctrl-C"
    assert waited < 5, f"stopped {waited:.1f} s after SIGTERM"
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr and "interrupted" in stderr, stderr


def test_a_stopped_video_leaves_no_file(tmp_path, monkeypatch):
    # A stand-in for imageio-ffmpeg's write_frames: a generator that writes each frame's bytes to its path.
    def write_frames(path, size, **kwargs):
        with open(path, "wb") as f:
            while True:
                frame = yield
                if frame is not None:
                    f.write(frame.tobytes())

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", types.SimpleNamespace(write_frames=write_frames))
    spec = importlib.util.spec_from_file_location("play_script", ROOT / "scripts" / "play.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    frame = np.zeros((2, 2, 3), np.uint8)
    stopped = script.VideoFrames(tmp_path / "stopped.mp4", 30)
    stopped.send(frame)
    assert not (tmp_path / "stopped.mp4").exists(), "frames go to a temporary name"
    stopped.close(keep=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "a stopped rollout leaves neither video nor temp file"
    done = script.VideoFrames(tmp_path / "done.mp4", 30)
    done.send(frame)
    done.send(frame)
    done.close(keep=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done.mp4"], "a finished rollout's video is renamed"
    assert (tmp_path / "done.mp4").stat().st_size == 2 * frame.nbytes, "with every frame"
