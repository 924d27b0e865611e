"""Sweeps: run a grid of experiments on this machine, or write a Slurm job array for it.

A sweep is methods x variants x envs x datasets x seeds, one run (one command line) each.
Methods are the project's scripts:

    redq_adaptive_bc  redq_adaptive_bc.py            (the paper's method)
    td3_bc            baselines/td3_bc.py             (TD3-ft, TD3+BC with a fixed alpha_online)
    redq              baselines/redq.py               (REDQ from scratch; --dataset is only a label)
    awac              baselines/awac.py
    balanced_replay   baselines/balanced_replay.py

`--figure N` (1 to 5) is the README's "Reproducing the paper" table, row N, on the paper's
env-datasets, 5 seeds by default. `--extra FLAGS` adds flags to every run (a flag a script does
not have is left out of that script's runs, with a note: redq.py has no offline phase, so no
--offline-steps); `--variant FLAGS` (repeatable) multiplies the grid by flag sets. The runs are
ordered seed first, so a sweep that is stopped half-way has every panel for its first seeds.
Runs get `--dataset D` as is: medium and expert are Minari's remote datasets, random and
medium-expert are built on first use, medium-replay must exist as local/<env>/medium-replay-v0.
Download or build the datasets before a sweep (README, "Datasets" and "Building D4RL-style
datasets"): runs that start together would otherwise each fetch or build the same one.

Local runs, K at a time, each writing its log into the sweep folder; a status line every few
seconds, a table of exit codes, durations and logs at the end, and exit status 1 if a run failed:

    python scripts/sweep.py --figure 1 --seeds 0 --workers 2 \\
        --extra "--offline-steps 1000 --online-steps 1000 --eval-every 500"
    python scripts/sweep.py --methods redq_adaptive_bc td3_bc --envs hopper walker2d \\
        --datasets medium --seeds 0 1 2 --variant "" --variant "--utd 10" --workers 2
    python scripts/sweep.py --figure 2 --dry-run           # print the 375 commands, run nothing

A Slurm job array, one array task per run (sbatch-ready; the command list goes next to it):

    python scripts/sweep.py --figure 2 --slurm fig2.sbatch --partition gpu --gpus 1 --cpus 4 \\
        --time 12:00:00 --mem 16G
    sbatch fig2.sbatch                   # task i runs line i+1 of fig2.commands.txt

Layout of a sweep folder (--sweep-dir; default runs/sweeps/<name>-<date>-<time>/):

    commands.txt           one command per run; line i+1 is task i
    logs/task_<i>.log      everything task i printed (appended to by restarts)
    runs/task_<i>/<env>-<dataset>__<method>__<seed>__<unix time>/   task i's run folder
    preempted/task_<i>/    partial runs of scripts that cannot resume, moved out of runs/

Every run gets its own fixed `--output-dir <sweep>/runs/task_<i>`, so a task finds its earlier
attempt. When a task starts (a Slurm task, also after a requeue, or a local sweep started again
with the same --sweep-dir):
- its newest run folder holds final.pt: the run is complete, nothing is run;
- it holds an unfinished run and the script supports --resume (an Args field `resume`, found by
  reading the script when the sweep is made): `--resume <that run folder>` is appended, and the
  script continues from its last checkpoint (--checkpoint-every) with the arguments in its
  config.json;
- otherwise the partial run is moved to preempted/ (so plot.py does not count it twice) and the
  run starts again.
The Slurm script asks for `--requeue`: a preempted task goes back into the queue and resumes.
Slurm also signals each task 5 minutes before its time limit, and a task whose script can resume
requeues itself then, so runs longer than the partition's time limit still finish.

`python plot.py <sweep>/runs/ ...` draws the figure; the exact command is printed at the end.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

METHODS = {
    "redq_adaptive_bc": "redq_adaptive_bc.py",
    "td3_bc": "baselines/td3_bc.py",
    "redq": "baselines/redq.py",
    "awac": "baselines/awac.py",
    "balanced_replay": "baselines/balanced_replay.py",
}
ENVS = ("hopper", "halfcheetah", "walker2d", "ant")
DATASETS = ("random", "medium", "medium-replay", "medium-expert", "expert", "simple")
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
# Flags the sweep sets for every run; giving them in --extra or --variant would contradict the grid.
RESERVED_FLAGS = ("--env", "--dataset", "--seed", "--output-dir", "--resume")


@dataclass(frozen=True)
class Figure:
    title: str
    groups: tuple  # (method, (variant flags, ...)), "" = the script's defaults
    envs: tuple
    datasets: tuple
    plot_flags: str  # plot.py's flags after the runs folder, as in the README


PAPER_ENVS = ("hopper", "halfcheetah", "walker2d")
PAPER_DATASETS = ("random", "medium", "medium-replay", "medium-expert")  # the paper leaves out Expert
# The README's "Reproducing the paper" table, one entry per row. Every run pre-trains: the README's
# shortcut of pre-training once and fine-tuning the other variants with --load-offline needs the
# first run to finish before the others start, an ordering a flat sweep does not express.
FIGURES = {
    1: Figure("TD3+BC with fixed alpha_online",
              (("td3_bc", ("--alpha-online 0.0", "--alpha-online 0.1", "--alpha-online 0.3")),),
              PAPER_ENVS, ("medium",),
              "--methods td3_bc --label-by alpha_online --out plots/fig1"),
    2: Figure("the method vs peers",
              tuple((method, ("",)) for method in METHODS),
              PAPER_ENVS, PAPER_DATASETS,
              "--out plots/fig2"),
    3: Figure("adaptive vs hand-tuned alpha_online",
              (("redq_adaptive_bc", ("",) + tuple(f"--no-adaptive-bc --alpha-online {a}"
                                                  for a in ("0.0", "0.1", "0.2", "0.3"))),),
              PAPER_ENVS, PAPER_DATASETS,
              "--methods redq_adaptive_bc --label-by adaptive_bc alpha_online --out plots/fig3"),
    4: Figure("TD3-ft with and without downsampling",
              (("td3_bc", ("--keep-ratio 1.0", "--keep-ratio 0.05")),),
              PAPER_ENVS, ("random",),
              "--methods td3_bc --datasets random --label-by keep_ratio --out plots/fig4"),
    5: Figure("uses of the ensemble (hopper)",
              (("redq_adaptive_bc", ("", "--num-min-critics 10", "--num-critics 2 --num-min-critics 2")),),
              ("hopper",), PAPER_DATASETS,
              "--methods redq_adaptive_bc --envs hopper --label-by num_critics num_min_critics --out plots/fig5"),
}


class UsageError(Exception):
    """Bad input: one line on stderr, exit status 2, before anything runs or is written."""


# ---------------------------------------------------------------- what a script accepts


def script_fields(path):
    """{field name: is bool} of the script's `Args` dataclass, read from its source; None when the
    script has no Args class that can be read (then its flags are not checked)."""
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Args":
            return {item.target.id: ast.unparse(item.annotation) == "bool" for item in node.body
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
    return None


def script_flags(path):
    """The flags tyro makes from the script's Args (--no-X too for a bool field X); None if unknown."""
    fields = script_fields(path)
    if fields is None:
        return None
    flags = set()
    for name, is_bool in fields.items():
        flags.add("--" + name.replace("_", "-"))
        if is_bool:
            flags.add("--no-" + name.replace("_", "-"))
    return flags


