"""Issue 13: the ways a user can break a run, each met as a user meets it (the script run as a subprocess with
tiny budgets). Every bad case ends with exit status 2 and one line on stderr starting with `error:` (no
traceback), and loses or damages no file of the run folder or the datasets root. The plumbing is shared, so
one script is enough for most cases; the cheap ones run for all five scripts at the end of this file."""

import contextlib
import csv
import hashlib
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, assert_same_networks, hopper_episodes, make_minari_dataset, spaces

pytestmark = pytest.mark.slow  # almost every test runs the scripts as subprocesses, several at once

MAIN = "redq_adaptive_bc.py"
BASELINES = ["baselines/td3_bc.py", "baselines/redq.py", "baselines/awac.py", "baselines/balanced_replay.py"]
HOST = socket.gethostname()
DATASET = "local/hopper/uniform-random-400steps-v0"  # conftest's datasets_path holds it
# A run that lives long enough to be killed, resumed and locked: 3 offline and 7 online evaluations.
RESUMABLE = [
    "--dataset",
    "uniform-random",
    "--random-dataset-steps",
    400,
    "--offline-steps",
    200,
    "--online-steps",
    600,
    "--eval-every",
    100,
    "--eval-episodes",
    1,
    "--utd",
    1,
    "--hidden-dim",
    16,
    "--num-critics",
    3,
    "--batch-size",
    32,
    "--keep-min",
    100,
    "--checkpoint-every",
    50,
]
RESUMABLE_ROWS = [("offline", s) for s in (0, 100, 200)] + [("online", s) for s in range(0, 601, 100)]
# Fast runs on a 300-step dataset: 2 offline and 2 online evaluations.
QUICK = [
    "--dataset",
    "uniform-random",
    "--random-dataset-steps",
    300,
    "--offline-steps",
    20,
    "--online-steps",
    20,
    "--eval-every",
    20,
    "--eval-episodes",
    1,
    "--utd",
    1,
    "--hidden-dim",
    16,
    "--num-critics",
    3,
    "--batch-size",
    32,
    "--keep-min",
    100,
]


# ---------------------------------------------------------------------------------------
# Running scripts, several at once (each one is mostly Python start-up)
# ---------------------------------------------------------------------------------------
def start(script, *flags, datasets_path, cwd):
    env = {**os.environ, "MINARI_DATASETS_PATH": str(datasets_path), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *map(str, flags)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc, timeout=300):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_together(cases: dict, datasets_path, cwd) -> dict:
    """{name: (script, flags...)} started at once; {name: CompletedProcess}."""
    procs = {name: start(*case, datasets_path=datasets_path, cwd=cwd) for name, case in cases.items()}
    return {name: finish(proc) for name, proc in procs.items()}


def usage_error(proc, *fragments, alone=False) -> str:
    """Exit status 2, no traceback, exactly one stderr line starting with 'error:' and it is the last one
    (alone: the only line, as for a bad flag rejected before any work)."""
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, (proc.returncode, proc.stderr)
    assert len(errors) == 1, proc.stderr
    assert lines[-1] == errors[0], proc.stderr
    assert not alone or len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def snapshot(folder: Path) -> dict:
    """Every file under folder and a hash of its bytes (.lock aside: taking a lock writes the taker's pid)."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    } | {str(p.relative_to(folder)) + "/": "" for p in folder.rglob("*") if p.is_dir()}


def read_progress(run_dir):
    with open(run_dir / "progress.csv", newline="") as f:
        return list(csv.DictReader(f))


def no_run_folder(output_dir: Path) -> bool:
    """The output folder holds nothing (its checks may have made it, empty)."""
    return not output_dir.exists() or not any(output_dir.iterdir())


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: no process has its pid (until the kernel reuses it)
    return child.pid


def copy_dataset(datasets_path, root: Path) -> Path:
    """A private copy of conftest's dataset under root, to be damaged."""
    target = root / DATASET
    shutil.copytree(datasets_path / DATASET, target)
    return target / "data"


