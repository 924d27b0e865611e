"""Sweeps: run a grid of training runs on this machine (--workers K) or as Slurm job arrays (--slurm FILE).

A sweep is methods x variants x envs x datasets x seeds. A method is a project script (METHODS) or any script's
path. --variant and --extra flags go to the scripts as they are: a script rejects a flag it lacks (exit status 2),
and a local sweep then starts no more runs. --figure N is the recipe for the paper's Figure N (FIGURES).

--pretrain-once (the figures' default): per method, env, dataset and seed, one pre-train-only run per set of
pre-training flags (PRETRAINING; other flags count as fine-tuning only): --extra and --extra-for less --online-steps,
those flags, then --online-steps 0. Every variant, the default included, is then its command plus `--load-offline
<sweep>/runs/task_<j>` (task j's finished run), with the same pre-training values, as --load-offline requires.
Variants that change pre-training otherwise (--num-min-critics M < N, M != 2) need --no-pretrain-once; redq (no
offline phase) and figure groups with chain=False run whole. A fine-tune waits for its pre-training; on Slurm,
<stem>.submit.sh submits FILE for the rest, then per fine-tuning slot k an array, its task j after task j (aftercorr).

    python scripts/sweep.py --figure 3 --seeds 0 --workers 2 --extra "--offline-steps 1000 --online-steps 1000"
    python scripts/sweep.py --methods redq_adaptive_bc --variant "" --variant --no-adaptive-bc --dry-run
    python scripts/sweep.py --figure 3 --slurm fig3.sbatch --gpus 1 --setup "module load cuda"; bash fig3.submit.sh

The sweep folder (--sweep-dir; default sweeps/<name>-<date>-<time>, outside runs/ so that `plot.py runs/` never
meets its seeds) holds commands.txt (line i+1 is task i), logs/task_<i>.log and runs/task_<i>/; a restarted task
finds its run there (finished, with final.pt and actor.pt and no latest.pt: done; else --resume). Locally, each run
holds its task's claim (logs/task_<i>.lock, flock) while it lives: a sweep started again waits for a run an earlier
start left alive, and never starts it twice. Slurm tasks run with HF_HUB_OFFLINE=1 (datasets must be local) and get
SIGUSR1 2 minutes before their time limit: the run saves latest.pt, exits 138 and requeues.
"""

import argparse
import datetime
import fcntl
import os
import shlex
import signal
import string
import subprocess
import sys
import time
from collections import Counter, namedtuple
from functools import partial
from itertools import product
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the shared package, for python scripts/sweep.py
from plumbing.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
SBATCH_TEMPLATE = Path(__file__).resolve().with_name("sweep.sbatch")  # the job array script, filled per sweep
METHODS = {
    "redq_adaptive_bc": "redq_adaptive_bc.py",
    "td3_bc": "baselines/td3_bc.py",
    "redq": "baselines/redq.py",
    "awac": "baselines/awac.py",
    "balanced_replay": "baselines/balanced_replay.py",
}
RESERVED = ("--env", "--dataset", "--seed", "--output-dir", "--resume")  # set by the sweep for every run
# Pre-training flags: what --load-offline takes over (dataset, offline-steps, NETWORK_KEYS), then offline update knobs
PRETRAINING = set(
    """dataset-id d4rl-version random-dataset-steps offline-steps hidden-dim hidden-layers activation num-critics
    critic-init alpha-offline actor-hidden-layers state-dependent-std log-std-min log-std-max num-groups group-size
    ensemble ratio-hidden-dim ratio-hidden-layers min-over-all-offline authors-code learning-rate batch-size tau gamma
    policy-noise noise-clip policy-freq delay-target-updates critic-loss-reduction actor-weight-decay lam
    target-update-period normalize-weights max-weight num-action-samples""".split()
)
PAPER_ENVS = ("hopper", "halfcheetah", "walker2d")
PAPER_DATASETS = ("random", "medium", "medium-replay", "medium-expert")  # the paper leaves out Expert
Run = namedtuple("Run", "index argv label after")  # after: the task whose pre-trained agent it fine-tunes
# plan: () -> (argv, note), argv None when already complete; FileNotFoundError: it cannot start. after:
# the index of the job that must succeed first. argv: the command it runs, set as it starts.
# status: ok, failed, complete, skipped, interrupted, not started.
Job = namedtuple("Job", "name plan log label after argv", defaults=("", None, None))
Result = namedtuple("Result", "job status returncode seconds", defaults=(None, 0.0))


