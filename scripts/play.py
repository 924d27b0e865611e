"""Watch a trained policy: roll out a finished run's actor deterministically, print its returns and
normalized score, and optionally write a video.

Usage:
    python scripts/play.py runs/hopper-medium__redq_adaptive_bc__0__1700000000
    python scripts/play.py RUN_DIR --episodes 3 --seed 7
    python scripts/play.py RUN_DIR --episodes 1 --video hopper.mp4     # needs: pip install imageio-ffmpeg
    python scripts/play.py sweeps/fig3-20250101-120000/runs/task_1     # a folder holding one run: that run

It reads RUN_DIR/actor.pt (final.pt if there is no actor.pt), both loaded with weights_only=True:
{"actor": state dict, "meta": {"method", "config", "actor": {"class", "kwargs"}}}. The policy class is
the one the method's script defines (redq_adaptive_bc.py, or baselines/<method>.py for any other
method), imported by path and rebuilt from the stored kwargs, so a new method needs no change here.

The environment is gym.make(config["env_id"]). Episode 1 is reset with --seed (default: the run's
seed + 100, the seed its own evaluations use), later episodes continue that stream, and the action
is the deterministic one (the actor's output: the mean for a Gaussian actor). So with the default
seed and --episodes equal to the run's --eval-episodes, the mean return is the run's last
evaluation. Normalized score x100 = 100 * (return - ref_min_score) / (ref_max_score - ref_min_score),
with the reference scores config.json records.

Video (--video PATH): frames of every episode played, at the environment's render_fps, written by
imageio-ffmpeg (its wheel ships an ffmpeg binary; not in requirements.txt: pip install imageio-ffmpeg).
MuJoCo renders with OpenGL: on a Linux machine with no display (no DISPLAY or WAYLAND_DISPLAY) and
MUJOCO_GL unset, this script sets MUJOCO_GL=egl, which needs the EGL and Mesa libraries
(Debian/Ubuntu: apt-get install libegl1 libgl1-mesa-dri). MUJOCO_GL=osmesa (apt-get install
libosmesa6) is the slower fallback; with a display, MuJoCo's default (glfw) is used.

Bad input (no such folder, no actor.pt or final.pt, a damaged file, an unknown method or env) is
one line on stderr and exit status 2. SIGTERM or Ctrl-C stops the rollout at once (exit status 130); the
video is written under a temporary name and renamed when the last episode ends, so a stopped rollout
leaves none.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import re
import signal
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shared package, for python scripts/play.py
from plumbing.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
if (
    "MUJOCO_GL" not in os.environ
    and sys.platform.startswith("linux")
    and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
):
    os.environ["MUJOCO_GL"] = "egl"  # headless: must be set before MuJoCo is imported

VIDEO_HELP = "pip install imageio-ffmpeg"


def policy_path(run_dir: Path) -> Path:
    """RUN_DIR/actor.pt, else RUN_DIR/final.pt (checked before torch is imported: bad input fails at once). A folder
    holding exactly one run folder (a sweep's runs/task_<i>) stands for that run."""
    if not run_dir.is_dir():
        raise UsageError(f"no such run folder: {run_dir}")
    runs = sorted(folder.parent for folder in run_dir.glob("*/config.json"))
    if not (run_dir / "config.json").exists() and len(runs) == 1:
        run_dir = runs[0]
    elif not (run_dir / "config.json").exists() and runs:
        raise UsageError(f"{run_dir} holds {len(runs)} run folders, not one: name the one to play")
    path = run_dir / "actor.pt" if (run_dir / "actor.pt").exists() else run_dir / "final.pt"
    if not path.exists():
        raise UsageError(f"{run_dir} has neither actor.pt nor final.pt: only a finished run has a policy to play")
    return path


def load_policy_file(path: Path) -> dict:
    """actor.pt's content (from final.pt's agent if the run has no actor.pt), checked for what play needs."""
    from plumbing.run_folder import load_torch  # imports torch: only after the quick checks of the input

    checkpoint = load_torch(path, "play")  # weights_only: a foreign file cannot run code
    if not isinstance(checkpoint.get("meta"), dict):
        raise UsageError(f"{path} is not a checkpoint of this project (no meta dictionary)")
    if path.name == "final.pt":
        agent = checkpoint.get("agent")
        checkpoint = {"actor": agent.get("actor") if isinstance(agent, dict) else None, "meta": checkpoint["meta"]}
    meta = checkpoint["meta"]
    description = meta.get("actor")
    if (
        not isinstance(checkpoint.get("actor"), dict)
        or not isinstance(description, dict)
        or not {"class", "kwargs"} <= description.keys()
    ):
        raise UsageError(f"{path} does not hold a policy with its network description (meta['actor'])")
    if not isinstance(meta.get("config"), dict):
        meta["config"] = read_config(path.parent)
    checkpoint["path"] = path
    return checkpoint


def read_config(run_dir: Path) -> dict:
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{run_dir}/config.json cannot be read ({type(e).__name__})") from None
    return config if isinstance(config, dict) else {}


def method_script(method) -> Path:
    """The script that defines a method's classes: redq_adaptive_bc.py or baselines/<method>.py."""
    if not isinstance(method, str) or not re.fullmatch(r"[A-Za-z0-9_]+", method):
        raise UsageError(f"meta['method'] is {method!r}, not a method name")
    path = ROOT / "redq_adaptive_bc.py" if method == "redq_adaptive_bc" else ROOT / "baselines" / f"{method}.py"
    if not path.is_file():
        raise UsageError(f"method {method!r}: no script {path.relative_to(ROOT)} defines its policy")
    return path


def build_actor(checkpoint: dict, device):
    """The policy class of the method's script (imported by path; scripts guard main()), with the stored weights."""
    import torch

    meta = checkpoint["meta"]
    path = method_script(meta.get("method"))
    spec = importlib.util.spec_from_file_location(f"play_{meta['method']}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UsageError(f"cannot import {path.name} ({type(e).__name__}: {str(e).strip()[:160]})") from None
    name, kwargs = meta["actor"]["class"], meta["actor"]["kwargs"]
    cls = getattr(module, str(name), None)
    if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module)):
        raise UsageError(f"{path.name} defines no policy class {name!r} (named in {checkpoint['path']})")
    try:
        actor = cls(**kwargs)
        actor.load_state_dict(checkpoint["actor"])
    except (TypeError, RuntimeError, KeyError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UsageError(f"{checkpoint['path']} does not fit {path.name}'s {name} ({reason})") from None
    return actor.to(device).eval()


def deterministic(actor):
    """obs -> action: the actor's act() or mean() method if its class defines one, else actor(obs); a
    distribution gives its mean, a tuple its first element."""
    for name in ("act", "mean"):
        if inspect.isfunction(inspect.getattr_static(type(actor), name, None)):
            return getattr(actor, name)
    return actor


def play(actor, env, episodes, seed, device, frames=None, report=print):
    """Undiscounted return of each episode, each reported as it ends; every rendered frame goes to
    frames.send when given."""
    import torch

    policy, returns = deterministic(actor), []
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed if episode == 0 else None)
        done, total = False, 0.0
        if frames is not None:
            frames.send(env.render())
        while not done:
            with torch.no_grad():
                out = policy(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])
            out = out[0] if isinstance(out, tuple) else out
            out = out.mean if isinstance(out, torch.distributions.Distribution) else out
            obs, reward, terminated, truncated, _ = env.step(out[0].cpu().numpy())
            total += float(reward)
            done = terminated or truncated
            if frames is not None:
                frames.send(env.render())
        returns.append(total)
        report(episode + 1, total)
    return np.array(returns)


