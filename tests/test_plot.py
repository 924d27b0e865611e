"""plot.py: table numbers worked out by hand, honest alignment, and the command line end to end.

The fake runs (all on hopper, every number chosen so the arithmetic is easy by hand):

  hopper-medium, redq_adaptive_bc, 3 seeds (online steps and lengths differ):
    seed 0: offline 20, 45        online (0,50) (100,30) (200,60) (300,70) (1000,80)
    seed 1: offline 10, 55        online (0,55) (150,25) (200,45) (400,65) (800,75)
    seed 2: offline 50            online (0,50) (50,20) (100,40) (600,90) + a cut last line "700,9"
            (its folder name says "adaptive": config.json must win)
  hopper-medium, td3_bc, 2 seeds (no alpha logged):
    seed 0: offline 40            online (0,40) (250,50) (500,60)
    seed 1: offline 30            online (0,30) (250,20) (500,40) (750,50)   no config.json
  hopper-random, redq (from scratch, online rows only):
    seed 0: online (0,5) (100,10) (200,15)
    seed 1: online (0,7) (100,9)
  return_mean is always 10 x normalized_score.
  Broken: non-numeric step, zero-byte progress.csv, header only, offline rows only,
  config.json without progress.csv. Each must be skipped with one line on stderr.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

import plot

HEADER = (
    "phase,step,normalized_score,normalized_score_std,return_mean,alpha,critic_loss,"
    "actor_loss,q_mean,updates_per_s,env_steps_per_s,wall_s"
)


def row(phase, step, score, alpha=None, extra=False):
    a = "" if alpha is None else f"{alpha:g}"
    line = f"{phase},{step},{score},1.5,{score * 10},{a},0.1,-1.0,3.0,80.0,500.0,12.0"
    return line + (",0.05" if extra else "")


def write_run(
    root,
    name,
    offline=(),
    online=(),
    method=None,
    seed=0,
    dataset="medium",
    alpha=False,
    tail="",
    config=True,
    text=None,
):
    """A run folder like the scripts write. alpha=True logs alpha (0.4 offline, decaying online)
    and an extra method-specific column after the standard ones."""
    folder = root / name
    folder.mkdir(parents=True)
    if config:
        (folder / "config.json").write_text(
            f'{{"method": "{method}", "env": "hopper", "dataset": "{dataset}", "seed": {seed}, '
            f'"offline_steps": 1000, "utd": 20}}'
        )
    if text is None:
        lines = [HEADER + (",bc_loss" if alpha else "")]
        lines += [row("offline", s, v, 0.4 if alpha else None, alpha) for s, v in offline]
        lines += [row("online", s, v, 0.4 - s / 10000 if alpha else None, alpha) for s, v in online]
        text = "\n".join(lines) + "\n" + tail
    if text is not False:
        (folder / "progress.csv").write_text(text)
    return folder


BROKEN = {  # folder name -> piece of the reason it must be skipped for
    "hopper-medium__td3_bc__7__1700000007": "not a number",
    "hopper-medium__td3_bc__8__1700000008": "empty",
    "hopper-medium__td3_bc__9__1700000009": "no rows",
    "hopper-medium__redq_adaptive_bc__5__1700000005": "no online rows",
    "hopper-medium__redq_adaptive_bc__6__1700000006": "no progress.csv",
}


@pytest.fixture
def runs_dir(tmp_path):
    root = tmp_path / "runs"
    a = dict(method="redq_adaptive_bc", alpha=True)
    write_run(
        root,
        "hopper-medium__redq_adaptive_bc__0__1700000000",
        [(0, 20), (500, 45)],
        [(0, 50), (100, 30), (200, 60), (300, 70), (1000, 80)],
        seed=0,
        **a,
    )
    write_run(
        root,
        "hopper-medium__redq_adaptive_bc__1__1700000001",
        [(0, 10), (500, 55)],
        [(0, 55), (150, 25), (200, 45), (400, 65), (800, 75)],
        seed=1,
        **a,
    )
    write_run(
        root,
        "hopper-medium__adaptive__2__1700000002",
        [(500, 50)],
        [(0, 50), (50, 20), (100, 40), (600, 90)],
        seed=2,
        tail="online,700,9",
        **a,
    )
    write_run(
        root,
        "hopper-medium__td3_bc__0__1700000010",
        [(1000, 40)],
        [(0, 40), (250, 50), (500, 60)],
        method="td3_bc",
        seed=0,
    )
    write_run(
        root,
        "hopper-medium__td3_bc__1__1700000011",
        [(1000, 30)],
        [(0, 30), (250, 20), (500, 40), (750, 50)],
        config=False,
    )
    write_run(
        root,
        "hopper-random__redq__0__1700000020",
        [],
        [(0, 5), (100, 10), (200, 15)],
        method="redq",
        dataset="random",
        seed=0,
    )
    write_run(
        root, "hopper-random__redq__1__1700000021", [], [(0, 7), (100, 9)], method="redq", dataset="random", seed=1
    )
    # broken ones
    write_run(
        root,
        "hopper-medium__td3_bc__7__1700000007",
        method="td3_bc",
        text=HEADER + "\n" + row("online", "abc", 10) + "\n",
    )
    write_run(root, "hopper-medium__td3_bc__8__1700000008", method="td3_bc", text="")
    write_run(root, "hopper-medium__td3_bc__9__1700000009", method="td3_bc", text=HEADER + "\n")
    write_run(root, "hopper-medium__redq_adaptive_bc__5__1700000005", [(0, 10), (500, 20)], [], **a)
    write_run(root, "hopper-medium__redq_adaptive_bc__6__1700000006", text=False, **a)
    return root


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "plot.py"), *map(str, args)], capture_output=True, text=True, timeout=120
    )


# ---------------------------------------------------------------- table numbers


def test_mean_std_is_population_std_and_ignores_blanks():
    # 50, 60, 70: mean 60; deviations -10, 0, 10 -> variance (100+0+100)/3 = 66.67 -> std 8.165
    # (the sample std would be sqrt(200/2) = 10)
    mean, std, n = plot.mean_std([50, None, 60, 70])
    assert (mean, n) == (60.0, 3)
    assert std == pytest.approx(8.1650, abs=1e-4)
    assert plot.mean_std([None, None]) is None


def test_table_numbers_by_hand(runs_dir, capsys):
    runs = plot.load_runs([runs_dir])
    table = plot.results_table(plot.group_runs(runs))
    lines = table.splitlines()
    assert lines[0] == ("| env | dataset | method | seeds | pre-trained | final | online mean | dip (first 10%) |")
    # Order: env, then dataset in DATASET_ORDER (random before medium), then method name.
    assert [ln.split("|")[3].strip() for ln in lines[2:5]] == ["redq", "redq_adaptive_bc", "td3_bc"]
    # redq from scratch, seeds 0 and 1:
    #   pre-trained = online step-0 row: 5, 7 -> 6 ± 1
    #   final 15, 9 -> 12 ± 3;  online mean (5+10+15)/3 = 10, (7+9)/2 = 8 -> 9 ± 1
    #   dip: seed 0 last step 200 -> steps <= 20 -> 5; seed 1 last 100 -> steps <= 10 -> 7 -> 6 ± 1
    assert lines[2] == "| hopper | random | redq | 2 | 6.00 ± 1.00 | 12.00 ± 3.00 | 9.00 ± 1.00 | 6.00 ± 1.00 |"
    # redq_adaptive_bc, 3 seeds (seed 2's cut line "700,9" is dropped, its final is 90):
    #   pre-trained 45, 55, 50 -> mean 50, var (25+25+0)/3 = 16.67 -> std 4.08
    #   final 80, 75, 90 -> mean 81.67, var (1.667^2+6.667^2+8.333^2)/3 = 116.67/3 -> std 6.24
    #   online mean 290/5 = 58, 265/5 = 53, 200/4 = 50 -> mean 53.67,
    #        var (4.333^2 + 0.667^2 + 3.667^2)/3 = 32.67/3 = 10.89 -> std 3.30
    #   dip: seed 0 steps <= 100 -> min(50, 30) = 30 (step 100 itself counts);
    #        seed 1 steps <= 80 -> 55 (its 25 at step 150 is later than 10%);
    #        seed 2 steps <= 60 -> min(50, 20) = 20 -> mean 35, var (25+400+225)/3 -> std 14.72
    assert lines[3] == (
        "| hopper | medium | redq_adaptive_bc | 3 | 50.00 ± 4.08 | 81.67 ± 6.24 | 53.67 ± 3.30 | 35.00 ± 14.72 |"
    )
    # td3_bc, seeds 0 and 1 (seed 1 has no config.json: method from the folder name):
    #   pre-trained 40, 30 -> 35 ± 5;  final 60, 50 -> 55 ± 5
    #   online mean 150/3 = 50, 140/4 = 35 -> 42.5 ± 7.5
    #   dip: seed 0 steps <= 50 -> 40; seed 1 steps <= 75 -> 30 -> 35 ± 5
    assert lines[4] == "| hopper | medium | td3_bc | 2 | 35.00 ± 5.00 | 55.00 ± 5.00 | 42.50 ± 7.50 | 35.00 ± 5.00 |"
    assert len([ln for ln in lines if ln.startswith("| hopper")]) == 3  # broken runs not in the table
    assert lines[-1] == "normalized score (x100), mean ± std over seeds; the columns: python plot.py --help", (
        "a pointer"
    )
    assert "population standard deviation" in plot.__doc__, "the usage, stated once, says what std is"
    # one stderr line per broken folder, with its reason
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(BROKEN)
    for name, reason in BROKEN.items():
        (line,) = [ln for ln in err if name in ln]
        assert line.startswith("skipping ")
        assert reason in line


def test_pretrained_blank_when_run_has_neither(tmp_path):
    # seed 0 has an offline row (pre-trained 40); seed 1 has no offline row and its first online
    # eval is at step 100, not 0 -> no pre-trained value: cell is 40 ± 0 over the one seed that has it.
    # Its dip is blank too: no eval at steps <= 10% of 200 = 20. Seed 0's dip: steps <= 10 -> 40.
    write_run(tmp_path, "hopper-medium__td3_bc__0__1", [(1000, 40)], [(0, 40), (100, 50)], method="td3_bc")
    write_run(tmp_path, "hopper-medium__td3_bc__1__1", [], [(100, 60), (200, 70)], method="td3_bc", seed=1)
    runs = plot.load_runs([tmp_path])
    assert [plot.summarize_run(r)["pretrained"] for r in runs] == [40.0, None]
    assert [plot.summarize_run(r)["dip"] for r in runs] == [40.0, None]
    cells = [c.strip() for c in plot.results_table(plot.group_runs(runs)).splitlines()[2].split("|")]
    assert cells[5] == "40.00 ± 0.00 (n=1)"  # pre-trained
    assert cells[6] == "60.00 ± 10.00"  # final 50, 70: both seeds have it, no (n=...)
    assert cells[8] == "40.00 ± 0.00 (n=1)"  # dip


def test_folder_name_parsing_and_config_precedence(runs_dir):
    # no config.json: everything from the name, dataset split at the first "-"
    assert plot.parse_folder_name("hopper-medium-replay__td3_bc__3__1700000000") == {
        "env": "hopper",
        "dataset": "medium-replay",
        "method": "td3_bc",
        "seed": 3,
    }
    assert plot.read_meta(runs_dir / "hopper-medium__td3_bc__1__1700000011") == {
        "method": "td3_bc",
        "env": "hopper",
        "dataset": "medium",
        "seed": 1,
    }
    # a second run started in the same second gets a -k suffix: still a run folder, same fields
    assert plot.parse_folder_name("hopper-medium__td3_bc__3__1700000000-2") == {
        "env": "hopper",
        "dataset": "medium",
        "method": "td3_bc",
        "seed": 3,
    }
    # config.json says redq_adaptive_bc although the folder name says "adaptive"
    assert plot.read_meta(runs_dir / "hopper-medium__adaptive__2__1700000002")["method"] == "redq_adaptive_bc"


def test_truncated_last_line_is_dropped(runs_dir):
    run = plot.load_run(runs_dir / "hopper-medium__adaptive__2__1700000002")
    assert run.online_steps.tolist() == [0, 50, 100, 600]  # not 700: that line has no newline yet
    assert run.online_values.tolist() == [50, 20, 40, 90]
    assert run.offline_values.tolist() == [50]
    assert run.alpha_steps.tolist() == [0, 50, 100, 600]
    assert run.alpha_values == pytest.approx([0.4, 0.395, 0.39, 0.34])


# ---------------------------------------------------------------- alignment


def test_align_only_where_every_run_has_data():
    # run A evaluates at 0, 10, 20; run B at 5, 15, 30: both have data on [5, 20] only
    a = (np.array([0.0, 10, 20]), np.array([0.0, 10, 20]))  # value = step
    b = (np.array([5.0, 15, 30]), np.array([100.0, 200, 350]))
    grid, matrix = plot.align([a, b])
    assert grid.tolist() == [5, 10, 15, 20]  # union of steps in range: 0 and 30 left out
    assert matrix[0].tolist() == [5, 10, 15, 20]
    assert matrix[1].tolist() == [100, 150, 200, 250]  # 15 -> 30 is +150 over 15 steps: 20 -> 250
    # no overlap at all: nothing, rather than an extrapolated curve
    grid, matrix = plot.align([a, (np.array([25.0, 30]), np.array([1.0, 2]))])
    assert len(grid) == 0
    assert matrix.shape == (2, 0)


def test_group_curve_ends_at_shortest_run(runs_dir, capsys):
    groups = plot.group_runs(plot.load_runs([runs_dir]))
    runs = groups[("hopper", "medium", "redq_adaptive_bc")]
    grid, mean, std, n_runs = plot.mean_curve([(r.online_steps, r.online_values) for r in runs])
    # last steps 1000, 800, 600 -> range ends at 600; union of eval steps up to 600
    assert grid.tolist() == [0, 50, 100, 150, 200, 300, 400, 600]
    assert n_runs.tolist() == [3] * 8
    # step 50: seed 0 between (0,50) and (100,30) -> 40; seed 1 between (0,55) and (150,25)
    # -> 55 - 30/3 = 45; seed 2 evaluated there -> 20; mean (40+45+20)/3 = 35
    assert mean[1] == pytest.approx(35.0)
    # step 600: seed 0 70 + 300/700*10 = 74.2857; seed 1 70; seed 2 90 -> mean 78.0952
    assert mean[-1] == pytest.approx((70 + 300 / 700 * 10 + 70 + 90) / 3)
    assert std[0] == pytest.approx(np.std([50, 55, 50]))


def test_smooth_is_trailing_moving_average():
    # window 2: 0, (0+10)/2, (10+20)/2, (20+30)/2
    assert plot.smooth([0, 10, 20, 30], 2).tolist() == [0, 5, 15, 25]
    assert plot.smooth([0, 10, 20, 30], 1).tolist() == [0, 10, 20, 30]


# ---------------------------------------------------------------- command line


def test_cli_png_end_to_end(runs_dir, tmp_path):
    out = tmp_path / "figs"
    result = run_cli(runs_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    for name in ("score.png", "alpha.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert len(data) > 1000
    results = (out / "results.md").read_text()
    assert "| hopper | medium | redq_adaptive_bc | 3 | 50.00 ± 4.08 |" in results
    assert results in result.stdout + "\n"  # the same table is printed
    skips = [ln for ln in result.stderr.splitlines() if ln.startswith("skipping ")]
    assert len(skips) == len(BROKEN)
    assert all(any(name in ln for ln in skips) for name in BROKEN)
    # curves.csv: every point says how many runs it averages; alpha only for the method that logs it
    rows = [ln.split(",") for ln in (out / "curves.csv").read_text().splitlines()]
    assert rows[0] == ["quantity", "env", "dataset", "method", "step", "mean", "std", "n_runs"]
    adaptive = [r for r in rows if r[0] == "score" and r[3] == "redq_adaptive_bc"]
    assert [r[4] for r in adaptive] == ["0", "50", "100", "150", "200", "300", "400", "600"]
    assert {r[7] for r in adaptive} == {"3"}
    assert {r[3] for r in rows[1:] if r[0] == "alpha"} == {"redq_adaptive_bc"}
    assert not (runs_dir / "plots").exists()  # --out was honored


def test_cli_svg_raw_returns_smooth_and_filter(runs_dir):
    result = run_cli(runs_dir, "--format", "svg", "--methods", "td3_bc", "--raw-returns", "--smooth", "2")
    assert result.returncode == 0, result.stderr
    out = runs_dir / "plots"  # the default output folder
    svg = (out / "score.svg").read_text()
    assert svg.lstrip().startswith("<?xml")
    assert "<svg" in svg
    assert not (out / "score.png").exists()
    assert not (out / "alpha.svg").exists()  # td3_bc logs no alpha
    # table: raw returns (10 x score), unsmoothed: final 600, 500 -> 550 ± 50; only td3_bc rows
    results = (out / "results.md").read_text()
    assert (
        "| hopper | medium | td3_bc | 2 | 350.00 ± 50.00 | 550.00 ± 50.00 | 425.00 ± 75.00 | 350.00 ± 50.00 |"
    ) in results
    assert "redq" not in results
    # curves smoothed per run before averaging (window 2), on steps 0, 250, 500:
    #   seed 0: 400, 500, 600 -> 400, 450, 550;  seed 1: 300, 200, 400 -> 300, 250, 300
    #   mean 350, 350, 425
    rows = [ln.split(",") for ln in (out / "curves.csv").read_text().splitlines()[1:]]
    assert [(r[0], r[4], float(r[5])) for r in rows] == [
        ("return", "0", 350),
        ("return", "250", 350),
        ("return", "500", 425),
    ]
    # the broken redq_adaptive_bc folders are filtered out, so not reported; td3_bc ones are
    skips = [ln for ln in result.stderr.splitlines() if ln.startswith("skipping ")]
    assert len(skips) == 3
    assert all("td3_bc" in ln for ln in skips)


@pytest.mark.parametrize("case", ["empty", "missing", "filtered", "bad_format", "bad_smooth"])
def test_cli_errors_exit_2_with_one_line(tmp_path, runs_dir, case):
    (tmp_path / "empty").mkdir()
    args = {
        "empty": [tmp_path / "empty"],
        "missing": [tmp_path / "nope"],
        "filtered": [runs_dir, "--methods", "nosuch"],
        "bad_format": [runs_dir, "--format", "jpg"],
        "bad_smooth": [runs_dir, "--smooth", "0"],
    }[case]
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    expected = {
        "empty": "no runs",
        "missing": "no such folder",
        "filtered": "no runs",
        "bad_format": "--format",
        "bad_smooth": "--smooth",
    }[case]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), result.stderr
    assert expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("**/plots"))


def test_rows_without_the_metric_are_ignored(tmp_path):
    # an online row with an empty normalized_score (not applicable) must not become a NaN point
    text = "\n".join([HEADER, row("online", 0, 50), "online,100,,,,,,,,,,", row("online", 200, 70)]) + "\n"
    write_run(tmp_path, "hopper-medium__td3_bc__0__1", method="td3_bc", text=text)
    run = plot.load_run(tmp_path / "hopper-medium__td3_bc__0__1")
    assert run.online_steps.tolist() == [0, 200]
    assert plot.summarize_run(run)["online_mean"] == 60.0  # (50 + 70) / 2


def with_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_runs_that_differ_are_never_averaged(tmp_path):
    # Fig. 1: td3_bc at alpha_online 0.0 and 0.1, two seeds each; final scores 10, 20 and 50, 70.
    # Bookkeeping differs in every run (output_dir, git_commit, host, versions, device) and one run
    # records a key the others lack (new_flag): neither may split a curve.
    for seed, alpha, final in [(0, 0.0, 10), (1, 0.0, 20), (0, 0.1, 50), (1, 0.1, 70)]:
        name = f"hopper-medium__td3_bc__{seed}__{int(alpha * 10)}"
        folder = write_run(tmp_path / "runs", name, online=[(0, 5), (100, final)], method="td3_bc", seed=seed)
        with_config(
            folder,
            alpha_online=alpha,
            output_dir=f"/somewhere/{name}",
            git_commit=f"abc{seed}{alpha}",
            host=f"node{seed}",
            versions={"torch": f"2.{seed}"},
            device=["cpu", "cuda"][seed],
            **({"new_flag": 1} if final == 70 else {}),
        )
    runs = plot.load_runs([str(tmp_path / "runs")])
    groups = plot.group_runs(runs)
    finals = {key[2]: sorted(r.online_values[-1] for r in runs) for key, runs in groups.items()}
    assert finals == {"td3_bc (alpha_online=0.0)": [10, 20], "td3_bc (alpha_online=0.1)": [50, 70]}
    assert plot.differing_keys(runs) == ["alpha_online"]
    # --label-by adds keys to every label (utd is 20 everywhere) and never merges what differs
    groups = plot.group_runs(plot.load_runs([str(tmp_path / "runs")], label_by=["utd", "no_such_key"]))
    assert sorted(k[2] for k in groups) == ["td3_bc (utd=20, alpha_online=0.0)", "td3_bc (utd=20, alpha_online=0.1)"]
    proc = run_cli(str(tmp_path / "runs"), "--methods", "td3_bc")
    assert proc.returncode == 0, proc.stderr
    assert "| td3_bc (alpha_online=0.1) | 2 |" in proc.stdout
    assert "| td3_bc (alpha_online=0.0) | 2 |" in proc.stdout
    assert "60.00 ± 10.00" in proc.stdout  # final of the 0.1 variant: mean(50, 70), population std 10
    (note,) = [ln for ln in proc.stderr.splitlines() if "differ" in ln]  # one line: what was split, by which key
    assert note.startswith("note: ")
    assert note.endswith("hopper-medium td3_bc by alpha_online")


def test_labels_name_the_fewest_keys_that_tell_the_curves_apart(tmp_path):
    # The results' three variants: --authors-code moves kd and r_last with it; --no-adaptive-bc moves adaptive_bc.
    # Each key alone makes 2 curves of the 3; the tie goes to the first in sorted order (adaptive_bc), and then
    # authors_code (also 3 curves with adaptive_bc, and before kd and r_last) separates the rest.
    variants = {
        "default": dict(adaptive_bc=True, authors_code=False, kd=8e-5, r_last="previous"),
        "authors": dict(adaptive_bc=True, authors_code=True, kd=1e-4, r_last="moving-average"),
        "fixed": dict(adaptive_bc=False, authors_code=False, kd=8e-5, r_last="previous"),
    }
    for i, config in enumerate(variants.values()):
        folder = write_run(tmp_path, f"hopper-medium__m__0__{i}", online=[(0, 1), (10, 2)], method="m", seed=0)
        with_config(folder, **config)
    labels = {Path(r.folder).name: r.label for r in plot.load_runs([tmp_path])}
    assert labels == {
        "hopper-medium__m__0__0": "m (adaptive_bc=True, authors_code=False)",
        "hopper-medium__m__0__1": "m (adaptive_bc=True, authors_code=True)",
        "hopper-medium__m__0__2": "m (adaptive_bc=False, authors_code=False)",
    }
    # Four curves: a splits them 2 + 2, z tells all four apart at once, so z alone labels them.
    runs = [plot.Run.__new__(plot.Run) for _ in range(4)]
    for run, (a, z) in zip(runs, [(0, 1), (0, 2), (1, 3), (1, 4)]):
        run.config = dict(a=a, z=z)
    assert plot.telling_keys(runs, ["a", "z"]) == ["z"]
    assert plot.telling_keys(runs, ["a", "z"], chosen=["a"]) == ["a", "z"], "--label-by keys come first"


def test_missing_key_is_shown_as_unknown_when_others_disagree(tmp_path):
    # kp 1 and 2 differ; the run without config.json cannot be put in either curve: its own, "kp=?"
    write_run(tmp_path, "hopper-medium__td3_bc__0__1", online=[(0, 1), (10, 2)], method="td3_bc", seed=0)
    write_run(tmp_path, "hopper-medium__td3_bc__1__1", online=[(0, 1), (10, 2)], method="td3_bc", seed=1)
    write_run(tmp_path, "hopper-medium__td3_bc__2__1", online=[(0, 1), (10, 2)], config=False)
    with_config(tmp_path / "hopper-medium__td3_bc__0__1", kp=1)
    with_config(tmp_path / "hopper-medium__td3_bc__1__1", kp=2)
    labels = sorted(r.label for r in plot.load_runs([tmp_path]))
    assert labels == ["td3_bc (kp=1)", "td3_bc (kp=2)", "td3_bc (kp=?)"]


def test_one_seed_twice_in_a_curve_is_an_error(tmp_path):
    # the same run twice (a copy, or a second start in the same second: the -1 suffix)
    for name in ("hopper-medium__td3_bc__3__1700000000", "hopper-medium__td3_bc__3__1700000000-1"):
        write_run(tmp_path / "runs", name, online=[(0, 1), (10, 2)], method="td3_bc", seed=3)
    proc = run_cli(tmp_path / "runs")
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: hopper-medium td3_bc: seed 3 twice")
    assert "1700000000-1" in line
    assert not (tmp_path / "runs" / "plots").exists()
    # a different configuration is a different curve, not a duplicate
    with_config(tmp_path / "runs" / "hopper-medium__td3_bc__3__1700000000-1", utd=10)
    assert run_cli(tmp_path / "runs").returncode == 0


def test_scratch_runs_join_every_dataset_panel_of_their_env(tmp_path):
    # hopper: td3_bc on random and medium, redq from scratch seeds 0, 1 (finals 9, 11: 10 ± 1);
    # walker2d: only a scratch run, so it gets its own walker2d-scratch panel.
    write_run(tmp_path, "hopper-random__td3_bc__0__1", online=[(0, 1), (100, 2)], method="td3_bc", dataset="random")
    write_run(tmp_path, "hopper-medium__td3_bc__0__1", online=[(0, 1), (100, 2)], method="td3_bc")
    for seed, final in [(0, 9), (1, 11)]:
        write_run(
            tmp_path,
            f"hopper-scratch__redq__{seed}__1",
            online=[(0, 1), (100, final)],
            method="redq",
            dataset="scratch",
            seed=seed,
        )
    folder = write_run(
        tmp_path, "walker2d-scratch__redq__0__1", online=[(0, 1), (100, 5)], method="redq", dataset="scratch"
    )
    with_config(folder, env="walker2d")
    groups = plot.group_runs(plot.load_runs([tmp_path]))
    assert list(groups) == [
        ("hopper", "random", "redq (scratch)"),
        ("hopper", "random", "td3_bc"),
        ("hopper", "medium", "redq (scratch)"),
        ("hopper", "medium", "td3_bc"),
        ("walker2d", "scratch", "redq (scratch)"),
    ]
    assert len(groups[("hopper", "medium", "redq (scratch)")]) == 2
    proc = run_cli(tmp_path, "--datasets", "medium")  # scratch runs pass any --datasets filter
    assert proc.returncode == 0, proc.stderr
    assert "| hopper | medium | redq (scratch) | 2 | 1.00 ± 0.00 | 10.00 ± 1.00 |" in proc.stdout
    assert "| hopper | random |" not in proc.stdout
    assert "| walker2d | scratch | redq (scratch) | 1 |" in proc.stdout
    assert "(the same runs, repeated)" in " ".join(plot.__doc__.split()), "the usage says why scratch rows repeat"


def text_on_canvas(fig):
    """Every title, axis label and legend of a saved figure lies inside the canvas; legends miss the axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # plot.py closed the figure: draw it again, same size, same layout
    canvas.draw()
    renderer = canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    artists = [fig._suptitle] + list(fig.legends)
    for ax in fig.axes:
        if ax.axison:
            artists += [ax.title, ax.xaxis.label, ax.yaxis.label] + ([ax.get_legend()] if ax.get_legend() else [])
    for artist in artists:
        box = artist.get_window_extent(renderer)
        assert box.x0 >= -1, artist
        assert box.y0 >= -1, artist
        assert box.x1 <= width + 1, artist
        assert box.y1 <= height + 1, artist
    for legend in fig.legends:
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)
    return True


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 1), (2, 3)])
def test_figures_keep_titles_and_legends_on_the_canvas(tmp_path, shape):
    envs, datasets = ["hopper", "walker2d"][: shape[0]], ["random", "medium", "expert"][: shape[1]]
    steps = np.array([0.0, 100.0])
    long = [f"redq_adaptive_bc (kp={k}, target_return=1.0, keep_ratio=0.05)" for k in (1, 2, 3)]
    for labels in (["td3_bc"], long):  # short: legend inside each panel; long: one legend below the figure
        panels = {
            (e, d): [plot.Curve(label, steps, steps / 10, steps / 100, np.array([3, 3])) for label in labels]
            for e in envs
            for d in datasets
        }
        colors = {label: f"C{i}" for i, label in enumerate(labels)}
        fig = plot.plot_grid(
            panels,
            envs,
            datasets,
            colors,
            "normalized score (x100)",
            "Online fine-tuning: normalized score (x100), mean ± 1 std over seeds",
            tmp_path / "score.png",
        )
        assert text_on_canvas(fig)
        assert bool(fig.legends) == (labels is long)


