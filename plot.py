"""Learning curves and a results table from run folders.

Usage:
    python plot.py runs/                        # every run under runs/, output in runs/plots/
    python plot.py runs/ old_runs/ --out figs --format pdf
    python plot.py runs/ --methods redq_adaptive_bc td3_bc --envs hopper --datasets medium
    python plot.py runs/ --smooth 5             # moving average over 5 evaluations per run
    python plot.py runs/ --raw-returns          # return_mean instead of the normalized score
    python plot.py runs/ --episodes             # also alpha and R per training episode (episodes.csv)
    python plot.py sweeps/fig3-20250101-120000/runs/  # a sweep's runs (scripts/sweep.py keeps them out of runs/)

Units: every figure shows normalized returns x100 (D4RL's scale: 0 = random, 100 = expert), with R_target
drawn at 100. progress.csv already holds x100 scores (normalized_score); episodes.csv keeps Eq. 2's own
fractions (R_current, R_last, like --target-return 1.0), which the episodes figure multiplies by 100.

It reads only what each run writes (the contract: docs/adding-a-method.md):
    <env>-<dataset>__<method>__<seed>__<unixtime>[-k]/config.json    method, env, dataset, seed, settings
    <env>-<dataset>__<method>__<seed>__<unixtime>[-k]/progress.csv   one row per evaluation
    <env>-<dataset>__<method>__<seed>__<unixtime>[-k]/episodes.csv   one row per training episode (--episodes)
If config.json is missing or lacks a key, the key comes from the folder name. Any method name
works: methods come from config.json's "method", nothing here lists them.

It writes into --out (default: <first input folder>/plots):
    score.<fmt>     the paper's Figure 2: one panel per env-dataset (rows env, columns
                    dataset), normalized score (x100) against online environment steps,
                    one line per curve (see below): mean and a band of one std over seeds
    alpha.<fmt>     the same grid for alpha (the BC weight the adaptive controller moves): per
                    online training episode where episodes.csv logs it (the main script), else
                    at the run's evaluations; methods that log no alpha are left out
    episodes.<fmt>  with --episodes: per env-dataset, alpha (top) and R_current / R_last
                    (bottom, x100 on a symlog axis, linear within ±1, so that R near 0 and the
                    target at 100, dotted, both show) of every training episode of every run,
                    one line per run; runs whose episodes.csv has no alpha, R_current and
                    R_last columns are left out
    curves.csv      every plotted point: quantity, env, dataset, method, step, mean, std, n_runs
    results.md      the results table (also printed to stdout)

Pipeline: find and load runs -> one curve per (env, dataset, method, configuration) -> align
seeds -> plot -> table.

Curves never mix configurations: runs of one env, dataset and method whose config.json differ
in anything but the seed and bookkeeping (paths, host, versions, git commit, device, resume,
checkpointing, see BOOKKEEPING) are separate curves, labelled by the fewest keys that tell them
apart, e.g. "td3_bc (alpha_online=0.1)" (--authors-code, which moves six keys: "authors_code=True"),
and one line on stderr says which groups were split by which keys, all of them.
A key that only some runs record splits nothing (older runs of a script that gained a flag);
a run lacking a key others disagree on shows it as "?". --label-by KEY adds keys to every
label (e.g. to show alpha_online in every panel); it never merges runs that differ.
Two runs with the same seed in one curve (a copied or repeated run) are an error: exit 2,
one line naming both folders; move one of them out of the searched folders.

REDQ from scratch (config dataset or dataset_name "scratch": no offline data) runs once per
env and seed; it is drawn in every dataset panel of its env as "<method> (scratch)" and has a
row in every env-dataset block of the table (the same runs, repeated).

Honest alignment: seeds of one curve may stop at different steps or evaluate at different
steps. A curve exists only where every one of its runs has data: from the latest first
online step to the earliest last online step (the shortest run), on the union of the runs'
evaluation steps in that range, each run linearly interpolated there. Nothing is
extrapolated, so every point averages all n runs (n_runs in curves.csv, n in the legend).

The table, per env-dataset and curve, each cell "mean ± std over seeds":
    pre-trained  last offline evaluation (the online step-0 evaluation when the run has no
                 offline rows; a run with neither is left out of this cell)
    final        last online evaluation
    online mean  mean of all online evaluations (a regret-like summary of stability)
    dip          lowest evaluation at online steps <= 10% of that run's last online step
std is the population standard deviation over seeds (numpy's default, ddof=0; 0 for one
seed). The table uses the raw evaluations: --smooth changes only the curves.

A run folder that cannot be used (no progress.csv, an empty one, unparsable values, no
online rows yet) is skipped with one line on stderr; a partial last line (a run still
being written) is dropped and the rest of the run is used. Pre-train-only runs (config.json
online_steps 0: a sweep's first stage, whose fine-tunes are drawn) are left out, named in one
stderr line. No usable run: exit 2.
"""