class VideoFrames:
    """Frames to an mp4 through imageio-ffmpeg, opened at the first frame (whose size it needs). It writes a
    temporary file beside PATH and renames it at the end: a stopped rollout leaves no half-written video."""

    def __init__(self, path: Path, fps: float):
        try:
            import imageio_ffmpeg
        except ImportError:
            raise UsageError(f"--video needs imageio-ffmpeg, which is not installed: {VIDEO_HELP}") from None
        self.ffmpeg, self.path, self.fps, self.writer, self.count = imageio_ffmpeg, path, fps, None, 0
        self.tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # ffmpeg reads the suffix

    def send(self, frame):
        if frame is None:
            raise UsageError("the environment rendered no frame (render_mode='rgb_array' unsupported?)")
        if self.writer is None:
            self.writer = self.ffmpeg.write_frames(
                str(self.tmp),
                (frame.shape[1], frame.shape[0]),
                fps=self.fps,
                macro_block_size=1,
                ffmpeg_log_level="error",
            )
            self.writer.send(None)  # start the generator
        self.writer.send(np.ascontiguousarray(frame))
        self.count += 1

    def close(self, keep: bool):
        """Finish the file and move it to PATH (keep), or remove it (a stopped or failed rollout)."""
        try:
            if self.writer is not None:
                self.writer.close()
            if keep and self.writer is not None:
                os.replace(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)


