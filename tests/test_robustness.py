"""Issue 13: the ways a user can break a run, each met as a user meets it (the script run as a subprocess with
tiny budgets). Every bad case ends with exit status 2 and one line on stderr starting with `error:` (no
traceback), and loses or damages no file of the run folder or the datasets root. The plumbing is shared, so
one script is enough for most cases; the cheap ones run for all five scripts at the end of this file."""

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
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import ROOT, hopper_episodes, make_minari_dataset, spaces

pytestmark = pytest.mark.slow  # almost every test runs the scripts as subprocesses, several at once

MAIN = "redq_adaptive_bc.py"
BASELINES = ["baselines/td3_bc.py", "baselines/redq.py", "baselines/awac.py", "baselines/balanced_replay.py"]
HOST = socket.gethostname()
DATASET = "local/hopper/random-400steps-v0"  # conftest's datasets_path holds it
# A run that lives long enough to be killed, resumed and locked: 3 offline and 7 online evaluations.
RESUMABLE = [
    "--dataset",
    "random",
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
    "random",
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
    root = tmp_path / "datasets"  # empty: all three build local/hopper/random-300steps-v0 at once
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
    assert all(f.name.startswith("hopper-random-300steps__redq_adaptive_bc__0__") for f in folders)
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
    metadata = json.loads((root / "local/hopper/random-300steps-v0/data/metadata.json").read_text())
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
            "random",
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
    usage_error(
        proc, f"--load-offline: {tmp_path / 'offline.pt'} is not a readable checkpoint (UnpicklingError: ", alone=True
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
    (leftover / "local/hopper/random-300steps-v0/data").mkdir(parents=True)
    (leftover / "local/hopper/random-300steps-v0/data/main_data.hdf5").write_bytes(b"\x89HDF\r\n half")
    # the build happens, then the run stops at its reference scores (min above D4RL's max), cheaply
    proc = finish(
        start(
            MAIN, *QUICK, "--ref-min-score", 5000, "--output-dir", tmp_path / "runs", datasets_path=root, cwd=tmp_path
        )
    )
    usage_error(proc, "reference scores must satisfy min < max, got 5000.0 and 3234.3")
    assert not leftover.exists()
    assert sorted(p.name for p in root.iterdir()) == ["local"]
    assert json.loads((root / "local/hopper/random-300steps-v0/data/metadata.json").read_text())["total_steps"] == 300
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
    args = module.Args(dataset="random", random_dataset_steps=400, output_dir=str(folder.parent))
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