import argparse
import csv
import io
import json
import os
import sys
import textwrap
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from plumbing.errors import UsageError

# Panel order for the grid; names not listed here follow in alphabetical order.
ENV_ORDER = ["hopper", "halfcheetah", "walker2d", "ant"]
DATASET_ORDER = ["random", "simple", "medium", "medium-replay", "medium-expert", "expert"]
DIP_FRACTION = 0.1  # the dip is looked for in the first 10% of fine-tuning
TABLE_COLUMNS = [  # (key in summarize_run's dict, table header)
    ("pretrained", "pre-trained"),
    ("final", "final"),
    ("online_mean", "online mean"),
    ("dip", "dip (first 10%)"),
]


SCRATCH = "scratch"  # the dataset of a run without offline data (REDQ from scratch): drawn in every panel
# config.json keys that say where or how a run ran, not what it computed: never split curves.
BOOKKEEPING = {
    "seed",
    "output_dir",
    "resume",
    "device",
    "git_commit",
    "versions",
    "host",
    "hostname",
    "pretrained_from",
    "load_offline",
    "run_name",
    "exp_name",
    "track",
    "checkpoint_every",
    "checkpoint_minutes",
    "compile",
    "ref_source",
    "start_time",
    "timestamp",
}
BOOKKEEPING_SUFFIXES = ("_dir", "_path", "_time")


class Curve(NamedTuple):
    """One line of a panel: a curve's mean and population std over seeds on the steps all its runs cover."""

    label: str
    steps: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    n_runs: np.ndarray  # runs averaged at each step (all of them: nothing is extrapolated)


class SkipRun(Exception):
    """A run folder that cannot be used; the message says why (one line on stderr)."""


@dataclass
class Run:
    folder: str
    method: str
    env: str
    dataset: str
    seed: int | None
    offline_values: np.ndarray  # metric of the offline rows, in file order
    online_steps: np.ndarray  # env steps of the online rows, increasing
    online_values: np.ndarray  # metric of the online rows
    alpha_steps: np.ndarray  # online rows that logged an alpha
    alpha_values: np.ndarray
    config: dict = field(default_factory=dict)  # config.json ({} when missing or unreadable)
    label: str = ""  # the curve it belongs to: method, "(scratch)", differing config keys

    @property
    def scratch(self):
        return self.dataset == SCRATCH


# ---------------------------------------------------------------- loading runs


def find_run_folders(tops):
    """Every run folder under the given folders: one holding progress.csv or config.json,
    or named <a>__<b>__<c>__<d>. Run folders are not searched further."""
    found = []
    for top in tops:
        for folder, subdirs, files in os.walk(top):
            name = os.path.basename(os.path.normpath(folder))
            if "progress.csv" in files or "config.json" in files or len(name.split("__")) == 4:
                found.append(folder)
                subdirs[:] = []
            subdirs.sort()
    unique = {os.path.realpath(f): f for f in reversed(found)}  # a folder given twice counts once
    return sorted(unique.values())


def parse_folder_name(folder):
    """'hopper-medium-replay__td3_bc__3__1700000000' (or ...__1700000000-2, a second run started in
    that second) -> env hopper, dataset medium-replay, method td3_bc, seed 3. Returns {} when the
    name does not have that shape."""
    parts = os.path.basename(os.path.normpath(folder)).split("__")
    if len(parts) < 2 or "-" not in parts[0]:
        return {}
    env, dataset = parts[0].split("-", 1)
    meta = {"env": env, "dataset": dataset, "method": parts[1]}
    if len(parts) > 2 and parts[2].lstrip("-").isdigit():
        meta["seed"] = int(parts[2])
    return meta