def seconds(s):
    """A duration for humans: 42.0s, 3.5m, 1.2h."""
    return f"{s:.1f}s" if s < 60 else f"{s / 60:.1f}m" if s < 3600 else f"{s / 3600:.1f}h"


# A method's variants ("" = its defaults); chain: --pretrain-once applies (else whole runs); datasets: not the sweep's
Group = namedtuple("Group", "method variants chain datasets", defaults=(("",), False, ()))
Figure = namedtuple("Figure", "title groups datasets envs plot", defaults=(PAPER_DATASETS, PAPER_ENVS, ""))
FIGURES = {
    1: Figure(
        "TD3+BC with fixed alpha_online on hopper's four datasets, fine-tuning one pre-training",
        (Group("td3_bc", tuple(f"--alpha-online {a}" for a in ("0.0", "0.1", "0.3")), True),),
        envs=("hopper",),
        plot="--methods td3_bc --envs hopper --label-by alpha_online --out plots/fig1",
    ),
    2: Figure(
        "the method vs peers, which also run at its G = 20 (--utd 20); REDQ from scratch once per env and seed",
        (
            Group("redq_adaptive_bc"),
            *(Group(m, ("", "--utd 20"), True) for m in ("td3_bc", "awac", "balanced_replay")),
            Group("redq", datasets=("scratch",)),
        ),
        plot="--out plots/fig2",
    ),
    3: Figure(
        "adaptive vs fixed alpha_online, all fine-tuning one pre-training",
        (
            Group(
                "redq_adaptive_bc",
                ("",) + tuple(f"--no-adaptive-bc --alpha-online {a}" for a in ("0.0", "0.1", "0.2", "0.3")),
                True,
            ),
        ),
        plot="--methods redq_adaptive_bc --label-by adaptive_bc alpha_online --out plots/fig3",
    ),
    4: Figure(
        "TD3-ft with and without downsampling, fine-tuning one pre-training",
        (Group("td3_bc", ("--keep-ratio 1.0", "--keep-ratio 0.05"), True),),
        ("random",),
        plot="--methods td3_bc --datasets random --label-by keep_ratio --out plots/fig4",
    ),
    5: Figure(
        "uses of the ensemble (hopper); the min over all ten critics (--num-min-critics 10) acts in fine-tuning "
        "only (the authors' scope)",
        (Group("redq_adaptive_bc", ("", "--num-min-critics 10", "--num-critics 2 --num-min-critics 2"), True),),
        envs=("hopper",),
        plot="--methods redq_adaptive_bc --envs hopper --label-by num_critics num_min_critics --out plots/fig5",
    ),
}


def flags(text, where):
    """The tokens of a flag string; it starts with a flag and sets nothing the sweep sets."""
    try:
        tokens = shlex.split(text)
    except ValueError as e:
        raise UsageError(f"{where}: cannot parse {text!r} ({e})") from None
    bad = [t for t in tokens[:1] if not t.startswith("--")] + [t for t in tokens if t.split("=")[0] in RESERVED]
    if bad:
        raise UsageError(f"{where}: {bad[0]!r} is not a flag, or is one the sweep sets (--envs, --datasets, --seeds)")
    return tokens


