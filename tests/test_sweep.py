"""scripts/sweep.py: the grid it expands (small grids and the paper's figures, checked against the
README's table), its errors, the local runner (summary, exit status, logs, parallelism, OMP
threads, restarts) and the Slurm job array (content, bash syntax, and requeue/resume by running
the script itself with bash). Nothing here trains: stand-in scripts write run folders and exit."""

import importlib.util
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "scripts" / "sweep.py"
spec = importlib.util.spec_from_file_location("sweep", SWEEP)
sweep = importlib.util.module_from_spec(spec)
sys.modules["sweep"] = sweep  # dataclasses look their module up while the class is made
spec.loader.exec_module(sweep)

PAPER_ENVS = ["hopper", "halfcheetah", "walker2d"]
PAPER_DATASETS = ["random", "medium", "medium-replay", "medium-expert"]
# The README's "Reproducing the paper" table, written out: (script, variant flags) x envs x datasets.
FIGURE_SPECS = {
    1: ([("baselines/td3_bc.py", "--alpha-online 0.0"), ("baselines/td3_bc.py", "--alpha-online 0.1"),
         ("baselines/td3_bc.py", "--alpha-online 0.3")], PAPER_ENVS, ["medium"]),
    2: ([("redq_adaptive_bc.py", ""), ("baselines/td3_bc.py", ""), ("baselines/redq.py", ""),
         ("baselines/awac.py", ""), ("baselines/balanced_replay.py", "")], PAPER_ENVS, PAPER_DATASETS),
    3: ([("redq_adaptive_bc.py", "")] + [("redq_adaptive_bc.py", f"--no-adaptive-bc --alpha-online {a}")
                                         for a in ("0.0", "0.1", "0.2", "0.3")], PAPER_ENVS, PAPER_DATASETS),
    4: ([("baselines/td3_bc.py", "--keep-ratio 1.0"), ("baselines/td3_bc.py", "--keep-ratio 0.05")],
        PAPER_ENVS, ["random"]),
    5: ([("redq_adaptive_bc.py", ""), ("redq_adaptive_bc.py", "--num-min-critics 10"),
         ("redq_adaptive_bc.py", "--num-critics 2 --num-min-critics 2")], ["hopper"], PAPER_DATASETS),
}

# A stand-in for a training script: the same Args fields the sweep reads, a run folder like the
# real ones, and behavior set by the environment (FAKE_PARTIAL: stop before final.pt, as a killed
# run does; FAKE_SLEEP: seconds to run). --fail exits 1 after writing config.json, unless resumed.
FAKE = '''
import json, os, sys, time
from dataclasses import dataclass
from typing import Optional

METHOD = "{method}"


@dataclass
class Args:
    env: str = "hopper"
    dataset: str = "medium"
    seed: int = 0
    output_dir: str = "runs"
    offline_steps: int = 10
    fail: bool = False
{resume_field}

argv = sys.argv[1:]
print("argv: " + json.dumps(argv))
print("omp: " + os.environ.get("OMP_NUM_THREADS", "unset"), flush=True)
opts = {{argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}}
if "--resume" in opts:
    run = opts["--resume"]
    open(os.path.join(run, "resumed.txt"), "a").write("resumed\\n")
else:
    run = os.path.join(opts["--output-dir"],
                       f"{{opts['--env']}}-{{opts['--dataset']}}__{{METHOD}}__{{opts['--seed']}}__{{int(time.time())}}")
    os.makedirs(run, exist_ok=True)
    json.dump({{"method": METHOD}}, open(os.path.join(run, "config.json"), "w"))
open(os.path.join(run, "pid"), "w").write(str(os.getpid()))
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
if ("--fail" in argv and "--resume" not in opts) or os.environ.get("FAKE_PARTIAL"):
    sys.exit(1)
open(os.path.join(run, "final.pt"), "w").write("done")
'''


@pytest.fixture
def fake_root(tmp_path):
    """A repository with stand-in scripts: redq_adaptive_bc.py can --resume, baselines/td3_bc.py cannot."""
    root = tmp_path / "repo"
    (root / "baselines").mkdir(parents=True)
    (root / "redq_adaptive_bc.py").write_text(FAKE.format(
        method="redq_adaptive_bc", resume_field="    resume: Optional[str] = None"))
    (root / "baselines" / "td3_bc.py").write_text(FAKE.format(method="td3_bc", resume_field=""))
    return root