def read_config(folder):
    """config.json as a dict; {} when it is missing, unreadable or half-written."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            loaded = json.load(f)
        return loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        return {}


def read_meta(folder, config=None):
    """method, env, dataset, seed of a run: from config.json (env_name and dataset_name, the names in
    the folder name, before the env and dataset flags), else from the folder name. A run of dataset
    "scratch" (no offline data) has dataset "scratch" whatever else it records."""
    config = read_config(folder) if config is None else config
    from_name = parse_folder_name(folder)
    meta = {}
    for key, config_keys in (
        ("method", ["method"]),
        ("env", ["env_name", "env"]),
        ("dataset", ["dataset_name", "dataset"]),
        ("seed", ["seed"]),
    ):
        values = [config.get(k) for k in config_keys if config.get(k) not in (None, "")]
        meta[key] = values[0] if values else from_name.get(key)
    if SCRATCH in (config.get("dataset"), config.get("dataset_name")):
        meta["dataset"] = SCRATCH
    if not all(isinstance(meta[k], str) and meta[k] for k in ("method", "env", "dataset")):
        raise SkipRun(
            "cannot tell method/env/dataset: no usable config.json and the folder name "
            "is not <env>-<dataset>__<method>__<seed>__<unixtime>"
        )
    try:
        meta["seed"] = None if meta["seed"] is None else int(meta["seed"])
    except (TypeError, ValueError):
        meta["seed"] = None
    return meta


def read_rows(path, columns, name="progress.csv"):
    """(line number, row dict) of each complete row of a CSV log (a partial last line, of a run still being
    written, is dropped), which must have the given columns."""
    try:
        with open(path, newline="") as f:
            text = f.read()
    except FileNotFoundError:
        raise SkipRun(f"no {name}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SkipRun(f"{name} unreadable ({getattr(e, 'strerror', None) or e})") from None
    if not text.strip():
        raise SkipRun(f"{name} is empty")
    reader = csv.DictReader(io.StringIO(text[: text.rfind("\n") + 1]))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if reader.fieldnames and missing:
        raise SkipRun(f"{name} has no {', '.join(missing)} column")
    rows = [(reader.line_num, row) for row in reader]
    if not rows:
        raise SkipRun(f"{name} has {'a header but ' if reader.fieldnames else ''}no rows yet")
    for line, row in rows:
        if None in row.values():
            raise SkipRun(f"{name} line {line}: fewer fields than its header")
    return rows


def to_float(text, column, line, name="progress.csv"):
    """A csv field as a float; empty means not applicable (NaN)."""
    if not text.strip():
        return np.nan
    try:
        return float(text)
    except ValueError:
        raise SkipRun(f"{name} line {line}: {column}={text!r} is not a number") from None


def load_run(folder, metric="normalized_score", meta=None, config=None):
    """One run folder -> Run, or SkipRun saying why it cannot be used. alpha: per training episode from
    episodes.csv where the run logs it there, else the online evaluations' (progress.csv)."""
    config = read_config(folder) if config is None else config
    meta = meta or read_meta(folder, config)
    rows = read_rows(os.path.join(folder, "progress.csv"), ("phase", "step", metric))
    bad = [(line, row["phase"]) for line, row in rows if row["phase"] not in ("offline", "online")]
    if bad:
        raise SkipRun(f"progress.csv line {bad[0][0]}: phase {bad[0][1]!r} is not offline or online")
    phase = np.array([row["phase"] for _, row in rows])
    step, value, alpha = (
        np.array([to_float(row.get(c) or "", c, line) for line, row in rows]) for c in ("step", metric, "alpha")
    )
    online = phase == "online"
    if not online.any():
        raise SkipRun("no online rows yet (still pre-training?)")
    order = np.argsort(step[online], kind="stable")
    on_step, on_value, on_alpha = step[online][order], value[online][order], alpha[online][order]
    has_value, has_alpha = ~np.isnan(on_value), ~np.isnan(on_alpha)
    if not has_value.any():
        raise SkipRun(f"no {metric} values in the online rows")
    alpha_steps, alpha_values = on_step[has_alpha], on_alpha[has_alpha]
    try:
        episodes = load_episodes(folder, ("alpha",))
        logged = ~np.isnan(episodes["alpha"])
        if logged.any():
            alpha_steps, alpha_values = episodes["step"][logged], episodes["alpha"][logged]
    except SkipRun:
        pass  # no per-episode alpha: the evaluations' alone
    return Run(
        folder,
        meta["method"],
        meta["env"],
        meta["dataset"],
        meta["seed"],
        value[(phase == "offline") & ~np.isnan(value)],
        on_step[has_value],
        on_value[has_value],
        alpha_steps,
        alpha_values,
        config,
        meta["method"],
    )


EPISODE_COLUMNS = ("alpha", "R_current", "R_last")  # what --episodes draws, against step