def display_path(path, root):
    """A path as written in commands, which run in the repository root: relative to it when inside."""
    path = Path(path).resolve()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def expand(groups, envs, datasets, seeds, extra, pretrain_once, runs_dir, root):
    """Every run, seed first (a sweep stopped half-way has whole panels for its first seeds): pre-trainings and
    whole runs, then the fine-tunes, whose argv ends in --load-offline runs/task_<their pre-training>."""
    runs = []

    def keep(tokens, test):
        """The flags of a flag list (which starts with one), with their values, whose names pass test."""
        starts = [i for i, token in enumerate(tokens) if token.startswith("--")] + [len(tokens)]
        return [
            t
            for i, j in zip(starts, starts[1:])
            if test(tokens[i][2:].split("=")[0].removeprefix("no-"))
            for t in tokens[i:j]
        ]

    def add(seed, script, env, dataset, tokens, note, after=None):
        i, load = len(runs), [] if after is None else ["--load-offline", f"{runs_dir}/task_{after}"]
        argv = ["python", script, "--env", env, "--dataset", dataset, "--seed", str(seed), *tokens]
        argv += ["--output-dir", f"{runs_dir}/task_{i}", *load]
        label = [Path(script).stem, f"{env}-{dataset} seed {seed}", note, load and f"(fine-tunes task {after})"]
        runs.append(Run(i, argv, " ".join(filter(None, label)), after))
        return i

    for seed in seeds:
        tunes, pretrainings = [], {}  # (script, env, dataset, pre-training flags): its task
        for group in groups:
            script = display_path(root / METHODS[group.method] if group.method in METHODS else group.method, root)
            common = [*extra.get("", []), *extra.get(Path(script).stem, [])]
            for env, dataset, variant in product(envs, group.datasets or datasets, group.variants):
                tokens = common + flags(variant, "--variant")
                if not (pretrain_once and group.chain and Path(script).stem != "redq"):  # redq: no offline phase
                    add(seed, script, env, dataset, tokens, variant)
                    continue
                pre = keep(tokens[len(common) :], PRETRAINING.__contains__)
                if (key := (script, env, dataset, *pre)) not in pretrainings:
                    base = keep(common, lambda name: name != "online-steps") + pre + ["--online-steps", "0"]
                    pretrainings[key] = add(seed, script, env, dataset, base, shlex.join(["pre-training", *pre]))
                tunes.append((seed, script, env, dataset, tokens, variant, pretrainings[key]))
        for tune in tunes:
            add(*tune)
    return runs


def run_complete(run):
    """RunFolder.finish got to its end: final.pt, actor.pt, no latest.pt. A run killed inside it (final.pt alone) is
    resumed, and --resume writes what it left undone."""
    return (run / "final.pt").exists() and (run / "actor.pt").exists() and not (run / "latest.pt").exists()


def plan(argv, root):
    """(argv, note) of a task as it starts; argv None: its run is complete. An unfinished run is resumed (with
    the arguments in its config.json); a fine-tune gets the offline.pt of its pre-training task's finished run."""
    task_dir = root / argv[argv.index("--output-dir") + 1]
    found = [f for f in sorted(task_dir.glob("*__*__*__*")) if (f / "config.json").is_file()]  # name order is age
    argv = [sys.executable, *argv[1:]]
    if found and run_complete(found[-1]):
        return None, f"complete: {found[-1]}"
    if found:
        return [*argv[:2], "--resume", str(found[-1])], f"resuming {found[-1]}"
    if argv[-2] == "--load-offline":
        done = [f for f in sorted((root / argv[-1]).glob("*__*__*__*")) if (f / "final.pt").exists()]
        if not done:
            raise FileNotFoundError(f"no finished run in {argv[-1]} to fine-tune")
        argv[-1] = str(done[-1] / "offline.pt")
    return argv, ""


