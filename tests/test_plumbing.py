"""plumbing/, the package every script shares: each function against values worked out by hand.
(Its behaviour through a script, as a user meets it, is in test_robustness.py.)"""

import csv
import importlib.machinery
import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from conftest import HOPPER_REF, ROOT, hopper_episodes, make_minari_dataset, run_script

from plumbing import cli, datasets, errors, run_folder, tracking
from plumbing.cli import RunArgs, UsageError
from plumbing.datasets import choose_reference_scores, dataset_path, load_dataset, resolve_dataset_id, staged_dataset
from plumbing.run_folder import CsvLog, RunFolder, RunningMeans, load_torch


@pytest.fixture
def root(tmp_path, monkeypatch):
    """An empty MINARI_DATASETS_PATH."""
    path = tmp_path / "datasets"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(path))
    return path


@pytest.fixture(autouse=True)
def release_locks():
    """lock() keeps its descriptor for the life of the process: close the ones a test took."""
    before = len(run_folder.LOCKS)
    yield
    while len(run_folder.LOCKS) > before:
        os.close(run_folder.LOCKS.pop())


def one_line(error) -> bool:
    text = str(error.value if hasattr(error, "value") else error)
    return "\n" not in text and text.strip() == text and text != ""


# ---------------------------------------------------------------------------------------
# Dataset ids and paths
# ---------------------------------------------------------------------------------------
def test_resolve_dataset_id():
    assert resolve_dataset_id("hopper", "medium", None, 1_000_000) == "local/d4rl/hopper-medium-v0"  # D4RL, v0
    assert resolve_dataset_id("hopper", "medium", None, 300, "v2") == "local/d4rl/hopper-medium-v2"
    assert resolve_dataset_id("walker2d", "random", None, 300) == "local/d4rl/walker2d-random-v0"  # size: local only
    assert resolve_dataset_id("hopper", "uniform-random", None, 1_000_000) == "local/hopper/uniform-random-v0"
    assert resolve_dataset_id("hopper", "uniform-random", None, 300) == "local/hopper/uniform-random-300steps-v0"
    assert resolve_dataset_id("ant", "minari-medium-expert", None, 300) == "local/ant/minari-medium-expert-v0"
    assert resolve_dataset_id("hopper", "redq-medium-replay", None, 300) == "local/hopper/redq-medium-replay-v0"
    assert resolve_dataset_id("hopper", "random", "mujoco/ant/simple-v0", 300) == "mujoco/ant/simple-v0"
    with pytest.raises(UsageError, match="--dataset medium is D4RL's.*not --env ant"):
        resolve_dataset_id("ant", "medium", None, 300)
    with pytest.raises(UsageError, match="is not a Minari id"):
        resolve_dataset_id("hopper", "medium", "local/../../../x/random-300steps-v0", 1_000_000)


@pytest.mark.parametrize(
    "dataset_id",
    [
        "local/../../../x/random-300steps-v0",
        "../random-v0",
        "local/hopper/../../random-v0",
        "/etc/random-v0",
        "local/./random-v0",
        "local//random-v0",
        "local/hopper/",
        "local/hopper/random",
        "local/hop per/random-v0",
        "local\\..\\..\\random-v0",
        "~/random-v0",
        "local/hopper/random-v0\n",
    ],
)
def test_dataset_path_rejects_ids_that_leave_the_datasets_root(dataset_id, root):
    with pytest.raises(UsageError, match="is not a Minari id") as error:
        dataset_path(dataset_id)
    assert one_line(error)


def test_dataset_path_of_a_good_id(root):
    assert dataset_path("local/hopper/uniform-random-300steps-v0") == root / "local/hopper/uniform-random-300steps-v0"
    assert dataset_path("mujoco/hopper/medium-v0") == root / "mujoco" / "hopper" / "medium-v0"
    assert dataset_path("hopper-1.5_x-v10") == root / "hopper-1.5_x-v10"


def test_names_of_envs_and_datasets():
    assert datasets.env_name_of("Walker2d-v5") == "walker2d"
    assert datasets.env_name_of("mujoco/HalfCheetah-v5") == "halfcheetah"
    assert datasets.dataset_name_of("mujoco/hopper/medium-v0") == "medium"
    assert datasets.dataset_name_of("local/hopper/uniform-random-300steps-v0") == "uniform-random-300steps"


# ---------------------------------------------------------------------------------------
# Building, staging, downloading
# ---------------------------------------------------------------------------------------
def test_random_dataset_follows_d4rls_recipe(root):
    dataset = load_dataset("local/hopper/uniform-random-150steps-v0")  # not on disk: built, the size from the id
    episodes = list(dataset.iterate_episodes())
    assert dataset.total_steps == 150
    assert sum(len(ep.rewards) for ep in episodes) == 150
    assert dataset.spec.env_spec.id == "Hopper-v5"
    for ep in episodes:
        assert len(ep.observations) == len(ep.actions) + 1
        assert not ep.terminations[:-1].any()
        assert not ep.truncations[:-1].any()
    for ep in episodes[:-1]:  # a random hopper falls within 1000 steps: every full episode terminates
        assert ep.terminations[-1]
        assert not ep.truncations[-1]
    last = episodes[-1]  # cut by the budget: a time-out, unless it happened to terminate on the last step
    assert last.terminations[-1] != last.truncations[-1]
    # The default actions of this seed do not terminate exactly at step 150: the last one is truncated.
    assert last.truncations[-1]
    assert not last.terminations[-1]
    assert (np.abs(np.concatenate([ep.actions for ep in episodes])) <= 1).all()
    assert sorted(p.name for p in root.iterdir()) == ["local"]  # no staging folder left
    assert load_dataset("local/hopper/uniform-random-150steps-v0").total_steps == 150  # now read from disk


