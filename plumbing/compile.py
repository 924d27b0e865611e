"""--compile, kept apart from the plain step (as LeanRL does): torch.compile each part of an agent's gradient
step and, on CUDA, capture it as CUDA graphs. The results are the same; only the speed changes (docs/speed.md)."""

import torch


def compile_step(agent, parts=("critic_step", "actor_step", "target_step")) -> None:
    """Replace agent.<part> by its compiled version. On CUDA ('reduce-overhead' mode) each part becomes a CUDA
    graph, whose outputs are overwritten by its next replay: agent.update then marks each step's start and
    returns copies of the metrics. The optimizers must be built with capturable=True there."""
    cuda = agent.device.type == "cuda"
    for name in parts:
        setattr(agent, name, torch.compile(getattr(agent, name), mode="reduce-overhead" if cuda else None))
    if cuda:
        update = agent.update

        def update_in_graphs(*args, **kwargs):
            torch.compiler.cudagraph_mark_step_begin()
            return {k: v.clone() for k, v in update(*args, **kwargs).items()}

        agent.update = update_in_graphs