def child_environ(workers, environ=None, cores=None):
    """OMP_NUM_THREADS = cores // workers unless set: oversubscribed threads made torch ~10x slower (README)."""
    environ = dict(os.environ if environ is None else environ)
    return {
        **environ,
        "OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS")
        or str(max(1, (cores or len(os.sched_getaffinity(0))) // workers)),
    }


def claim(path):
    """A descriptor holding an exclusive flock on a task's claim file, or None while a live process holds it. The
    run inherits the descriptor, so the claim lasts as long as the run, even past a SIGKILL of its sweep."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def start(job, fd, cwd, environ):
    """The job's run, started in its own session with the claim descriptor fd (which then names its pid)."""
    with open(job.log, "a") as log:
        log.write(f"=== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} {shlex.join(job.argv)}\n")
        log.flush()
        proc = subprocess.Popen(
            job.argv,
            cwd=cwd,
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=(fd,),
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(proc.pid).encode(), 0)
    return proc


def run_local(jobs, workers, cwd, environ, every=5.0, out=None, poll=0.05):
    """Runs the jobs, `workers` at a time, each appending to its log. A job waits for the job it fine-tunes
    (skipped if that one failed), and for a run of its own still alive from an earlier start of the sweep (its
    claim, logs/task_<i>.lock). After a run exits 2 (it rejected its arguments) no job starts. On
    KeyboardInterrupt the runs get SIGTERM (they save latest.pt), SIGKILL a minute later."""
    out, results, running, pending, held = out or sys.stderr, {}, {}, list(range(len(jobs))), set()
    begin = last = time.monotonic()

    def say(text):
        print(f"[sweep {seconds(time.monotonic() - begin)}] {text}", file=out, flush=True)

    try:
        while running or pending:
            for i in [i for i in pending if jobs[i].after is None or jobs[i].after in results][
                : workers - len(running)
            ]:
                job, before, lock = jobs[i], results.get(jobs[i].after), str(Path(jobs[i].log).with_suffix(".lock"))
                if (fd := claim(lock)) is None:
                    if i not in held:
                        say(f"{job.name} is running in pid {Path(lock).read_text()} (an earlier start's): waiting")
                    held.add(i)
                    continue
                pending.remove(i)
                try:
                    if before and before.status not in ("ok", "complete"):
                        raise FileNotFoundError(f"{before.job.name} did not succeed")
                    argv, note = job.plan()
                except FileNotFoundError as e:
                    results[i] = Result(job, "skipped")
                    say(f"skip {job.name}: {e}")
                    argv = note = None
                if argv is None and i not in results:
                    results[i] = Result(job, "complete", 0)
                    say(f"{job.name} already complete ({note})")
                if argv is None:
                    os.close(fd)
                    continue
                running[i] = (start(job._replace(argv=argv), fd, cwd, environ), time.monotonic(), fd)
                say(f"start {job.name}: {job.label}" + (f" ({note})" if note else ""))
            for i in [i for i, r in running.items() if r[0].poll() is not None]:
                pending = finished(i, running.pop(i), jobs, results, pending, say)
            if time.monotonic() - last >= every:
                last, failed = time.monotonic(), sum(r.status == "failed" for r in results.values())
                say(
                    f"running {len(running)} | finished {len(results)} | failed {failed} | pending {len(pending)} | "
                    f"of {len(jobs)}" + (" | now: " + ", ".join(jobs[i].name for i in running) if running else "")
                )
            time.sleep(poll if running or pending else 0)
    except KeyboardInterrupt:
        say(f"interrupted: stopping {len(running)} run(s)")
        for proc, _, _ in running.values():
            proc.send_signal(signal.SIGTERM)
        for i, (proc, started, _) in running.items():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            results[i] = Result(jobs[i], "interrupted", proc.wait(), time.monotonic() - started)
        results.update({k: Result(jobs[k], "not started") for k in pending})
    return [results[i] for i in range(len(jobs))]


def finished(i, run, jobs, results, pending, say):
    """Record job i's ended run (its claim released); returns the jobs still to start (none after an exit 2)."""
    (proc, started, fd), job = run, jobs[i]
    os.close(fd)
    rc = proc.returncode
    results[i] = Result(job, "ok" if rc == 0 else "failed", rc, time.monotonic() - started)
    lines = Path(job.log).read_text(errors="replace").strip().splitlines() if rc else [""]
    say(
        f"done {job.name} ({seconds(results[i].seconds)})"
        if rc == 0
        else f"FAILED {job.name} (exit {rc}): {lines[-1]}  [log {job.log}]"
    )
    if rc == 2 and pending:
        say(f"{job.name} rejected its arguments: no more runs are started")
        results.update({k: Result(jobs[k], "not started") for k in pending})
        return []
    return pending


def summary_table(results):
    rows = [("job", "status", "exit", "time", "run", "log")] + [
        (
            r.job.name,
            r.status,
            "" if r.returncode is None else str(r.returncode),
            seconds(r.seconds) if r.seconds else "",
            r.job.label,
            r.job.log,
        )
        for r in results
    ]
    width = [max(len(row[c]) for row in rows) for c in range(5)] + [0]
    tally = ", ".join(f"{n} {s}" for s, n in Counter(r.status for r in results).items())
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, width)) for row in rows]
    return "\n".join(lines + [f"{len(results)} runs: {tally}"])


