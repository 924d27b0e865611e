"""Check docs/teaching.md's kit: blank each exercise and make each common mistake, one at a time, on a scratch
copy of the repository, run the kit's command, and print a markdown table of what the tests caught.

    python scripts/check_teaching_kit.py            # about one minute per row on 2 CPU cores

The repository itself is never edited: the script copies it (without .git, runs/ and .venv) into a temporary
folder. A mistake is a text replacement in redq_adaptive_bc.py; a row whose text is no longer found (the
script changed) says so instead of passing silently. Exit status 1 if any row is not caught.
"""

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "equations", "tests/test_redq_adaptive_bc.py"]
EXERCISES = ["adapt_alpha", "td_target", "critic_loss", "actor_loss", "soft_update", "num_kept", "downsample"]
EXERCISES += ["ReplayBuffer.add", "Actor.forward"]
CLIP = "min(max(alpha_online + (p_term + d_term) * episode_length, 0.0), alpha_max)"
RAW_NOISE = "(torch.randn_like(batch.actions) * policy_noise)"
MISTAKES = [  # (mistake, text in redq_adaptive_bc.py, replacement)
    ("td_target: mean instead of min over the M critics", ".min(dim=0).values\n    return", ".mean(dim=0)\n    return"),
    ("td_target: no (1 - terminal)", "gamma * (1.0 - batch.terminals) * q_next", "gamma * q_next"),
    (
        "td_target: ignores the critic subset",
        "next_actions.clamp(low, high), critic_idx)",
        "next_actions.clamp(low, high), None)",
    ),
    (
        "td_target: no clamp of a' to the bounds",
        "next_actions.clamp(low, high), critic_idx)",
        "next_actions, critic_idx)",
    ),
    (
        "td_target: a' clamped to [-1, 1]",
        "next_actions.clamp(low, high), critic_idx)",
        "next_actions.clamp(-1, 1), critic_idx)",
    ),
    ("td_target: unclipped noise", f"{RAW_NOISE}.clamp(-noise_clip, noise_clip)", RAW_NOISE),
    ("td_target: noise not scaled by action_scale", "noise * actor_target.action_scale", "noise"),
    (
        "td_target: noise clipped after scaling",
        f"{RAW_NOISE}.clamp(",
        f"{RAW_NOISE[:-1]} * actor_target.action_scale).clamp(",
    ),
    (
        "critic step: the online actor in the target",
        "y = td_target(batch, self.actor_target,",
        "y = td_target(batch, self.actor,",
    ),
    ("adapt_alpha: no max(0, .) in the D term", "max(0.0, R_last - R_current)", "(R_last - R_current)"),
    ("adapt_alpha: no clip of alpha", CLIP, "alpha_online + (p_term + d_term) * episode_length"),
    ("adapt_alpha: clip at alpha_max only", CLIP, "min(alpha_online + (p_term + d_term) * episode_length, alpha_max)"),
    (
        "adapt_alpha: returns the old R_last",
        "R_next = R_current if moving_average is None",
        "R_next = R_last if moving_average is None",
    ),
    (
        "adapt_alpha: P term on R_current in the authors' mode",
        "(R_current if moving_average is None else R_last)",
        "R_current",
    ),
    ("adapt_alpha: no episode-length scaling", "(p_term + d_term) * episode_length", "(p_term + d_term)"),
    (
        "adapt_alpha: moving average weights swapped",
        "moving_average * R_current + (1 - moving_average) * R_last",
        "moving_average * R_last + (1 - moving_average) * R_current",
    ),
    ("critic_loss: sum over the batch", "((q - y) ** 2).mean(dim=1)", "((q - y) ** 2).sum(dim=1)"),
    (
        "critic_loss: always sums over critics",
        'per_critic.sum() if reduction == "sum" else per_critic.mean()',
        "per_critic.sum()",
    ),
    (
        "actor_loss: BC summed over action dimensions",
        "((pi - batch.actions) ** 2).mean()",
        "((pi - batch.actions) ** 2).sum(-1).mean()",
    ),
    ("actor_loss: no .detach() on the normalizer", "q_bar.abs().mean().detach()", "q_bar.abs().mean()"),
    ("actor_loss: no abs() in the normalizer", "q_bar.abs().mean().detach()", "q_bar.mean().detach()"),
    ("actor_loss: BC term with the wrong sign", "return q_term + alpha * bc_term", "return q_term - alpha * bc_term"),
    (
        "actor_loss: min over critics instead of the mean",
        "critic(batch.obs, pi).mean(dim=0)",
        "critic(batch.obs, pi).min(dim=0).values",
    ),
    ("actor_loss: Q at the dataset's actions", "critic(batch.obs, pi)", "critic(batch.obs, batch.actions)"),
    ("soft_update: tau and 1 - tau swapped", "list(source.parameters()), tau)", "list(source.parameters()), 1 - tau)"),
    (
        "Agent: actor target never soft-updated",
        "        soft_update(self.actor_target, self.actor, self.args.tau)\n",
        "",
    ),
    (
        "Agent: policy_freq ignored",
        "update_actor = self.num_updates % self.args.policy_freq == 0",
        "update_actor = True",
    ),
    ("Actor: no action_bias", "* self.action_scale + self.action_bias", "* self.action_scale"),
    ("ReplayBuffer.add: always writes from slot 0", "idx = (self.ptr + torch.arange(", "idx = (0 + torch.arange("),
    ("ReplayBuffer.add: size not capped", "min(self.size + n, self.capacity)", "self.size + n"),
    ("num_kept: floor instead of ceil", "math.ceil(keep_ratio * dataset_size)", "int(keep_ratio * dataset_size)"),
    (
        "num_kept: ignores keep_min",
        "max(math.ceil(keep_ratio * dataset_size), keep_min)",
        "math.ceil(keep_ratio * dataset_size)",
    ),
    ("num_kept: not capped at the dataset size", "return min(dataset_size, max(", "return (max("),
    ("downsample: keeps the first k rows", "torch.randperm(buffer.size, generator=generator)[:k]", "torch.arange(k)"),
    ("downsample: ignores with_replacement", "if with_replacement:", "if False:"),
]


