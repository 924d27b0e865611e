"""scripts/sweep.py: the figures' recipes, flags passed through (and a bad one's exit status 2 stopping
the sweep), pre-training once (--online-steps 0) per set of pre-training flags, then every variant fine-tuning
from it, locally and on Slurm (the generated files, run with bash as Slurm would, with stand-ins for sbatch and
scontrol), resume, and an interrupted sweep. Nothing here trains: a stub script writes run folders as the
training scripts do."""

import dataclasses
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

import sweep

SWEEP = ROOT / "scripts" / "sweep.py"

# A training script's outside: rejects unknown flags with exit 2 before any work, and so does --load-offline
# given another --hidden-dim than its pre-training's (as the scripts' NETWORK_KEYS); writes
# <output-dir>/<env>-<dataset>__<name>__<seed>__<time>/ with config.json, then offline.pt, final.pt and actor.pt
# (removing latest.pt; STUB_DIE_IN_FINISH: SIGKILLed after final.pt);
# --resume RUN continues RUN; SIGTERM/SIGUSR1 save latest.pt and exit 128 + signal. It appends its
# argv and start/end times to <run>/calls.jsonl. STUB_SLEEP: seconds to run.
STUB = r"""
import json, os, signal, sys, time
start, argv, got = time.time(), sys.argv[1:], []
known = {"--env", "--dataset", "--seed", "--output-dir", "--resume", "--load-offline", "--steps", "--utd", "--fail",
         "--online-steps", "--hidden-dim"}
bad = [a for a in argv if a.startswith("--") and a not in known]
if bad:
    print(f"error: unknown flag {bad[0]}", file=sys.stderr)
    sys.exit(2)
opts = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
if "--load-offline" in opts:
    pre = json.load(open(os.path.join(os.path.dirname(opts["--load-offline"]), "config.json")))
    pre = {pre[i]: pre[i + 1] for i in range(len(pre) - 1) if pre[i].startswith("--")}
    if opts.get("--hidden-dim", pre.get("--hidden-dim")) != pre.get("--hidden-dim"):
        print("error: --load-offline: pre-trained with another --hidden-dim", file=sys.stderr)
        sys.exit(2)
time.sleep(float(os.environ.get("STUB_START_DELAY", "0")))  # imports, dataset loading: no run folder yet
if "--resume" in opts:
    run = opts["--resume"]
else:
    name = os.path.basename(__file__)[:-3]
    folder = f"{opts['--env']}-{opts['--dataset']}__{name}__{opts['--seed']}__{int(start)}"
    run = os.path.join(opts["--output-dir"], folder)
    os.makedirs(run)
    json.dump(argv, open(os.path.join(run, "config.json"), "w"))
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, lambda signum, frame: got.append(signum))
open(os.path.join(run, "pid"), "w").write(str(os.getpid()))
while time.time() < start + float(os.environ.get("STUB_SLEEP", "0")) and not got:
    time.sleep(0.01)
with open(os.path.join(run, "calls.jsonl"), "a") as f:
    f.write(json.dumps({"argv": argv, "start": start, "end": time.time(), "signals": got}) + "\n")
if got:
    open(os.path.join(run, "latest.pt"), "w").write("state")
    sys.exit(128 + got[0])
if "--fail" in argv:
    sys.exit(1)
open(os.path.join(run, "offline.pt"), "w").write("agent")
open(os.path.join(run, "final.pt"), "w").write("done")
if "STUB_DIE_IN_FINISH" in os.environ:  # killed between final.pt and actor.pt, as RunFolder.finish could be
    os.kill(os.getpid(), signal.SIGKILL)
open(os.path.join(run, "actor.pt"), "w").write("policy")
if os.path.exists(os.path.join(run, "latest.pt")):
    os.remove(os.path.join(run, "latest.pt"))
"""


@pytest.fixture
def stub(tmp_path):
    path = tmp_path / "my_method.py"
    path.write_text(STUB)
    return path


def calls(task_dir):
    """[(run folder, call)] of every stub call in a task folder."""
    return [
        (run, json.loads(line))
        for run in sorted(Path(task_dir).glob("*__*"))
        if (run / "calls.jsonl").exists()
        for line in (run / "calls.jsonl").read_text().splitlines()
    ]