def exit_status(results):
    """130 interrupted, 2 a run rejected its arguments, 1 a run failed or was skipped, else 0."""
    statuses, codes = {r.status for r in results}, {r.returncode for r in results}
    return 130 if "interrupted" in statuses else 2 if 2 in codes else 1 if statuses - {"ok", "complete"} else 0


def ranges(indices):
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8', a Slurm --array list."""
    spans = []
    for i in indices:
        if spans and i == spans[-1][-1] + 1:
            spans[-1].append(i)
        else:
            spans.append([i])
    return ",".join(f"{s[0]}-{s[-1]}" if len(s) > 1 else str(s[0]) for s in spans)


class SlurmTemplate(string.Template):
    delimiter = "@"  # bash owns $: the template's fields are @name


def slurm_files(args, name, sweep, root, runs):
    """{path: text} of FILE, a job array whose tasks ask this file what to run (--task), and <stem>.submit.sh, which
    submits FILE for the pre-trainings and whole runs, then once per fine-tuning slot k (SWEEP_SLOT=k)."""
    q, minari, limit = shlex.quote, os.environ.get("MINARI_DATASETS_PATH"), f"%{args.workers}" if args.workers else ""
    finetunes = {after: [r.index for r in runs if r.after == after] for after in dict.fromkeys(r.after for r in runs)}
    firsts, sbatch_file = finetunes.pop(None), q(str(Path(args.slurm).resolve()))
    options = [
        f"--job-name={name}",
        f"--array={ranges(firsts)}{limit}",
        f"--output={sweep}/logs/slurm-%A_%a.out",
        "--open-mode=append",
        "--requeue",
        "--signal=B:USR1@120",
        f"--cpus-per-task={args.cpus or 2}",
    ]
    gres = args.gpus and f"gpu:{args.gpus}"
    per_run = {"time": args.time, "partition": args.partition, "gres": gres, "mem": args.mem}
    options += [f"--{key}={value}" for key, value in per_run.items() if value] + (args.sbatch_option or [])
    task = (
        f"{q(str(Path(__file__).resolve()))} --root {q(str(root))} --sweep-dir {q(str(sweep))} --task "
        '"$SLURM_ARRAY_TASK_ID" ${SWEEP_SLOT:+--slot "$SWEEP_SLOT"}'
    )
    sbatch = SlurmTemplate(SBATCH_TEMPLATE.read_text()).substitute(
        name=name,
        options="\n".join(f"#SBATCH {option}" for option in options),
        root=q(str(root)),
        setup=args.setup or "# (no --setup line)",
        python=q(args.python or sys.executable),
        minari=f"export MINARI_DATASETS_PATH={q(minari)}" if minari else "# (MINARI_DATASETS_PATH was not set)",
        task=task,
    )
    submit = [
        "#!/bin/bash",
        f"# {name}: {len(firsts)} runs, then {len(runs) - len(firsts)} fine-tunes",
        "set -euo pipefail",
        f'first=$(sbatch --parsable {sbatch_file}); first=${{first%%;*}}; echo "job $first"',
    ]
    for k in range(max(map(len, finetunes.values()), default=0)):
        submit.append(
            f"sbatch --dependency=aftercorr:$first --kill-on-invalid-dep=yes --job-name={name}-ft{k} --array="
            f"{ranges([j for j, ts in finetunes.items() if len(ts) > k])}{limit} --export=ALL,SWEEP_SLOT={k} "
            f"{sbatch_file}"
        )
    return {args.slurm: sbatch, os.path.splitext(args.slurm)[0] + ".submit.sh": "\n".join(submit) + "\n"}