def test_random_dataset_of_zero_steps_is_not_a_recipe(root):
    with pytest.raises(UsageError, match="local/hopper/uniform-random-0steps-v0 not found"):
        load_dataset("local/hopper/uniform-random-0steps-v0")
    assert not (root / "local" / "hopper" / "uniform-random-0steps-v0").exists()


def test_staged_dataset_moves_a_complete_dataset_into_place(root):
    with staged_dataset("local/x/y-v0"):
        scratch = Path(os.environ["MINARI_DATASETS_PATH"])
        assert scratch.parent == root
        assert scratch.name.startswith(f".staging-{socket.gethostname()}-{os.getpid()}-")
        (scratch / "local/x/y-v0/data").mkdir(parents=True)
        (scratch / "local/x/y-v0/data/metadata.json").write_text("{}")
    assert os.environ["MINARI_DATASETS_PATH"] == str(root)
    assert (root / "local/x/y-v0/data/metadata.json").read_text() == "{}"
    assert sorted(p.name for p in root.iterdir()) == ["local"]


def test_staged_dataset_leaves_no_half_written_dataset(root):
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_dataset("local/x/y-v0"):
            scratch = Path(os.environ["MINARI_DATASETS_PATH"])
            (scratch / "local/x/y-v0/data").mkdir(parents=True)
            (scratch / "local/x/y-v0/data/main_data.hdf5").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert os.environ["MINARI_DATASETS_PATH"] == str(root)
    assert list(root.iterdir()) == []


def test_staged_dataset_keeps_the_copy_a_parallel_run_finished_first(root):
    (root / "local/x/y-v0/data").mkdir(parents=True)
    (root / "local/x/y-v0/data/metadata.json").write_text('{"first": 1}')
    with staged_dataset("local/x/y-v0"):
        scratch = Path(os.environ["MINARI_DATASETS_PATH"])
        (scratch / "local/x/y-v0/data").mkdir(parents=True)
        (scratch / "local/x/y-v0/data/metadata.json").write_text('{"second": 2}')
    assert (root / "local/x/y-v0/data/metadata.json").read_text() == '{"first": 1}'
    assert sorted(p.name for p in root.iterdir()) == ["local"]