def load_episodes(folder, columns=EPISODE_COLUMNS):
    """{column: array} of a run's episodes.csv (step and the given columns, rows in step order), or SkipRun."""
    rows = read_rows(os.path.join(folder, "episodes.csv"), ("step", *columns), "episodes.csv")
    values = {
        c: np.array([to_float(row[c], c, line, "episodes.csv") for line, row in rows]) for c in ("step", *columns)
    }
    order = np.argsort(values["step"], kind="stable")
    return {c: v[order] for c, v in values.items()}


def load_runs(tops, metric="normalized_score", methods=None, envs=None, datasets=None, label_by=()):
    """All usable runs under the given folders that pass the filters, labelled by curve (label_runs);
    each unusable one is reported with one line on stderr. Scratch runs pass any --datasets filter:
    they belong to every dataset panel of their env."""
    runs, pretraining_only = [], []
    for folder in find_run_folders(tops):
        try:
            config = read_config(folder)
            meta = read_meta(folder, config)
            if (
                (methods and meta["method"] not in methods)
                or (envs and meta["env"] not in envs)
                or (datasets and meta["dataset"] not in datasets and meta["dataset"] != SCRATCH)
            ):
                continue  # filtered out, not broken: say nothing
            if config.get("online_steps") == 0:
                pretraining_only.append(folder)  # a pre-train-once sweep's first stage: its fine-tunes are drawn
                continue
            runs.append(load_run(folder, metric, meta, config))
        except SkipRun as e:
            print(f"skipping {folder}: {str(e).splitlines()[0]}", file=sys.stderr)
    if pretraining_only:
        print(
            f"note: {len(pretraining_only)} pre-train-only run(s) (online_steps 0) not plotted: "
            + ", ".join(pretraining_only),
            file=sys.stderr,
        )
    note = label_runs(runs, label_by)
    if note:
        print(note, file=sys.stderr)
    return runs


# ---------------------------------------------------------------- one curve per configuration


def is_bookkeeping(key):
    return key in BOOKKEEPING or key.endswith(BOOKKEEPING_SUFFIXES)


def setting(config, key):
    """A config value in a comparable, printable form (nested values as sorted JSON)."""
    value = config[key]
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def differing_keys(runs):
    """The config keys, bookkeeping aside, on which runs that record them disagree (sorted)."""
    values = {}
    for run in runs:
        for key in run.config:
            if not is_bookkeeping(key):
                values.setdefault(key, set()).add(setting(run.config, key))
    return sorted(key for key, seen in values.items() if len(seen) > 1)


def telling_keys(runs, split, chosen=()):
    """The fewest keys of split (greedily, after the chosen ones) whose values tell apart every configuration
    the runs hold: --authors-code changes six keys at once, and its curve is labelled "authors_code=True"."""

    def curves(keys):  # how many configurations these keys tell apart
        return len({tuple(setting(run.config, k) if k in run.config else "?" for k in keys) for run in runs})

    chosen = list(chosen)
    while curves(chosen) < curves(split):
        candidates = [k for k in split if k not in chosen]
        chosen.append(max(candidates, key=lambda k: (curves([*chosen, k]), -split.index(k))))  # ties: sorted order
    return chosen


def label_runs(runs, label_by=()):
    """Give every run the label of its curve: the method, "scratch" for a run without offline data,
    then key=value for the --label-by keys and for the fewest keys, among those on which runs of the same
    env, dataset and method differ, that tell the curves apart (telling_keys). Returns the one-line note
    saying which groups were split by which keys, all of them ("" if none was)."""
    groups, splits = {}, []
    for run in runs:
        groups.setdefault((run.env, run.dataset, run.method), []).append(run)
    for (env, dataset, method), members in groups.items():
        split = differing_keys(members)
        if split:
            splits.append(f"{env}-{dataset} {method} by {', '.join(split)}")
        keys = telling_keys(members, split, chosen=label_by) if split else label_by
        for run in members:
            parts = [SCRATCH] if run.scratch else []
            parts += [
                f"{k}={setting(run.config, k) if k in run.config else '?'}"
                for k in keys
                if k in run.config or k in split
            ]
            run.label = f"{method} ({', '.join(parts)})" if parts else method
    if not splits:
        return ""
    return (
        "note: runs that differ in more than the seed are separate curves, labelled by the fewest of the keys "
        "that differ that tell them apart; they differ: " + "; ".join(sorted(splits))
    )