def runs_of(*args):
    return sweep.build(sweep.parse_args([*args, "--sweep-dir", "/tmp/sweep-test-unused"]))[2]


def option(argv, flag):
    return argv[argv.index(flag) + 1] if flag in argv else None


# ---------------------------------------------------------------- the figures


def pre_trainings(runs):
    return {r.after for r in runs} - {None}


@pytest.mark.parametrize(
    "n,total,pre,fine,whole",
    [(1, 80, 20, 60, 60), (2, 615, 180, 360, 435), (3, 360, 60, 300, 300), (4, 45, 15, 30, 30), (5, 100, 40, 60, 60)],
)
def test_figure_run_counts(n, total, pre, fine, whole):
    runs = runs_of("--figure", str(n))
    assert (len(runs), len(pre_trainings(runs)), sum(r.after is not None for r in runs)) == (total, pre, fine)
    assert [r.argv[-1] if r.after is None else r.argv[-3] for r in runs] == [
        f"/tmp/sweep-test-unused/runs/task_{i}" for i in range(total)
    ]
    assert len(runs_of("--figure", str(n), "--no-pretrain-once")) == whole
    assert not any(
        {"--load-offline", "--online-steps"} & set(r.argv) for r in runs_of("--figure", str(n), "--no-pretrain-once")
    )


def test_figure_variants_all_fine_tune_their_group_s_pre_training():
    """A pre-training is the script, env, dataset and seed with its group's pre-training flags and --online-steps 0;
    every variant of a pre-trained figure group, the default one included, fine-tunes the pre-training of the same
    method, env, dataset and seed: Fig. 5's M = 10 shares the default's, N = M = 2 has its own."""
    alphas = [["--no-adaptive-bc", "--alpha-online", a] for a in ("0.0", "0.1", "0.2", "0.3")]
    expected = {
        1: {(): [["--alpha-online", a] for a in ("0.0", "0.1", "0.3")]},
        3: {(): [[], *alphas]},
        4: {(): [["--keep-ratio", "1.0"], ["--keep-ratio", "0.05"]]},
        2: {(): [[], ["--utd", "20"]]},
        5: {
            (): [[], ["--num-min-critics", "10"]],
            ("--num-critics", "2"): [["--num-critics", "2", "--num-min-critics", "2"]],
        },
    }
    for n, groups in expected.items():
        runs = runs_of("--figure", str(n))
        for p in pre_trainings(runs):
            pre, tunes = runs[p], [r for r in runs if r.after == p]
            assert pre.after is None
            assert pre.argv[-4:-2] == ["--online-steps", "0"]
            assert [r.argv[8:-4] for r in tunes] == groups[tuple(pre.argv[8:-4])]
            for r in tunes:
                assert option(r.argv, "--load-offline") == option(pre.argv, "--output-dir")
                assert r.index > p
                assert r.argv[1:8] == pre.argv[1:8]  # script, env, dataset, seed
        whole = [r for r in runs if r.after is None and r.index not in pre_trainings(runs)]
        assert {r.argv[1] for r in whole} <= ({"redq_adaptive_bc.py", "baselines/redq.py"} if n == 2 else set())
    assert not any("--min-over-all-offline" in r.argv for r in runs_of("--figure", "5"))  # the authors' scope


def test_pre_training_flags_group_variants_and_online_steps_0_wins():
    """A variant's PRETRAINING flags (here --hidden-dim, --no-delay-target-updates) choose its pre-training, which
    gets every run's flags, --online-steps (even as --online-steps=60) left out, then --online-steps 0; the
    fine-tunes get everything. REDQ from scratch has no offline phase: its variants run whole."""
    variants = [[], ["--alpha-online", "0.1"], ["--hidden-dim", "8", "--utd", "2"], ["--no-delay-target-updates"]]
    runs = runs_of(
        "--methods",
        "td3_bc",
        "--seeds",
        "0",
        "--pretrain-once",
        "--extra=--online-steps=60 --batch-size 32",
        "--extra-for",
        "td3_bc",
        "--eval-every 20",
        *(f"--variant={shlex.join(v)}" for v in variants),
    )
    common = ["--batch-size", "32", "--eval-every", "20"]
    assert [r.argv[8:-2] for r in runs if r.after is None] == [
        [*common, *flags, "--online-steps", "0"] for flags in ([], variants[2][:2], variants[3])
    ]
    tunes = [r for r in runs if r.after is not None]
    assert [r.after for r in tunes] == [0, 0, 1, 2]
    assert [r.argv[8:-4] for r in tunes] == [["--online-steps=60", *common, *flags] for flags in variants]
    assert not any(
        {"--load-offline", "--online-steps"} & set(r.argv)
        for r in runs_of("--methods", "redq", "--pretrain-once", "--variant", "", "--variant", "--utd 5")
    )