def run_cli(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, str(SWEEP), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def dry_run_commands(capsys, *args):
    assert sweep.main([*args, "--dry-run"]) == 0
    captured = capsys.readouterr()
    return [line for line in captured.out.splitlines() if not line.startswith("#")], captured.out, captured.err


def figure_commands(n, runs_dir):
    groups, envs, datasets = FIGURE_SPECS[n]
    lines = []
    for script, variant in groups:
        for env in envs:
            for dataset in datasets:
                flags = f"{variant} " if variant else ""
                lines.append(f"python {script} --env {env} --dataset {dataset} --seed 0 {flags}"
                             f"--output-dir {runs_dir}/task_{len(lines)}")
    return lines


# ---------------------------------------------------------------- expansion


def test_small_grid_exact_commands_seed_first(capsys, tmp_path):
    sd = tmp_path / "sw"
    commands, out, _ = dry_run_commands(
        capsys, "--methods", "redq_adaptive_bc", "td3_bc", "--envs", "hopper", "walker2d", "--datasets", "medium",
        "--seeds", "0", "1", "--variant", "", "--variant", "--utd 10", "--extra", "--offline-steps 1000",
        "--sweep-dir", str(sd))
    expected = []
    for seed in (0, 1):
        for script in ("redq_adaptive_bc.py", "baselines/td3_bc.py"):
            for variant in ("", "--utd 10 "):
                for env in ("hopper", "walker2d"):
                    expected.append(f"python {script} --env {env} --dataset medium --seed {seed} {variant}"
                                    f"--offline-steps 1000 --output-dir {sd}/runs/task_{len(expected)}")
    assert commands == expected
    assert f"python plot.py {sd}/runs/ --label-by utd" in out
    assert not sd.exists()  # a dry run writes nothing


@pytest.mark.parametrize("n", sorted(FIGURE_SPECS))
def test_figure_commands_exact(capsys, tmp_path, n):
    sd = tmp_path / "sw"
    commands, _, _ = dry_run_commands(capsys, "--figure", str(n), "--seeds", "0", "--sweep-dir", str(sd))
    assert commands == figure_commands(n, f"{sd}/runs")


@pytest.mark.parametrize("n,total", [(1, 45), (2, 300), (3, 300), (4, 30), (5, 60)])
def test_figure_counts_with_default_five_seeds(tmp_path, n, total):
    args = sweep.parse_args(["--figure", str(n), "--sweep-dir", str(tmp_path / "sw")])
    _, _, runs, _ = sweep.build(args, [])
    assert len(runs) == total
    assert sorted({r.seed for r in runs}) == [0, 1, 2, 3, 4]
    # one run per (seed, method, variant, env, dataset), each with its own task folder
    assert len({(r.seed, r.method, tuple(r.variant), r.env, r.dataset) for r in runs}) == total
    assert [r.output_dir.rsplit("_", 1)[1] for r in runs] == [str(i) for i in range(total)]


def readme_figure_rows():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Reproducing the paper", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| (\d): ", line)
        if m:
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows[int(m.group(1))] = (cells[1], cells[2].strip("`"))
    return rows


@pytest.mark.parametrize("n", sorted(FIGURE_SPECS))
def test_figures_match_the_readme_table(tmp_path, n):
    """Scripts, flag names, flag values and the plot command of each figure, against the README row."""
    runs_cell, plot_cell = readme_figure_rows()[n]
    args = sweep.parse_args(["--figure", str(n), "--seeds", "0", "--sweep-dir", str(tmp_path / "sw")])
    _, sd, runs, plot = sweep.build(args, [])
    assert plot.replace(f"{sd}/runs/", "runs/") == plot_cell
    assert {r.script for r in runs} == set(re.findall(r"python (\S+\.py)", runs_cell))
    grid_flags = {"--env", "--dataset", "--seed", "--load-offline"}
    readme_flags = set(re.findall(r"--[a-z-]+", runs_cell)) - grid_flags
    assert {t for r in runs for t in r.variant if t.startswith("--")} == readme_flags
    for values in re.findall(r"∈ \{([^}]*)\}", runs_cell):  # e.g. A ∈ {0.0, 0.1, 0.3}
        assert {v.strip() for v in values.split(",")} == {
            r.variant[r.variant.index("--alpha-online") + 1] for r in runs if "--alpha-online" in r.variant}


