"""D4RL's files (plumbing/d4rl.py): names and URLs, the cache, the download against a real local HTTP server,
the checks, and the conversion, transition by transition against d4rl.qlearning_dataset's rule restated here.
No test touches the network."""

import http.server
import json
import threading
import time
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY, run_script, write_d4rl_file

from plumbing import d4rl, datasets
from plumbing.errors import Preempted, UsageError, stop_requested


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """An empty Minari root and an empty D4RL cache; the D4RL server is a closed local port unless a test
    starts one."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path / "d4rl"))
    monkeypatch.setenv("D4RL_BASE_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    (tmp_path / "d4rl").mkdir()
    return tmp_path / "minari", tmp_path / "d4rl"


def one_line(error):
    assert "\n" not in str(error.value), f"not one line: {error.value}"
    return str(error.value)


# ---------------------------------------------------------------------------------------
# Names, URLs and the cache
# ---------------------------------------------------------------------------------------
def test_urls_and_file_names_are_d4rls():
    # d4rl/infos.py: 'hopper-medium-v0' : '.../offline_rl/gym_mujoco/hopper_medium.hdf5',
    # 'walker2d-medium-replay-v0' : '.../gym_mujoco/walker_mixed.hdf5'; d4rl/gym_mujoco/__init__.py builds v2 as
    # 'http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/%s.hdf5' % (env+'_'+dset.replace('-','_')+'-v2')
    assert d4rl.url_of("hopper", "medium", "v0") == d4rl.BASE_URL + "/gym_mujoco/hopper_medium.hdf5"
    assert d4rl.BASE_URL == "http://rail.eecs.berkeley.edu/datasets/offline_rl", "D4RL's server"
    assert d4rl.file_name("hopper", "medium-replay", "v0") == "hopper_mixed.hdf5", "v0 medium-replay is _mixed"
    assert d4rl.file_name("walker2d", "medium-replay", "v0") == "walker_mixed.hdf5", "walker's v0 file is walker_"
    assert d4rl.file_name("halfcheetah", "medium-expert", "v0") == "halfcheetah_medium_expert.hdf5"
    assert d4rl.file_name("hopper", "medium-replay", "v2") == "hopper_medium_replay-v2.hdf5"
    assert d4rl.url_of("walker2d", "random", "v2").endswith("/gym_mujoco_v2/walker2d_random-v2.hdf5")


def test_base_url_and_cache_folder_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("D4RL_DATASET_DIR", raising=False)
    assert d4rl.cache_dir() == Path.home() / ".d4rl" / "datasets", "D4RL's default cache"
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    monkeypatch.setenv("D4RL_BASE_URL", "http://127.0.0.1:1234/x/")
    assert d4rl.cache_dir() == tmp_path
    assert d4rl.url_of("hopper", "expert", "v0") == "http://127.0.0.1:1234/x/gym_mujoco/hopper_expert.hdf5"


def test_local_ids_are_not_minaris_d4rl_namespace():
    dataset_id = d4rl.local_id("walker2d", "medium-expert", "v2")
    assert dataset_id == "local/d4rl/walker2d-medium-expert-v2" and not dataset_id.startswith("D4RL/")
    assert d4rl.parse_local_id(dataset_id) == ("walker2d", "medium-expert", "v2")
    assert d4rl.parse_local_id("local/hopper/uniform-random-v0") is None, "a local build is not D4RL's"


# ---------------------------------------------------------------------------------------
# qlearning_dataset's rule, restated in the test's own words
# ---------------------------------------------------------------------------------------
def qlearning_reference(data, max_episode_steps=1000):
    """The transitions of d4rl.qlearning_dataset(env, data) (terminate_on_end=False). D4RL's lines
    (d4rl/__init__.py):
        for i in range(N-1):
            ...
            if use_timeouts:
                final_timestep = dataset['timeouts'][i]
            else:
                final_timestep = (episode_step == env._max_episode_steps - 1)
            if (not terminate_on_end) and final_timestep:
                # Skip this transition and don't apply terminals on the last step of an episode
                episode_step = 0
                continue
            if done_bool or final_timestep:
                episode_step = 0
            obs_.append(obs) ... done_.append(done_bool)
            episode_step += 1
    """
    rows, age = [], 0  # age: D4RL's episode_step
    last_row = len(data["rewards"]) - 1
    for i in range(last_row):
        is_timeout = bool(data["timeouts"][i]) if "timeouts" in data else age == max_episode_steps - 1
        if is_timeout:
            age = 0
            continue
        age = 1 if data["terminals"][i] else age + 1
        rows.append(i)
    f32 = np.float32
    return dict(
        obs=data["observations"][rows].astype(f32),
        actions=data["actions"][rows].astype(f32),
        rewards=np.ravel(data["rewards"])[rows].astype(f32),
        next_obs=data["observations"][[r + 1 for r in rows]].astype(f32),
        terminals=np.ravel(data["terminals"])[rows].astype(f32),
    )


def converted(name="medium", version="v0", env="hopper"):
    """The converted dataset, read back through the method's own flatten_episodes."""
    import redq_adaptive_bc

    dataset = datasets.load_dataset(d4rl.local_id(env, name, version))
    return dataset, redq_adaptive_bc.flatten_episodes(dataset)