def test_figure_2_scratch_once_per_env_and_seed_and_g_matched_rows():
    runs = runs_of("--figure", "2")
    scratch = [(option(r.argv, "--env"), option(r.argv, "--seed")) for r in runs if "baselines/redq.py" in r.argv]
    assert sorted(scratch) == sorted({(e, str(s)) for e in sweep.PAPER_ENVS for s in range(5)})  # 15, no duplicate
    assert {option(r.argv, "--dataset") for r in runs if "baselines/redq.py" in r.argv} == {"scratch"}
    for script in ("baselines/td3_bc.py", "baselines/awac.py", "baselines/balanced_replay.py"):
        rows = [r for r in runs if script in r.argv]  # a pre-training, then G = 1 and G = 20 fine-tunes
        assert len(rows) == 3 * 60
        assert sum(option(r.argv, "--utd") == "20" for r in rows) == 60
        assert sum(option(r.argv, "--online-steps") == "0" for r in rows) == 60
    assert not any(
        {"--utd", "--online-steps", "--load-offline"} & set(r.argv) for r in runs if "redq_adaptive_bc.py" in r.argv
    )  # the method's runs are whole
    assert len([r for r in runs if "redq_adaptive_bc.py" in r.argv]) == 60


def test_figure_flags_are_the_scripts_own():
    """Each figure's command shapes parse with their script's own tyro Args: a typo in FIGURES fails here, not
    in a cluster's queue (the sweep itself leaves flags to the scripts)."""
    import tyro

    modules = {}
    for n in sweep.FIGURES:
        runs = runs_of("--figure", str(n), "--seeds", "0", "--envs", "hopper", "--datasets", "medium")
        for r in runs:
            if r.argv[1] not in modules:
                spec_ = importlib.util.spec_from_file_location(f"sweep_check_{Path(r.argv[1]).stem}", ROOT / r.argv[1])
                modules[r.argv[1]] = sys.modules[spec_.name] = importlib.util.module_from_spec(spec_)
                spec_.loader.exec_module(modules[r.argv[1]])
            parsed = tyro.cli(modules[r.argv[1]].Args, args=r.argv[2:])
            assert (parsed.env, parsed.seed, parsed.load_offline is None) == ("hopper", 0, r.after is None)
            assert (parsed.online_steps == 0) == (r.index in pre_trainings(runs))
    assert len(modules) == 5