def test_staged_dataset_never_overwrites_a_folder_that_is_not_a_dataset(root):
    (root / "local/x/y-v0/notes").mkdir(parents=True)
    (root / "local/x/y-v0/notes/mine.txt").write_text("keep me")
    with pytest.raises(UsageError, match="holds no dataset: delete it") as error:
        with staged_dataset("local/x/y-v0"):
            scratch = Path(os.environ["MINARI_DATASETS_PATH"])
            (scratch / "local/x/y-v0/data").mkdir(parents=True)
    assert one_line(error)
    assert (root / "local/x/y-v0/notes/mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in root.iterdir()) == ["local"]


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: its pid belongs to no process (until the kernel reuses it)
    assert not datasets.process_alive(child.pid)
    return child.pid


def test_dead_staging_folders_of_this_host_are_removed(root):
    host, pid = socket.gethostname(), dead_pid()
    dead = root / f".staging-{host}-{pid}-k2j_x8ab"
    alive = root / f".staging-{host}-{os.getpid()}-q1w2e3r4"  # a build in progress (this process)
    other_host = root / f".staging-some-other-host-{pid}-a1b2c3d4"  # its pid means nothing here
    for folder in (dead, alive, other_host):
        (folder / "local/x/y-v0/data").mkdir(parents=True)
    with staged_dataset("local/x/z-v0"):
        (Path(os.environ["MINARI_DATASETS_PATH"]) / "local/x/z-v0").mkdir(parents=True)
    assert not dead.exists()
    assert alive.exists()
    assert other_host.exists()


def test_failed_download_leaves_nothing_behind(root, monkeypatch):
    import minari

    def partial_download(dataset_id, *args, **kwargs):  # writes half a dataset, then the network fails
        (datasets.datasets_root() / dataset_id / "data").mkdir(parents=True)
        raise ConnectionError("Max retries exceeded with url: /api/datasets\nsecond line")

    monkeypatch.setattr(minari, "download_dataset", partial_download)
    with pytest.raises(
        UsageError,
        match=r"mujoco/hopper/medium-v0 .*could not be downloaded \(Max retries.*"
        r"minari download mujoco/hopper/medium-v0",
    ) as error:
        load_dataset("mujoco/hopper/medium-v0")
    assert one_line(error)
    assert list(root.iterdir()) == []
    assert os.environ["MINARI_DATASETS_PATH"] == str(root)


def test_medium_expert_is_medium_and_expert_combined(root):
    make_minari_dataset("mujoco/hopper/medium-v0", hopper_episodes(2, 5), env_id="Hopper-v5")
    make_minari_dataset("mujoco/hopper/expert-v0", hopper_episodes(3, 4, seed=1), env_id="Hopper-v5")
    dataset = load_dataset("local/hopper/minari-medium-expert-v0")
    assert dataset.total_steps == 2 * 5 + 3 * 4
    assert dataset.total_episodes == 5
    assert (root / "local/hopper/minari-medium-expert-v0/data/metadata.json").is_file()
    metadata = dataset.storage.metadata
    assert (metadata["ref_min_score"], metadata["ref_max_score"]) == (-20.272305, 3234.3), "ref scores set again"
    assert metadata["dataset_summary"]["episodes"] == 5, "the summary is written at build time"
    assert not list(root.glob(".staging*"))


def test_unknown_local_dataset_suggests_close_ids(root):
    (root / "local/hopper/uniform-random-400steps-v0/data").mkdir(parents=True)
    with pytest.raises(UsageError, match="did you mean local/hopper/uniform-random-400steps-v0") as error:
        load_dataset("local/hopper/uniform-random-40steps-v1")
    assert one_line(error)
    with pytest.raises(UsageError, match="redq-medium-replay.*--export-replay"):
        load_dataset("local/hopper/redq-medium-replay-v0")


# ---------------------------------------------------------------------------------------
# Checks of the data and reference scores
# ---------------------------------------------------------------------------------------
def transitions(n=4):
    return {
        "obs": np.zeros((n, 2), np.float32),
        "actions": np.zeros((n, 3), np.float32),
        "rewards": np.ones(n, np.float32),
    }


BOX = types.SimpleNamespace(low=np.full(3, -1.0, np.float32), high=np.full(3, 1.0, np.float32))


def test_check_transitions_accepts_data_within_bounds_up_to_the_tolerance():
    data = transitions()
    data["actions"][0] = [1.0005, -1.0005, 0.3]  # within the 1e-3 tolerance (float32 rounding of a bound)
    assert datasets.check_transitions(data, "d-v0", BOX) is None, "actions within 1e-3 of a bound are accepted"
    data["actions"][0] = [1.0015, -1.0, 0.3]  # beyond it: the same check refuses them
    with pytest.raises(UsageError, match="outside the environment's bounds"):
        datasets.check_transitions(data, "d-v0", BOX)


@pytest.mark.parametrize(
    "key, row, value, message",
    [
        ("obs", (1, 0), np.nan, "NaN or infinite values in obs"),
        ("rewards", (2,), np.inf, "NaN or infinite values in rewards"),
        ("actions", (3, 1), -np.inf, "NaN or infinite values in actions"),
        ("actions", (0, 2), 1.01, r"actions span \[0, 1.01\], outside the environment's bounds \[-1, 1\]"),
        ("actions", (1, 0), -100.0, r"actions span \[-100, 0\], outside"),
    ],
)
def test_check_transitions_rejects(key, row, value, message):
    data = transitions()
    data[key][row] = value
    with pytest.raises(UsageError, match=message) as error:
        datasets.check_transitions(data, "d-v0", BOX)
    assert one_line(error)
    assert "d-v0" in str(error.value)


def test_check_transitions_rejects_an_empty_dataset():
    with pytest.raises(UsageError, match="has no transitions"):
        datasets.check_transitions(transitions(0), "d-v0", BOX)


def test_reference_scores_flags_then_metadata_then_d4rl_table():
    assert choose_reference_scores("hopper", 1.0, 9.0, 2.0, 8.0) == (1.0, 9.0, "flags")
    assert choose_reference_scores("hopper", None, None, 2.0, 8.0) == (2.0, 8.0, "dataset metadata")
    assert choose_reference_scores("hopper", None, None) == (*HOPPER_REF, "D4RL table")
    assert choose_reference_scores("hopper", 5.0, None, 2.0, 8.0) == (5.0, 8.0, "flags (min), dataset metadata (max)")
    assert choose_reference_scores("walker2d", None, 100.0) == (1.629008, 100.0, "D4RL table (min), flags (max)")
    assert choose_reference_scores("pendulum", -1, 2) == (-1.0, 2.0, "flags")  # any env, given both flags
    with pytest.raises(UsageError, match="no reference scores for pendulum"):
        choose_reference_scores("pendulum", None, 2.0)
    # reference_scores reads the dataset's metadata
    dataset = types.SimpleNamespace(storage=types.SimpleNamespace(metadata={"ref_min_score": 2, "ref_max_score": 8}))
    assert datasets.reference_scores(dataset, "hopper", None, None) == (2.0, 8.0, "dataset metadata")
    assert datasets.reference_scores(dataset, "hopper", None, 10.0) == (
        2.0,
        10.0,
        "dataset metadata (min), flags (max)",
    )


@pytest.mark.parametrize(
    "flag_min, flag_max, meta_min, meta_max",
    [
        (10.0, 10.0, None, None),
        (4000.0, None, None, None),
        (None, -30.0, None, None),
        (None, None, 5.0, 1.0),
    ],
)
def test_reference_scores_must_satisfy_min_below_max(flag_min, flag_max, meta_min, meta_max):
    with pytest.raises(UsageError, match="min < max") as error:
        choose_reference_scores("hopper", flag_min, flag_max, meta_min, meta_max)
    assert one_line(error)


def test_task_normalizes_like_d4rl():
    task = datasets.Task("d", None, None, None, "hopper", "medium", HOPPER_REF, "D4RL table")
    assert task.normalized(np.array([HOPPER_REF[0], HOPPER_REF[1]])).tolist() == [0.0, 1.0]
    assert task.normalized((HOPPER_REF[0] + HOPPER_REF[1]) / 2) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------
UNICODE_BOX = (
    "╭─ Unrecognized options ───────────╮\n│ Unrecognized options: --sed, 3   │\n"
    "│ ──────────────────────────────── │\n│ Perhaps you meant:               │\n"
    "│     --seed INT                   │\n│         (default: 0)             │\n"
    "│ ──────────────────────────────── │\n│ For full helptext, run -c --help │\n"
    "╰──────────────────────────────────╯\n"
)
ASCII_BOX = (
    " Value error                                                           \n"
    " --------------------------------------------------------------------- \n"
    "  Error parsing --seed: invalid literal for int() with base 10: 'abc'  \n"
    "  ---------------------------------------------------------------------\n"
    "  Argument helptext:                                                   \n"
    "      --seed INT                                                       \n"
    "  ---------------------------------------------------------------------\n"
    "  For full helptext, see -c --help                                     \n"
    "                                                                       \n"
)
WRAPPED_BOX = (
    "╭─ Value error ──────────────────────╮\n│ Error parsing --env: invalid       │\n"
    "│ choice 'pendulum'                  │\n│ ────────────────────────────────── │\n"
    "│ For full helptext, see -c --help   │\n╰────────────────────────────────────╯\n"
)


def test_tyro_error_line_from_unicode_and_ascii_boxes():
    assert cli.tyro_error_line(UNICODE_BOX) == "Unrecognized options: --sed, 3"
    assert cli.tyro_error_line(ASCII_BOX) == "Error parsing --seed: invalid literal for int() with base 10: 'abc'"
    assert cli.tyro_error_line(WRAPPED_BOX) == "Error parsing --env: invalid choice 'pendulum'"
    assert cli.tyro_error_line("plain text\n") == "plain text"


@dataclass
class ToyArgs(RunArgs):
    offline_steps: int = 10
    learning_rate: float = 3e-4
    utd: int | None = None
    r_last: Literal["previous", "moving-average"] | None = None


def test_parse_args_folds_tyros_box_into_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_args(ToyArgs, "toy", ["--sed", "1"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: Unrecognized options: --sed, 1\n"
    with pytest.raises(SystemExit):
        cli.parse_args(ToyArgs, "toy", ["--offline-steps", "1.5"])
    assert capsys.readouterr().err == (
        "error: Error parsing --offline-steps: invalid literal for int() with base 10: '1.5'\n"
    )
    args = cli.parse_args(ToyArgs, "toy", ["--utd", "3", "--r-last", "moving-average"])
    assert (args.utd, args.r_last, args.offline_steps) == (3, "moving-average", 10)


@pytest.mark.parametrize(
    "value, annotation, fits",
    [
        (3, int, True),
        (3.0, int, False),
        (True, int, False),
        ("3", int, False),
        (None, int, False),
        (3, float, True),
        (0.5, float, True),
        (True, float, False),
        ("0.5", float, False),
        (math.nan, float, True),
        (True, bool, True),
        (1, bool, False),
        ("runs", str, True),
        (None, str, False),
        (None, int | None, True),
        (2, int | None, True),
        (2.0, int | None, False),
        ("a", int | None, False),
        ("relu", Literal["relu", "tanh"], True),
        ("elu", Literal["relu", "tanh"], False),
        (None, Literal["previous", "moving-average"] | None, True),
        ("previous", Literal["previous", "moving-average"] | None, True),
        ("next", Literal["previous", "moving-average"] | None, False),
    ],
)
def test_fits_type(value, annotation, fits):
    assert cli.fits_type(value, annotation) is fits


def write_run(folder: Path, config: dict, progress="phase,step\noffline,0\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if progress is not None:
        (folder / "progress.csv").write_text(progress)
    return folder


def toy_config(**changes):
    return {
        "method": "toy",
        **asdict(ToyArgs(seed=3, offline_steps=7)),
        "dataset_id": None,
        "git_commit": "abc",
        **changes,
    }


def test_args_from_run_restores_every_argument(tmp_path):
    run = write_run(tmp_path / "run", toy_config(learning_rate=1))  # an int is a fine float
    args = cli.args_from_run(ToyArgs, "toy", run)
    assert args == ToyArgs(seed=3, offline_steps=7, learning_rate=1, resume=str(run))
    assert cli.parse_args(ToyArgs, "toy", ["--resume", str(run), "--seed", "9"]).seed == 3  # other flags ignored


@pytest.mark.parametrize(
    "config, progress, message",
    [
        (toy_config(offline_steps="7"), "p\n", r"has offline_steps='7', not a <class 'int'>"),
        (toy_config(offline_steps=7.0), "p\n", r"has offline_steps=7.0, not a <class 'int'>"),
        (toy_config(seed=True), "p\n", r"has seed=True"),
        (toy_config(learning_rate="3e-4"), "p\n", r"has learning_rate='3e-4'"),
        (toy_config(env="pendulum"), "p\n", r"has env='pendulum', not a typing.Literal\['hopper'"),
        (toy_config(utd=2.5), "p\n", r"has utd=2.5, not a int \| None"),
        ({k: v for k, v in toy_config().items() if k != "method"}, "p\n", "is a run of an unknown method, not toy"),
        (toy_config(method="td3_bc"), "p\n", "is a run of td3_bc, not toy"),
        ({k: v for k, v in toy_config().items() if k != "learning_rate"}, "p\n", "lacks the argument 'learning_rate'"),
        (toy_config(), None, "has no progress.csv; start a new run instead"),
        (["not", "a", "dict"], "p\n", "is a run of an unknown method"),
    ],
)
def test_args_from_run_rejects_a_config_that_does_not_fit(tmp_path, config, progress, message):
    run = write_run(tmp_path / "run", config, progress)
    with pytest.raises(UsageError, match=message) as error:
        cli.args_from_run(ToyArgs, "toy", run)
    assert one_line(error)
    assert str(error.value).startswith("--resume: ")


def test_args_from_run_of_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken/config.json").write_text('{"method": "toy", ')
    for folder, kind in [
        (tmp_path, "FileNotFoundError"),
        (tmp_path / "missing", "FileNotFoundError"),
        (tmp_path / "broken", "JSONDecodeError"),
    ]:
        with pytest.raises(UsageError, match=f"is not a run folder .no readable config.json: {kind}"):
            cli.args_from_run(ToyArgs, "toy", folder)


def test_check_ranges_messages():
    args = types.SimpleNamespace(
        batch_size=0, kp=-1e-5, keep_ratio=1.5, tau=1.0, target_return=math.nan, lr=math.inf, unset=None, steps=3
    )
    check = cli.check_ranges
    with pytest.raises(UsageError, match=r"^--batch-size must be positive, got 0$"):
        check(args, positive=["steps", "batch_size"])
    with pytest.raises(UsageError, match=r"^--kp must be non-negative, got -1e-05$"):
        check(args, non_negative=["kp"])
    with pytest.raises(UsageError, match=r"^--keep-ratio must be in \(0, 1\], got 1.5$"):
        check(args, fraction=["tau", "keep_ratio"])
    with pytest.raises(UsageError, match=r"^--target-return must be finite, got nan$"):
        check(args, finite=["target_return"])
    with pytest.raises(UsageError, match=r"^--lr must be positive, got inf$"):  # inf is never in range
        check(args, positive=["lr"])
    check(args, positive=["unset", "steps"], non_negative=["unset"], fraction=["unset", "tau"], finite=["unset"])


@pytest.mark.parametrize("seed, ok", [(0, True), (2**32 - 1, True), (-1, False), (2**32, False)])
def test_check_run_args_seed_range(seed, ok, tmp_path):
    args = ToyArgs(seed=seed, output_dir=str(tmp_path / "runs"))
    if ok:
        cli.check_run_args(args)
    else:
        with pytest.raises(UsageError, match=r"--seed must be in \[0, 2\*\*32\)"):
            cli.check_run_args(args)


@pytest.mark.parametrize(
    "raised, status, stderr",
    [
        (UsageError("--x must be positive, got 0"), 2, "error: --x must be positive, got 0\n"),
        (cli.TrainingDiverged("a loss became non-finite"), 1, "error: a loss became non-finite; stopped."),
        (cli.Preempted(signal.SIGUSR1), 128 + signal.SIGUSR1, "stopped by SIGUSR1: latest.pt is saved"),
        (cli.Preempted(signal.SIGTERM), 128 + signal.SIGTERM, "stopped by SIGTERM"),
        (KeyboardInterrupt(), 130, "interrupted: progress.csv and the checkpoints written so far are kept."),
        (cli.RunFinished("runs/a"), None, "runs/a has finished already (final.pt): nothing to resume\n"),
    ],
)
def test_run_main_exit_statuses(raised, status, stderr, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["toy.py", "--output-dir", str(tmp_path / "runs")])
    handlers = {s: signal.getsignal(s) for s in cli.STOP_SIGNALS}

    def main(args):
        assert all(signal.getsignal(s) is cli.request_stop for s in cli.STOP_SIGNALS)
        raise raised

    try:
        if status is None:
            cli.run_main(main, ToyArgs, "toy", check=lambda args: None)
        else:
            with pytest.raises(SystemExit) as exit_:
                cli.run_main(main, ToyArgs, "toy", check=lambda args: None)
            assert exit_.value.code == status
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    assert capsys.readouterr().err.startswith(stderr)


def test_a_stop_signal_is_recorded_and_checked_at_the_next_safe_point(tmp_path, monkeypatch):
    monkeypatch.setattr(errors, "stop_requested", [])  # run_folder reads the same list
    monkeypatch.setattr(run_folder, "stop_requested", errors.stop_requested)
    old = signal.signal(signal.SIGUSR1, errors.request_stop)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert errors.stop_requested == [signal.SIGUSR1]
    run = RunFolder.create(tmp_path, "toy", {"method": "toy", "checkpoint_every": 10, "checkpoint_minutes": 30.0})
    assert run.checkpoint_due(1, safe=False)  # a stop request does not wait
    with pytest.raises(cli.Preempted) as stop:
        run.save_latest({"phase": "offline", "step": 1}, np.random.default_rng(0))
    assert stop.value.signum == signal.SIGUSR1
    assert torch.load(run.path / "latest.pt", weights_only=False)["step"] == 1  # saved before stopping


def test_checkpoints_are_due_every_checkpoint_every_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder, "stop_requested", [])
    run = RunFolder.create(tmp_path, "toy", {"method": "toy", "checkpoint_every": 10, "checkpoint_minutes": 30.0})
    assert not run.checkpoint_due(9)
    assert run.checkpoint_due(10)
    assert not run.checkpoint_due(10, safe=False)
    run.save_latest({"phase": "offline", "step": 10}, np.random.default_rng(0))
    assert not run.checkpoint_due(19)
    assert run.checkpoint_due(20)


# ---------------------------------------------------------------------------------------
# The run folder
# ---------------------------------------------------------------------------------------
def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_csv_log_writes_and_flushes_each_row(tmp_path):
    log = CsvLog(tmp_path / "p.csv", ["phase", "step", "score", "alpha"])
    log.write({"phase": "offline", "step": 0, "score": 1 / 3})  # a missing column stays empty
    assert read_rows(tmp_path / "p.csv") == [["phase", "step", "score", "alpha"], ["offline", "0", "0.333333", ""]]
    assert log.rows == 1
    log.close()


def test_csv_log_keep_rows_truncates_after_the_checkpointed_rows(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("phase,step\noffline,0\noffline,20\noffline,40\nonl")  # 3 rows and half a fourth
    log = CsvLog(path, ["phase", "step"], keep_rows=2)  # latest.pt was written after the second row
    assert log.rows == 2
    assert path.read_text() == "phase,step\noffline,0\noffline,20\n"
    log.write({"phase": "offline", "step": 40})
    log.close()
    assert read_rows(path) == [["phase", "step"], ["offline", "0"], ["offline", "20"], ["offline", "40"]]
    assert CsvLog(path, ["phase", "step"], keep_rows=0).rows == 0
    assert path.read_text() == "phase,step\n"


@pytest.mark.parametrize(
    "text, keep_rows",
    [
        ("phase,step\noffline,0\n", 2),  # fewer rows than latest.pt counted
        ("step,phase\noffline,0\noffline,20\n", 1),  # another header
        (None, 1),  # the file is gone
    ],
)
def test_csv_log_refuses_a_file_that_does_not_match_latest(tmp_path, text, keep_rows):
    path = tmp_path / "p.csv"
    if text is not None:
        path.write_text(text)
    with pytest.raises(UsageError, match=f"does not hold the {keep_rows} rows latest.pt expects"):
        CsvLog(path, ["phase", "step"], keep_rows=keep_rows)
    assert path.read_text() == text if text is not None else not path.exists()  # untouched


def test_run_folders_created_in_the_same_second_get_distinct_names(tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder.time, "time", lambda: 1_700_000_000.7)
    runs = [
        RunFolder.create(tmp_path / "runs", "hopper-random__toy__0", {"method": "toy", "kp": kp})
        for kp in (0.0, 1.0, 2.0)
    ]
    assert [r.path.name for r in runs] == [
        "hopper-random__toy__0__1700000000",
        "hopper-random__toy__0__1700000000-1",
        "hopper-random__toy__0__1700000000-2",
    ]
    for run, kp in zip(runs, (0.0, 1.0, 2.0)):
        config = json.loads((run.path / "config.json").read_text())
        assert config["kp"] == kp
        assert config["host"] == socket.gethostname()
        assert "torch" in config["versions"]
        assert sorted(p.name for p in run.path.iterdir()) == [".lock", "config.json"]


def test_a_second_lock_names_the_holder(tmp_path):
    run_folder.lock(tmp_path)
    with pytest.raises(UsageError, match=f"is in use by pid {os.getpid()} on {socket.gethostname()}") as error:
        run_folder.lock(tmp_path)
    assert one_line(error)


def test_the_lock_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from plumbing.run_folder import lock; "
            "lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)",
            str(tmp_path),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=f"is in use by pid {holder.pid} on "):
            run_folder.lock(tmp_path)
        with pytest.raises(UsageError, match=f"pid {holder.pid}"):
            RunFolder.reopen(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    run_folder.lock(tmp_path)  # SIGKILL released it: the kernel drops a dead process's flock
    assert (tmp_path / ".lock").read_text() == f"pid {os.getpid()} on {socket.gethostname()}"


def test_reopen_a_run(tmp_path):
    run = RunFolder.create(tmp_path, "toy", {"method": "toy", "checkpoint_every": 10, "checkpoint_minutes": 30.0})
    run.log("progress", ["phase", "step"]).write({"phase": "offline", "step": 0})
    run_folder.save_torch(
        run.path / "latest.pt", {"phase": "offline", "step": 5, "logs": {"progress": 1}, "wall_s": 2.0, "rng": {}}
    )
    run.close()
    os.close(run_folder.LOCKS.pop())  # unlocked, as if the first process had ended
    again = RunFolder.reopen(run.path)
    assert again.resumed
    assert again.latest["step"] == 5
    assert again.config["method"] == "toy"
    assert again.wall_s() >= 2.0
    again.log("progress", ["phase", "step"]).write({"phase": "offline", "step": 10})
    again.close()
    assert read_rows(run.path / "progress.csv") == [["phase", "step"], ["offline", "0"], ["offline", "10"]]
    os.close(run_folder.LOCKS.pop())
    run_folder.save_torch(run.path / "latest.pt", {"phase": "offline", "step": 5})
    with pytest.raises(UsageError, match="latest.pt is not a resumable state of this project"):
        RunFolder.reopen(run.path)
    os.close(run_folder.LOCKS.pop())
    (run.path / "final.pt").write_bytes(b"")
    (run.path / "actor.pt").write_bytes(b"")
    (run.path / "latest.pt").unlink()  # a finish step that completed (test_robustness: one that did not)
    with pytest.raises(cli.RunFinished):
        RunFolder.reopen(run.path)


def test_atomic_writes_leave_no_temporary_files(tmp_path):
    run_folder.save_torch(tmp_path / "a.pt", {"x": torch.arange(3)})
    assert torch.equal(load_torch(tmp_path / "a.pt", "test")["x"], torch.arange(3))
    (tmp_path / "b.txt").write_text("old")

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run_folder.atomic_write(tmp_path / "b.txt", fails)
    assert (tmp_path / "b.txt").read_text() == "old"  # the old file, whole
    CsvLog(tmp_path / "c.csv", ["x"]).close()
    run_folder.check_output_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.txt", "c.csv"]


def test_running_means():
    means = RunningMeans()
    first = torch.tensor(1.0)
    means.add({"critic_loss": first, "q_mean": torch.tensor(2.0)})
    first.fill_(100.0)  # a CUDA graph overwrites its outputs in place: the sum must not alias them
    means.add({"critic_loss": torch.tensor(3.0)})
    assert means.pop() == {"critic_loss": 2.0, "q_mean": 2.0}  # (1 + 3) / 2 and 2 / 1
    assert means.pop() == {}
    means.add({"actor_loss": torch.tensor(-4.0)})
    assert means.pop() == {"actor_loss": -4.0}


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling creates the marker file


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "directory", "list", "evil"])
def test_load_torch_of_a_damaged_file_is_one_line(tmp_path, kind):
    path, marker = tmp_path / "latest.pt", tmp_path / "pwned"
    good = tmp_path / "good.pt"
    torch.save({"agent": {"w": torch.randn(64, 64)}}, good)
    if kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(1000))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "directory":
        path.mkdir()
    elif kind == "list":
        torch.save([1, 2], path)
    else:
        torch.save({"meta": Evil(marker)}, path)
    with pytest.raises(UsageError, match=rf"^--resume: {path} is not a readable checkpoint \(\w+: .+\)$") as error:
        load_torch(path, "--resume")
    assert one_line(error)
    assert not marker.exists()


def test_check_output_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", tmp_path / "file" / "runs"):
        with pytest.raises(UsageError, match=f"--output-dir {bad} cannot hold run folders") as error:
            run_folder.check_output_dir(bad)
        assert one_line(error)
    run_folder.check_output_dir(tmp_path / "new" / "runs")  # can be made later: nothing is created by the check
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "file").read_text() == "x"


