"""scripts/play.py: the score it prints is the one computed by hand from its returns and the run's
reference scores, it replays the run's own last evaluation exactly, bad input is one line and exit 2,
and (where imageio-ffmpeg and headless OpenGL work) it writes a video of the episodes."""

import json
import os
import re
import shutil
import subprocess
import sys

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
        "random",
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