def test_figure_commands_parse_with_the_scripts_own_args(tmp_path):
    """Each figure's (script, variant) is parsed by that script's tyro Args: the flags exist and
    set the fields the figure is about."""
    import tyro

    modules = {}
    for n in FIGURE_SPECS:
        args = sweep.parse_args(["--figure", str(n), "--seeds", "0", "--sweep-dir", str(tmp_path / "sw")])
        for run in sweep.build(args, [])[2]:
            if run.script not in modules:
                spec_ = importlib.util.spec_from_file_location(f"sweep_check_{run.method}", ROOT / run.script)
                modules[run.script] = sys.modules[spec_.name] = importlib.util.module_from_spec(spec_)
                spec_.loader.exec_module(modules[run.script])
            parsed = tyro.cli(modules[run.script].Args, args=run.argv[2:])
            assert (parsed.env, parsed.dataset, parsed.seed) == (run.env, run.dataset, 0)
            assert parsed.output_dir == run.output_dir
            flags = dict(sweep.split_flags(run.variant, "test"))
            for flag, tokens in flags.items():
                if flag.startswith("--no-"):
                    assert getattr(parsed, flag[5:].replace("-", "_")) is False
                else:
                    assert getattr(parsed, flag[2:].replace("-", "_")) == float(tokens[1])
    assert len(modules) == 5


def test_figure_subset_of_methods_and_envs(capsys, tmp_path):
    sd = tmp_path / "sw"
    commands, _, _ = dry_run_commands(capsys, "--figure", "2", "--methods", "awac", "--envs", "walker2d",
                                   "--datasets", "medium", "--seeds", "3", "--sweep-dir", str(sd))
    assert commands == [f"python baselines/awac.py --env walker2d --dataset medium --seed 3 "
                        f"--output-dir {sd}/runs/task_0"]


def test_extra_flags_left_out_where_a_script_lacks_them(capsys, tmp_path):
    commands, _, err = dry_run_commands(capsys, "--figure", "2", "--seeds", "0", "--envs", "hopper", "--datasets",
                                   "medium", "--extra", "--offline-steps 7 --online-steps 9",
                                   "--sweep-dir", str(tmp_path / "sw"))
    by_script = {shlex.split(c)[1]: shlex.split(c) for c in commands}
    assert len(by_script) == 5
    for script, argv in by_script.items():
        assert argv[argv.index("--online-steps") + 1] == "9"
        assert ("--offline-steps" in argv) == (script != "baselines/redq.py")  # REDQ from scratch: no offline phase
    assert "--offline-steps is left out of the redq runs" in err


def test_slurm_dry_run_writes_nothing(capsys, tmp_path):
    file = tmp_path / "f.sbatch"
    commands, out, _ = dry_run_commands(capsys, "--figure", "4", "--seeds", "0", "--slurm", str(file),
                                     "--sweep-dir", str(tmp_path / "sw"))
    assert len(commands) == 6 and f"would write {file}" in out
    assert not file.exists() and not (tmp_path / "f.commands.txt").exists()


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("args,needle", [
    (["--methods", "sac"], "unknown method 'sac'"),
    (["--figure", "6"], "unknown figure '6'"),
    (["--figure", "x"], "unknown figure 'x'"),
    (["--methods", "td3_bc", "--workers", "0"], "--workers: must be a positive integer, got '0'"),
    (["--methods", "td3_bc", "--workers", "two"], "--workers: must be a positive integer, got 'two'"),
    (["--figure", "1", "--methods", "awac"], "unknown method of Figure 1 'awac'"),
    (["--figure", "1", "--variant", "--utd 2"], "--variant cannot be combined with --figure"),
    ([], "give --figure N or --methods"),
    (["--methods", "td3_bc", "--envs", "pong"], "unknown env 'pong'"),
    (["--methods", "td3_bc", "--seeds", "1", "1"], "seed given twice: 1"),
    (["--methods", "td3_bc", "--extra", "--seed 3"], "--seed is set by the sweep"),
    (["--methods", "td3_bc", "--extra", "--ofline-steps 3"], "--ofline-steps is not a flag of baselines/td3_bc.py"),
    (["--methods", "awac", "--variant", "--alpha-online 0.1"], "--alpha-online is not a flag of baselines/awac.py"),
    (["--methods", "td3_bc", "--extra", "--utd '2"], "cannot parse"),
    (["--figure", "3", "--extra", "--adaptive-bc --offline-steps 5"], "--adaptive-bc is also set by a variant"),
    (["--methods", "td3_bc", "--partition", "gpu"], "need --slurm FILE"),
    (["--methods", "td3_bc", "--slurm", "x.sbatch", "--time", "soon"], "--time 'soon'"),
])
def test_bad_input_is_one_line_exit_2(args, needle):
    result = run_cli(*args, "--dry-run")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


