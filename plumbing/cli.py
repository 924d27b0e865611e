"""The command line every script shares: tyro arguments with the run flags below, bad input as one line
and exit status 2 before any work, and the exit statuses of a run (1 diverged, 128+signal preempted,
130 interrupted)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import signal
import sys
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import tyro

from plumbing.d4rl import ENVS as D4RL_ENVS
from plumbing.d4rl import NAMES as D4RL_NAMES
from plumbing.d4rl import check_env as check_d4rl_env
from plumbing.errors import STOP_SIGNALS, Preempted, RunFinished, TrainingDiverged, UsageError, request_stop
from plumbing.run_folder import check_output_dir, fill_eval_settings

# Re-exported for scripts written before plumbing.runtime existed (benchmarks/update_speed.py --against REV).
from plumbing.runtime import pick_device as pick_device
from plumbing.runtime import progress_bar as progress_bar
from plumbing.runtime import seed_everything as seed_everything
from plumbing.tracking import check_tracking


@dataclass
class RunArgs:
    """Flags of every training script: what to train on, where to write, how to checkpoint."""

    env: Literal["hopper", "halfcheetah", "walker2d", "ant"] = "hopper"
    """MuJoCo task (Gymnasium *-v4 for D4RL's data, *-v5 for data recorded on v5)"""
    dataset: Literal[
        "random",
        "medium",
        "medium-replay",
        "medium-expert",
        "expert",
        "uniform-random",
        "minari-medium-expert",
        "redq-medium-replay",
    ] = "medium"
    """offline dataset: random..expert are D4RL's (the paper's); uniform-random (uniform actions, built here),
    minari-medium-expert (Minari's medium + expert, built here), redq-medium-replay (baselines/redq.py's export)"""
    d4rl_version: Literal["v0", "v2"] = "v0"
    """version of D4RL's files: v0 as the authors' code loads, v2 as today's tables (CORL, IQL)"""
    dataset_id: str | None = None
    """any Minari dataset id, instead of --env/--dataset (Minari's own: mujoco/hopper/medium-v0); its task comes
    from its env spec, else its namespace (local/<env>/...), else --env"""
    seed: int = 0
    """random seed, 0 <= seed < 2**32 (the evaluation environment uses seed + 100)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """torch device; auto picks cuda when available"""
    output_dir: str = "runs"
    """runs are written to <output-dir>/<env>-<dataset>__<method>__<seed>__<unix time>/"""
    eval_every: int | None = None
    """evaluate every this many gradient steps offline / environment steps online (default 5,000, the paper's; with
    --load-offline: the pre-training run's number, then counted in environment steps)"""
    eval_episodes: int | None = None
    """episodes per evaluation (default 10, the paper's, at most 10,000; with --load-offline: the pre-training run's)"""
    load_offline: str | None = None
    """a run folder or its offline.pt: skip pre-training, fine-tune that agent with its dataset and networks"""
    random_dataset_steps: int = 1_000_000
    """size of --dataset uniform-random (default 1M; other sizes get the id local/<env>/uniform-random-<n>steps-v0)"""
    ref_min_score: float | None = None
    """return that normalizes to 0 (default: dataset metadata, else D4RL's random score)"""
    ref_max_score: float | None = None
    """return that normalizes to 100 (default: dataset metadata, else D4RL's expert score)"""
    checkpoint_every: int = 50_000
    """write a resumable latest.pt every this many gradient steps offline / env steps online"""
    checkpoint_minutes: float = 30.0
    """also write latest.pt after this many minutes of wall time (a preempted job keeps its progress)"""
    resume: str | None = None
    """a run folder to continue from its latest.pt, with the arguments in its config.json (other flags are ignored)"""
    track: bool = False
    """mirror the logged rows to TensorBoard (<run>/tensorboard) and, when installed, wandb"""


def parse_args(Args, method: str, argv: list[str] | None = None, description: str = ""):
    """tyro.cli with tyro's boxed error folded into one line (exit status 2); --resume reads config.json."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = tyro.cli(Args, args=argv, description=description)
    except SystemExit as e:
        if e.code not in (0, None):
            print("error: " + tyro_error_line(captured.getvalue()), file=sys.stderr)
        raise
    if args.resume is not None:
        args = args_from_run(Args, method, args.resume)
    return args


def tyro_error_line(text: str) -> str:
    """The message in tyro's error box, drawn in Unicode (title in the top border) or in ASCII
    (title, rule, message) when stderr cannot encode Unicode."""
    sections = [[]]
    for line in text.splitlines():
        content = line.strip().strip("│|").strip()
        if content[:1] in ("╭", "╰"):
            continue
        if content and set(content) <= set("─-"):
            sections.append([])
        elif content:
            sections[-1].append(content)
    message = sections[1] if "╭" not in text and len(sections) > 1 else sections[0]
    return " ".join(message) or text.strip()


def args_from_run(Args, method: str, run_dir):
    """The arguments a run folder was started with, each checked against its declared type."""
    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(
            f"--resume: {run_dir} is not a run folder (no readable config.json: {type(e).__name__})"
        ) from None
    if not isinstance(config, dict) or config.get("method") != method:
        found = config.get("method") if isinstance(config, dict) else None
        raise UsageError(f"--resume: {run_dir} is a run of {found or 'an unknown method'}, not {method}")
    if not (Path(run_dir) / "progress.csv").is_file():
        raise UsageError(f"--resume: {run_dir} has no progress.csv; start a new run instead")
    hints = typing.get_type_hints(Args)
    values = {}
    for field in fields(Args):
        if field.name == "resume":
            continue
        if field.name not in config:
            raise UsageError(f"--resume: {path} lacks the argument {field.name!r}")
        if not fits_type(config[field.name], hints[field.name]):
            raise UsageError(f"--resume: {path} has {field.name}={config[field.name]!r}, not a {hints[field.name]}")
        values[field.name] = config[field.name]
    return Args(**values, resume=str(run_dir))


def fits_type(value, annotation) -> bool:
    origin, params = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return value in params
    if origin in (typing.Union, types.UnionType):
        return any(fits_type(value, p) for p in params)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation)


def check_ranges(args, positive=(), non_negative=(), fraction=(), finite=()) -> None:
    """One line per broken rule: positive > 0, non_negative >= 0, fraction in (0, 1], all finite.
    None (an unset optional) passes."""

    def flag(name):
        return "--" + name.replace("_", "-")

    for names, ok, rule in [
        (positive, lambda v: v > 0, "positive"),
        (non_negative, lambda v: v >= 0, "non-negative"),
        (fraction, lambda v: 0 < v <= 1, "in (0, 1]"),
        (finite, lambda v: True, "finite"),
    ]:
        for name in names:
            value = getattr(args, name)
            if value is not None and (not math.isfinite(value) or not ok(value)):
                raise UsageError(f"{flag(name)} must be {rule}, got {value}")


MAX_EVAL_EPISODES = 10_000


def check_run_args(args) -> None:
    """The checks of RunArgs's flags."""
    check_ranges(
        args,
        positive=["eval_every", "eval_episodes", "random_dataset_steps", "checkpoint_every", "checkpoint_minutes"],
        finite=["ref_min_score", "ref_max_score"],
    )
    if (args.eval_episodes or 0) > MAX_EVAL_EPISODES:  # None: from the pre-training run; more is a typo
        raise UsageError(f"--eval-episodes must be at most {MAX_EVAL_EPISODES:,}, got {args.eval_episodes}")
    if args.dataset_id is None and args.dataset in D4RL_NAMES and args.env not in D4RL_ENVS:
        check_d4rl_env(args.env, args.dataset)
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    if args.resume is None:
        check_output_dir(args.output_dir)
    if args.track:
        check_tracking()


def run_main(main, Args, method: str, check, description: str = "") -> None:
    """Parse and check the arguments, run main(args), and turn the ways a run ends into exit statuses."""
    try:
        args = parse_args(Args, method, description=description)
        if args.load_offline is None:  # a fine-tune takes them from its pre-training run (load_pretrained)
            fill_eval_settings(args)
        check_run_args(args)
        check(args)
        for signum in STOP_SIGNALS:  # cluster preemption: save and exit at the next safe point
            signal.signal(signum, request_stop)
        main(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunFinished as e:
        completed = f"; completed its finish step ({', '.join(e.done)})" if e.done else ""
        print(f"{e} has finished already (final.pt): nothing to resume{completed}", file=sys.stderr)
    except TrainingDiverged as e:
        print(f"error: {e}; stopped. progress.csv and the checkpoints written before are kept.", file=sys.stderr)
        sys.exit(1)
    except Preempted as e:
        print(f"stopped by {e}: {e.note or 'latest.pt is saved; continue with --resume <run folder>'}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        print("interrupted: progress.csv and the checkpoints written so far are kept.", file=sys.stderr)
        sys.exit(130)