def test_check_memory():
    run_folder.check_memory(1000, "the buffer")
    with pytest.raises(UsageError, match=r"^the buffer need about 9313225746.2 GiB, but this machine has"):
        run_folder.check_memory(10**19, "the buffer")


# ---------------------------------------------------------------------------------------
# Tracking (TensorBoard faked: it is not a requirement of the project)
# ---------------------------------------------------------------------------------------
class FakeWriter:
    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.texts, self.closed = log_dir, [], [], False

    def add_scalar(self, key, value, step):
        self.scalars.append((key, value, step))

    def add_text(self, key, text):
        self.texts.append((key, text))

    def close(self):
        self.closed = True


def test_tracker_mirrors_numeric_values_on_one_step_axis(tmp_path, monkeypatch):
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    installed = {"tensorboard": importlib.machinery.ModuleSpec("tensorboard", None)}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: installed.get(name))
    tracking.check_tracking()
    tracker = tracking.Tracker(tmp_path / "run" / "tensorboard", {"offline_steps": 100, "seed": 3})
    log = CsvLog(tmp_path / "progress.csv", ["phase", "step", "normalized_score", "alpha"], tracker=tracker)
    log.write({"phase": "offline", "step": 20, "normalized_score": 5.0, "alpha": 0.4})
    log.write({"phase": "online", "step": 30, "normalized_score": 7.5, "alpha": ""})  # empty: not a number
    tracker.close()
    writer = tracker.writer
    assert writer.log_dir == str(tmp_path / "run" / "tensorboard")
    assert writer.texts == [("config", "offline_steps: 100\nseed: 3")]
    assert writer.scalars == [
        ("progress/normalized_score", 5.0, 20),
        ("progress/alpha", 0.4, 20),
        ("progress/normalized_score", 7.5, 130),
    ]  # online steps follow the 100 offline ones
    assert writer.closed
    assert tracker.wandb is None
    installed.clear()
    with pytest.raises(UsageError, match="--track needs TensorBoard or wandb"):
        tracking.check_tracking()