def check_duplicate_seeds(runs):
    """UsageError if one curve holds two runs of the same seed (they would count as two seeds)."""
    seen = {}
    for run in runs:
        if run.seed is None:
            continue
        key = (run.env, run.dataset, run.label, run.seed)
        if key in seen:
            raise UsageError(
                f"error: {run.env}-{run.dataset} {run.label}: seed {run.seed} twice, in {seen[key]} and "
                f"{run.folder} (same configuration); move one of them out of the searched folders"
            )
        seen[key] = run.folder


# ---------------------------------------------------------------- grouping and alignment


def ordered(names, preferred):
    return sorted(set(names), key=lambda x: (preferred.index(x) if x in preferred else len(preferred), x))


def group_runs(runs):
    """{(env, dataset, label): [runs]} in grid order (env, dataset), then label. A scratch run joins
    every dataset of its env that other runs have (its own "scratch" panel if there is none)."""
    datasets_of = {}
    for run in runs:
        if not run.scratch:
            datasets_of.setdefault(run.env, set()).add(run.dataset)
    groups = {}
    for run in runs:
        for dataset in sorted(datasets_of.get(run.env, [run.dataset])) if run.scratch else [run.dataset]:
            groups.setdefault((run.env, dataset, run.label), []).append(run)
    envs = ordered([k[0] for k in groups], ENV_ORDER)
    datasets = ordered([k[1] for k in groups], DATASET_ORDER)
    keys = sorted(groups, key=lambda k: (envs.index(k[0]), datasets.index(k[1]), k[2]))
    return {k: groups[k] for k in keys}


def smooth(values, k):
    """Trailing moving average over the last k evaluations (fewer at the start): the curve
    keeps its length and a point never sees later evaluations."""
    values = np.asarray(values, dtype=float)
    if k <= 1 or len(values) == 0:
        return values
    csum = np.concatenate([[0.0], np.cumsum(values)])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(end - k, 0)
    return (csum[end] - csum[start]) / (end - start)


def align(curves):
    """curves: one (steps, values) per run, steps increasing. Returns (grid, matrix):
    grid is the union of the runs' steps inside [latest first step, earliest last step],
    matrix[i] is run i linearly interpolated on grid. No extrapolation: an empty grid when
    the runs share no range."""
    lo = max(steps[0] for steps, _ in curves)
    hi = min(steps[-1] for steps, _ in curves)
    grid = np.unique(np.concatenate([steps for steps, _ in curves]))
    grid = grid[(grid >= lo) & (grid <= hi)]
    matrix = np.array([np.interp(grid, steps, values) for steps, values in curves])
    return grid, matrix.reshape(len(curves), len(grid))


def mean_curve(curves, k=1):
    """Smooth each run (window k), align, then mean, population std and run count per point."""
    grid, matrix = align([(steps, smooth(values, k)) for steps, values in curves])
    return grid, matrix.mean(axis=0), matrix.std(axis=0), np.isfinite(matrix).sum(axis=0)


# ---------------------------------------------------------------- table


def summarize_run(run):
    """The four numbers of the table for one run (None where the run has no such value)."""
    steps, values = run.online_steps, run.online_values
    if len(run.offline_values):
        pretrained = float(run.offline_values[-1])
    elif (steps == 0).any():
        pretrained = float(values[steps == 0][0])
    else:
        pretrained = None
    early = steps <= DIP_FRACTION * steps[-1]
    return {
        "pretrained": pretrained,
        "final": float(values[-1]),
        "online_mean": float(values.mean()),
        "dip": float(values[early].min()) if early.any() else None,  # no eval that early
    }