def supports_resume(path):
    """Whether `--resume RUN_DIR` continues a run: the script's Args has a `resume` field (or, if
    the Args cannot be read, its text mentions --resume)."""
    fields = script_fields(path)
    if fields is not None:
        return "resume" in fields
    try:
        return "--resume" in Path(path).read_text()
    except OSError:
        return False


def split_flags(tokens, where):
    """['--a', '1', '--no-b', '--c=2'] -> [('--a', ['--a', '1']), ('--no-b', ['--no-b']), ('--c', ['--c=2'])]."""
    groups = []
    for token in tokens:
        if token.startswith("--"):
            groups.append((token.split("=", 1)[0], [token]))
        elif groups:
            groups[-1][1].append(token)
        else:
            raise UsageError(f"{where}: {token!r} is not a flag (flags start with --)")
    for flag, _ in groups:
        if flag in RESERVED_FLAGS:
            raise UsageError(f"{where}: {flag} is set by the sweep for every run "
                             f"(use --envs, --datasets, --seeds, --sweep-dir)")
    return groups


def parse_flags(text, where):
    try:
        return split_flags(shlex.split(text), where)
    except ValueError as e:  # unbalanced quotes
        raise UsageError(f"{where}: cannot parse {text!r} ({e})") from None


# ---------------------------------------------------------------- the grid