def assert_same_transitions(got, expected):
    assert len(got["rewards"]) == len(expected["rewards"]), "number of transitions"
    for key in expected:
        assert np.array_equal(got[key], expected[key]), f"{key} differs from qlearning_dataset's"


def test_v0_counter_drops_the_next_episodes_step_one_early(monkeypatch):
    # Hand-worked with a limit of 5 steps (the drop at counter 4) and a terminal at row 2: the counter reads
    # 0,1,2 (terminal: set to 0, then +1) 1,2,3, so row 6 (the 4th step of the next episode) is dropped, not row 7;
    # then 0,1,2,3 for rows 7..10; row 11 is the file's last row, never a transition.
    monkeypatch.setattr(d4rl, "MAX_EPISODE_STEPS", 5)
    terminals = np.zeros(12, bool)
    terminals[2] = True
    kept = d4rl.kept_steps(terminals, None)
    assert kept.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10], "v0 counter with D4RL's quirk"
    assert d4rl.episode_bounds(kept, terminals) == [(0, 2), (3, 5), (7, 10)], "cut after the terminal, at the drop"


def test_v2_drops_the_time_out_steps_only():
    terminals, timeouts = np.zeros(8, bool), np.zeros(8, bool)
    terminals[[1, 4]], timeouts[[4, 6]] = True, True  # row 4 is both: a time-out, so dropped
    kept = d4rl.kept_steps(terminals, timeouts)
    assert kept.tolist() == [0, 1, 2, 3, 5], "rows 4 and 6 dropped, row 7 is the last row"
    assert d4rl.episode_bounds(kept, terminals) == [(0, 1), (2, 3), (5, 5)]


@pytest.mark.parametrize("column", [False, True], ids=["shape (N,)", "shape (N, 1)"])
def test_v2_conversion_equals_qlearning_dataset(dirs, column):
    _, cache = dirs
    n = 60
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    terminals[[9, 30]] = True  # episodes ending by termination
    timeouts[[20, 45]] = True  # by time-out; the last episode is unfinished at the file's end
    data = write_d4rl_file(cache / "hopper_medium-v2.hdf5", terminals, timeouts, column=column)
    dataset, got = converted(version="v2")
    assert_same_transitions(got, qlearning_reference(data))
    episodes = list(dataset.iterate_episodes())
    assert [len(ep.rewards) for ep in episodes] == [10, 10, 10, 14, 13], "split after terminals and at time-outs"
    assert [bool(ep.terminations[-1]) for ep in episodes] == [True, False, True, False, False]
    assert [bool(ep.truncations[-1]) for ep in episodes] == [False, True, False, True, True]
    # A terminal's next observation is the next episode's first row, as qlearning_dataset pairs it.
    assert np.array_equal(episodes[0].observations[-1], data["observations"][10].astype(np.float64))