def blank(source: str, qualname: str) -> str:
    """The source with qualname's body (after its docstring) replaced by `raise NotImplementedError`."""
    nodes = ast.parse(source).body
    for part in qualname.split("."):
        node = next(n for n in nodes if getattr(n, "name", None) == part)
        nodes = node.body
    has_docstring = isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    first = node.body[1] if has_docstring else node.body[0]
    lines = source.splitlines(keepends=True)
    indent = " " * first.col_offset
    return "".join(lines[: first.lineno - 1] + [f"{indent}raise NotImplementedError\n"] + lines[node.end_lineno :])


def failing_tests(copy: Path, source: str) -> list[str]:
    (copy / "redq_adaptive_bc.py").write_text(source)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *KIT], cwd=copy, env=env, capture_output=True, text=True)
    return sorted(set(re.findall(r"^(?:FAILED|ERROR) \S+::test_(\w+)", proc.stdout, re.M)))


def main() -> int:
    original = (ROOT / "redq_adaptive_bc.py").read_text()
    rows = [(f"`{name}` blanked", blank(original, name)) for name in EXERCISES]
    rows += [(m, original.replace(old, new) if original.count(old) == 1 else None) for m, old, new in MISTAKES]
    missed = 0
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "runs", ".venv", "__pycache__"))
        if failing_tests(copy, original):
            print("error: the kit fails on the unchanged script", file=sys.stderr)
            return 2
        print("| mistake | caught | by |\n|---|---|---|")
        for mistake, source in rows:
            failed = None if source is None else failing_tests(copy, source)
            missed += not failed
            caught = "text not found" if failed is None else ("yes" if failed else "NO")
            print(f"| {mistake} | {caught} | {', '.join(failed or [])} |", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
