"""The run folder: one writer at a time, config.json, CSV logs flushed per row, checkpoints, resume.

    <output-dir>/<env>-<dataset>__<method>__<seed>__<unix time>[-k]/
        config.json     every argument, the dataset, reference scores, versions, git commit
        progress.csv    one row per evaluation (columns: docs/adding-a-method.md)
        episodes.csv    one row per online training episode
        latest.pt       resumable state (the newest checkpoint; removed when the run finishes)
        offline.pt      the agent after pre-training (--load-offline takes it, or the run folder)
        final.pt        the agent at the end: its presence marks a finished run
        actor.pt        the final policy alone, with its network configuration (scripts/play.py)

Every file is written to a private temporary name and renamed, so a reader (or a kill) never sees
half a file. The folder is locked while a process writes to it; the lock dies with the process.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import fcntl
import json
import math
import os
import platform
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from plumbing.datasets import process_alive
from plumbing.errors import Preempted, RunFinished, TrainingDiverged, UsageError, checkpoint_error, stop_requested
from plumbing.tracking import Tracker

# Every key of a progress.csv row, in order, for every method (docs/adding-a-method.md).
PROGRESS_COLUMNS = [
    "phase",
    "step",
    "normalized_score",
    "normalized_score_std",
    "return_mean",
    "alpha",
    "critic_loss",
    "actor_loss",
    "q_mean",
    "updates_per_s",
    "env_steps_per_s",
    "wall_s",
]
ECHOED = ("phase", "step", "normalized_score", "alpha")  # printed per row when stderr is not a terminal


def private_tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


PRIVATE_TMP = re.compile(r"\..+\.(\d+)\.tmp")  # private_tmp's names: the pid of the writer


def remove_dead_writers_files(folder: Path) -> None:
    """The temporary files of writers killed mid-write (each as large as the file it was replacing), kept only
    while their process on this host lives. Called with the folder's lock held, so no live run writes here."""
    for path in folder.glob(".*.tmp"):
        match = PRIVATE_TMP.fullmatch(path.name)
        if match and int(match.group(1)) != os.getpid() and not process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)


def atomic_write(path: Path, write) -> None:
    """write(tmp_path), then rename: a reader never sees a half-written file, and a full disk keeps the old one."""
    tmp = private_tmp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if not disk_full(e, path.parent):
            raise
        raise disk_full_error(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)


def disk_full(error: BaseException, folder: Path) -> bool:
    """ENOSPC or EDQUOT; or torch.save's short write (its zip writer's RuntimeError names no errno) with the
    folder's file system left without room (the half-written temporary file still holds what it took)."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    short_write = any(text in str(error) for text in ("unexpected pos", "file write failed"))
    return isinstance(error, RuntimeError) and short_write and shutil.disk_usage(folder).free < 2**20


def disk_full_error(path: Path, error: BaseException) -> UsageError:
    detail = os.strerror(error.errno if isinstance(error, OSError) else errno.ENOSPC)
    return UsageError(
        f"disk full: no room in {path.parent} for {path.name} ({detail}); the files written before are intact: "
        f"free space there, then continue with --resume {path.parent}"
    )


def save_torch(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path: Path, what: str) -> dict:
    """torch.load with weights_only=True (a foreign file cannot run code); any damage is one line."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict):
            raise ValueError("not a checkpoint dictionary")
        return obj
    except Exception as e:
        raise UsageError(f"{what}: {path} is not a readable checkpoint ({checkpoint_error(e)})") from None


class CsvLog:
    """A CSV file with a fixed header, one row per write, flushed at once so a killed run keeps its rows."""

    def __init__(self, path: Path, columns, keep_rows=None, echo=(), tracker=None):
        """keep_rows: continue a file after its first keep_rows rows (--resume); None starts a new one."""
        lines = [",".join(columns) + "\n"]
        if keep_rows is not None and (keep_rows > 0 or path.exists()):
            existing = path.read_text().splitlines(keepends=True) if path.exists() else []
            if existing[:1] != lines or len(existing) < 1 + keep_rows:
                raise UsageError(f"--resume: {path} does not hold the {keep_rows} rows latest.pt expects")
            lines = existing[: 1 + keep_rows]  # rows written after the checkpoint are written again
        atomic_write(path, lambda tmp: tmp.write_text("".join(lines)))
        self.path, self.rows, self.echo, self.tracker = path, len(lines) - 1, echo, tracker
        self.file = open(path, "a", newline="")
        # "\n" as the header and the rows kept by --resume (read back with universal newlines) end
        self.writer = csv.DictWriter(self.file, fieldnames=columns, restval="", lineterminator="\n")

    def write(self, row: dict) -> None:
        try:
            self.writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            self.file.flush()
        except OSError as e:
            if not disk_full(e, self.path.parent):
                raise
            raise disk_full_error(self.path, e) from None
        self.rows += 1
        if self.echo and not sys.stderr.isatty():
            print(" ".join(f"{k}={fmt(row[k])}" for k in self.echo if k in row), file=sys.stderr, flush=True)
        if self.tracker is not None:
            self.tracker.log(self.path.stem, row)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a full disk was reported when the row was written
            self.file.close()


def fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class RunFolder:
    """The folder of one run, locked for this process. Create one with RunFolder.create or RunFolder.reopen."""

    def __init__(self, path: Path, config: dict, latest: dict | None, resumed: bool):
        self.path, self.config, self.latest, self.resumed = path, config, latest, resumed
        self.started = time.monotonic() - (latest["wall_s"] if latest else 0.0)
        self.last_checkpoint = (latest["step"] if latest else 0, time.monotonic())
        self.logs: dict[str, CsvLog] = {}
        self.actor_description: dict = {}
        online = latest is not None and latest["phase"] == "online"
        self.clock = (time.monotonic(), latest.get("num_updates", 0) if latest else 0, latest["step"] if online else 0)
        self.means = RunningMeans(latest.get("means") if latest else None)  # the loss columns' running means
        self.tracker = None
        if config.get("track"):
            self.tracker = Tracker(path / "tensorboard", config)

    @classmethod
    def create(cls, output_dir, name: str, config: dict) -> RunFolder:
        """A new folder <output_dir>/<name>__<unix time>, suffixed -1, -2, ... if that name is taken."""
        base = Path(output_dir) / f"{name}__{int(time.time())}"
        for k in range(1000):
            path = base if k == 0 else base.with_name(f"{base.name}-{k}")
            try:
                path.mkdir(parents=True)
                break
            except FileExistsError:
                continue
        else:
            raise UsageError(f"cannot find a free run folder name like {base}")
        lock(path)
        config = {**config, "git_commit": git_commit(), "versions": versions(), "host": socket.gethostname()}
        atomic_write(path / "config.json", lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
        return cls(path, config, latest=None, resumed=False)

    @classmethod
    def reopen(cls, path) -> RunFolder:
        """An existing run folder (--resume), with its latest.pt state (None: start again from the beginning)."""
        path = Path(path)
        if (path / "final.pt").exists():
            raise RunFinished(path, complete_finish(path))
        lock(path)
        remove_dead_writers_files(path)
        config = json.loads((path / "config.json").read_text())
        latest = load_torch(path / "latest.pt", "--resume") if (path / "latest.pt").exists() else None
        if latest is not None and not {"phase", "step", "logs", "wall_s", "rng"} <= latest.keys():
            raise UsageError(f"--resume: {path / 'latest.pt'} is not a resumable state of this project")
        return cls(path, config, latest, resumed=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def log(self, name: str, columns, echo: bool = False) -> CsvLog:
        """Open <name>.csv, continuing after the rows latest.pt counted when resuming."""
        keep = None if not self.resumed else self.latest["logs"].get(name, 0) if self.latest else 0
        self.logs[name] = CsvLog(self.path / f"{name}.csv", columns, keep, ECHOED if echo else (), self.tracker)
        return self.logs[name]

    def describe_actor(self, class_name: str, **kwargs) -> None:
        """How to rebuild the policy (the script's class and its arguments): stored in every checkpoint."""
        self.actor_description = {"class": class_name, "kwargs": kwargs}

    def meta(self) -> dict:
        return {"method": self.config["method"], "config": self.config, "actor": self.actor_description}

    def log_evaluation(
        self, phase: str, step: int, returns, scores, losses: dict, updates: int, env_steps: int = 0, **extra
    ) -> None:
        """A progress.csv row: an evaluation's returns and normalized scores (x100), the losses averaged since the
        previous row, the speeds since then. A non-finite loss stops the run (TrainingDiverged, exit status 1)."""
        self.logs["progress"].write(
            dict(
                phase=phase,
                step=step,
                normalized_score=float(np.mean(scores)),
                normalized_score_std=float(np.std(scores)),
                return_mean=float(np.mean(returns)),
                **losses,
                **self.speed(updates, env_steps),
                **extra,
            )
        )
        if not all(math.isfinite(v) for v in losses.values()):
            raise TrainingDiverged(f"a loss became non-finite ({losses}) at {phase} step {step}")

    def wall_s(self) -> float:
        return time.monotonic() - self.started

    def speed(self, updates: int, env_steps: int) -> dict:
        """updates/s and env steps/s since the previous call (empty where nothing happened), and wall_s."""
        now, last_updates, last_steps = time.monotonic(), self.clock[1], self.clock[2]
        elapsed = max(now - self.clock[0], 1e-9)
        self.clock = (now, updates, env_steps)
        return {
            "updates_per_s": (updates - last_updates) / elapsed if updates > last_updates else "",
            "env_steps_per_s": (env_steps - last_steps) / elapsed if env_steps > last_steps else "",
            "wall_s": self.wall_s(),
        }

    # ---- checkpoints ---------------------------------------------------------------------
    def checkpoint_due(self, step: int, safe: bool = True) -> bool:
        """True at a stop signal, or (when safe) every checkpoint_every steps / checkpoint_minutes minutes."""
        if stop_requested:
            return True
        last_step, last_time = self.last_checkpoint
        return safe and (
            step - last_step >= self.config["checkpoint_every"]
            or time.monotonic() - last_time >= 60 * self.config["checkpoint_minutes"]
        )

    def save_latest(self, state: dict, rng: np.random.Generator, env=None) -> None:
        """Write latest.pt (state + every random stream + log lengths); raise Preempted if a stop signal came."""
        state = {
            **state,
            "rng": rng_states(rng, env),
            "wall_s": self.wall_s(),
            "means": self.means.state_dict(),
            "logs": {name: log.rows for name, log in self.logs.items()},
        }
        save_torch(self.path / "latest.pt", state)
        self.last_checkpoint = (state["step"], time.monotonic())
        if stop_requested:
            raise Preempted(stop_requested[0])

    def restore(self, agent, rng: np.random.Generator, env, pretrained: dict | None = None) -> dict | None:
        """Where training starts: latest.pt's agent, update count and random streams (--resume), else the agent
        of --load-offline with the random streams its pre-training process ended with (so fine-tuning continues
        as that process would have). agent: load_state_dict() and num_updates. Returns latest.pt's state."""
        start = self.latest or pretrained
        if start is not None:
            try:
                agent.load_state_dict(start["agent"])
            except (RuntimeError, KeyError, ValueError) as e:
                source = "latest.pt" if self.latest else pretrained["path"]
                raise UsageError(
                    f"{source} does not fit the networks of this run's configuration "
                    f"({str(e).strip().splitlines()[0][:160]})"
                ) from None
            agent.num_updates = start["num_updates"]
            set_rng_states(start["rng"], rng, env)
        return self.latest

    def save_offline(self, agent: dict, num_updates: int, rng: np.random.Generator) -> None:
        """offline.pt: the pre-trained agent, the run's configuration, and the random streams at this point,
        so a run fine-tuning it with --load-offline continues exactly as this process would."""
        save_torch(
            self.path / "offline.pt",
            {"agent": agent, "meta": self.meta(), "num_updates": num_updates, "rng": rng_states(rng)},
        )

    def finish(self, agent: dict, actor: dict) -> None:
        """final.pt (the whole agent; from here on the run is finished), then actor.pt (the policy alone), then
        latest.pt is no longer needed. A process killed after final.pt leaves the rest to --resume
        (complete_finish), which writes the same files from final.pt."""
        save_torch(self.path / "final.pt", {"agent": agent, "meta": self.meta()})
        save_torch(self.path / "actor.pt", {"actor": actor, "meta": self.meta()})
        (self.path / "latest.pt").unlink(missing_ok=True)
        with open(self.path / "progress.csv", newline="") as f:
            scores = [float(row["normalized_score"]) for row in csv.DictReader(f) if row["normalized_score"]]
        print(
            f"final normalized score {scores[-1]:.1f}, best {max(scores):.1f}, wall time {self.wall_s():.0f} s, "
            f"run folder {self.path}"
        )

    def close(self) -> None:
        for log in self.logs.values():
            log.close()
        if self.tracker is not None:
            self.tracker.close()


def complete_finish(path: Path) -> list[str]:
    """--resume of a finished run (final.pt): do what a process killed inside RunFolder.finish left undone
    (actor.pt from final.pt's agent, the stale latest.pt and dead writers' temporary files removed); returns
    what was done. A run that finished cleanly is not touched (not even locked: it may be on a read-only mount)."""
    stale = [p for p in path.glob(".*.tmp") if PRIVATE_TMP.fullmatch(p.name)]
    if (path / "actor.pt").exists() and not (path / "latest.pt").exists() and not stale:
        return []
    lock(path)
    done = []
    if not (path / "actor.pt").exists():
        final = load_torch(path / "final.pt", "--resume")
        agent = final.get("agent")
        if not isinstance(agent, dict) or not isinstance(agent.get("actor"), dict) or "meta" not in final:
            raise UsageError(f"--resume: {path / 'final.pt'} holds no agent with an actor to write actor.pt from")
        save_torch(path / "actor.pt", {"actor": agent["actor"], "meta": final["meta"]})
        done.append("wrote actor.pt from final.pt")
    if (path / "latest.pt").exists():
        (path / "latest.pt").unlink()
        done.append("removed the stale latest.pt")
    remove_dead_writers_files(path)
    return done


def open_run(args, method: str, task, **info) -> RunFolder:
    """--resume's folder, or a new one named <env>-<dataset>__<method>__<seed>__<time> whose config.json holds
    every argument, the task (dataset, env, reference scores) and info."""
    if args.resume:
        return RunFolder.reopen(args.resume)
    fill_eval_settings(args)  # a caller that skipped run_main (a test building Args itself) gets the defaults
    config = {
        "method": method,
        **dataclasses.asdict(args),
        "eval_settings_from": args.eval_settings_from,
        "dataset_id": task.dataset_id,
        "env_id": task.env.spec.id,
        "env_name": task.env_name,
        "dataset_name": task.dataset_name,
        "ref_min_score": task.ref[0],
        "ref_max_score": task.ref[1],
        "ref_source": task.ref_source,
        "dataset_summary": task.summary,  # episodes, returns and the behavior's normalized score, as stored
        "dataset_source": task.source,  # D4RL's id and URL for converted D4RL data
        **info,
    }
    return RunFolder.create(args.output_dir, f"{task.env_name}-{task.dataset_name}__{method}__{args.seed}", config)


class RunningMeans:
    """Means of a step's metrics since the last pop(), summed on the device: no host sync per step."""

    def __init__(self, state: dict | None = None):
        """state: a state_dict(), so a resumed run averages exactly the steps an uninterrupted one would."""
        state = state or {}
        self.sums = {key: torch.tensor(total, dtype=torch.float32) for key, (total, _) in state.items()}
        self.counts = {key: count for key, (_, count) in state.items()}

    def state_dict(self) -> dict:
        return {key: (float(total), self.counts[key]) for key, total in self.sums.items()}

    def add(self, metrics: dict) -> None:
        for key, value in metrics.items():
            self.sums[key] = value.detach() + self.sums[key] if key in self.sums else value.detach().clone()
            self.counts[key] = self.counts.get(key, 0) + 1

    def pop(self) -> dict:
        means = {key: float(total) / self.counts[key] for key, total in self.sums.items()}  # one sync per row
        self.sums, self.counts = {}, {}
        return means


def load_pretrained(args, method: str, network_keys) -> dict:
    """--load-offline (a run folder or its offline.pt): the pre-trained agent, with the dataset and network
    settings of its run copied into args. A flag left at its default takes the pre-training run's value; a
    flag set to something else is a conflict."""
    path = Path(args.load_offline)
    path = path / "offline.pt" if path.is_dir() else path
    if not path.is_file():
        raise UsageError(f"--load-offline: no offline.pt at {args.load_offline}")
    checkpoint = load_torch(path, "--load-offline")
    meta = checkpoint.get("meta")
    if not isinstance(meta, dict) or meta.get("method") != method or not isinstance(meta.get("config"), dict):
        found = meta.get("method") if isinstance(meta, dict) else None
        raise UsageError(f"--load-offline: {path} is not an offline.pt of {method} (written by {found or 'unknown'})")
    source, defaults = meta["config"], {f.name: f.default for f in dataclasses.fields(args)}
    for key in DATASET_KEYS + list(network_keys) + ["offline_steps"]:
        if key not in source:
            raise UsageError(f"--load-offline: {path} does not record {key!r}")
        value = getattr(args, key)
        if value == defaults[key]:
            setattr(args, key, source[key])
        elif value != source[key]:
            raise UsageError(
                f"--load-offline: {path} was pre-trained with --{key.replace('_', '-')} {source[key]}, "
                f"this run asks for {value}; leave the flag out to use the pre-training value"
            )
    fill_eval_settings(args, pretraining=source)
    return {
        "agent": checkpoint["agent"],
        "num_updates": checkpoint["num_updates"],
        "rng": checkpoint["rng"],
        "path": str(path),
    }


# The evaluation settings a fine-tune inherits from its pre-training run, and their values when nothing sets them.
EVAL_DEFAULTS = {"eval_every": 5_000, "eval_episodes": 10}


def fill_eval_settings(args, pretraining: dict | None = None) -> None:
    """Give --eval-every and --eval-episodes left unset (None) a value: the pre-training run's (--load-offline, whose
    config.json is `pretraining`), else EVAL_DEFAULTS. args.eval_settings_from records where each came from ("flag",
    "pretraining", "default"), for config.json. --eval-every counts gradient steps offline and environment steps
    online; a fine-tune inherits the number as it is, and counts environment steps with it."""
    sources = getattr(args, "eval_settings_from", {})
    for key, default in EVAL_DEFAULTS.items():
        if getattr(args, key) is not None:
            sources.setdefault(key, "flag")
        elif pretraining is not None and pretraining.get(key) is not None:
            setattr(args, key, pretraining[key])
            sources[key] = "pretraining"
        else:
            setattr(args, key, default)
            sources[key] = "default"
    args.eval_settings_from = sources


# The dataset settings --load-offline takes over (its reference scores follow from the dataset as before).
DATASET_KEYS = ["env", "dataset", "d4rl_version", "dataset_id", "random_dataset_steps"]


def lock(path: Path) -> None:
    """One writer per run folder: an exclusive flock on <run>/.lock, held until this process exits
    (the kernel drops it when the process dies, so a killed run never blocks a later --resume)."""
    try:
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a read-only mount, or a folder of another user
        raise UsageError(
            f"{path} cannot be written ({e.strerror}: {path / '.lock'}); a run continues only in a writable folder: "
            f"copy it somewhere writable and --resume the copy"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UsageError(f"{path} is in use by {holder}; wait for it to finish or stop it first") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    LOCKS.append(fd)  # kept open (and locked) for the life of the process


LOCKS: list[int] = []


def check_output_dir(output_dir) -> None:
    """The output folder is a writable folder, or can be made in one: checked before the dataset is loaded,
    without creating anything."""
    path = Path(output_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a folder" if not existing.is_dir() else "is not writable"
        raise UsageError(f"--output-dir {output_dir} cannot hold run folders ({existing} {what})")


def check_run_size(
    num_networks: int, hidden_dim: int, hidden_layers: int, transitions: int, batch_size: int = 0
) -> None:
    """A rough upper bound of what a run allocates, checked before any work: num_networks MLPs (weights,
    Adam's two moments and a target copy), a replay buffer of Ant-v5-sized transitions, the largest of
    the four tasks (s, a, r, s', terminal: 2 x 105 + 8 + 2 floats), and one sampled batch of them with
    its int64 indices and what the update keeps for the backward pass (every network's hidden activations
    and their gradients)."""
    weights = num_networks * hidden_dim * (hidden_dim * hidden_layers + 400)
    stored = 4 * (4 * weights + 220 * transitions)
    batch = batch_size * (4 * 220 + 8 + 2 * 4 * num_networks * hidden_dim * hidden_layers)
    what = (
        "the networks and the replay buffer"
        if batch <= stored
        else f"a batch of {batch_size} transitions and its activations"
    )
    check_memory(stored + batch, what)


def check_memory(nbytes: int, what: str) -> None:
    """Fail before any work when nbytes of buffers and networks cannot fit in this machine's free memory
    (host memory: the dataset passes through it on every device)."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        free = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable"))) * 1024
    except (OSError, StopIteration, ValueError):
        return  # not Linux: let the allocation decide
    if nbytes > free:
        raise UsageError(
            f"{what} need about {nbytes / 2**30:.1f} GiB, but this machine has {free / 2**30:.1f} GiB free"
        )


# ---------------------------------------------------------------------------------------
# Random streams, versions
# ---------------------------------------------------------------------------------------
def rng_states(rng: np.random.Generator, env=None) -> dict:
    """Every random stream a run draws from, so a resumed run continues it exactly."""
    return {
        "python": random.getstate(),
        "numpy": rng.bit_generator.state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "env": None if env is None else env.unwrapped.np_random.bit_generator.state,
    }


def set_rng_states(states: dict, rng: np.random.Generator, env=None) -> None:
    random.setstate(states["python"])
    rng.bit_generator.state = states["numpy"]
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])
    if env is not None and states["env"] is not None:
        env.unwrapped.np_random.bit_generator.state = states["env"]


def versions() -> dict:
    # str(): torch.__version__ is a TorchVersion, which torch.load(weights_only=True) refuses to unpickle
    found = {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__}
    for package in ("gymnasium", "minari", "mujoco"):
        with contextlib.suppress(Exception):
            found[package] = __import__(package).__version__
    return found


def git_commit() -> str | None:
    """The commit of the code that ran, with '-dirty' if it had uncommitted changes; None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