def mean_std(values):
    """(mean, population std, count) of the values that are not None; None if there are none."""
    v = np.array([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return None
    return float(v.mean()), float(v.std()), len(v)  # np.std: ddof=0, population std


def format_cell(stats, n_seeds):
    if stats is None:
        return ""
    mean, std, count = stats
    text = f"{mean:.2f} ± {std:.2f}"
    return text if count == n_seeds else f"{text} (n={count})"


def results_table(groups, metric="normalized_score"):
    """Markdown table: one row per (env, dataset, curve), footer saying what the numbers are."""
    head = ["env", "dataset", "method", "seeds"] + [title for _, title in TABLE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":--"] * 3 + ["--:"] * (len(head) - 3)) + "|"]
    for (env, dataset, method), runs in groups.items():
        summaries = [summarize_run(r) for r in runs]
        cells = [format_cell(mean_std([s[key] for s in summaries]), len(runs)) for key, _ in TABLE_COLUMNS]
        lines.append("| " + " | ".join([env, dataset, method, str(len(runs))] + cells) + " |")
    quantity = "normalized score (x100)" if metric == "normalized_score" else metric
    lines += ["", f"{quantity}, mean ± std over seeds; the columns: python plot.py --help"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- curves and figures


def curves_for(groups, quantity, k):
    """{(env, dataset): [Curve]} for quantity 'value' or 'alpha'."""
    panels = {}
    for (env, dataset, method), runs in groups.items():
        if quantity == "alpha":
            curves = [(r.alpha_steps, r.alpha_values) for r in runs if len(r.alpha_steps)]
        else:
            curves = [(r.online_steps, r.online_values) for r in runs]
        if not curves:
            continue  # this method logs no alpha
        grid, mean, std, n_runs = mean_curve(curves, k)
        if len(grid) == 0:
            print(f"note: {env}-{dataset} {method}: its runs share no online step range, not plotted", file=sys.stderr)
            continue
        panels.setdefault((env, dataset), []).append(Curve(method, grid, mean, std, n_runs))
    return panels


LEGEND_INSIDE = (4, 24)  # at most 4 curves, labels of at most 24 characters: a legend inside each panel


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def new_figure(nrows, ncols, title, row_height=3.4):
    """A grid of axes whose layout keeps every title, label and outside legend on the canvas, with the
    title wrapped to the figure's width (a one-panel figure is widened, never clipped)."""
    plt = pyplot()
    width = max(4.6 * ncols, 6.4)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width, row_height * nrows + 0.8), squeeze=False, layout="constrained"
    )
    fig.suptitle(balanced_lines(title, int(width * 10)))
    return plt, fig, axes