def test_missing_script_is_one_line_exit_2(fake_root):
    result = run_cli("--root", str(fake_root), "--methods", "awac", "--dry-run")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: method awac: script {fake_root}/baselines/awac.py not found"]


# ---------------------------------------------------------------- scripts: flags and --resume


def test_script_flags_and_resume_detection(fake_root, tmp_path):
    assert sweep.supports_resume(fake_root / "redq_adaptive_bc.py")
    assert not sweep.supports_resume(fake_root / "baselines" / "td3_bc.py")
    flags = sweep.script_flags(fake_root / "baselines" / "td3_bc.py")
    assert {"--fail", "--no-fail", "--offline-steps"} <= flags and "--no-seed" not in flags
    no_args = tmp_path / "plain.py"
    no_args.write_text("import sys  # understands --resume DIR\n")
    assert sweep.script_flags(no_args) is None and sweep.supports_resume(no_args)


def test_restart_plan(tmp_path):
    task, moved = tmp_path / "task_0", tmp_path / "preempted"
    argv = ["python", "x.py"]
    assert sweep.restart_plan(argv, str(task), True, str(moved)) == (argv, "")  # first start
    old, new = task / "h-m__x__0__1700000000", task / "h-m__x__0__1700000100"
    for d in (old, new):
        d.mkdir(parents=True)
    (new / "config.json").write_text("{}")
    plan, note = sweep.restart_plan(argv, str(task), True, str(moved))
    assert plan == argv + ["--resume", str(new)] and "resuming" in note
    assert sorted(os.listdir(moved)) == [old.name] and sorted(os.listdir(task)) == [new.name]
    (new / "final.pt").write_text("")
    assert sweep.restart_plan(argv, str(task), True, str(moved))[0] is None  # complete: nothing to run
    (new / "final.pt").unlink()
    assert sweep.restart_plan(argv, str(task), False, str(moved))[0] == argv  # cannot resume: start over
    assert os.listdir(task) == [] and sorted(os.listdir(moved)) == sorted([old.name, new.name])


# ---------------------------------------------------------------- the local runner


def py(code):
    return [sys.executable, "-c", code]


def test_run_local_summary_exit_status_and_logs(tmp_path):
    logs = tmp_path / "logs"
    jobs = [sweep.Job("task 0", py("import sys; print('first'); sys.exit(3)"), str(logs / "task_0.log"), "a"),
            sweep.Job("task 1", py("print('second')"), str(logs / "task_1.log"), "b"),
            sweep.Job("task 2", None, str(logs / "task_2.log"), "c", "complete: x")]
    err = io.StringIO()
    results = sweep.run_local(jobs, 1, str(tmp_path), sweep.child_environ(1, {}), status_every=0.05, out=err)
    assert [(r.status, r.returncode) for r in results] == [("failed", 3), ("ok", 0), ("complete", 0)]
    assert sweep.exit_status(results) == 1
    assert sweep.exit_status(results[1:]) == 0
    assert "first" in (logs / "task_0.log").read_text() and "second" in (logs / "task_1.log").read_text()
    assert (logs / "task_0.log").read_text().startswith("=== ")  # the header names the command
    assert not (logs / "task_2.log").exists()
    table = sweep.summary_table(results).splitlines()
    assert table[0].split() == ["job", "status", "exit", "time", "run", "log"]
    assert table[1].split()[:4] == ["task", "0", "failed", "3"] and table[1].endswith(str(logs / "task_0.log"))
    assert table[2].split()[:4] == ["task", "1", "ok", "0"]
    assert table[-1] == "3 runs: 1 failed, 1 ok, 1 complete"
    assert "FAILED task 0 (exit 3" in err.getvalue()
    assert "running 0 | done 2 | failed 1 | pending 0 | of 3" in err.getvalue().splitlines()[-1]


def test_run_local_status_line_while_running(tmp_path):
    err = io.StringIO()
    jobs = [sweep.Job(f"task {i}", py("import time; time.sleep(0.6)"), str(tmp_path / f"{i}.log")) for i in range(3)]
    sweep.run_local(jobs, 2, str(tmp_path), dict(os.environ), status_every=0.1, out=err)
    assert re.search(r"running 2 \| done 0 \| failed 0 \| pending 1 \| of 3 \| now: task 0, task 1", err.getvalue())