def write_episodes(folder, rows, columns="step,length,return,R_current,R_last,p_term,d_term,alpha"):
    (folder / "episodes.csv").write_text(columns + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))


def test_episodes_figure(tmp_path):
    # two runs of the main script log Eq. 2's inputs; a baseline's episodes.csv has no alpha: left out.
    for seed in (0, 1):
        folder = write_run(
            tmp_path,
            f"hopper-medium__redq_adaptive_bc__{seed}__1",
            online=[(0, 1), (100, 2)],
            method="redq_adaptive_bc",
            seed=seed,
        )
        write_episodes(folder, [(40, 40, 100, 0.3, 0.2, 1e-5, 0, 0.39), (20, 20, 50, 0.2, 0.1, 1e-5, 0, 0.4)])
    folder = write_run(tmp_path, "hopper-medium__td3_bc__0__1", online=[(0, 1), (100, 2)], method="td3_bc")
    write_episodes(folder, [(20, 20, 50, 0.2)], columns="step,length,return,normalized_return")
    runs = plot.load_runs([tmp_path])
    episodes = plot.episodes_for(plot.group_runs(runs))
    (panel,) = episodes.values()
    assert sorted(run.seed for run, _ in panel) == [0, 1]
    assert panel[0][1]["step"].tolist() == [20, 40]
    assert panel[0][1]["alpha"].tolist() == [0.4, 0.39]  # step order
    proc = run_cli(tmp_path, "--episodes", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "episodes.png").read_bytes().startswith(b"\x89PNG")
    assert "1 of 3 runs have no episodes.csv with alpha" in proc.stderr
    assert not (tmp_path / "plots").exists(), "--out replaces the default folder <first folder>/plots"