def test_checkpoints_are_due_after_checkpoint_minutes_of_wall_time(tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder, "stop_requested", [])
    clock = [1000.0]
    monkeypatch.setattr(run_folder.time, "monotonic", lambda: clock[0])
    run = RunFolder.create(tmp_path, "toy", {"method": "toy", "checkpoint_every": 10**6, "checkpoint_minutes": 2.0})
    clock[0] += 119.0
    assert not run.checkpoint_due(5)
    clock[0] += 1.0  # 2 minutes since the run started
    assert run.checkpoint_due(5)
    assert not run.checkpoint_due(5, safe=False)  # mid-episode: waits for its end
    run.save_latest({"phase": "online", "step": 5}, np.random.default_rng(0))
    assert not run.checkpoint_due(6)  # the clock starts again at each checkpoint


def test_config_records_the_git_commit_of_the_code(tmp_path):
    run = RunFolder.create(tmp_path, "toy", {"method": "toy"})
    recorded = json.loads((run.path / "config.json").read_text())["git_commit"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        assert recorded is None  # not a git checkout
    else:
        assert recorded.split("-")[0] == head.stdout.strip()
        assert recorded in (
            head.stdout.strip(),
            head.stdout.strip() + "-dirty",
        )


def test_a_fine_tune_inherits_the_evaluation_settings_of_its_pre_training(datasets_path, tmp_path):
    # conftest's tiny dataset, named by its id as the folder holds it (its name does not matter here).
    (dataset_dir,) = (datasets_path / "local" / "hopper").iterdir()
    tiny = ["--dataset-id", f"local/hopper/{dataset_dir.name}", "--hidden-dim", 8, "--batch-size", 16]
    pre = run_script(
        "baselines/td3_bc.py",
        *tiny,
        *("--offline-steps", 20, "--online-steps", 0, "--eval-every", 20, "--eval-episodes", 2),
        *("--output-dir", tmp_path / "pre"),
        datasets_path=datasets_path,
        cwd=tmp_path,
    )
    assert pre.returncode == 0, pre.stderr
    (pre_run,) = (tmp_path / "pre").iterdir()
    tune = run_script(
        "baselines/td3_bc.py",
        *tiny,
        *("--online-steps", 30, "--eval-every", 30, "--load-offline", pre_run, "--output-dir", tmp_path / "tune"),
        datasets_path=datasets_path,
        cwd=tmp_path,
    )
    assert tune.returncode == 0, tune.stderr
    (tune_run,) = (tmp_path / "tune").iterdir()
    config = json.loads((tune_run / "config.json").read_text())
    assert config["eval_episodes"] == 2, "--eval-episodes is the pre-training run's 2, not the default 10"
    assert config["eval_every"] == 30, "--eval-every given on the command line wins"
    assert config["eval_settings_from"] == {"eval_every": "flag", "eval_episodes": "pretraining"}, "sources recorded"
    pre_config = json.loads((pre_run / "config.json").read_text())
    assert pre_config["eval_settings_from"] == {"eval_every": "flag", "eval_episodes": "flag"}, "pre-training's"


def test_evaluation_settings_default_to_the_papers_values_when_nothing_sets_them():
    args = RunArgs()
    run_folder.fill_eval_settings(args)
    assert (args.eval_every, args.eval_episodes) == (5_000, 10), "the paper's 5,000 steps and 10 episodes"
    assert args.eval_settings_from == {"eval_every": "default", "eval_episodes": "default"}, "sources"
    args = RunArgs(eval_every=7)
    run_folder.fill_eval_settings(args, pretraining={"eval_every": 3, "eval_episodes": 4})
    assert (args.eval_every, args.eval_episodes) == (7, 4), "a flag wins, the pre-training fills the rest"