def test_dry_run_writes_nothing(tmp_path, capsys):
    assert sweep.main(["--figure", "4", "--seeds", "0", "--dry-run", "--sweep-dir", str(tmp_path / "sw")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len([line for line in lines if line.startswith("python ")]) == 9
    assert not (tmp_path / "sw").exists()
    assert lines[-1].endswith(
        f"python plot.py {tmp_path}/sw/runs/ --methods td3_bc --datasets random --label-by keep_ratio --out plots/fig4"
    )


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--methods", "sac"], "method 'sac': no such script"),
        (["--figure", "6"], "invalid choice: 6"),
        (["--figure", "1", "--methods", "awac"], "Figure 1 has no method 'awac'"),
        (["--figure", "1", "--variant", "--utd 2"], "--variant cannot be combined with --figure"),
        (["--methods", "td3_bc", "--extra", "--seed 3"], "'--seed' is not a flag, or is one the sweep sets"),
        (["--methods", "td3_bc", "--extra-for", "awac", "--utd 2"], "'awac' is not a method of this sweep"),
        (["--methods", "td3_bc", "--workers", "0"], "--workers and --cpus must be positive"),
    ],
)
def test_bad_sweep_input_is_one_line_exit_2(args, needle):
    result = subprocess.run([sys.executable, str(SWEEP), *args, "--dry-run"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert needle in result.stderr, result.stderr


def test_a_bare_flag_is_a_variant_in_the_documented_form():
    """issue 20: `--variant "--no-adaptive-bc"` reaches argparse as --variant --no-adaptive-bc, which it took for
    an option ("expected one argument"). The value after --variant, --extra and --extra-for METHOD is a value."""
    runs = runs_of(
        *("--methods", "redq_adaptive_bc", "--seeds", "0", "--variant", "--no-adaptive-bc", "--variant", ""),
        *("--extra", "--online-steps=9", "--extra-for", "redq_adaptive_bc", "--authors-code"),
    )
    assert [r.argv[8:-2] for r in runs] == [
        ["--online-steps=9", "--authors-code", "--no-adaptive-bc"],
        ["--online-steps=9", "--authors-code"],
    ], "each variant's bare flag after --extra's and --extra-for's"


def test_the_help_s_examples_run(tmp_path, capsys):
    examples = [
        shlex.split(line.split(";")[0])[2:] for line in sweep.__doc__.splitlines() if "python scripts/sweep" in line
    ]
    assert len(examples) == 3, "the docstring's examples"
    for example in examples:
        code = sweep.main([*example, "--dry-run", "--sweep-dir", str(tmp_path / "sw")])
        assert code == 0, f"{shlex.join(example)}: {capsys.readouterr().err}"
    assert "--no-adaptive-bc" in capsys.readouterr().out, "the bare-flag variant reaches the commands"


def test_a_sweep_s_default_folder_is_outside_runs():
    # plot.py runs/ would find a sweep's seeds next to the user's own runs (issue 20): seed 0 twice, exit 2.
    name, folder, _, plot = sweep.build(sweep.parse_args(["--methods", "td3_bc"]))
    assert folder.parent == ROOT / "sweeps", f"{folder} is in sweeps/"
    assert plot.startswith(f"python plot.py sweeps/{folder.name}/runs/"), "its plot command reads it there"


@pytest.mark.parametrize("method", sorted(sweep.METHODS))
def test_pretraining_knows_every_flag_load_offline_takes_over(method):
    """PRETRAINING is written by hand; a script that gains a network or dataset flag (NETWORK_KEYS, DATASET_KEYS,
    what plumbing.run_folder.load_pretrained takes over) must be named there, or its variants would all fine-tune
    one pre-training built with the default value."""
    from plumbing.run_folder import DATASET_KEYS

    source = (ROOT / sweep.METHODS[method]).read_text()
    spec_ = importlib.util.spec_from_file_location(f"pretraining_check_{method}", ROOT / sweep.METHODS[method])
    module = sys.modules[spec_.name] = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    taken_over = [*DATASET_KEYS, *getattr(module, "NETWORK_KEYS", []), "offline_steps"]
    unknown = [k for k in taken_over if k not in ("env", "dataset") and k.replace("_", "-") not in sweep.PRETRAINING]
    assert unknown == [], f"{method}: add {unknown} to scripts/sweep.py's PRETRAINING"
    assert "load_pretrained(" in source or "NETWORK_KEYS" not in source, "NETWORK_KEYS reach load_pretrained"


def test_pretraining_names_only_flags_some_script_has():
    fields = set()
    for method, path in sweep.METHODS.items():
        spec_ = importlib.util.spec_from_file_location(f"pretraining_fields_{method}", ROOT / path)
        module = sys.modules[spec_.name] = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(module)
        fields |= {f.name.replace("_", "-") for f in dataclasses.fields(module.Args)}
    assert sweep.PRETRAINING - fields == set(), "a flag no script has any more (renamed?)"


# ---------------------------------------------------------------- local runs


def test_flags_pass_through_a_method_by_path_and_resume(stub, tmp_path, capsys):
    sd = tmp_path / "sw"
    args = [
        "--methods",
        str(stub),
        "--seeds",
        "0",
        "--variant",
        "",
        "--variant=--fail",
        "--extra",
        "--steps 5",
        "--extra-for",
        "my_method",
        "--utd 3",
        "--sweep-dir",
        str(sd),
        "--status-every",
        "0.1",
    ]
    assert sweep.main(args) == 1
    assert capsys.readouterr().out.splitlines()[-2] == "2 runs: 1 ok, 1 failed"
    ((run0, call0),) = calls(sd / "runs" / "task_0")
    assert call0["argv"] == [
        "--env",
        "hopper",
        "--dataset",
        "medium",
        "--seed",
        "0",
        "--steps",
        "5",
        "--utd",
        "3",
        "--output-dir",
        f"{sd}/runs/task_0",
    ]
    assert run0.name.startswith("hopper-medium__my_method__0__")
    assert sweep.main(args) == 0  # again: task 0 is complete, task 1 resumes its unfinished run
    assert capsys.readouterr().out.splitlines()[-2] == "2 runs: 1 complete, 1 ok"
    (run1, first), (_, second) = calls(sd / "runs" / "task_1")
    assert "--fail" in first["argv"]
    assert second["argv"] == ["--resume", str(run1)]
    assert len(calls(sd / "runs" / "task_0")) == 1


def test_a_bad_flag_fails_the_first_run_with_exit_2_and_stops_the_sweep(stub, tmp_path, capsys):
    sd = tmp_path / "sw"
    code = sweep.main(
        ["--methods", str(stub), "--seeds", "0", "1", "2", "--extra", "--bogus 1", "--sweep-dir", str(sd)]
    )
    out, err = capsys.readouterr()
    assert code == 2
    assert out.splitlines()[-2] == "3 runs: 1 failed, 2 not started"
    assert "FAILED task 0 (exit 2): error: unknown flag --bogus" in err
    assert not (sd / "logs" / "task_1.log").exists()


def test_pre_train_once_locally(stub, tmp_path, capsys, monkeypatch):
    """One pre-train-only run (--online-steps 0 wins over --extra's) per env and set of pre-training flags, then
    every variant fine-tunes it: each starts after its pre-training has finished and gets that run's offline.pt,
    with the same --hidden-dim (the stub, as the scripts, exits 2 otherwise). A failed pre-training skips its
    fine-tunes."""
    monkeypatch.setenv("STUB_SLEEP", "0.3")
    sd = tmp_path / "sw"
    args = [
        "--methods",
        str(stub),
        "--envs",
        "hopper",
        "walker2d",
        "--seeds",
        "0",
        "--variant",
        "",
        "--variant",
        "--utd 20",
        "--variant",
        "--hidden-dim 8 --utd 5",
        "--extra",
        "--online-steps 7",
        "--pretrain-once",
        "--workers",
        "4",
        "--sweep-dir",
        str(sd),
    ]
    assert sweep.main(args) == 0
    commands = (sd / "commands.txt").read_text().splitlines()
    assert [c.split("--load-offline ")[-1] if "--load-offline" in c else None for c in commands] == [None] * 4 + [
        f"{sd}/runs/task_{j}" for j in (0, 0, 1, 2, 2, 3)
    ]
    for pre, hidden in [(0, None), (1, "8"), (2, None), (3, "8")]:
        ((_, call),) = calls(sd / "runs" / f"task_{pre}")
        assert call["argv"].count("--online-steps") == 1
        assert option(call["argv"], "--online-steps") == "0"
        assert option(call["argv"], "--hidden-dim") == hidden
        assert "--utd" not in call["argv"]
    for i, pre, utd in [(4, 0, None), (5, 0, "20"), (6, 1, "5"), (7, 2, None), (8, 2, "20"), (9, 3, "5")]:
        ((pre_run, pre_call),) = calls(sd / "runs" / f"task_{pre}")
        ((_, call),) = calls(sd / "runs" / f"task_{i}")
        assert call["start"] >= pre_call["end"]
        assert option(call["argv"], "--load-offline") == str(pre_run / "offline.pt")
        assert (option(call["argv"], "--online-steps"), option(call["argv"], "--utd")) == ("7", utd)
    default_run = calls(sd / "runs" / "task_0")[0][0]
    mixed = subprocess.run(
        [
            sys.executable,
            str(stub),
            "--env",
            "hopper",
            "--dataset",
            "medium",
            "--seed",
            "0",
            "--hidden-dim",
            "8",
            "--load-offline",
            str(default_run / "offline.pt"),
            "--output-dir",
            str(tmp_path / "mixed"),
        ],
        capture_output=True,
        text=True,
    )
    assert mixed.returncode == 2
    assert "another --hidden-dim" in mixed.stderr  # what a wrong grouping would meet
    capsys.readouterr()
    assert sweep.main(args) == 0
    assert capsys.readouterr().out.splitlines()[-2] == "10 runs: 10 complete"

    monkeypatch.setenv("STUB_SLEEP", "0")
    failing = [
        "--methods",
        str(stub),
        "--seeds",
        "0",
        "--extra=--fail",
        "--variant",
        "",
        "--variant",
        "--utd 20",
        "--pretrain-once",
        "--sweep-dir",
        str(tmp_path / "sw2"),
    ]
    assert sweep.main(failing) == 1
    assert capsys.readouterr().out.splitlines()[-2] == "3 runs: 1 failed, 2 skipped"


def test_interrupted_sweep_stops_its_runs_with_sigterm(stub, tmp_path):
    sd = tmp_path / "sw"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(SWEEP),
            "--methods",
            str(stub),
            "--seeds",
            "0",
            "1",
            "2",
            "--workers",
            "2",
            "--sweep-dir",
            str(sd),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "STUB_SLEEP": "60"},
    )
    deadline = time.time() + 30
    while time.time() < deadline and len(list(sd.glob("runs/task_*/*/pid"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert out.splitlines()[-2] == "3 runs: 2 interrupted, 1 not started"
    assert len(list(sd.glob("runs/task_*/*/latest.pt"))) == 2  # the runs saved their state


def test_a_run_killed_inside_its_finish_is_resumed_not_counted_complete(stub, tmp_path, capsys, monkeypatch):
    """A run SIGKILLed between final.pt and actor.pt (RunFolder.finish) is not complete: started again, the sweep
    gives it --resume, which writes actor.pt (plumbing.run_folder.complete_finish); then it is complete."""
    sd = tmp_path / "sw"
    args = ["--methods", str(stub), "--seeds", "0", "--sweep-dir", str(sd), "--status-every", "0.1"]
    monkeypatch.setenv("STUB_DIE_IN_FINISH", "1")
    assert sweep.main(args) == 1
    ((run, first),) = calls(sd / "runs" / "task_0")
    assert (run / "final.pt").exists() and not (run / "actor.pt").exists(), "the stub died inside its finish"
    monkeypatch.delenv("STUB_DIE_IN_FINISH")
    capsys.readouterr()
    assert sweep.main(args) == 0
    assert capsys.readouterr().out.splitlines()[-2] == "1 runs: 1 ok", "run again, not counted complete"
    assert calls(sd / "runs" / "task_0")[-1][1]["argv"] == ["--resume", str(run)]
    assert (run / "actor.pt").exists()
    assert sweep.main(args) == 0
    assert capsys.readouterr().out.splitlines()[-2] == "1 runs: 1 complete", "finished now"


def test_a_sweep_killed_and_started_again_runs_no_task_twice(stub, tmp_path):
    """issue 17: a sweep killed with SIGKILL leaves its runs alive (they run in their own sessions); started again
    while a run is still starting (no run folder yet), it must wait for that run, not start the task a second time."""
    sd = tmp_path / "sw"
    argv = [sys.executable, str(SWEEP), "--methods", str(stub), "--seeds", "0", "--sweep-dir", str(sd)]
    env = {**os.environ, "STUB_START_DELAY": "3"}
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    claim, deadline = sd / "logs" / "task_0.lock", time.time() + 30
    while time.time() < deadline and not (claim.exists() and claim.read_text()):
        time.sleep(0.02)
    first.kill()  # SIGKILL: no handler runs, the run it started lives on
    first.wait(timeout=10)
    run_pid = int(claim.read_text())
    assert not list((sd / "runs" / "task_0").glob("*__*")), "killed while its run was starting (no run folder)"
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert f"task 0 is running in pid {run_pid} (an earlier start's): waiting" in again.stderr, "says why it waits"
    assert again.stdout.splitlines()[-2] == "1 runs: 1 complete", "and finds the run complete once it ends"
    assert len(calls(sd / "runs" / "task_0")) == 1, "the task ran once"


def test_child_environ_omp_threads():
    assert sweep.child_environ(2, {}, cores=2)["OMP_NUM_THREADS"] == "1"
    assert sweep.child_environ(3, {}, cores=8)["OMP_NUM_THREADS"] == "2"
    assert sweep.child_environ(2, {"OMP_NUM_THREADS": "3"}, cores=2)["OMP_NUM_THREADS"] == "3"  # the user's


# ---------------------------------------------------------------- Slurm


@pytest.fixture
def slurm_sweep(stub, tmp_path, monkeypatch):
    """A two-stage sweep written for Slurm (per env and seed, a pre-training fine-tuned twice, and a --hidden-dim 8
    pre-training fine-tuned once), and a bin/ folder with stand-ins for sbatch (prints job id 77) and scontrol,
    which log their arguments to slurm.log."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari data"))
    sd, file = tmp_path / "sw", tmp_path / "job" / "fig.sbatch"
    file.parent.mkdir()
    assert (
        sweep.main(
            [
                "--methods",
                str(stub),
                "--envs",
                "hopper",
                "walker2d",
                "--seeds",
                "0",
                "1",
                "--variant",
                "",
                "--variant",
                "--utd 20",
                "--variant",
                "--hidden-dim 8",
                "--pretrain-once",
                "--sweep-dir",
                str(sd),
                "--slurm",
                str(file),
                "--setup",
                "echo setup-ran",
                "--gpus",
                "1",
                "--time",
                "1:00:00",
                "--workers",
                "3",
            ]
        )
        == 0
    )
    (tmp_path / "bin").mkdir()
    for tool, reply in (("sbatch", "echo 77"), ("scontrol", "")):
        (tmp_path / "bin" / tool).write_text(f'#!/bin/bash\necho "{tool} $*" >> {tmp_path}/slurm.log\n{reply}\n')
        (tmp_path / "bin" / tool).chmod(0o755)
    return sd, file, tmp_path


def stub_of(sd):
    return (sd / "commands.txt").read_text().split()[1]


def task_env(tmp_path, task, slot=None, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "STUB_SLEEP")}
    env.update(
        PATH=f"{tmp_path}/bin:{env['PATH']}",
        SLURM_ARRAY_JOB_ID="77",
        SLURM_ARRAY_TASK_ID=str(task),
        SLURM_CPUS_PER_TASK="3",
        **extra,
    )
    return {**env, "SWEEP_SLOT": str(slot)} if slot is not None else env


SLOT_ARRAYS = ["0-3,10-13%3", "0,2,10,12%3"]  # slot 0: every pre-training; slot 1: those with a second fine-tune


def test_slurm_files(slurm_sweep):
    sd, file, tmp_path = slurm_sweep
    lines = file.read_text().splitlines()
    for line in [
        "#SBATCH --array=0-3,10-13%3",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --time=1:00:00",
        "echo setup-ran",
        f"PYTHON=${{PYTHON:-{sys.executable}}}",
        f"export MINARI_DATASETS_PATH='{tmp_path}/minari data'",
    ]:
        assert line in lines
    assert any(line.startswith("export ") and "HF_HUB_OFFLINE=1" in line for line in lines)
    assert "trap 'forward USR1' USR1" in file.read_text()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < first_command
    submit = (tmp_path / "job" / "fig.submit.sh").read_text()
    assert f"first=$(sbatch --parsable {file})" in submit
    for k, array in enumerate(SLOT_ARRAYS):
        assert (
            f"sbatch --dependency=aftercorr:$first --kill-on-invalid-dep=yes --job-name=sweep-ft{k} "
            f"--array={array} --export=ALL,SWEEP_SLOT={k} {file}"
        ) in submit
    for script in (file, tmp_path / "job" / "fig.submit.sh"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert (
        subprocess.run(
            ["bash", str(tmp_path / "job" / "fig.submit.sh")], env=task_env(tmp_path, 0), capture_output=True
        ).returncode
        == 0
    )
    assert (tmp_path / "slurm.log").read_text().splitlines() == [f"sbatch --parsable {file}"] + [
        f"sbatch --dependency=aftercorr:77 --kill-on-invalid-dep=yes --job-name=sweep-ft{k} --array={array} "
        f"--export=ALL,SWEEP_SLOT={k} {file}"
        for k, array in enumerate(SLOT_ARRAYS)
    ]


def test_slurm_tasks_fine_tune_requeue_and_resume(slurm_sweep):
    """Runs the sbatch script with bash as Slurm would. Seed 0: tasks 0-3 pre-train (hopper, hopper --hidden-dim 8,
    walker2d, walker2d --hidden-dim 8), 4-9 fine-tune (task 2's are 7 and 8, task 3's is 9). Pre-training task 2,
    its second fine-tune (slot 1); task 3 and its only one (slot 0); then task 10 (seed 1's first pre-training) gets
    SIGUSR1 as at the time limit, requeues itself, and resumes."""
    sd, file, tmp_path = slurm_sweep
    assert subprocess.run(["bash", str(file)], env=task_env(tmp_path, 2), timeout=60).returncode == 0
    ((pre_run, pre_call),) = calls(sd / "runs" / "task_2")
    assert option(pre_call["argv"], "--online-steps") == "0"
    assert "--hidden-dim" not in pre_call["argv"]
    log = (sd / "logs" / "task_2.log").read_text().splitlines()  # the task's own log, as a local sweep writes
    assert log[0].startswith("=== ")
    assert log[-1].startswith(f"+ {sys.executable} {stub_of(sd)} --env walker2d")
    assert subprocess.run(["bash", str(file)], env=task_env(tmp_path, 2, slot=1), timeout=60).returncode == 0
    ((_, call),) = calls(sd / "runs" / "task_8")
    assert option(call["argv"], "--utd") == "20"
    assert option(call["argv"], "--load-offline") == str(pre_run / "offline.pt")
    assert subprocess.run(["bash", str(file)], env=task_env(tmp_path, 2, slot=2), capture_output=True).returncode == 2
    assert subprocess.run(["bash", str(file)], env=task_env(tmp_path, 3), timeout=60).returncode == 0
    assert subprocess.run(["bash", str(file)], env=task_env(tmp_path, 3, slot=0), timeout=60).returncode == 0
    ((_, call),) = calls(sd / "runs" / "task_9")
    assert option(call["argv"], "--hidden-dim") == "8"
    assert "/task_3/" in option(call["argv"], "--load-offline")
    assert subprocess.run(["bash", str(file)], env=task_env(tmp_path, 3, slot=1), capture_output=True).returncode == 2

    task = subprocess.Popen(["bash", str(file)], env=task_env(tmp_path, 10, STUB_SLEEP="60"))
    deadline = time.time() + 30
    while time.time() < deadline and not list(sd.glob("runs/task_10/*/pid")):
        time.sleep(0.05)
    task.send_signal(signal.SIGUSR1)  # --signal=B:USR1 signals the batch shell only
    assert task.wait(timeout=30) == 128 + signal.SIGUSR1
    ((run, call),) = calls(sd / "runs" / "task_10")
    assert call["signals"] == [signal.SIGUSR1]
    assert (run / "latest.pt").exists()
    assert (tmp_path / "slurm.log").read_text().splitlines()[-1] == "scontrol requeue 77_10"
    assert subprocess.run(["bash", str(file)], env=task_env(tmp_path, 10), timeout=60).returncode == 0  # requeued
    assert calls(sd / "runs" / "task_10")[-1][1]["argv"] == ["--resume", str(run)]
    assert (run / "final.pt").exists()
    again = subprocess.run(["bash", str(file)], env=task_env(tmp_path, 10), timeout=60)
    assert again.returncode == 0
    assert "complete: " in (sd / "logs" / "task_10.log").read_text()
