"""What a run needs from the machine: the torch device, seeded random streams, a progress bar."""

from __future__ import annotations

import sys

from tqdm import tqdm


def pick_device(name: str):
    """--device auto: cuda when available."""
    import torch

    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def seed_everything(seed: int):
    """Seed Python's, NumPy's and torch's global streams; returns the NumPy generator the script draws from."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def progress_bar(total, initial=0, **kwargs):
    """tqdm with an ETA on a terminal; silent when stderr is a file (a Slurm log), where progress.csv rows
    are echoed as lines instead."""
    return tqdm(total=total, initial=initial, mininterval=2, disable=not sys.stderr.isatty(), **kwargs)