@pytest.fixture(scope="module")
def killed_run(datasets_path, tmp_path_factory):
    """A run killed with SIGKILL after its first latest.pt (offline step 50): (the folder, whose lock holder
    died, and a pristine copy of it for the tests to copy)."""
    out = tmp_path_factory.mktemp("killed")
    proc = start(MAIN, *RESUMABLE, "--output-dir", out / "runs", datasets_path=datasets_path, cwd=out)
    try:
        deadline = time.time() + 120
        while not list(out.glob("runs/*/latest.pt")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.kill()  # SIGKILL
    finally:
        result = finish(proc)
    assert result.returncode == -signal.SIGKILL, result.stderr
    (run_dir,) = (out / "runs").iterdir()
    assert (run_dir / "latest.pt").is_file()
    assert not (run_dir / "final.pt").exists()
    pristine = out / "pristine" / run_dir.name
    shutil.copytree(run_dir, pristine)
    return run_dir, pristine


def resumable_copy(killed_run, folder: Path) -> Path:
    shutil.copytree(killed_run[1], folder)
    return folder


# ---------------------------------------------------------------------------------------
# 1. Two --resume of one run folder at once; a stale lock
# ---------------------------------------------------------------------------------------
def test_second_resume_is_refused_while_the_first_finishes_and_a_dead_holders_lock_is_free(
    killed_run, datasets_path, tmp_path
):
    run_dir = killed_run[0]  # locked by a process that SIGKILL ended: the lock must not block --resume
    datasets_before = snapshot(datasets_path)
    first = start(MAIN, "--resume", run_dir, datasets_path=datasets_path, cwd=tmp_path)
    try:
        deadline = time.time() + 120
        while (run_dir / ".lock").read_text() != f"pid {first.pid} on {HOST}":
            assert first.poll() is None, first.communicate()[1]
            assert time.time() < deadline, first.communicate()[1]
            time.sleep(0.02)
        second = finish(start(MAIN, "--resume", run_dir, datasets_path=datasets_path, cwd=tmp_path))
        assert first.poll() is None, "the first run ended before the second one tried its lock"
    finally:
        done = finish(first)
    usage_error(second, f"{run_dir} is in use by pid {first.pid} on {HOST}; wait for it to finish")
    assert done.returncode == 0, done.stderr
    rows = read_progress(run_dir)
    assert [(r["phase"], int(r["step"])) for r in rows] == RESUMABLE_ROWS  # every row once, none lost
    assert all(r["normalized_score"] for r in rows)
    assert all(r["wall_s"] for r in rows)
    with open(run_dir / "episodes.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps
    assert steps == sorted(set(steps))
    assert steps[-1] <= 600
    assert (run_dir / "final.pt").is_file()
    assert not (run_dir / "latest.pt").exists()
    assert snapshot(datasets_path) == datasets_before


# ---------------------------------------------------------------------------------------
# 2. Parallel runs differing only in a variant flag, started together (on a dataset none has built yet)
# ---------------------------------------------------------------------------------------
def test_parallel_variants_started_together_all_succeed_in_their_own_folders(tmp_path):
    root = tmp_path / "datasets"  # empty: all three build local/hopper/uniform-random-300steps-v0 at once
    variants = {"kp0": ["--kp", 0], "kp1e-4": ["--kp", 1e-4], "fixed": ["--no-adaptive-bc"]}
    results = run_together(
        {name: (MAIN, *QUICK, *flags, "--output-dir", tmp_path / "runs") for name, flags in variants.items()},
        root,
        tmp_path,
    )
    for name, proc in results.items():
        assert proc.returncode == 0, (name, proc.stderr)
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 3
    assert all(f.name.startswith("hopper-uniform-random-300steps__redq_adaptive_bc__0__") for f in folders)
    configs = [json.loads((f / "config.json").read_text()) for f in folders]
    assert sorted((c["kp"], c["adaptive_bc"]) for c in configs) == [(0.0, True), (3e-5, False), (1e-4, True)]
    for folder in folders:
        assert (folder / "final.pt").is_file()
        assert [(r["phase"], int(r["step"])) for r in read_progress(folder)] == [
            ("offline", 0),
            ("offline", 20),
            ("online", 0),
            ("online", 20),
        ]
    assert sorted(p.name for p in root.iterdir()) == ["local"]  # no staging folder left behind
    metadata = json.loads((root / "local/hopper/uniform-random-300steps-v0/data/metadata.json").read_text())
    assert metadata["total_steps"] == 300


# ---------------------------------------------------------------------------------------
# 3. A damaged latest.pt
# ---------------------------------------------------------------------------------------
def test_resume_from_a_damaged_latest_pt(killed_run, datasets_path, tmp_path):
    runs = {kind: resumable_copy(killed_run, tmp_path / kind) for kind in ("random", "truncated", "empty")}
    latest = (runs["random"] / "latest.pt").read_bytes()
    (runs["random"] / "latest.pt").write_bytes(np.random.default_rng(0).bytes(len(latest)))
    (runs["truncated"] / "latest.pt").write_bytes(latest[: len(latest) // 2])
    (runs["empty"] / "latest.pt").write_bytes(b"")
    before = {kind: snapshot(run) for kind, run in runs.items()}
    results = run_together({kind: (MAIN, "--resume", run) for kind, run in runs.items()}, datasets_path, tmp_path)
    for kind, proc in results.items():
        usage_error(proc, f"--resume: {runs[kind] / 'latest.pt'} is not a readable checkpoint (")
        assert snapshot(runs[kind]) == before[kind], kind  # progress.csv and the rest untouched


# ---------------------------------------------------------------------------------------
# 4. and 5. Datasets that do not fit or are broken
# ---------------------------------------------------------------------------------------
def test_dataset_with_actions_outside_the_envs_bounds(tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    episodes = hopper_episodes(4, 25)
    for ep in episodes:
        ep["actions"] = np.where(ep["actions"] > 0, 100.0, -100.0).astype(np.float32)  # the right shape, x100
    make_minari_dataset("local/hopper/loud-v0", episodes, env_id="Hopper-v5", **spaces(11, 3))
    before = snapshot(root)
    proc = finish(
        start(
            MAIN,
            "--dataset-id",
            "local/hopper/loud-v0",
            "--output-dir",
            tmp_path / "runs",
            datasets_path=root,
            cwd=tmp_path,
        )
    )
    usage_error(
        proc, "dataset local/hopper/loud-v0: actions span [-100, 100], outside the environment's bounds [-1, 1]"
    )
    assert snapshot(root) == before
    assert no_run_folder(tmp_path / "runs")


def break_dataset(datasets_path, root: Path, kind: str):
    data = copy_dataset(datasets_path, root)
    if kind == "no episodes":
        with h5py.File(data / "main_data.hdf5", "a") as f:
            for name in list(f.keys()):
                del f[name]
        metadata = json.loads((data / "metadata.json").read_text())
        (data / "metadata.json").write_text(json.dumps({**metadata, "total_episodes": 0, "total_steps": 0}))
    elif kind == "truncated hdf5":
        with open(data / "main_data.hdf5", "r+b") as f:
            f.truncate(f.seek(0, 2) - 2000)
    elif kind == "lost last episode":
        with h5py.File(data / "main_data.hdf5", "a") as f:
            del f[f"episode_{len(f.keys()) - 1}"]
    elif kind == "no metadata.json":
        (data / "metadata.json").unlink()
    elif kind == "not a dataset":  # a folder where the dataset would go, holding something else
        shutil.rmtree(data)
        (data.parent / "notes.txt").write_text("mine")


BROKEN = {
    "no episodes": f"dataset {DATASET} has no episodes",
    "truncated hdf5": "cannot be read (Unable to synchronously open file (truncated file",
    "lost last episode": "cannot be read (",
    "no metadata.json": "has no metadata.json (an incomplete copy?)",
    "not a dataset": "that folder holds no dataset: delete it and try again",
}


def test_broken_datasets(datasets_path, tmp_path):
    roots = {kind: tmp_path / kind.replace(" ", "_") for kind in BROKEN}
    for kind, root in roots.items():
        break_dataset(datasets_path, root, kind)
    before = {kind: snapshot(root) for kind, root in roots.items()}
    procs = {
        kind: start(
            MAIN,
            "--dataset",
            "uniform-random",
            "--random-dataset-steps",
            400,
            "--output-dir",
            tmp_path / "runs",
            datasets_path=root,
            cwd=tmp_path,
        )
        for kind, root in roots.items()
    }
    results = {kind: finish(proc) for kind, proc in procs.items()}
    for kind, proc in results.items():
        usage_error(proc, f"dataset {DATASET}", BROKEN[kind])
        assert snapshot(roots[kind]) == before[kind], kind  # nothing deleted, nothing half-written left
    assert no_run_folder(tmp_path / "runs")


# ---------------------------------------------------------------------------------------
# 6. and 7. Rejected before any work: sizes that cannot fit, output folders that cannot hold runs, paths
#    that leave the datasets root
# ---------------------------------------------------------------------------------------
def test_rejected_before_any_work(tmp_path):
    root = tmp_path / "a" / "b" / "c" / "datasets"  # empty: loading the dataset would build it
    (tmp_path / "a_file").write_text("not a folder")
    huge = 10**12  # by the estimate (Ant-sized transitions, 880 bytes each) far beyond any machine
    runs = tmp_path / "runs"
    cases = {
        "online steps": (
            ["--online-steps", huge, "--output-dir", runs],
            "the networks and the replay buffer need about",
        ),
        "hidden dim": (["--hidden-dim", 10**9, "--output-dir", runs], "the networks and the replay buffer need about"),
        "file as output dir": (["--output-dir", tmp_path / "a_file"], f"--output-dir {tmp_path / 'a_file'} cannot"),
        "output dir in a file": (["--output-dir", tmp_path / "a_file" / "runs"], "cannot hold run folders"),
        "traversal": (
            ["--dataset-id", "local/../../../x/random-300steps-v0", "--output-dir", runs],
            "dataset id 'local/../../../x/random-300steps-v0' is not a Minari id",
        ),
        "target return": (["--target-return", "nan", "--output-dir", runs], "--target-return must be finite, got nan"),
    }
    before = snapshot(tmp_path)
    results = run_together({name: (MAIN, *QUICK, *flags) for name, (flags, _) in cases.items()}, root, tmp_path)
    for name, (_, message) in cases.items():
        usage_error(results[name], message, alone=True)  # one line: the dataset was not even loaded
    assert not runs.exists()  # not even the output folder is made for a rejected run
    after = snapshot(tmp_path)
    assert after == before  # no dataset built, nothing written outside the datasets root
    assert (tmp_path / "a_file").read_text() == "not a folder"


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


def test_a_malicious_pickle_as_load_offline_does_not_run(datasets_path, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"agent": {}, "meta": Evil(marker), "num_updates": 0, "rng": {}}, tmp_path / "offline.pt")
    proc = finish(
        start(
            MAIN,
            *QUICK,
            "--load-offline",
            tmp_path / "offline.pt",
            "--output-dir",
            tmp_path / "runs",
            datasets_path=datasets_path,
            cwd=tmp_path,
        )
    )
    line = usage_error(proc, alone=True)
    # what was refused and why, in one complete line (issue 17: it used to stop mid-sentence at "Re-running `torch.")
    assert line == (
        f"error: --load-offline: {tmp_path / 'offline.pt'} is not a readable checkpoint (UnpicklingError: it holds a "
        f"pickled io.open, which torch.load(weights_only=True) refuses to build because unpickling it could run "
        f"code; this project's checkpoints hold only tensors and plain values)"
    )
    assert not marker.exists()
    assert no_run_folder(tmp_path / "runs")


# ---------------------------------------------------------------------------------------
# 8. A run folder that does not fit --resume
# ---------------------------------------------------------------------------------------
def edit_config(run: Path, **changes):
    config = json.loads((run / "config.json").read_text())
    config.update({k: v for k, v in changes.items() if v is not None})
    for key in [k for k, v in changes.items() if v is None]:
        del config[key]
    (run / "config.json").write_text(json.dumps(config))


def test_resume_of_a_folder_whose_config_does_not_fit(killed_run, datasets_path, tmp_path):
    runs = {
        kind: resumable_copy(killed_run, tmp_path / kind)
        for kind in ("string batch size", "float offline steps", "no method", "no progress")
    }
    edit_config(runs["string batch size"], batch_size="32")
    edit_config(runs["float offline steps"], offline_steps=200.0)
    edit_config(runs["no method"], method=None)
    (runs["no progress"] / "progress.csv").unlink()
    messages = {
        "string batch size": "config.json has batch_size='32', not a <class 'int'>",
        "float offline steps": "config.json has offline_steps=200.0, not a <class 'int'>",
        "no method": "is a run of an unknown method, not redq_adaptive_bc",
        "no progress": "has no progress.csv; start a new run instead",
    }
    before = {kind: snapshot(run) for kind, run in runs.items()}
    results = run_together({kind: (MAIN, "--resume", run) for kind, run in runs.items()}, datasets_path, tmp_path)
    for kind, proc in results.items():
        usage_error(proc, f"--resume: {runs[kind]}", messages[kind], alone=True)
        assert snapshot(runs[kind]) == before[kind], kind  # progress.csv, latest.pt: the same bytes


# ---------------------------------------------------------------------------------------
# 9. A dataset build killed half-way leaves a staging folder: the next build removes it
# ---------------------------------------------------------------------------------------
def test_the_next_build_removes_a_dead_builds_staging_folder(tmp_path):
    root = tmp_path / "datasets"
    leftover = root / f".staging-{HOST}-{dead_pid()}-x7k2m9qa"  # as a SIGKILL during minari's write leaves it
    (leftover / "local/hopper/uniform-random-300steps-v0/data").mkdir(parents=True)
    (leftover / "local/hopper/uniform-random-300steps-v0/data/main_data.hdf5").write_bytes(b"\x89HDF\r\n half")
    # the build happens, then the run stops at its reference scores (min above D4RL's max), cheaply
    proc = finish(
        start(
            MAIN, *QUICK, "--ref-min-score", 5000, "--output-dir", tmp_path / "runs", datasets_path=root, cwd=tmp_path
        )
    )
    usage_error(proc, "reference scores must satisfy min < max, got 5000.0 and 3234.3")
    assert not leftover.exists()
    assert sorted(p.name for p in root.iterdir()) == ["local"]
    metadata = json.loads((root / "local/hopper/uniform-random-300steps-v0/data/metadata.json").read_text())
    assert metadata["total_steps"] == 300
    assert no_run_folder(tmp_path / "runs")


# ---------------------------------------------------------------------------------------
# The cheap checks for every script (the plumbing is shared; each script must call it)
# ---------------------------------------------------------------------------------------
SCRIPTS = [MAIN] + BASELINES


def method_run_folder(script, folder: Path) -> Path:
    """A run folder of script's method, as its first process would have left it (config.json from its own
    Args, one progress.csv row), with random bytes as latest.pt."""
    module = importlib.import_module(Path(script).stem)
    from plumbing.run_folder import PROGRESS_COLUMNS

    folder.mkdir(parents=True)
    args = module.Args(dataset="uniform-random", random_dataset_steps=400, output_dir=str(folder.parent))
    (folder / "config.json").write_text(json.dumps({"method": module.METHOD, **asdict(args)}))
    (folder / "progress.csv").write_text(",".join(PROGRESS_COLUMNS) + "\noffline,0" + "," * 10 + "\n")
    (folder / "latest.pt").write_bytes(np.random.default_rng(1).bytes(5000))
    return folder


@pytest.fixture(scope="module")
def every_script(datasets_path, tmp_path_factory):
    """--seed -1, --hidden-dim 10**9 and --resume of a folder with a damaged latest.pt, for every script, all started
    at once."""
    tmp = tmp_path_factory.mktemp("every_script")
    cases, folders, setup_errors = {}, {}, {}
    for script in SCRIPTS:
        name = Path(script).stem
        cases[("seed", script)] = (script, "--seed", -1, "--output-dir", tmp / "runs" / name)
        cases[("huge", script)] = (script, "--hidden-dim", 10**9, "--output-dir", tmp / "runs" / name)
        try:
            folders[script] = method_run_folder(script, tmp / "resume" / name)
            cases[("latest", script)] = (script, "--resume", folders[script])
        except Exception as e:  # noqa: BLE001 - reported by the test of this script
            setup_errors[script] = e
    before = {script: snapshot(folder) for script, folder in folders.items()}
    results = run_together(cases, datasets_path, tmp)
    return tmp, results, folders, before, setup_errors


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_rejects_a_negative_seed(every_script, script):
    tmp, results, *_ = every_script
    usage_error(results[("seed", script)], "--seed must be in [0, 2**32), got -1", alone=True)
    assert not (tmp / "runs").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_rejects_networks_that_cannot_fit_before_any_work(every_script, script):
    tmp, results, *_ = every_script
    usage_error(results[("huge", script)], "the networks and the replay buffer need about", alone=True)
    assert not (tmp / "runs").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_refuses_a_damaged_latest_pt(every_script, script):
    tmp, results, folders, before, setup_errors = every_script
    if script in setup_errors:
        raise setup_errors[script]
    usage_error(results[("latest", script)], f"--resume: {folders[script] / 'latest.pt'} is not a readable checkpoint")
    assert snapshot(folders[script]) == before[script]


# ---------------------------------------------------------------------------------------
# Issue 17: a kill inside the finish step, stop signals in long plumbing loops, read-only mounts, a full disk,
# leftovers. Where a failure must happen at one exact point, a sitecustomize.py on the subprocess's PYTHONPATH
# wraps the call at that point (it changes nothing else): the kill, the signal and the full disk stay real.
# ---------------------------------------------------------------------------------------
HOOKS = """
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, os.environ["HOOK_ROOT"])
MARKS, HOOK = Path(os.environ["HOOK_MARKS"]), os.environ["HOOK"]


def mark(name):
    (MARKS / name).write_text(str(os.getpid()))


if HOOK == "kill-in-actor-pt":  # SIGKILL half-way through writing actor.pt's temporary file
    import torch
    save = torch.save

    def killing_save(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        if Path(f).name.startswith(".actor.pt."):
            os.truncate(f, os.path.getsize(f) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

    torch.save = killing_save
if HOOK == "mark-build-and-write":  # marks when the random dataset's steps and its Minari write begin
    import minari
    import plumbing.datasets
    build, write = plumbing.datasets.build_random_dataset, minari.create_dataset_from_buffers

    def marked_build(*args, **kwargs):
        mark("build")
        return build(*args, **kwargs)

    def marked_write(*args, **kwargs):
        mark("write")
        return write(*args, **kwargs)

    plumbing.datasets.build_random_dataset, minari.create_dataset_from_buffers = marked_build, marked_write
if HOOK == "fill-disk-at-second-latest-pt":  # the disk fills up just before the second latest.pt is written
    import errno, hashlib, torch
    save, saves = torch.save, []

    def filling_save(obj, f, *args, **kwargs):
        if Path(f).name.startswith(".latest.pt."):
            saves.append(f)
            if len(saves) == 2:
                latest = Path(f).with_name("latest.pt")
                mark("latest.md5:" + hashlib.md5(latest.read_bytes()).hexdigest())
                filler = os.environ.get("HOOK_FILLER")
                if not filler:  # no tmpfs could be mounted: ENOSPC as the kernel would report it
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                with open(filler, "wb") as out:  # a real full disk: write until the tmpfs has no room
                    try:
                        while True:
                            out.write(bytes(1 << 16))
                            out.flush()
                    except OSError:
                        pass
        return save(obj, f, *args, **kwargs)

    torch.save = filling_save
if HOOK == "slow-combine":  # medium + expert take minutes to combine at full size: 60 s here, after a mark
    import minari
    combine = minari.combine_datasets

    def slow_combine(*args, **kwargs):
        mark("combine")
        time.sleep(60)
        return combine(*args, **kwargs)

    minari.combine_datasets = slow_combine
if HOOK == "mark-rollouts":  # marks when --export-rollouts starts recording its rollouts
    import plumbing.recording
    init = plumbing.recording.EpisodeRecorder.__init__

    def marked_init(self, *args, stoppable=False, **kwargs):
        if stoppable:
            mark("rollouts")
        init(self, *args, stoppable=stoppable, **kwargs)

    plumbing.recording.EpisodeRecorder.__init__ = marked_init
if HOOK == "erofs":  # no read-only mount could be made: EROFS where the code first writes
    import errno, tempfile
    opened, mkdtemp = os.open, tempfile.mkdtemp

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    os.open = lambda path, *a, **k: read_only() if Path(path).name == ".lock" else opened(path, *a, **k)
    tempfile.mkdtemp = read_only
"""


def start_hooked(hook, tmp_path, *command, datasets_path, cwd, **env):
    """start() with the sitecustomize HOOKS running `hook` (marks land in tmp_path/marks); returns (proc, marks)."""
    hooks, marks = tmp_path / "hooks", tmp_path / "marks"
    hooks.mkdir(exist_ok=True)
    marks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(HOOKS)
    extra = {"PYTHONPATH": str(hooks), "HOOK": hook, "HOOK_MARKS": str(marks), "HOOK_ROOT": str(ROOT), **env}
    old = {key: os.environ.get(key) for key in extra}
    os.environ.update(extra)
    try:
        return start(*command, datasets_path=datasets_path, cwd=cwd), marks
    finally:
        for key, value in old.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def wait_for(path: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the process ended before {path.name}: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.01)


def temp_files(folder: Path) -> list:
    return sorted(p.name for p in folder.glob(".*.tmp"))


def test_resume_completes_the_finish_step_of_a_run_killed_while_writing_actor_pt(datasets_path, tmp_path):
    """A real SIGKILL half-way through actor.pt's temporary file (the hook kills the process there): final.pt is
    written, actor.pt is not, latest.pt and the dead writer's .actor.pt.<pid>.tmp are left. --resume completes the
    finish step and says the run finished; a second --resume changes nothing."""
    runs = tmp_path / "runs"
    flags = [*QUICK, "--checkpoint-every", 10, "--output-dir", runs]
    proc, _ = start_hooked("kill-in-actor-pt", tmp_path, MAIN, *flags, datasets_path=datasets_path, cwd=tmp_path)
    killed = finish(proc)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (run_dir,) = runs.iterdir()
    assert (run_dir / "final.pt").is_file() and (run_dir / "latest.pt").is_file(), "what the kill leaves"
    assert not (run_dir / "actor.pt").exists(), "actor.pt was not written before the kill"
    assert temp_files(run_dir) == [f".actor.pt.{proc.pid}.tmp"], "the dead writer's half file is left"
    kept = {k: v for k, v in snapshot(run_dir).items() if k not in ("latest.pt", f".actor.pt.{proc.pid}.tmp")}

    resumed = finish(start(MAIN, "--resume", run_dir, datasets_path=datasets_path, cwd=tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.strip().splitlines()[-1] == (
        f"{run_dir} has finished already (final.pt): nothing to resume; completed its finish step "
        f"(wrote actor.pt from final.pt, removed the stale latest.pt)"
    ), resumed.stderr
    assert not (run_dir / "latest.pt").exists(), "the stale latest.pt is removed"
    assert temp_files(run_dir) == [], "the dead writer's temporary file is removed"
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if k != "actor.pt"} == kept, "no other file changed"
    final = torch.load(run_dir / "final.pt", weights_only=True)
    actor = torch.load(run_dir / "actor.pt", weights_only=True)
    assert actor["meta"] == final["meta"], "actor.pt carries final.pt's meta"
    assert actor["actor"].keys() == final["agent"]["actor"].keys()
    for key, value in final["agent"]["actor"].items():
        assert torch.equal(actor["actor"][key], value), f"actor.pt's {key} is final.pt's"

    again = finish(start(MAIN, "--resume", run_dir, datasets_path=datasets_path, cwd=tmp_path))
    assert again.returncode == 0, again.stderr
    assert again.stderr.strip().splitlines()[-1] == f"{run_dir} has finished already (final.pt): nothing to resume"
    assert snapshot(run_dir) == after, "a finished run is not touched"


def test_resume_removes_dead_writers_temp_files_and_writes_one_line_ending(killed_run, datasets_path, tmp_path):
    """Temporary files of a dead pid go, one of a live pid (this test's) stays; the CSVs rewritten by --resume and
    the rows written after it end lines the same way (\\n)."""
    run_dir = resumable_copy(killed_run, tmp_path / "run")
    dead, live = run_dir / f".latest.pt.{dead_pid()}.tmp", run_dir / f".latest.pt.{os.getpid()}.tmp"
    dead.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    proc = finish(start(MAIN, "--resume", run_dir, datasets_path=datasets_path, cwd=tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert not dead.exists(), "a dead writer's temporary file is removed"
    assert live.read_bytes() == b"being written", "a live process's temporary file is kept"
    for name in ("progress.csv", "episodes.csv"):
        data = (run_dir / name).read_bytes()
        assert b"\r" not in data and data.endswith(b"\n"), f"{name}: one line ending (\\n) for old and new rows"
    assert [(r["phase"], int(r["step"])) for r in read_progress(run_dir)] == RESUMABLE_ROWS


@pytest.mark.parametrize("stage", ["build", "write"])
def test_sigterm_during_a_dataset_build_stops_it_within_seconds_leaving_nothing(stage, tmp_path):
    """SIGTERM once a 40k-step random dataset's steps (build) or its Minari write (write) have begun (the hook
    marks both; the build takes ~12 s and the write ~6 s on a loaded 2-core machine): the script exits 143 within
    5 s (measured: 0.5-0.9 s; before issue 17, 13.8 s, after the build, an evaluation and an update), says
    so, and leaves no dataset, no staging folder and no run folder."""
    root, runs = tmp_path / "datasets", tmp_path / "runs"
    flags = ["--dataset", "uniform-random", "--random-dataset-steps", 40_000, "--output-dir", runs]
    proc, marks = start_hooked("mark-build-and-write", tmp_path, MAIN, *flags, datasets_path=root, cwd=tmp_path)
    try:
        wait_for(marks / stage, proc)
        time.sleep(0.5 if stage == "build" else 0.2)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        seconds = time.monotonic() - sent
    finally:
        result = finish(proc)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    print(f"{stage}: {seconds:.2f} s from SIGTERM to exit")  # shown with pytest -s
    assert seconds < 5, f"{seconds:.1f} s from SIGTERM to exit"
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "stopped by SIGTERM: dataset local/hopper/uniform-random-40000steps-v0 was not finished and nothing of it "
        "was kept; the next run obtains it again"
    )
    assert list(root.rglob("*")) == [], "no dataset, no staging folder"
    assert no_run_folder(runs)


def mount(*args) -> bool:
    return subprocess.run(["mount", *map(str, args)], capture_output=True).returncode == 0


@contextlib.contextmanager
def mounted(*args, at: Path, bind_read_only=False):
    """mount args at `at` (made here); yields whether it worked (tests run as root, but a container may forbid
    mounts), and unmounts at the end."""
    at.mkdir()
    done = mount(*args, at)
    try:
        yield done and (not bind_read_only or mount("-o", "remount,ro,bind", at))
    finally:
        if done:
            subprocess.run(["umount", str(at)], capture_output=True)


def test_resume_of_a_run_folder_on_a_read_only_mount(killed_run, datasets_path, tmp_path):
    """A read-only bind mount of a resumable run folder where mounts are permitted, else EROFS raised where the
    lock is opened (the erofs hook): one line, exit 2, every file the same bytes."""
    run_dir = resumable_copy(killed_run, tmp_path / "run")
    before = snapshot(run_dir)
    with mounted("--bind", run_dir, at=tmp_path / "ro", bind_read_only=True) as read_only:
        if read_only:
            proc = finish(start(MAIN, "--resume", tmp_path / "ro", datasets_path=datasets_path, cwd=tmp_path))
            where = tmp_path / "ro"
        else:
            command = (MAIN, "--resume", run_dir)
            proc = finish(start_hooked("erofs", tmp_path, *command, datasets_path=datasets_path, cwd=tmp_path)[0])
            where = run_dir
    usage_error(proc, f"{where} cannot be written (Read-only file system: {where / '.lock'}); a run continues only")
    assert snapshot(run_dir) == before


def test_a_dataset_to_build_in_a_read_only_datasets_root(tmp_path):
    """An empty datasets root mounted read-only (a bind mount where permitted, else EROFS raised where the
    staging folder is made: the erofs hook): one line, exit 2, before the build and before any run folder."""
    root, runs = tmp_path / "datasets", tmp_path / "runs"
    root.mkdir()
    flags = [*QUICK, "--output-dir", runs]
    with mounted("--bind", root, at=tmp_path / "ro", bind_read_only=True) as read_only:
        started = time.monotonic()
        if read_only:
            proc = finish(start(MAIN, *flags, datasets_path=tmp_path / "ro", cwd=tmp_path))
            where = tmp_path / "ro"
        else:
            proc = finish(start_hooked("erofs", tmp_path, MAIN, *flags, datasets_path=root, cwd=tmp_path)[0])
            where = root
        seconds = time.monotonic() - started
    usage_error(
        proc,
        f"dataset local/hopper/uniform-random-300steps-v0 is not in {where} and cannot be written there "
        f"(Read-only file system); set MINARI_DATASETS_PATH to a writable folder",
        alone=True,
    )
    assert list(root.iterdir()) == [] and no_run_folder(runs)
    assert seconds < 30, f"rejected after {seconds:.0f} s: the build did not run first"


def test_a_datasets_root_that_is_a_file_and_a_huge_batch_are_one_line(killed_run, datasets_path, tmp_path):
    """MINARI_DATASETS_PATH naming a file; --batch-size 10**9 (a flag, and batch_size edited in config.json before
    --resume); --eval-episodes above 10,000: one line, exit 2, no run folder, the resumed folder unchanged."""
    (tmp_path / "a_file").write_text("not a folder")
    runs = tmp_path / "runs"
    edited = resumable_copy(killed_run, tmp_path / "edited")
    edit_config(edited, batch_size=10**9)
    before = snapshot(edited)
    results = run_together(
        {
            "batch": (MAIN, *QUICK, "--batch-size", 10**9, "--output-dir", runs),
            "edited batch": (MAIN, "--resume", edited),
            "episodes": (MAIN, *QUICK, "--eval-episodes", 10_001, "--output-dir", runs),
        },
        datasets_path,
        tmp_path,
    )
    for case in ("batch", "edited batch"):
        usage_error(results[case], "a batch of 1000000000 transitions and its activations need about", alone=True)
    usage_error(results["episodes"], "--eval-episodes must be at most 10,000, got 10001", alone=True)
    assert snapshot(edited) == before
    a_file = finish(start(MAIN, *QUICK, "--output-dir", runs, datasets_path=tmp_path / "a_file", cwd=tmp_path))
    usage_error(a_file, f"MINARI_DATASETS_PATH={tmp_path / 'a_file'} is not a folder", alone=True)
    assert (tmp_path / "a_file").read_text() == "not a folder" and no_run_folder(runs)


def test_a_full_disk_is_one_line_and_resume_after_freeing_space_gives_the_same_run(datasets_path, tmp_path):
    """The run folder on a 32 MiB tmpfs that the hook fills just before the second latest.pt is written (a real
    ENOSPC); where mounts are not permitted the hook raises ENOSPC at that write instead. One line naming the
    folder, exit 2, the previous latest.pt intact and no temporary file; --resume after freeing space ends
    with the networks and the scores of an uninterrupted run."""
    flags = [*QUICK, "--checkpoint-every", 10]
    reference = start(MAIN, *flags, "--output-dir", tmp_path / "reference", datasets_path=datasets_path, cwd=tmp_path)
    with mounted("-t", "tmpfs", "-o", "size=32m", "tmpfs", at=tmp_path / "disk") as tmpfs:
        filler = {"HOOK_FILLER": str(tmp_path / "disk" / "filler")} if tmpfs else {}
        command = (MAIN, *flags, "--output-dir", tmp_path / "disk" / "runs")
        proc, marks = start_hooked(
            "fill-disk-at-second-latest-pt", tmp_path, *command, datasets_path=datasets_path, cwd=tmp_path, **filler
        )
        full = finish(proc)
        (run_dir,) = (tmp_path / "disk" / "runs").iterdir()
        usage_error(
            full,
            f"disk full: no room in {run_dir} for latest.pt (No space left on device); the files written before are "
            f"intact: free space there, then continue with --resume {run_dir}",
        )
        (mark,) = [p.name for p in marks.iterdir() if p.name.startswith("latest.md5:")]
        latest = hashlib.md5((run_dir / "latest.pt").read_bytes()).hexdigest()
        assert mark == f"latest.md5:{latest}", "the previous latest.pt is intact"
        assert temp_files(run_dir) == [], "no temporary file is left"
        (tmp_path / "disk" / "filler").unlink(missing_ok=True)
        resumed = finish(start(MAIN, "--resume", run_dir, datasets_path=datasets_path, cwd=tmp_path))
        assert resumed.returncode == 0, resumed.stderr
        assert finish(reference).returncode == 0
        (reference_dir,) = (tmp_path / "reference").iterdir()
        assert_same_networks(run_dir, reference_dir, ["actor", "critic", "actor_target", "critic_target"])
        scores = [
            [(r["phase"], r["step"], r["normalized_score"]) for r in read_progress(d)] for d in (run_dir, reference_dir)
        ]
        assert scores[0] == scores[1], "the same rows and scores"


def sigterm_when_marked(proc, marks: Path, name: str):
    """SIGTERM once the hook marked `name`; returns (CompletedProcess, seconds from the signal to the exit)."""
    try:
        wait_for(marks / name, proc)
        time.sleep(0.3)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        seconds = time.monotonic() - sent
    finally:
        result = finish(proc)
    print(f"{name}: {seconds:.2f} s from SIGTERM to exit")  # shown with pytest -s
    return result, seconds


def test_sigterm_while_medium_expert_is_combined_stops_at_once(tmp_path):
    """D4RL's medium-expert recipe combines two Minari datasets in one library call; the hook makes it last 60 s
    (at full size it takes minutes), so the signal lands inside it: exit 143 within 5 s, the sources untouched,
    no combined dataset, no staging folder, no run folder."""
    root, runs = tmp_path / "datasets", tmp_path / "runs"
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        for name in ("medium", "expert"):
            make_minari_dataset(f"mujoco/hopper/{name}-v0", hopper_episodes(2, 20), env_id="Hopper-v5", **spaces(11, 3))
    finally:
        del os.environ["MINARI_DATASETS_PATH"]
    before = snapshot(root)
    command = (MAIN, "--dataset", "minari-medium-expert", "--output-dir", runs)
    proc, marks = start_hooked("slow-combine", tmp_path, *command, datasets_path=root, cwd=tmp_path)
    result, seconds = sigterm_when_marked(proc, marks, "combine")
    assert result.returncode == 128 + signal.SIGTERM and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert seconds < 5, f"{seconds:.1f} s from SIGTERM to exit"
    assert result.stderr.strip().splitlines()[-1] == (
        "stopped by SIGTERM: dataset local/hopper/minari-medium-expert-v0 was not finished and nothing of it was kept; "
        "the next run obtains it again"
    )
    assert snapshot(root) == before and no_run_folder(runs)


def test_sigterm_during_export_rollouts_stops_at_once_and_resume_makes_the_same_dataset(tmp_path):
    """baselines/redq.py --export-rollouts after a tiny training run: SIGTERM once the rollouts began (the hook
    marks it) ends them within 5 s, with no rollouts dataset and no staging folder left (the replay, exported
    first, is kept), and the run not finished: its latest.pt is the state after training (phase "exports", the
    replay done). --resume then makes the rollouts without training again or rewriting the replay; both datasets
    equal an uninterrupted run's step for step."""
    root, runs = tmp_path / "datasets", tmp_path / "runs"
    flags = ["--online-steps", 120, "--learning-starts", 100, "--eval-every", 60, "--eval-episodes", 1]
    flags += ["--num-critics", 3, "--hidden-dim", 16, "--batch-size", 32, "--rollout-steps", 10_000]
    export = ["--export-replay", "local/hopper/replay-v0", "--export-rollouts", "local/hopper/rollouts-v0"]
    export += ["--output-dir", runs]
    proc, marks = start_hooked(
        "mark-rollouts", tmp_path, "baselines/redq.py", *flags, *export, datasets_path=root, cwd=tmp_path
    )
    result, seconds = sigterm_when_marked(proc, marks, "rollouts")
    assert result.returncode == 128 + signal.SIGTERM and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert seconds < 5, f"{seconds:.1f} s from SIGTERM to exit"
    assert result.stderr.strip().splitlines()[-1] == (
        "stopped by SIGTERM: the recording stopped before it was written, no dataset was made; latest.pt is saved: "
        "continue with --resume <run folder>"
    )
    assert sorted(p.name for p in (root / "local" / "hopper").iterdir()) == ["replay-v0"], "the replay alone"
    assert not list(root.glob(".staging*")), "no staging folder"
    replay_written = (root / "local/hopper/replay-v0/data/main_data.hdf5").stat().st_mtime_ns
    (run_dir,) = runs.iterdir()
    assert not (run_dir / "final.pt").exists(), "the exports belong to the run: it has not finished"
    state = torch.load(run_dir / "latest.pt", weights_only=True)
    assert (state["phase"], state["step"], state["exported"]) == ("exports", 120, ["replay"])
    rows = (run_dir / "progress.csv").read_text()

    resumed = finish(start("baselines/redq.py", "--resume", run_dir, datasets_path=root, cwd=tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run_dir / "progress.csv").read_text() == rows, "no training step and no evaluation again"
    assert (run_dir / "final.pt").is_file() and (run_dir / "actor.pt").is_file()
    assert not (run_dir / "latest.pt").exists()
    assert (root / "local/hopper/replay-v0/data/main_data.hdf5").stat().st_mtime_ns == replay_written, "kept"
    assert "writing local/hopper/replay-v0" not in resumed.stderr, "not written again"
    other = ["--export-replay", "local/hopper/replay-b-v0", "--export-rollouts", "local/hopper/rollouts-b-v0"]
    other += ["--output-dir", tmp_path / "uninterrupted"]
    whole = finish(start("baselines/redq.py", *flags, *other, datasets_path=root, cwd=tmp_path))
    assert whole.returncode == 0, whole.stderr[-2000:]
    for dataset in ("replay", "rollouts"):
        with (
            h5py.File(root / f"local/hopper/{dataset}-v0/data/main_data.hdf5") as a,
            h5py.File(root / f"local/hopper/{dataset}-b-v0/data/main_data.hdf5") as b,
        ):
            assert sorted(a) == sorted(b) and len(a) > 1, f"{dataset}: the same episodes"
            for episode in a:
                for name in ("observations", "actions", "rewards", "terminations", "truncations"):
                    assert np.array_equal(a[episode][name][()], b[episode][name][()]), (dataset, episode, name)


def test_a_stop_signal_swallowed_by_a_weakref_callback_is_raised_again(capsys):
    """In process, as run_main sets the handlers: a SIGTERM whose Preempted is raised inside a weakref callback
    (where Python only prints an exception; h5py's writes run such callbacks) is raised again in the main flow
    within a moment (a 10 ms SIGALRM retry), and nothing is printed."""
    from plumbing.errors import STOP_SIGNALS, Preempted, request_stop, stop_raises, stop_requested

    previous = {signum: signal.signal(signum, request_stop) for signum in STOP_SIGNALS}
    stop_requested.clear()

    class Referent:
        pass

    def callback(ref):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # the handler runs here, inside the callback
            pass

    try:
        started = time.monotonic()
        with pytest.raises(Preempted) as stopped, stop_raises("a note"):
            referent = Referent()
            ref = weakref.ref(referent, callback)  # noqa: F841 - kept alive so its callback runs
            del referent
            time.sleep(5)  # the retry interrupts this
        assert time.monotonic() - started < 2, "raised again at once, not after the sleep"
        assert (stopped.value.signum, stopped.value.note) == (signal.SIGTERM, "a note")
        assert "Exception ignored" not in capsys.readouterr().err, "nothing printed"
        assert signal.getsignal(signal.SIGTERM) is request_stop, "the handlers are restored"
    finally:
        stop_requested.clear()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