@dataclass
class Run:
    index: int
    method: str
    env: str
    dataset: str
    seed: int
    variant: list  # the variant's flags
    extra: list  # the global flags this script accepts
    output_dir: str  # <sweep>/runs/task_<index>, as written in the command

    @property
    def script(self):
        return METHODS[self.method]

    @property
    def argv(self):
        return ["python", self.script, "--env", self.env, "--dataset", self.dataset, "--seed", str(self.seed),
                *self.variant, *self.extra, "--output-dir", self.output_dir]

    @property
    def command(self):
        return shlex.join(self.argv)

    @property
    def label(self):
        return f"{self.method} {self.env}-{self.dataset} seed {self.seed}" + \
            (f" {shlex.join(self.variant)}" if self.variant else "")


def display_path(path, root):
    """A path as written in commands: relative to the repository root (where runs start) when
    it is inside it, else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def expand(groups, envs, datasets, seeds, extra_text, sweep_dir, root, notes):
    """Every run of the sweep, seed first, then method, variant, env, dataset. groups is a list of
    (method, [variant text, ...]). Global flags a script lacks are left out of its runs (one note
    each); a flag no script has, or a variant flag its script lacks, is an error."""
    extra = parse_flags(extra_text, "--extra")
    flags_of = {}
    for method, _ in groups:
        path = Path(root) / METHODS[method]
        if not path.is_file():
            raise UsageError(f"method {method}: script {path} not found")
        flags_of[method] = script_flags(path)

    def accepts(method, flag):
        return flags_of[method] is None or flag in flags_of[method]

    for flag, _ in extra:
        if not any(accepts(method, flag) for method, _ in groups):
            scripts = ", ".join(METHODS[m] for m, _ in groups)
            raise UsageError(f"--extra: {flag} is not a flag of {scripts}")
    def setting(flag):  # --no-adaptive-bc and --adaptive-bc set the same thing
        return flag.replace("--no-", "--", 1)

    varied = {setting(flag) for _, variants in groups for v in variants for flag, _ in parse_flags(v, "--variant")}
    for flag, _ in extra:
        if setting(flag) in varied:
            raise UsageError(f"--extra: {flag} is also set by a variant of this sweep")
    extra_of = {}
    for method, variants in groups:
        extra_of[method] = [t for flag, tokens in extra if accepts(method, flag) for t in tokens]
        for flag in dict.fromkeys(flag for flag, _ in extra if not accepts(method, flag)):
            notes.append(f"note: {flag} is left out of the {method} runs ({METHODS[method]} has no such flag)")
        for variant in variants:
            for flag, _ in parse_flags(variant, "--variant"):
                if not accepts(method, flag):
                    raise UsageError(f"--variant: {flag} is not a flag of {METHODS[method]} (method {method})")

    runs_dir = display_path(Path(sweep_dir) / "runs", root)
    runs = []
    for seed in seeds:
        for method, variants in groups:
            for variant in variants:
                variant_tokens = [t for _, tokens in parse_flags(variant, "--variant") for t in tokens]
                for env in envs:
                    for dataset in datasets:
                        i = len(runs)
                        runs.append(Run(i, method, env, dataset, seed, variant_tokens, extra_of[method],
                                        f"{runs_dir}/task_{i}"))
    return runs


def plot_command(flags, sweep_dir, root):
    return f"python plot.py {display_path(Path(sweep_dir) / 'runs', root)}/ {flags}".rstrip()


def label_flags(variants):
    """plot.py --label-by keys for custom variants: the config.json keys their flags set."""
    keys = []
    for variant in variants:
        for flag, _ in parse_flags(variant, "--variant"):
            key = flag[2:].removeprefix("no-").replace("-", "_")
            if key not in keys:
                keys.append(key)
    return keys


# ---------------------------------------------------------------- restarting a task


def run_folders(task_dir):
    """Run folders (<env>-<dataset>__<method>__<seed>__<unix time>) in a task folder, oldest first."""
    if not os.path.isdir(task_dir):
        return []
    found = [d for d in os.listdir(task_dir)
             if len(d.split("__")) == 4 and os.path.isdir(os.path.join(task_dir, d))]
    return [os.path.join(task_dir, d) for d in sorted(found)]  # same prefix, 10-digit time: name order is age


def restart_plan(argv, task_dir, resumable, preempted_dir):
    """What a (re)started task runs: (argv or None when its run is complete, note). Moves partial
    runs that will not be resumed into preempted_dir. The Slurm script does the same in bash."""
    folders = run_folders(task_dir)
    if not folders:
        return argv, ""
    newest = folders[-1]
    if os.path.exists(os.path.join(newest, "final.pt")):
        return None, f"complete: {newest}"
    resume = newest if resumable and os.path.exists(os.path.join(newest, "config.json")) else None
    moved = [d for d in folders if d != resume]
    for d in moved:
        os.makedirs(preempted_dir, exist_ok=True)
        shutil.move(d, os.path.join(preempted_dir, os.path.basename(d)))
    if resume:
        return [*argv, "--resume", resume], f"resuming {resume}"
    return argv, f"restarting; partial run moved to {preempted_dir}"


# ---------------------------------------------------------------- local runs


@dataclass
class Job:
    name: str  # e.g. "task 3"
    argv: list | None  # None: nothing to run (already complete)
    log: str
    label: str = ""
    note: str = ""


@dataclass
class Result:
    job: Job
    status: str  # ok, failed, complete, interrupted, not started
    returncode: int | None
    seconds: float


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def child_environ(workers, environ=None, cores=None):
    """The children's environment. Unless the user set OMP_NUM_THREADS, each child gets
    max(1, cores // workers) OpenMP threads: torch otherwise starts one thread per core in every
    process, and oversubscribed threads spin against each other. On this project's shared 2-core
    machine that made torch about 10x slower (README: 7-13 instead of 108 steps/s)."""
    environ = dict(os.environ if environ is None else environ)
    if not environ.get("OMP_NUM_THREADS"):
        environ["OMP_NUM_THREADS"] = str(max(1, (cores or available_cores()) // workers))
    return environ


def format_seconds(s):
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


class Status:
    """The live status: event lines, and a compact line redrawn in place on a terminal or printed
    every `every` seconds otherwise."""

    def __init__(self, out, every):
        self.out, self.every = out, every
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.start = time.monotonic()
        self.last = self.start
        self.drawn = False

    def stamp(self):
        return f"[sweep {format_seconds(time.monotonic() - self.start)}]"

    def event(self, text):
        if self.tty and self.drawn:
            self.out.write("\r\x1b[K")
            self.drawn = False
        self.out.write(f"{self.stamp()} {text}\n")
        self.out.flush()

    def line(self, counts, running, force=False):
        now = time.monotonic()
        if not force and now - self.last < (min(self.every, 1.0) if self.tty else self.every):
            return
        self.last = now
        text = (f"{self.stamp()} running {counts['running']} | done {counts['done']} | "
                f"failed {counts['failed']} | pending {counts['pending']} | of {counts['total']}")
        if running:
            text += " | now: " + ", ".join(running[:6]) + (" ..." if len(running) > 6 else "")
        if self.tty:
            self.out.write("\r\x1b[K" + text)
            self.drawn = True
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def close(self):
        if self.tty and self.drawn:
            self.out.write("\n")
            self.out.flush()


def run_local(jobs, workers, cwd, environ, status_every=5.0, out=None, poll=0.1):
    """Runs the jobs, at most `workers` at a time, each as a subprocess writing its log file.
    A failed job does not stop the others. Returns one Result per job, in job order. On
    KeyboardInterrupt the running children get SIGINT (the scripts then keep what they wrote),
    then SIGKILL after 30 s; unfinished jobs are reported as interrupted / not started."""
    out = out or sys.stderr
    status = Status(out, status_every)
    results = {}
    pending = list(range(len(jobs)))
    running = {}  # job index -> (Popen, log file, start time)

    def counts():
        return {"running": len(running), "pending": len(pending), "total": len(jobs),
                "done": sum(r.status in ("ok", "complete") for r in results.values()),
                "failed": sum(r.status == "failed" for r in results.values())}

    try:
        while pending or running:
            while pending and len(running) < workers:
                i = pending.pop(0)
                job = jobs[i]
                if job.argv is None:
                    results[i] = Result(job, "complete", 0, 0.0)
                    status.event(f"{job.name} already complete ({job.note})")
                    continue
                os.makedirs(os.path.dirname(os.path.abspath(job.log)), exist_ok=True)
                log = open(job.log, "a")
                log.write(f"=== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} OMP_NUM_THREADS="
                          f"{environ.get('OMP_NUM_THREADS', '')} {shlex.join(job.argv)}\n")
                log.flush()
                try:
                    proc = subprocess.Popen(job.argv, cwd=cwd, env=environ, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
                except OSError as e:
                    log.write(f"cannot start: {e}\n")
                    log.close()
                    results[i] = Result(job, "failed", None, 0.0)
                    status.event(f"FAILED {job.name}: cannot start ({e})")
                    continue
                running[i] = (proc, log, time.monotonic())
                status.event(f"start {job.name}: {job.label}" + (f" ({job.note})" if job.note else ""))
            for i, (proc, log, started) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del running[i]
                seconds = time.monotonic() - started
                results[i] = Result(jobs[i], "ok" if rc == 0 else "failed", rc, seconds)
                if rc == 0:
                    status.event(f"done {jobs[i].name} ({format_seconds(seconds)})")
                else:
                    status.event(f"FAILED {jobs[i].name} (exit {rc}, {format_seconds(seconds)}), log {jobs[i].log}")
            status.line(counts(), [jobs[i].name for i in running])
            if pending or running:
                time.sleep(poll)
    except KeyboardInterrupt:
        status.event(f"interrupted: stopping {len(running)} running job(s)")
        for proc, _, _ in running.values():
            proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        for i, (proc, log, started) in running.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            results[i] = Result(jobs[i], "interrupted", proc.returncode, time.monotonic() - started)
        for i in pending:
            results[i] = Result(jobs[i], "not started", None, 0.0)
    status.line(counts(), [], force=True)
    status.close()
    return [results[i] for i in range(len(jobs))]


def summary_table(results):
    rows = [("job", "status", "exit", "time", "run", "log")]
    for r in results:
        rows.append((r.job.name, r.status, "" if r.returncode is None else str(r.returncode),
                     format_seconds(r.seconds) if r.seconds else "", r.job.label, r.job.log))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    tally = {}
    for r in results:
        tally[r.status] = tally.get(r.status, 0) + 1
    lines.append(f"{len(results)} runs: " + ", ".join(f"{n} {s}" for s, n in tally.items()))
    return "\n".join(lines)


def exit_status(results):
    if any(r.status in ("interrupted", "not started") for r in results):
        return 130
    return 1 if any(r.status == "failed" for r in results) else 0


# ---------------------------------------------------------------- Slurm


def slurm_script(runs, name, root, sweep_dir, commands_file, resumable, opts, plot=None):
    """An sbatch-ready job array: task i runs line i+1 of commands_file, resuming or restarting
    its run folder as described in the module docstring."""
    n = len(runs)
    sweep_abs, root_abs = Path(sweep_dir).resolve(), Path(root).resolve()
    scripts = list(dict.fromkeys(r.script for r in runs))
    can = [s for s in scripts if s in resumable] or ["none"]
    cannot = [s for s in scripts if s not in resumable] or ["none"]
    array = f"0-{n - 1}" + (f"%{opts['workers']}" if opts.get("workers") else "")
    head = [
        "#!/bin/bash",
        f"# Slurm job array written by scripts/sweep.py: {name}, {n} runs, one array task per run.",
        f"#   submit:   sbatch {Path(opts['file']).resolve()}",
        f"#   commands: {commands_file}   (task i runs line i+1)",
        f"#   runs:     {sweep_abs}/runs/task_<i>/      logs: {sweep_abs}/logs/task_<i>.log",
    ]
    if plot:
        head.append(f"#   plot:     cd {root_abs} && {plot}")
    head += [
        "#",
        "# Requeue and resume: every task writes its run into its own folder runs/task_<i>/. When a",
        "# task starts (also after a preemption requeued it, thanks to --requeue) it looks there:",
        "# a finished run (final.pt) means nothing is left to do; an unfinished one is continued with",
        "# `--resume <run folder>` if the script supports it, or else moved to preempted/task_<i>/",
        "# (out of plot.py's way) and run again from the start. Five minutes before the time limit",
        "# (--signal) a task whose script can resume requeues itself, to continue in a new allocation.",
        f"#   scripts that support --resume: {' '.join(can)}",
        f"#   scripts that do not (a requeued run starts over): {' '.join(cannot)}",
        "# Activate the virtualenv before sbatch (Slurm passes your environment on), or set PYTHON.",
        "#",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --array={array}",
        f"#SBATCH --output={sweep_abs}/logs/task_%a.log",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
        f"#SBATCH --cpus-per-task={opts['cpus']}",
    ]
    if opts.get("time"):
        head.append(f"#SBATCH --time={opts['time']}")
    if opts.get("partition"):
        head.append(f"#SBATCH --partition={opts['partition']}")
    if opts.get("gpus"):
        head.append(f"#SBATCH --gres=gpu:{opts['gpus']}")
    if opts.get("mem"):
        head.append(f"#SBATCH --mem={opts['mem']}")
    head += [f"#SBATCH {option}" for option in opts.get("sbatch_options") or ()]
    q = shlex.quote
    body = f"""
set -uo pipefail
REPO={q(str(root_abs))}
SWEEP={q(str(sweep_abs))}
COMMANDS={q(str(commands_file))}
RESUMABLE={q(' '.join(s for s in scripts if s in resumable))}
PYTHON=${{PYTHON:-python}}
# One OpenMP thread per allocated CPU, unless set: torch otherwise starts one per core of the
# node, and oversubscribed threads made it ~10x slower on a shared 2-core machine (README).
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-${{SLURM_CPUS_PER_TASK:-1}}}}