@pytest.mark.parametrize("workers", [1, 2])
def test_run_local_parallelism(tmp_path, workers):
    code = ("import sys, time; open(sys.argv[1], 'w').write(str(time.time())); time.sleep(0.8); "
            "open(sys.argv[2], 'w').write(str(time.time()))")
    jobs = [sweep.Job(f"task {i}", py(code) + [str(tmp_path / f"start{i}"), str(tmp_path / f"end{i}")],
                      str(tmp_path / f"{i}.log")) for i in range(2)]
    sweep.run_local(jobs, workers, str(tmp_path), dict(os.environ), status_every=10, out=io.StringIO())
    start1 = float((tmp_path / "start1").read_text())
    end0 = float((tmp_path / "end0").read_text())
    assert (start1 < end0) == (workers == 2)  # two at a time overlap; one at a time do not


def test_child_environ_omp_threads():
    assert sweep.child_environ(2, {}, cores=2)["OMP_NUM_THREADS"] == "1"
    assert sweep.child_environ(1, {}, cores=2)["OMP_NUM_THREADS"] == "2"
    assert sweep.child_environ(3, {}, cores=8)["OMP_NUM_THREADS"] == "2"
    assert sweep.child_environ(4, {}, cores=2)["OMP_NUM_THREADS"] == "1"
    assert sweep.child_environ(2, {"OMP_NUM_THREADS": "3"}, cores=2)["OMP_NUM_THREADS"] == "3"  # the user's


