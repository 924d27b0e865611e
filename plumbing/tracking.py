"""--track: mirror every logged row to TensorBoard and, when it is installed, wandb (CleanRL's habit).
Neither is a requirement of the project: `pip install tensorboard` (and `wandb`) to use it."""

from __future__ import annotations

import importlib.util
import os

from plumbing.errors import UsageError


def check_tracking() -> None:
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("wandb") is None:
        raise UsageError("--track needs TensorBoard or wandb: pip install tensorboard (and/or wandb)")


class Tracker:
    """Each numeric value of a row goes to <log>/<column>, indexed by the run's global step
    (online steps continue after the offline ones, so both phases share one x axis)."""

    def __init__(self, log_dir, config: dict):
        self.writer = self.wandb = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(log_dir))
            self.writer.add_text("config", "\n".join(f"{k}: {v}" for k, v in config.items()))
        if importlib.util.find_spec("wandb") is not None:
            import wandb

            self.wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "redq-adaptive-bc"),
                config=config,
                name=os.path.basename(str(log_dir.parent)),
                dir=str(log_dir.parent),
            )
        self.offline_steps = config.get("offline_steps") or 0

    def log(self, log_name: str, row: dict) -> None:
        step = int(row.get("step") or 0) + (self.offline_steps if row.get("phase") == "online" else 0)
        values = {f"{log_name}/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