def slurm_task(args):
    """Slurm's task J (--task J), or the K-th fine-tune of task J (--slot K): log, then become the training script."""
    sweep, root = Path(args.sweep_dir).resolve(), Path(args.root).resolve()
    lines, i = (sweep / "commands.txt").read_text().splitlines(), args.task
    if args.slot is not None:
        pre = ["--load-offline", f"{display_path(sweep / 'runs', root)}/task_{i}"]
        tunes = [k for k, line in enumerate(lines) if shlex.split(line)[-2:] == pre] + [None] * (args.slot + 1)
        if (i := tunes[args.slot]) is None:
            raise UsageError(f"task {args.task} has no fine-tune number {args.slot}")
    log = open(sweep / "logs" / f"task_{i}.log", "a")
    os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
    print(
        f"=== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} task {i} on {os.uname().nodename}, start "
        f"{int(os.environ.get('SLURM_RESTART_COUNT', 0)) + 1}",
        flush=True,
    )
    argv, note = plan(shlex.split(lines[i]), root)  # FileNotFoundError: exit status 2, as for bad input
    print(f"{note or 'starting'}\n+ {shlex.join(argv or [])}", flush=True)
    return os.execv(argv[0], argv) if argv else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="scripts/sweep.py",
        description=__doc__,
        epilog="figures:\n" + "\n".join(f"  {n}: {f.title}" for n, f in FIGURES.items()),
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.error = lambda message: p.exit(2, f"error: {message} (see python scripts/sweep.py --help)\n")  # one line
    add = p.add_argument
    add("--figure", type=int, choices=FIGURES, metavar="N", help="the recipe for the paper's Figure N (1-5)")
    add("--methods", nargs="+", metavar="M", help=f"{', '.join(METHODS)} or a script's path (with --figure: a subset)")
    add("--envs", nargs="+", metavar="E", help="default: hopper, or the figure's")
    add("--datasets", nargs="+", metavar="D", help="default: medium, or the figure's")
    add("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], metavar="S", help="default: 0 1 2 3 4")
    add("--variant", action="append", metavar="FLAGS", help='one variant\'s flags ("" = defaults), repeatable')
    add("--extra", action="append", default=[], metavar="FLAGS", help="flags for every run")
    add("--extra-for", nargs=2, action="append", default=[], metavar=("METHOD", "FLAGS"), help="flags for one method")
    add("--pretrain-once", action=argparse.BooleanOptionalAction, help="pre-train, then fine-tune (default: figures)")
    add("--sweep-dir", metavar="DIR", help="default: sweeps/<name>-<date>-<time>; an earlier one continues it")
    add("--workers", type=int, metavar="K", help="runs at a time (default: 1; Slurm: the arrays' %%K)")
    add("--status-every", type=float, default=5.0, metavar="SEC", help="seconds between status lines (default: 5)")
    add("--dry-run", action="store_true", help="print the commands; write and run nothing")
    add("--slurm", metavar="FILE", help="write the job array FILE and <stem>.submit.sh instead of running")
    add("--partition", help="per run")
    add("--time", help="per run; e.g. 12:00:00")
    add("--cpus", type=int, help="per run; default: 2")
    add("--gpus", type=int, help="per run; --gres=gpu:N")
    add("--mem", help="per run; e.g. 16G")
    add("--task", type=int, help=argparse.SUPPRESS)  # --task, --slot: the Slurm task's call back into this file
    add("--slot", type=int, help=argparse.SUPPRESS)
    add("--sbatch-option", action="append", metavar="OPT", help="another #SBATCH line, e.g. --sbatch-option=--qos=x")
    add("--setup", metavar="CMD", help='shell line run first in each task, e.g. "module load cuda"')
    add("--python", metavar="PATH", help="the tasks' interpreter (default: the one running this)")
    add("--root", default=str(ROOT), help=argparse.SUPPRESS)  # tests: a tree of stand-in scripts
    return p.parse_args(flag_values_as_values(sys.argv[1:] if argv is None else argv))


# Options whose value is itself a flag string, and how many values each takes (the last is the flag string).
FLAG_VALUED = {"--variant": 1, "--extra": 1, "--extra-for": 2}


def flag_values_as_values(argv):
    """argparse reads a value that looks like a flag (--variant --no-adaptive-bc) as the next option: glue it to its
    option (--variant=--no-adaptive-bc), or, after --extra-for METHOD, add a space (a value holding a space is a
    value to argparse; shlex.split drops it again)."""
    argv, out = list(argv), []
    while argv:
        token = argv.pop(0)
        n = FLAG_VALUED.get(token, 0)
        values, argv = argv[:n], argv[n:]
        if n == 1 and values:
            out.append(f"{token}={values[0]}")
        else:
            out += [token, *values[:-1], *[v + " " for v in values[-1:]]]
    return out


def build(args):
    """(name, sweep folder, runs, plot command); UsageError on bad input."""
    root = Path(args.root).resolve()
    if args.figure:
        if args.variant is not None:
            raise UsageError("--variant cannot be combined with --figure (the figure defines its variants)")
        figure, name = FIGURES[args.figure], f"fig{args.figure}"
        unknown = sorted(set(args.methods or ()) - {g.method for g in figure.groups})
        if unknown:
            raise UsageError(f"Figure {args.figure} has no method {unknown[0]!r}")
        groups = [g for g in figure.groups if g.method in (args.methods or [g.method])]
        envs, datasets, plot = args.envs or figure.envs, args.datasets or figure.datasets, figure.plot
    elif args.methods:
        name, envs, datasets, plot = "sweep", args.envs or ["hopper"], args.datasets or ["medium"], ""
        groups = [Group(m, tuple(args.variant or [""]), True) for m in args.methods]
    else:
        raise UsageError("give --figure N or --methods M ...")
    missing = [
        g.method for g in groups if not (root / METHODS[g.method] if g.method in METHODS else Path(g.method)).is_file()
    ]
    if missing:
        raise UsageError(f"method {missing[0]!r}: no such script (methods: {', '.join(METHODS)}, or a path)")
    if any(v is not None and v < 1 for v in (args.workers, args.cpus)):
        raise UsageError("--workers and --cpus must be positive")
    extra = {"": flags(" ".join(args.extra), "--extra")}
    for method, text in args.extra_for:
        if Path(method).stem not in {Path(g.method).stem for g in groups}:
            raise UsageError(f"--extra-for: {method!r} is not a method of this sweep")
        extra.setdefault(Path(method).stem, []).extend(flags(text, "--extra-for"))
    # Not under runs/: `python plot.py runs/` would meet a sweep's seeds beside the user's own runs.
    sweep = Path(args.sweep_dir or root / "sweeps" / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    pretrain_once = args.pretrain_once if args.pretrain_once is not None else bool(args.figure)
    runs = expand(groups, envs, datasets, args.seeds, extra, pretrain_once, display_path(sweep / "runs", root), root)
    return name, sweep.resolve(), runs, f"python plot.py {display_path(sweep / 'runs', root)}/ {plot}".rstrip()


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.task is not None:
            return slurm_task(args)
        name, sweep, runs, plot = build(args)
        text = "".join(shlex.join(r.argv) + "\n" for r in runs)
        if not args.dry_run and (sweep / "commands.txt").exists() and (sweep / "commands.txt").read_text() != text:
            raise UsageError(f"{sweep} holds another sweep (its commands.txt differs); choose another --sweep-dir")
    except (UsageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root, fine, pre = Path(args.root).resolve(), sum(r.after is not None for r in runs), {r.after for r in runs}
    head = f"{name}: {len(runs)} runs, {len(pre - {None})} pre-train only, {fine} fine-tune; sweep folder {sweep}"
    if args.dry_run:
        print(f"# {head}\n{text}# plot (from {root}): {plot}")
        return 0
    try:
        (sweep / "logs").mkdir(parents=True, exist_ok=True)
        (sweep / "commands.txt").write_text(text)
        for path, content in (slurm_files(args, name, sweep, root, runs) if args.slurm else {}).items():
            Path(path).write_text(content)
    except OSError as e:
        print(f"error: cannot write: {e}", file=sys.stderr)
        return 2
    if args.slurm:
        print(
            f"{head}\nwrote {args.slurm}\nsubmit: bash {os.path.splitext(args.slurm)[0]}.submit.sh\n"
            f"then plot (from {root}): {plot}"
        )
        return 0
    environ = child_environ(args.workers or 1)
    logs = [str(sweep / "logs" / f"task_{r.index}.log") for r in runs]
    jobs = [Job(f"task {r.index}", partial(plan, r.argv, root), log, r.label, r.after) for r, log in zip(runs, logs)]
    print(f"{head}; {args.workers or 1} at a time, OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}", file=sys.stderr)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill <pid> stops the sweep as Ctrl-C does
    results = run_local(jobs, args.workers or 1, str(root), environ, args.status_every)
    print(f"{summary_table(results)}\nplot (from {root}): {plot}")
    return exit_status(results)


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # e.g. --dry-run | head: stop quietly
    sys.exit(main())