def test_episodes_figure_shows_r_x100_with_the_target_at_100(tmp_path):
    # Eq. 2's R_current 0.02 against R_target 1.0: on a linear axis from 0 to 1 the R lines lie flat on 0.
    folder = with_config(
        write_run(tmp_path, "hopper-medium__redq_adaptive_bc__0__1", online=[(0, 1)], method="redq_adaptive_bc"),
        target_return=1.0,
    )
    write_episodes(folder, [(20, 20, 50, 0.02, 0.01, 1e-5, 0, 0.4), (40, 40, 90, 0.03, 0.02, 1e-5, 0, 0.39)])
    episodes = plot.episodes_for(plot.group_runs(plot.load_runs([tmp_path])))
    fig = plot.plot_episodes(episodes, ["hopper"], ["medium"], {"redq_adaptive_bc": "C0"}, tmp_path / "e.png")
    bottom = fig.axes[1]
    r_current, r_last, target = (line.get_ydata() for line in bottom.lines)
    assert list(r_current) == pytest.approx([2, 3]), "R_current x100"
    assert list(r_last) == pytest.approx([1, 2]), "R_last x100"
    assert list(target) == [100, 100], "R_target drawn at 100"
    assert bottom.get_yscale() == "symlog", "R near 0 and the target at 100 both show"
    low, high = bottom.get_ylim()
    assert low <= 1 and high >= 100, f"the axis spans R and the target ({low}, {high})"
    assert "x100" in bottom.get_ylabel(), "the axis states its unit"