def test_local_sweep_end_to_end_and_restart(fake_root, tmp_path, capsys, monkeypatch):
    """Through main(): 8 runs on 2 workers, half failing; then the same sweep again, which skips
    the complete runs, resumes the resumable failed ones and restarts the others."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    sd = tmp_path / "sw"
    args = ["--root", str(fake_root), "--methods", "redq_adaptive_bc", "td3_bc", "--seeds", "0", "1",
            "--variant", "", "--variant=--fail", "--workers", "2", "--sweep-dir", str(sd), "--status-every", "0.2"]
    assert sweep.main(args) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[-2] == "8 runs: 4 ok, 4 failed"
    assert out.splitlines()[-1].endswith(f"python plot.py {sd}/runs/ --label-by fail")
    omp = str(max(1, sweep.available_cores() // 2))
    commands = (sd / "commands.txt").read_text().splitlines()
    assert len(commands) == 8
    for i, command in enumerate(commands):
        log = (sd / "logs" / f"task_{i}.log").read_text()
        assert f"omp: {omp}" in log
        assert json.loads(log.split("argv: ", 1)[1].splitlines()[0]) == shlex.split(command)[2:]
        assert len(os.listdir(sd / "runs" / f"task_{i}")) == 1
    failed = [i for i, c in enumerate(commands) if "--fail" in c]
    resumable = [i for i in failed if "redq_adaptive_bc.py" in commands[i]]
    assert len(failed) == 4 and len(resumable) == 2

    assert sweep.main(args) == 1  # again: td3_bc --fail starts over and fails again
    out = capsys.readouterr().out
    assert out.splitlines()[-2] == "8 runs: 4 complete, 2 ok, 2 failed"
    for i in failed:
        runs = os.listdir(sd / "runs" / f"task_{i}")
        assert len(runs) == 1
        log = (sd / "logs" / f"task_{i}.log").read_text()
        assert log.count("=== ") == 2  # one header per start, appended
        if i in resumable:
            assert f'"--resume", "{sd / "runs" / f"task_{i}" / runs[0]}"' in log
            assert (sd / "runs" / f"task_{i}" / runs[0] / "resumed.txt").exists()
        else:
            assert "--resume" not in log
            assert len(os.listdir(sd / "preempted" / f"task_{i}")) == 1  # the partial run, out of plot's way

    other = ["--root", str(fake_root), "--methods", "td3_bc", "--seeds", "0", "--sweep-dir", str(sd)]
    assert sweep.main(other) == 2  # other commands, same folder
    assert "holds a different sweep" in capsys.readouterr().err


def test_interrupted_sweep_stops_its_children(fake_root, tmp_path):
    sd = tmp_path / "sw"
    proc = subprocess.Popen([sys.executable, str(SWEEP), "--root", str(fake_root), "--methods", "td3_bc",
                             "--seeds", "0", "1", "2", "--workers", "2", "--sweep-dir", str(sd)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FAKE_SLEEP": "60"})
    task_dirs = [sd / "runs" / f"task_{i}" for i in range(2)]  # the two started first
    deadline = time.time() + 20
    while time.time() < deadline and not all(list(d.glob("*/pid")) for d in task_dirs):
        time.sleep(0.1)
    pids = [int(next(d.glob("*/pid")).read_text()) for d in task_dirs]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert [line.split()[2] for line in out.splitlines()[1:4]] == ["interrupted", "interrupted", "not"]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ---------------------------------------------------------------- Slurm


def test_slurm_script(fake_root, tmp_path, capsys):
    file, sd = tmp_path / "job" / "s.sbatch", tmp_path / "sw"
    file.parent.mkdir()
    assert sweep.main(["--root", str(fake_root), "--methods", "redq_adaptive_bc", "td3_bc", "--seeds", "0", "1",
                       "--sweep-dir", str(sd), "--slurm", str(file), "--partition", "gpu", "--time", "1-00:00:00",
                       "--cpus", "3", "--gpus", "1", "--mem", "8G", "--workers", "2",
                       "--sbatch-option=--account=proj"]) == 0
    text = file.read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for line in ["#SBATCH --array=0-3%2", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={sd}/logs/task_%a.log", "#SBATCH --cpus-per-task=3",
                 "#SBATCH --time=1-00:00:00", "#SBATCH --partition=gpu", "#SBATCH --gres=gpu:1",
                 "#SBATCH --mem=8G", "#SBATCH --account=proj",
                 "#   scripts that support --resume: redq_adaptive_bc.py",
                 "#   scripts that do not (a requeued run starts over): baselines/td3_bc.py"]:
        assert line in lines
    # every #SBATCH line comes before the first command, or sbatch ignores it
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < first_command
    commands = (tmp_path / "job" / "s.commands.txt").read_text().splitlines()
    assert commands == (sd / "commands.txt").read_text().splitlines()
    assert commands[0] == f"python redq_adaptive_bc.py --env hopper --dataset medium --seed 0 " \
                          f"--output-dir {sd}/runs/task_0"
    assert len(commands) == 4 and (sd / "logs").is_dir()
    assert subprocess.run(["bash", "-n", str(file)]).returncode == 0
    assert "sbatch " in capsys.readouterr().out


def run_task(file, i, **env):
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.run(["bash", str(file)], capture_output=True, text=True, timeout=60,
                          env={**base, "SLURM_ARRAY_TASK_ID": str(i), "SLURM_CPUS_PER_TASK": "3",
                               "PYTHON": sys.executable, **env})


def test_slurm_task_requeue_resumes_or_restarts(fake_root, tmp_path):
    """Runs the generated script with bash as Slurm would start task 0 (resumable script) and
    task 1 (not resumable): killed first, then requeued, then started once more."""
    file, sd = tmp_path / "s.sbatch", tmp_path / "sw"
    assert sweep.main(["--root", str(fake_root), "--methods", "redq_adaptive_bc", "td3_bc", "--seeds", "0",
                       "--sweep-dir", str(sd), "--slurm", str(file)]) == 0
    task0, task1 = sd / "runs" / "task_0", sd / "runs" / "task_1"

    first = run_task(file, 0, FAKE_PARTIAL="1")  # a run that stops before the end
    assert first.returncode == 1 and "omp: 3" in first.stdout
    (run0,) = task0.iterdir()
    assert not (run0 / "final.pt").exists()
    second = run_task(file, 0)  # requeued
    assert second.returncode == 0
    assert f"resuming {run0}" in second.stdout
    assert json.loads(second.stdout.split("argv: ")[1].splitlines()[0])[-2:] == ["--resume", str(run0)]
    assert list(task0.iterdir()) == [run0] and (run0 / "final.pt").exists() and (run0 / "resumed.txt").exists()
    third = run_task(file, 0)
    assert third.returncode == 0 and "is complete, nothing to do" in third.stdout and "argv:" not in third.stdout

    assert run_task(file, 1, FAKE_PARTIAL="1").returncode == 1
    (partial,) = task1.iterdir()
    again = run_task(file, 1)
    assert again.returncode == 0 and "--resume" not in again.stdout.split("argv: ")[1]
    assert [p.name for p in (sd / "preempted" / "task_1").iterdir()] == [partial.name]
    (fresh,) = task1.iterdir()
    assert (fresh / "final.pt").exists()

    missing = run_task(file, 5)
    assert missing.returncode == 2 and "has no line 6" in missing.stderr