def test_v0_conversion_equals_qlearning_dataset_with_the_1000_step_counter(dirs):
    _, cache = dirs
    n = 2600
    terminals = np.zeros(n, bool)
    terminals[[500, 1700]] = True  # after 500 the counter restarts at 1: its drop is row 500 + 999 = 1499
    data = write_d4rl_file(cache / "hopper_medium.hdf5", terminals)
    dataset, got = converted()
    expected = qlearning_reference(data)
    assert_same_transitions(got, expected)
    # Rows 0..500 count 0..500; the terminal at 500 restarts at 1, so row 1499 reads 999: the only drop (the next,
    # after the terminal at 1700, would be row 2699, past the last transition 2598).
    assert len(expected["rewards"]) == n - 1 - 1, "one step dropped"
    assert 1499 not in {int(np.flatnonzero((data["observations"] == o).all(1))[0]) for o in got["obs"][1490:1505]}


def test_v0_first_drop_is_row_999_and_the_quirk_moves_the_next():
    terminals = np.zeros(2100, bool)
    terminals[1200] = True
    kept = set(d4rl.kept_steps(terminals, None).tolist())
    dropped = sorted(set(range(2099)) - kept)
    # Rows 0..998 are counted 0..998; row 999 reads 999 = max - 1: dropped. Rows 1000..1200 count 0..200, the
    # terminal at 1200 sets 0 then +1, so rows 1201.. count 1.. and row 1201 + 998 = 2199 would be next: past the end.
    assert dropped == [999], "only the first time-out is inside this file"
    terminals[1200] = False
    assert sorted(set(range(2099)) - set(d4rl.kept_steps(terminals, None).tolist())) == [999, 1999], "no terminal"


# ---------------------------------------------------------------------------------------
# The cache, the download, the checks
# ---------------------------------------------------------------------------------------
def test_a_file_in_the_cache_is_used_without_any_network_call(dirs, monkeypatch):
    _, cache = dirs
    write_d4rl_file(cache / "hopper_expert.hdf5", np.zeros(30, bool))

    def no_network(*args, **kwargs):
        raise AssertionError("the network was called")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    dataset = datasets.load_dataset("local/d4rl/hopper-expert-v0")
    assert dataset.total_steps == 29, "30 rows, the last is never a transition"
    metadata = dataset.storage.metadata
    assert metadata["d4rl_id"] == "hopper-expert-v0" and metadata["source_url"].endswith("/hopper_expert.hdf5")
    assert (metadata["ref_min_score"], metadata["ref_max_score"]) == (-20.272305, 3234.3), "D4RL's hopper scores"
    assert metadata["dataset_summary"]["transitions"] == 29, "the summary is written at conversion"
    assert dataset.spec.env_spec.id == "Hopper-v4", "D4RL's data runs on the v4 models"


def serve(folder, handler_class=None):
    """A real HTTP server on 127.0.0.1 serving folder, in a thread; returns (base URL, server)."""
    handler = handler_class or (lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=folder, **k))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def test_download_from_a_local_server_then_convert(dirs, tmp_path, monkeypatch):
    _, cache = dirs
    (tmp_path / "www/gym_mujoco").mkdir(parents=True)
    data = write_d4rl_file(tmp_path / "www/gym_mujoco/hopper_medium.hdf5", np.zeros(40, bool))
    url, server = serve(str(tmp_path / "www"))
    monkeypatch.setenv("D4RL_BASE_URL", url)
    try:
        dataset, got = converted()
    finally:
        server.shutdown()
    assert (cache / "hopper_medium.hdf5").read_bytes() == (tmp_path / "www/gym_mujoco/hopper_medium.hdf5").read_bytes()
    assert_same_transitions(got, qlearning_reference(data))
    assert [p.name for p in cache.iterdir()] == ["hopper_medium.hdf5"], "no staging file left"


class ShortBody(http.server.BaseHTTPRequestHandler):
    """Promises 10,000 bytes, sends 100 and closes: http.client returns the short body without an error."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "10000")
        self.end_headers()
        self.wfile.write(b"\x89HDF\r\n\x1a\n" + bytes(92))

    def log_message(self, *args):
        pass


class SlowBody(ShortBody):
    """Sends 1 kB every 20 ms for 10 s: long enough for a stop signal to arrive mid-way."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(500 * 1024))
        self.end_headers()
        for _ in range(500):
            self.wfile.write(bytes(1024))
            self.wfile.flush()
            time.sleep(0.02)