def balanced_lines(text, width):
    """text wrapped at most width characters a line, in as few lines of as even a length as that allows: the last
    line never holds a lone word that a little more width would have kept on the line above."""
    lines = textwrap.wrap(text, width)
    for even in range(-(-len(text) // len(lines)), width):
        if len(textwrap.wrap(text, even)) == len(lines):
            return "\n".join(textwrap.wrap(text, even))
    return "\n".join(lines)


def legend_below(fig, handles, labels):
    """One legend for the whole figure, under the panels, in as many columns as its width allows."""
    width = fig.get_size_inches()[0]
    ncols = max(1, min(len(labels), int(width * 14 // (max(map(len, labels)) + 6))))
    fig.set_figheight(fig.get_figheight() + 0.2 * -(-len(labels) // ncols))  # room for its rows
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize="small", frameon=False)


def plot_grid(panels, envs, datasets, colors, ylabel, title, path):
    """One panel per env-dataset (rows env, columns dataset), mean line and ±1 std band per curve.
    Few short labels: a legend in each panel with its n; otherwise one legend under the figure,
    with the range of n over the panels. Returns the (closed) figure, for tests."""
    labels = sorted({curve.label for curves in panels.values() for curve in curves})
    inside = len(labels) <= LEGEND_INSIDE[0] and max(map(len, labels), default=0) <= LEGEND_INSIDE[1]
    plt, fig, axes = new_figure(len(envs), len(datasets), title)
    handles, counts = {}, {}
    for row, env in enumerate(envs):
        for column, dataset in enumerate(datasets):
            ax = axes[row][column]
            lines = panels.get((env, dataset), [])
            if not lines:
                ax.set_axis_off()
                ax.text(0.5, 0.5, f"{env}-{dataset}\nno runs", ha="center", va="center", transform=ax.transAxes)
                continue
            for c in lines:
                (handles[c.label],) = ax.plot(
                    c.steps,
                    c.mean,
                    color=colors[c.label],
                    marker="o" if len(c.steps) == 1 else None,
                    label=f"{c.label} (n={c.n_runs.min()})",
                )
                ax.fill_between(c.steps, c.mean - c.std, c.mean + c.std, color=colors[c.label], alpha=0.2, linewidth=0)
                counts.setdefault(c.label, set()).add(int(c.n_runs.min()))
            ax.set_title(f"{env}-{dataset}")
            ax.set_xlabel("online environment steps")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if inside:
                ax.legend(fontsize="small")
    if not inside:
        n = {label: f"{min(c)}" if len(c) == 1 else f"{min(c)}-{max(c)}" for label, c in counts.items()}
        legend_below(fig, [handles[label] for label in labels], [f"{label} (n={n[label]})" for label in labels])
    fig.savefig(path)
    plt.close(fig)
    return fig


def plot_episodes(episodes, envs, datasets, colors, path):
    """Per env-dataset two panels, alpha above R: one thin line per run (every training episode),
    R_current solid with dots, R_last dashed, the target return dotted. R is x100, as in every figure, on a
    symlog axis: R near 0 and the target at 100 both show. Returns the (closed) figure."""
    from matplotlib.lines import Line2D

    title = "Training episodes online: alpha after Eq. 2 (top), R_current and R_last x100 (bottom), one line per run"
    plt, fig, axes = new_figure(2 * len(envs), len(datasets), title, row_height=2.6)
    for row, env in enumerate(envs):
        for column, dataset in enumerate(datasets):
            top, bottom = axes[2 * row][column], axes[2 * row + 1][column]
            runs = episodes.get((env, dataset), [])
            if not runs:
                top.set_axis_off(), bottom.set_axis_off()
                top.text(
                    0.5,
                    0.5,
                    f"{env}-{dataset}\nno episodes.csv with alpha and R",
                    ha="center",
                    va="center",
                    transform=top.transAxes,
                )
                continue
            for run, ep in runs:
                color = colors[run.label]
                top.plot(ep["step"], ep["alpha"], color=color, linewidth=1)
                # Eq. 2's fractions x100: the unit of every figure (100 = expert)
                bottom.plot(ep["step"], 100 * ep["R_current"], color=color, linewidth=0.8, marker=".", markersize=3)
                bottom.plot(ep["step"], 100 * ep["R_last"], color=color, linewidth=1, linestyle="--")
            targets = {r.config.get("target_return") for r, _ in runs} - {None}
            for target in targets:
                bottom.axhline(100 * float(target), color="grey", linestyle=":", linewidth=1)
            bottom.set_yscale("symlog", linthresh=1)  # linear within ±1 (x100), logarithmic beyond
            top.set_title(f"{env}-{dataset}")
            top.set_ylabel("alpha")
            bottom.set_ylabel("R x100 (symlog)")
            bottom.set_xlabel("online environment steps")
            top.sharex(bottom)
            top.tick_params(labelbottom=False)
            top.grid(alpha=0.3), bottom.grid(alpha=0.3)
    labels = sorted({run.label for runs in episodes.values() for run, _ in runs})
    handles = [Line2D([], [], color=colors[label]) for label in labels] + [
        Line2D([], [], color="black", marker=".", linewidth=0.8),
        Line2D([], [], color="black", linestyle="--"),
        Line2D([], [], color="grey", linestyle=":"),
    ]
    legend_below(fig, handles, labels + ["R_current (this episode)", "R_last", "R_target (x100)"])
    fig.savefig(path)
    plt.close(fig)
    return fig


def write_curves_csv(path, named_panels):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["quantity", "env", "dataset", "method", "step", "mean", "std", "n_runs"])
        for quantity, panels in named_panels:
            for (env, dataset), curves in panels.items():
                for c in curves:
                    for step, m, s, n in zip(c.steps, c.mean, c.std, c.n_runs):
                        writer.writerow([quantity, env, dataset, c.label, f"{step:g}", f"{m:.6g}", f"{s:.6g}", int(n)])


# ---------------------------------------------------------------- command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        self.exit(2, f"error: {message} (see python plot.py --help)\n")


def positive_int(text):
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return k


def parse_args(argv=None):
    parser = Parser(prog="plot.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="folders searched (recursively) for run folders, e.g. runs/")
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="M",
        help="only these methods (space- or comma-separated; put the folders first)",
    )
    parser.add_argument("--envs", nargs="+", metavar="E", help="only these envs, e.g. hopper walker2d")
    parser.add_argument("--datasets", nargs="+", metavar="D", help="only these datasets, e.g. medium medium-replay")
    parser.add_argument(
        "--label-by",
        nargs="+",
        metavar="KEY",
        help="also name these config.json keys in every curve's label, e.g. alpha_online "
        "keep_ratio (Figures 1, 3, 4, 5); runs that differ are split without it",
    )
    parser.add_argument("--out", help="output folder (default: <first folder>/plots)")
    parser.add_argument(
        "--format", choices=["png", "pdf", "svg"], default="png", help="figure file format (default: png)"
    )
    parser.add_argument(
        "--smooth",
        type=positive_int,
        default=1,
        metavar="K",
        help="trailing moving average over K evaluations per run, before averaging seeds; "
        "curves only, not the table (default: 1 = none)",
    )
    parser.add_argument(
        "--raw-returns", action="store_true", help="use return_mean instead of normalized_score (curves and table)"
    )
    parser.add_argument(
        "--episodes",
        action="store_true",
        help="also write episodes.<fmt>: alpha and R_current/R_last (x100) of every online training "
        "episode (episodes.csv), one panel pair per env-dataset",
    )
    args = parser.parse_args(argv)
    for name in ("methods", "envs", "datasets"):
        values = getattr(args, name)
        if values:
            setattr(args, name, {v for text in values for v in text.split(",") if v})
    if args.label_by:
        args.label_by = [v for text in args.label_by for v in text.split(",") if v]
    return args


def episodes_for(groups):
    """{(env, dataset): [(run, episodes)]} for the runs whose episodes.csv has alpha, R_current and R_last;
    one note on stderr counts the runs left out."""
    loaded, panels = {}, {}
    for (env, dataset, _), runs in groups.items():
        for run in runs:
            if run.folder not in loaded:
                try:
                    loaded[run.folder] = load_episodes(run.folder)
                except SkipRun:
                    loaded[run.folder] = None
            if loaded[run.folder] is not None and len(loaded[run.folder]["step"]):
                panels.setdefault((env, dataset), []).append((run, loaded[run.folder]))
    left_out = sum(ep is None for ep in loaded.values())
    if left_out and panels:
        print(
            f"note: {left_out} of {len(loaded)} runs have no episodes.csv with alpha, R_current and R_last: "
            "not in the episodes figure",
            file=sys.stderr,
        )
    return panels


def write_figures(groups, metric, args, out):
    """score, alpha (when a run logs it), episodes (--episodes) and curves.csv into out; returns their paths."""
    envs = ordered([k[0] for k in groups], ENV_ORDER)
    datasets = ordered([k[1] for k in groups], DATASET_ORDER)
    labels = sorted({k[2] for k in groups})
    colors = {m: f"C{i % 10}" for i, m in enumerate(labels)}  # same color for a curve in every panel
    ylabel = "normalized score (x100)" if metric == "normalized_score" else "return (return_mean)"
    score_panels = curves_for(groups, "value", args.smooth)
    alpha_panels = curves_for(groups, "alpha", args.smooth)
    written = [os.path.join(out, f"score.{args.format}")]
    title = f"Online fine-tuning: {ylabel}, mean ± 1 std over seeds"
    plot_grid(score_panels, envs, datasets, colors, ylabel, title, written[0])
    if alpha_panels:
        written.append(os.path.join(out, f"alpha.{args.format}"))
        title = "Online fine-tuning: alpha per training episode (else at evaluations), mean ± 1 std over seeds"
        plot_grid(alpha_panels, envs, datasets, colors, "alpha (BC weight)", title, written[-1])
    else:
        print("note: no run logs alpha, alpha figure not written", file=sys.stderr)
    episodes = episodes_for(groups) if args.episodes else None
    if episodes:
        written.append(os.path.join(out, f"episodes.{args.format}"))
        plot_episodes(episodes, envs, datasets, colors, written[-1])
    elif args.episodes:
        print(
            "note: no run has an episodes.csv with alpha, R_current and R_last: episodes figure not written",
            file=sys.stderr,
        )
    quantity = "score" if metric == "normalized_score" else "return"
    written.append(os.path.join(out, "curves.csv"))
    write_curves_csv(written[-1], [(quantity, score_panels), ("alpha", alpha_panels)])
    return written


def fail(message):
    print(message, file=sys.stderr)
    return 2


def main(argv=None):
    args = parse_args(argv)
    for folder in args.folders:
        if not os.path.isdir(folder):
            return fail(f"error: no such folder: {folder}")
    metric = "return_mean" if args.raw_returns else "normalized_score"
    where = " ".join(args.folders)

    runs = load_runs(args.folders, metric, args.methods, args.envs, args.datasets, args.label_by or ())
    if not runs:
        filters = args.methods or args.envs or args.datasets
        filtered = " matching --methods/--envs/--datasets" if filters else ""
        return fail(f"error: no runs with a readable progress.csv under {where}{filtered}")
    try:
        check_duplicate_seeds(runs)
    except UsageError as e:
        return fail(str(e))
    groups = group_runs(runs)

    out = args.out or os.path.join(args.folders[0], "plots")
    table = results_table(groups, metric)
    try:
        os.makedirs(out, exist_ok=True)
        written = write_figures(groups, metric, args, out)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(table)
    except OSError as e:
        return fail(f"error: cannot write to {out}: {e.strerror or e}")
    print(table)
    for path in written + [os.path.join(out, "results.md")]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