def test_alpha_is_drawn_per_training_episode_where_episodes_csv_logs_it(tmp_path):
    folder = write_run(
        tmp_path, "hopper-medium__redq_adaptive_bc__0__1", online=[(0, 1), (100, 2)], method="redq_adaptive_bc"
    )
    write_episodes(folder, [(60, 60, 50, 0.2, 0.1, 1e-5, 0, 0.38), (30, 30, 50, 0.2, 0.1, 1e-5, 0, 0.39)])
    (run,) = plot.load_runs([tmp_path])
    assert run.alpha_steps.tolist() == [30, 60], "every training episode, in step order"
    assert run.alpha_values.tolist() == [0.39, 0.38], "its alpha"
    other = write_run(tmp_path / "b", "hopper-medium__td3_bc__0__1", online=[(0, 1), (100, 2)], method="td3_bc")
    write_episodes(other, [(20, 20, 50, 0.2)], columns="step,length,return,normalized_return")
    (evaluated,) = [r for r in plot.load_runs([tmp_path]) if r.method == "td3_bc"]
    assert len(evaluated.alpha_steps) == 0, "no alpha in either file: none drawn"


def test_titles_never_leave_a_lone_word_on_a_line():
    title = "Online fine-tuning: normalized score (x100), mean ± 1 std over seeds"
    for width in range(20, len(title) + 5):
        lines = plot.balanced_lines(title, width).splitlines()
        assert all(len(line) <= width for line in lines), f"width {width}: a line is too long"
        assert len(lines) == len(plot.textwrap.wrap(title, width)), f"width {width}: no more lines than needed"
        assert len(lines) == 1 or len(lines[-1].split()) > 1, f"width {width}: {lines}"