def make_env(env_id, video: bool):
    import gymnasium as gym

    try:
        return gym.make(env_id, render_mode="rgb_array") if video else gym.make(env_id)
    except Exception as e:
        raise UsageError(f"cannot make env {env_id!r} ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        self.exit(2, f"error: {message} (see python scripts/play.py --help)\n")


def parse_args(argv=None):
    parser = Parser(prog="scripts/play.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "run_dir", type=Path, help="a finished run folder (with actor.pt or final.pt), or a folder holding one"
    )
    parser.add_argument("--episodes", type=positive_int, default=10, metavar="N", help="episodes to play (default 10)")
    parser.add_argument("--seed", type=int, help="reset seed of the first episode (default: the run's seed + 100)")
    parser.add_argument(
        "--video",
        type=Path,
        metavar="PATH.mp4",
        help=f"also write the episodes as a video (needs: {VIDEO_HELP}; headless: MUJOCO_GL=egl)",
    )
    parser.add_argument("--device", default="cpu", help="torch device for the policy (default cpu)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    path = policy_path(args.run_dir)
    if args.video and not args.video.parent.resolve().is_dir():
        raise UsageError(f"--video {args.video}: no folder {args.video.parent} to write it in")
    frames = VideoFrames(args.video, 30) if args.video else None  # fails early if the writer is missing
    import torch  # only now: the checks above answer in a blink

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: this machine has no CUDA device torch can use")
    checkpoint = load_policy_file(path)
    config = checkpoint["meta"]["config"]
    missing = [k for k in ("env_id", "ref_min_score", "ref_max_score") if config.get(k) is None]
    if missing:
        raise UsageError(f"{checkpoint['path']}: its config records no {', '.join(missing)}")
    actor = build_actor(checkpoint, device)
    env = make_env(config["env_id"], video=frames is not None)
    obs_dim = checkpoint["meta"]["actor"]["kwargs"].get("obs_dim")
    if obs_dim is not None and env.observation_space.shape != (obs_dim,):
        raise UsageError(f"{config['env_id']} observes {env.observation_space.shape}, the policy expects ({obs_dim},)")
    seed = args.seed if args.seed is not None else int(config.get("seed") or 0) + 100
    if frames is not None:
        frames.fps = env.metadata.get("render_fps") or 30
        try:
            with warnings.catch_warnings():  # a failing GL backend warns before it raises: one line is enough
                warnings.simplefilter("ignore")
                env.reset(seed=seed)
                env.render()
        except Exception as e:
            reason = (str(e).strip().splitlines() or [""])[-1][:120]
            raise UsageError(
                f"rendering failed with MUJOCO_GL={os.environ.get('MUJOCO_GL')} ({type(e).__name__}: "
                f"{reason}); headless Linux needs apt-get install libegl1 libgl1-mesa-dri "
                "(or MUJOCO_GL=osmesa with libosmesa6)"
            ) from None
    lo, hi = float(config["ref_min_score"]), float(config["ref_max_score"])

    def normalize(ret):  # D4RL's score, x100
        return 100 * (ret - lo) / (hi - lo)

    print(
        f"{config['env_id']}, {checkpoint['meta']['method']} policy from {checkpoint['path']}, seed {seed}", flush=True
    )
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the rollout as Ctrl-C does
    finished = False
    try:
        returns = play(
            actor,
            env,
            args.episodes,
            seed,
            device,
            frames,
            report=lambda i, ret: print(f"episode {i}: return {ret:.4f}  normalized {normalize(ret):.4f}", flush=True),
        )
        finished = True
    finally:
        if frames is not None:
            frames.close(keep=finished)
        env.close()
    scores = normalize(returns)
    print(
        f"mean normalized score (x100): {scores.mean():.4f} ± {scores.std():.4f} over {len(returns)} episodes "
        f"(mean return {returns.mean():.4f}; reference scores {lo:g} / {hi:g})"
    )
    if frames is not None:
        print(f"wrote {args.video} ({frames.count} frames at {frames.fps:g} fps)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: stopped the rollout (no video written)", file=sys.stderr)
        sys.exit(130)