class ErrorPage(ShortBody):
    def do_GET(self):
        body = b"<html>moved</html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize(
    "handler, message",
    [(ShortBody, "ended after 100 of 10000 bytes"), (ErrorPage, "is not a readable HDF5 file")],
    ids=["short body", "complete but not HDF5"],
)
def test_a_bad_download_leaves_no_file_a_later_run_would_use(dirs, monkeypatch, handler, message):
    _, cache = dirs
    url, server = serve(None, handler)
    monkeypatch.setenv("D4RL_BASE_URL", url)
    try:
        with pytest.raises(UsageError, match=message) as error:
            d4rl.obtain_file("hopper", "medium", "v0")
    finally:
        server.shutdown()
    one_line(error)
    assert list(cache.iterdir()) == [], "neither the file nor a staging file is left"


def test_a_stop_signal_ends_the_download_within_seconds(dirs, monkeypatch):
    _, cache = dirs
    url, server = serve(None, SlowBody)
    monkeypatch.setenv("D4RL_BASE_URL", url)
    timer = threading.Timer(0.3, lambda: stop_requested.append(15))
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Preempted) as error:
            d4rl.obtain_file("hopper", "medium", "v0")
    finally:
        stop_requested.clear()
        server.shutdown()
    assert time.monotonic() - start < 5, "stopped within seconds (the server needed 10)"
    assert "nothing half-written is kept" in error.value.note
    assert list(cache.iterdir()) == [], "no partial file left"


def test_without_network_one_line_names_the_url_and_the_folder(dirs):
    _, cache = dirs
    with pytest.raises(UsageError) as error:
        datasets.load_dataset("local/d4rl/hopper-medium-v2")
    line = one_line(error)
    assert "http://127.0.0.1:9/gym_mujoco_v2/hopper_medium-v2.hdf5" in line, "the URL"
    assert f"put it in {cache}" in line, "the folder"


def break_file(path, kind):
    """A D4RL-layout file with one defect."""
    import h5py

    terminals = np.zeros(20, bool)
    if kind == "shape":
        write_d4rl_file(path, terminals, obs_dim=10)  # Hopper has 11 observation values
    else:
        write_d4rl_file(path, terminals)
    if kind == "missing key":
        with h5py.File(path, "a") as f:
            del f["rewards"]
    elif kind == "nan":
        with h5py.File(path, "a") as f:
            f["observations"][3, 2] = np.nan
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:1500])


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing key", "lacks rewards"),
        ("shape", r"observations has shape \(20, 10\), the environment needs \(20, 11\)"),
        ("nan", "NaN or infinite values in observations"),
        ("truncated", "not a readable HDF5 file|cannot be read"),
    ],
)
def test_bad_files_stop_with_one_line(dirs, kind, message):
    root, cache = dirs
    break_file(cache / "hopper_medium.hdf5", kind)
    with pytest.raises(UsageError, match=message) as error:
        datasets.load_dataset("local/d4rl/hopper-medium-v0")
    one_line(error)
    assert not (root / "local/d4rl/hopper-medium-v0").exists(), "nothing converted"


# ---------------------------------------------------------------------------------------
# The task: environments, names, the summary
# ---------------------------------------------------------------------------------------
def task_args(**kw):
    defaults = dict(
        env="hopper",
        dataset="medium",
        d4rl_version="v0",
        dataset_id=None,
        random_dataset_steps=1_000_000,
        ref_min_score=None,
        ref_max_score=None,
        resume=None,
    )
    return types.SimpleNamespace(**{**defaults, **kw})


def test_task_of_d4rl_walker2d_random_is_named_random_on_walker2d_v4(dirs, capsys):
    root, cache = dirs
    write_d4rl_file(cache / "walker2d_random-v2.hdf5", np.zeros(30, bool), np.zeros(30, bool), 17, 6)
    task = datasets.open_task(task_args(env="walker2d", dataset="random", d4rl_version="v2"))
    assert task.env.spec.id == "Walker2d-v4" and task.eval_env.spec.id == "Walker2d-v4", "D4RL's walker model"
    assert task.env_name == "walker2d" and task.dataset_name == "random-v2", "the main script's alpha 100 rule"
    assert task.source == {"d4rl_id": "walker2d-random-v2", "source_url": d4rl.url_of("walker2d", "random", "v2")}
    assert "out of date" not in capsys.readouterr().err, "the v4 deprecation warning is silenced"