i=${{SLURM_ARRAY_TASK_ID:?submit this file with sbatch: SLURM_ARRAY_TASK_ID is not set}}
line=$(sed -n "$((i + 1))p" "$COMMANDS")
if [ -z "$line" ]; then echo "error: $COMMANDS has no line $((i + 1)) for task $i" >&2; exit 2; fi
eval "cmd=($line)"
cmd[0]=$PYTHON
script=${{cmd[1]}}
task_dir=$SWEEP/runs/task_$i
echo "=== $(date '+%Y-%m-%d %H:%M:%S') task $i on $(hostname), start $(( ${{SLURM_RESTART_COUNT:-0}} + 1 ))"

resumable=0
case " $RESUMABLE " in *" $script "*) resumable=1 ;; esac
# The task's run folders, oldest first (same prefix, names end in the unix start time).
folders=()
for d in "$task_dir"/*__*__*__*; do [ -d "$d" ] && folders+=("$d"); done
if [ ${{#folders[@]}} -gt 0 ]; then
    newest=${{folders[-1]}}
    if [ -f "$newest/final.pt" ]; then
        echo "task $i: $newest is complete, nothing to do"
        exit 0
    fi
    resume=""
    if [ $resumable = 1 ] && [ -f "$newest/config.json" ]; then resume=$newest; fi
    for d in "${{folders[@]}}"; do
        [ "$d" = "$resume" ] && continue
        mkdir -p "$SWEEP/preempted/task_$i" && mv "$d" "$SWEEP/preempted/task_$i/"
        echo "task $i: partial run $d moved to $SWEEP/preempted/task_$i/"
    done
    if [ -n "$resume" ]; then
        cmd+=(--resume "$resume")
        echo "task $i: resuming $resume"
    fi
fi

requeue_before_time_limit() {{
    if [ $resumable = 1 ]; then
        echo "task $i: time limit near, requeueing to resume in a new allocation"
        scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
    fi
}}
trap requeue_before_time_limit USR1

cd "$REPO" || exit 2
echo "+ ${{cmd[*]}}"
"${{cmd[@]}}" &
child=$!
wait "$child"; rc=$?
# A trapped signal interrupts wait (status > 128) while the run goes on: wait again.
while [ $rc -gt 128 ] && kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
echo "=== $(date '+%Y-%m-%d %H:%M:%S') task $i exit status $rc"
exit $rc
"""
    return "\n".join(head) + "\n" + body


# ---------------------------------------------------------------- command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        self.exit(2, f"error: {message} (see python scripts/sweep.py --help)\n")


def int_at_least(low, what):
    def parse(text):
        try:
            k = int(text)
        except ValueError:
            k = low - 1
        if k < low:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return k
    return parse


def parse_args(argv=None):
    parser = Parser(
        prog="scripts/sweep.py",
        description="Run a grid of experiments locally (--workers K) or write a Slurm job array (--slurm FILE).",
        epilog="methods: " + ", ".join(f"{m} ({s})" for m, s in METHODS.items()) + ". figures (README, "
               "'Reproducing the paper'): " + "; ".join(f"{k}: {f.title}" for k, f in FIGURES.items()) +
               ". Examples and how requeue/resume works: the module docstring (head scripts/sweep.py -n 60).",
    )
    what = parser.add_argument_group("what to run")
    what.add_argument("--figure", metavar="N", help="the paper's Figure N (1-5) as in the README's table")
    what.add_argument("--methods", nargs="+", metavar="M",
                      help="methods to run (with --figure: a subset of the figure's methods)")
    what.add_argument("--envs", nargs="+", metavar="E",
                      help=f"envs (default: hopper; with --figure: {' '.join(PAPER_ENVS)}, Fig. 5: hopper)")
    what.add_argument("--datasets", nargs="+", metavar="D",
                      help="datasets (default: medium; with --figure: Fig. 1 medium, Fig. 4 random, "
                           f"Fig. 2, 3, 5 {' '.join(PAPER_DATASETS)})")
    what.add_argument("--seeds", nargs="+", type=int, metavar="S", default=list(DEFAULT_SEEDS),
                      help="seeds (default: 0 1 2 3 4)")
    what.add_argument("--variant", action="append", metavar="FLAGS",
                      help='flags of one variant; repeat to multiply the grid ("" = defaults), e.g. '
                           '--variant "" --variant "--utd 10" (not with --figure)')
    what.add_argument("--extra", action="append", default=[], metavar="FLAGS",
                      help='flags added to every run, e.g. --extra "--offline-steps 1000 --online-steps 1000" '
                           "(a single flag: --extra=--compile); left out of scripts that lack them")
    where = parser.add_argument_group("where and how")
    where.add_argument("--sweep-dir", metavar="DIR",
                       help="the sweep folder: commands, logs, runs (default: runs/sweeps/<name>-<date>-<time>); "
                            "give an earlier one to continue it")
    where.add_argument("--workers", type=int_at_least(1, "a positive integer"), metavar="K",
                       help="runs at a time (local default: 1; with --slurm: the array's limit %%K)")
    where.add_argument("--status-every", type=float, default=5.0, metavar="SEC",
                       help="seconds between status lines of a local sweep (default: 5)")
    where.add_argument("--dry-run", action="store_true", help="print the commands, run and write nothing")
    slurm = parser.add_argument_group("Slurm (with --slurm FILE)")
    slurm.add_argument("--slurm", metavar="FILE", help="write an sbatch job array script instead of running")
    slurm.add_argument("--partition", metavar="P")
    slurm.add_argument("--time", metavar="T", help="time limit per run, e.g. 12:00:00 or 1-00:00:00")
    slurm.add_argument("--cpus", type=int_at_least(1, "a positive integer"), metavar="N",
                       help="CPUs per run (default: 2)")
    slurm.add_argument("--gpus", type=int_at_least(0, "a non-negative integer"), metavar="N",
                       help="GPUs per run (--gres=gpu:N)")
    slurm.add_argument("--mem", metavar="M", help="memory per run, e.g. 8G")
    slurm.add_argument("--sbatch-option", action="append", metavar="OPT",
                       help="another #SBATCH line, e.g. --sbatch-option=--account=proj (repeatable)")
    parser.add_argument("--root", default=str(ROOT), help=argparse.SUPPRESS)  # tests: a tree of stand-in scripts
    return parser.parse_args(argv)


def check_choices(values, known, what):
    for v in values:
        if v not in known:
            raise UsageError(f"unknown {what} {v!r} (known: {', '.join(known)})")
    duplicates = sorted({str(v) for v in values if values.count(v) > 1})
    if duplicates:
        raise UsageError(f"{what} given twice: {', '.join(duplicates)}")


def build(args, notes):
    """(name, runs, groups, plot command) from the arguments; UsageError on bad input."""
    root = Path(args.root)
    if args.figure is not None:
        if not args.figure.isdigit() or int(args.figure) not in FIGURES:
            raise UsageError(f"unknown figure {args.figure!r} (figures: {', '.join(map(str, FIGURES))})")
        if args.variant is not None:
            raise UsageError("--variant cannot be combined with --figure (the figure defines its variants)")
        figure = FIGURES[int(args.figure)]
        name = f"fig{args.figure}"
        groups = [(m, list(v)) for m, v in figure.groups]
        if args.methods:
            check_choices(args.methods, [m for m, _ in groups], f"method of Figure {args.figure}")
            groups = [(m, v) for m, v in groups if m in args.methods]
        envs, datasets, plot_flags = args.envs or list(figure.envs), args.datasets or list(figure.datasets), \
            figure.plot_flags
    else:
        if not args.methods:
            raise UsageError("give --figure N or --methods M ...")
        check_choices(args.methods, list(METHODS), "method")
        name = "sweep"
        variants = args.variant if args.variant is not None else [""]
        groups = [(m, list(variants)) for m in args.methods]
        envs, datasets = args.envs or ["hopper"], args.datasets or ["medium"]
        label_by = label_flags(variants)
        plot_flags = f"--label-by {' '.join(label_by)}" if label_by else ""
    check_choices(envs, ENVS, "env")
    check_choices(datasets, DATASETS, "dataset")
    check_choices(args.seeds, args.seeds, "seed")
    if not args.slurm and (args.partition or args.time or args.cpus or args.gpus is not None or args.mem
                           or args.sbatch_option):
        raise UsageError("--partition, --time, --cpus, --gpus, --mem and --sbatch-option need --slurm FILE")
    if args.time and not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", args.time):
        raise UsageError(f"--time {args.time!r}: expected minutes, H:MM:SS or D-HH:MM:SS")
    if args.mem and not re.fullmatch(r"\d+[KMGT]?", args.mem):
        raise UsageError(f"--mem {args.mem!r}: expected a number with an optional K, M, G or T")
    if args.status_every <= 0:
        raise UsageError(f"--status-every must be positive, got {args.status_every:g}")
    sweep_dir = Path(args.sweep_dir or root / "runs" / "sweeps" /
                     f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}").resolve()
    runs = expand(groups, envs, datasets, args.seeds, " ".join(args.extra), sweep_dir, root, notes)
    return name, sweep_dir, runs, plot_command(plot_flags, sweep_dir, root)


def commands_path(slurm_file):
    """The command list next to the Slurm script: fig2.sbatch -> fig2.commands.txt."""
    return os.path.splitext(slurm_file)[0] + ".commands.txt"


def write_commands(sweep_dir, runs):
    """Writes <sweep>/commands.txt; a sweep folder made for other commands is refused, since its
    tasks would resume runs of a different grid."""
    text = "".join(r.command + "\n" for r in runs)
    path = Path(sweep_dir) / "commands.txt"
    if path.exists() and path.read_text() != text:
        raise UsageError(f"{sweep_dir} holds a different sweep (its commands.txt differs); choose another --sweep-dir")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def main(argv=None):
    args = parse_args(argv)
    notes = []
    try:
        name, sweep_dir, runs, plot = build(args, notes)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root = Path(args.root).resolve()
    resumable = {r.script for r in runs if supports_resume(root / r.script)}
    for note in notes:
        print(note, file=sys.stderr)

    if args.dry_run:
        print(f"# {name}: {len(runs)} runs, sweep folder {sweep_dir}")
        print(f"# scripts that support --resume: {' '.join(sorted(resumable)) or 'none'}")
        if args.slurm:
            print(f"# would write {args.slurm} and {commands_path(args.slurm)}")
        for r in runs:
            print(r.command)
        print(f"# plot (from {root}): {plot}")
        return 0

    try:
        write_commands(sweep_dir, runs)
        if args.slurm:
            commands = commands_path(args.slurm)
            Path(commands).write_text("".join(r.command + "\n" for r in runs))
            opts = dict(file=args.slurm, cpus=args.cpus or 2, time=args.time, partition=args.partition,
                        gpus=args.gpus, mem=args.mem, workers=args.workers, sbatch_options=args.sbatch_option)
            Path(args.slurm).write_text(slurm_script(runs, name, root, sweep_dir, Path(commands).resolve(),
                                                     resumable, opts, plot))
            (sweep_dir / "logs").mkdir(exist_ok=True)  # Slurm does not create the --output folder
    except OSError as e:
        print(f"error: cannot write: {e}", file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.slurm:
        print(f"wrote {args.slurm} ({len(runs)} array tasks) and {commands}")
        print(f"submit: sbatch {args.slurm}")
        print(f"then plot (from {root}): {plot}")
        return 0

    workers = args.workers or 1
    environ = child_environ(workers)
    jobs = []
    for r in runs:
        task_dir = root / r.output_dir
        argv = [sys.executable, *r.argv[1:]]
        argv, note = restart_plan(argv, str(task_dir), r.script in resumable,
                                  str(sweep_dir / "preempted" / f"task_{r.index}"))
        jobs.append(Job(f"task {r.index}", argv, str(sweep_dir / "logs" / f"task_{r.index}.log"), r.label, note))
    print(f"{name}: {len(runs)} runs, {workers} at a time, OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}, "
          f"sweep folder {sweep_dir}", file=sys.stderr)

    def stop(signum, frame):  # kill <pid> stops the sweep as Ctrl-C does
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        results = run_local(jobs, workers, str(root), environ, args.status_every)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summary_table(results))
    print(f"plot (from {root}): {plot}")
    return exit_status(results)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. --dry-run | head
        sys.stdout = None
        sys.exit(0)