def test_help_states_the_units():
    text = " ".join(run_cli("--help").stdout.split())
    assert "every figure shows normalized returns x100" in text, "the figures' unit"
    assert "episodes.csv keeps Eq. 2's own fractions" in text, "the controller's file keeps fractions"
    assert "R_target drawn at 100" in text, "where the target is drawn"


@pytest.mark.slow
def test_real_run_folders_with_suffix(datasets_path, tmp_path):
    """A run of the main script, and a copy named like a second run started in the same second
    (suffix -1, seed 1): one curve of two seeds, and its episodes.csv drawn by --episodes."""
    from conftest import TINY, run_script

    proc = run_script(
        "redq_adaptive_bc.py",
        "--dataset",
        "uniform-random",
        *TINY,
        "--output-dir",
        tmp_path / "runs",
        datasets_path=datasets_path,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    (first,) = (tmp_path / "runs").iterdir()
    copy = first.with_name(first.name.replace("__0__", "__1__") + "-1")
    shutil.copytree(first, copy)
    with_config(copy, seed=1)
    proc = run_cli(tmp_path / "runs", "--episodes")
    assert proc.returncode == 0, proc.stderr
    assert "| hopper | uniform-random-400steps | redq_adaptive_bc | 2 |" in proc.stdout  # panel named as the folder
    assert (tmp_path / "runs" / "plots" / "episodes.png").exists()
    rows = [ln.split(",") for ln in (tmp_path / "runs" / "plots" / "curves.csv").read_text().splitlines()[1:]]
    assert {r[7] for r in rows} == {"2"}  # every point averages both runs


def test_pre_training_runs_of_a_sweep_are_left_out_and_named(tmp_path, capsys):
    # A pre-train-once sweep's first stage (--online-steps 0) has offline rows only; its fine-tunes are drawn.
    pre = with_config(
        write_run(tmp_path, "hopper-medium__td3_bc__0__1", offline=[(0, 5), (1000, 9)], method="td3_bc"), online_steps=0
    )
    fine = with_config(
        write_run(tmp_path, "hopper-medium__td3_bc__0__2", online=[(0, 9), (100, 12)], method="td3_bc"),
        online_steps=100,
        load_offline=str(pre),
    )
    runs = plot.load_runs([tmp_path])
    assert [Path(run.folder) for run in runs] == [fine]
    err = capsys.readouterr().err
    assert "skipping" not in err
    assert f"note: 1 pre-train-only run(s) (online_steps 0) not plotted: {pre}\n" in err, "named in one line"
    broken = write_run(tmp_path, "hopper-medium__td3_bc__1__3", offline=[(0, 5)], method="td3_bc", seed=1)
    plot.load_runs([tmp_path])
    assert f"skipping {broken}: no online rows yet" in capsys.readouterr().err  # a run still pre-training