def test_summary_is_computed_from_the_stored_episodes_and_warns_at_r_target(dirs, capsys):
    root, cache = dirs
    terminals = np.zeros(21, bool)
    terminals[9] = True
    data = write_d4rl_file(cache / "hopper_medium.hdf5", terminals)
    datasets.load_dataset("local/d4rl/hopper-medium-v0")
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    task = datasets.open_task(task_args(), target_return=0.0)
    returns = [data["rewards"][:10].astype(np.float32).sum(), data["rewards"][10:20].astype(np.float32).sum()]
    summary = task.summary
    assert (summary["episodes"], summary["transitions"]) == (2, 20), "rows 0-9 (terminal) and 10-19"
    assert summary["return_mean"] == pytest.approx(np.mean(returns), rel=1e-6), "mean episode return"
    assert summary["return_min"] == pytest.approx(min(returns), rel=1e-6)
    assert summary["return_max"] == pytest.approx(max(returns), rel=1e-6)
    expected_score = 100 * (np.mean(returns) + 20.272305) / (3234.3 + 20.272305)
    assert summary["normalized_score_mean"] == pytest.approx(expected_score, rel=1e-6), "D4RL-normalized mean"
    err = capsys.readouterr().err
    assert "2 episodes, 20 transitions" in err, "printed at start"
    assert "P term cannot lower alpha" in err, "warned: the data already reach R_target = 0"
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}, "nothing written on read"
    datasets.open_task(task_args(), target_return=1.0)
    assert "P term cannot lower alpha" not in capsys.readouterr().err, "no warning below R_target"


def test_ant_with_a_d4rl_name_is_refused_before_any_work(dirs):
    from plumbing.cli import RunArgs, check_run_args

    with pytest.raises(UsageError, match="not --env ant") as error:
        check_run_args(RunArgs(env="ant", dataset="medium"))  # with the other flags' checks, before any work
    one_line(error)
    with pytest.raises(UsageError, match="not --env ant"):
        datasets.open_task(task_args(env="ant"))
    check_run_args(RunArgs(env="ant", dataset="uniform-random"))  # a local build on Ant-v5 is fine


# ---------------------------------------------------------------------------------------
# End to end: the paper's command on a tiny D4RL file
# ---------------------------------------------------------------------------------------
def test_paper_command_runs_on_d4rl_hopper_medium_v0(tmp_path):
    cache = tmp_path / "d4rl"
    cache.mkdir()
    terminals = np.zeros(400, bool)
    terminals[[150, 320]] = True
    write_d4rl_file(cache / "hopper_medium.hdf5", terminals)
    env = {"D4RL_DATASET_DIR": str(cache), "D4RL_BASE_URL": "http://127.0.0.1:9"}
    flags = ["--env", "hopper", "--dataset", "medium", *TINY, "--output-dir", tmp_path / "runs"]
    proc = run_script("redq_adaptive_bc.py", *flags, datasets_path=tmp_path / "minari", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("hopper-medium__redq_adaptive_bc__0__")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["env_id"] == "Hopper-v4", "D4RL's hopper model"
    assert config["dataset_id"] == "local/d4rl/hopper-medium-v0"
    assert config["dataset_source"]["d4rl_id"] == "hopper-medium-v0", "the D4RL id"
    assert config["dataset_summary"]["transitions"] == 399, "400 rows, no time-out inside 1000 steps"
    assert isinstance(config["dataset_summary"]["normalized_score_mean"], float), "the behavior's score"
    phases = [line.split(",")[0] for line in (run_dir / "progress.csv").read_text().splitlines()[1:]]
    assert "offline" in phases and "online" in phases, "pre-training and fine-tuning ran"
    assert (run_dir / "final.pt").exists()


def test_no_network_through_the_script_is_exit_2_and_one_line(tmp_path):
    env = {"D4RL_DATASET_DIR": str(tmp_path / "d4rl"), "D4RL_BASE_URL": "http://127.0.0.1:9"}
    flags = ["--dataset", "medium", "--d4rl-version", "v2", "--output-dir", tmp_path / "runs"]
    proc = run_script("redq_adaptive_bc.py", *flags, datasets_path=tmp_path / "minari", cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "gym_mujoco_v2/hopper_medium-v2.hdf5" in lines[0], proc.stderr[-2000:]
    assert str(ROOT) not in proc.stderr, "no traceback"
