"""launch.sweep: the point helpers and names, and real sweeps through `python -m launch.sweep`."""

import json
import os
import shlex
import subprocess
import sys

import pytest
from cpu_env import cpu_env

from launch import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two optimizer steps of the tiny model, no eval: a point is mostly start-up and compilation.
FIXED = {
    "train.steps": 2,
    "train.batch_size": 4,
    "train.seq_len": 32,
    "train.warmup_steps": 1,
    "train.log_every": 1,
    "train.ckpt_every": 2,
    "train.eval_every": 0,
}
FIXED_FLAGS = [
    "--config.train.steps=2",
    "--config.train.batch_size=4",
    "--config.train.seq_len=32",
    "--config.train.warmup_steps=1",
    "--config.train.log_every=1",
    "--config.train.ckpt_every=2",
    "--config.train.eval_every=0",
]
# Seed varies slowest, so each pair running at once compiles both learning rates (lr is part of
# the compiled schedule) and the second pair finds them in the shared compilation cache.
POINTS = {
    "seed=0+lr=0.001": (0, 0.001),
    "seed=0+lr=0.003": (0, 0.003),
    "seed=1+lr=0.001": (1, 0.001),
    "seed=1+lr=0.003": (1, 0.003),
}


def write_sweep(path, sweep_expr, config="experiments/pretrain.py", fixed=FIXED):
    path.write_text(
        '"""A test sweep."""\n'
        "from launch.sweep import grid, zipped, product\n"
        f"CONFIG = {config!r}\n"
        f"FIXED = {fixed!r}\n"
        f"def get_sweep():\n    return {sweep_expr}\n"
    )
    return str(path)


def sweep_cli(*args, cache_dir=None):
    env = cpu_env(1)
    if cache_dir:  # the points of all tests share compiled programs
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    cmd = [sys.executable, "-m", "launch.sweep", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def point_files(workdir):
    return {
        name: (workdir / name / "sweep_point.json").read_text()
        + str((workdir / name / "sweep_point.json").stat().st_mtime_ns)
        for name in os.listdir(workdir)
        if (workdir / name / "sweep_point.json").exists()
    }


# --- helpers and names --------------------------------------------------------------------------


def test_every_bundled_sweep_file_loads():
    folder = os.path.join(ROOT, "experiments", "sweeps")
    files = sorted(f for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py")
    assert {"kl_overopt.py", "lora_vs_full.py", "tiny_lr.py"} <= set(files)
    for name in files:
        s = sweep.load_sweep(os.path.join(folder, name))
        assert s.points and len(set(s.names)) == len(s.names), name
    lora = sweep.load_sweep(os.path.join(folder, "lora_vs_full.py"))
    assert lora.names == [f"rank={r}+seed={s}" for r in (0, 16) for s in (0, 1, 2)]


def test_grid_zipped_product():
    assert sweep.grid({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
    ]
    assert sweep.zipped({"a": [1, 2], "b": [3, 4]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    with pytest.raises(ValueError, match="a=2, b=3"):
        sweep.zipped({"a": [1, 2], "b": [3, 4, 5]})
    with pytest.raises(ValueError, match="must be a list"):
        sweep.grid({"a": "abc"})
    pts = sweep.product(sweep.grid({"a": [1, 2]}), sweep.zipped({"b": [3, 4], "c": [5, 6]}))
    assert pts == [
        {"a": 1, "b": 3, "c": 5},
        {"a": 1, "b": 4, "c": 6},
        {"a": 2, "b": 3, "c": 5},
        {"a": 2, "b": 4, "c": 6},
    ]
    assert sweep.product([{"a": 1, "b": 2}], [{"a": 1}]) == [{"a": 1, "b": 2}]  # agree: fine
    with pytest.raises(ValueError, match="'a' is set to both 1 and 2"):
        sweep.product([{"a": 1}], [{"a": 2}])
    assert sweep.grid({"a": [1]}) + sweep.grid({"a": [2]}) == [{"a": 1}, {"a": 2}]  # union


def test_format_value():
    assert [sweep.format_value(v) for v in (True, 3, 0.001, 1e-05, "adamw", None)] == [
        "True",
        "3",
        "0.001",
        "1e-05",
        "adamw",
        "None",
    ]
    assert sweep.format_value((1, 2)) == "(1,2)"
    assert sweep.format_value((3,)) == "(3,)"
    assert sweep.format_value(("a", "b")) == "('a','b')"


def test_point_names():
    names = sweep.point_names(sweep.grid({"train.lr": [1e-3, 1e-5], "seed": [0]}))
    assert names == ["lr=0.001+seed=0", "lr=1e-05+seed=0"]
    # two swept keys end in `lr`: both keep their full path; `seed` stays short
    pts = [{"train.lr": 1, "ppo.lr": 2, "seed": 0}, {"train.lr": 3, "ppo.lr": 2, "seed": 0}]
    assert sweep.point_names(pts) == ["train.lr=1+ppo.lr=2+seed=0", "train.lr=3+ppo.lr=2+seed=0"]
    pts = [{"data.train": "a/b c.jsonl", "x": (1, 2), "flag": True}, {}]
    assert sweep.point_names(pts) == ["train=a_b_c.jsonl+x=_1_2_+flag=True", "base"]
    with pytest.raises(ValueError, match="both get the name 'p=a_b'"):
        sweep.point_names([{"p": "a/b"}, {"p": "a b"}])


@pytest.mark.parametrize(
    "body, message",
    [
        ("CONFIG = None\ndef get_sweep():\n    return [{}]\n", "defines no CONFIG"),
        ("CONFIG = 'experiments/nope.py'\ndef get_sweep():\n    return [{}]\n", "names no file"),
        ("CONFIG = 'experiments/pretrain.py'\n", "defines no get_sweep"),
        ("CONFIG = 'experiments/pretrain.py'\ndef get_sweep():\n    return []\n", "non-empty"),
        ("CONFIG = 'experiments/pretrain.py'\ndef get_sweep():\n    return [1]\n", "not a dict"),
        ("CONFIG = 'experiments/pretrain.py'\ndef get_sweep():\n    return [{1: 2}]\n", "key"),
        (
            "CONFIG = 'experiments/pretrain.py'\n"
            "def get_sweep():\n    return [{'a': 1, 'b': 2}, {'b': 2, 'a': 1}]\n",
            "points 0 and 1 are the same",
        ),
        (
            "CONFIG = 'experiments/pretrain.py'\nFIXED = {'seed': 1}\n"
            "def get_sweep():\n    return [{'seed': 2}]\n",
            "FIXED sets too",
        ),
    ],
)
def test_bad_sweep_files(tmp_path, body, message):
    path = tmp_path / "bad.py"
    path.write_text(body)
    with pytest.raises(ValueError, match=message) as e:
        sweep.load_sweep(str(path))
    assert str(path) in str(e.value)


def test_workdir_holds_one_sweep(tmp_path):
    a = sweep.load_sweep(write_sweep(tmp_path / "a.py", "grid({'seed': [0, 1]})"))
    b = sweep.load_sweep(write_sweep(tmp_path / "b.py", "grid({'seed': [0, 1, 2]})"))
    sweep.check_workdir(a, str(tmp_path / "w"), write=True)
    sweep.check_workdir(a, str(tmp_path / "w"), write=True)  # the same sweep again: fine
    with pytest.raises(ValueError, match="different sweep"):
        sweep.check_workdir(b, str(tmp_path / "w"), write=True)


def test_emit_prints_commands(tmp_path):
    path = write_sweep(tmp_path / "s.py", "grid({'seed': [0, 1], 'train.lr': [0.001, 0.003]})")
    workdir = str(tmp_path / "w")
    launcher = ["--launcher_args", "--nodes 2"]
    proc = sweep_cli("run", path, "--workdir", workdir, "--emit", "slurm", *launcher)
    assert proc.returncode == 0, proc.stderr
    run_args = [
        ["--config", "experiments/pretrain.py", "--workdir", os.path.join(workdir, name)]
        + [*FIXED_FLAGS, f"--config.seed={seed}", f"--config.train.lr={lr}"]
        + ["--config.log.wandb.group=w"]  # the sweep's name: its points are one wandb group
        for name, (seed, lr) in POINTS.items()
    ]
    slurm = ["python", "-m", "launch.slurm", "--nodes", "2", "--"]
    assert proc.stdout.splitlines() == [shlex.join(slurm + args) for args in run_args]
    assert not any(p.is_dir() for p in (tmp_path / "w").iterdir())  # nothing ran

    proc = sweep_cli("run", path, "--workdir", workdir, "--emit", "tpu", "--launcher_args=-z a")
    tpu = ["python", "-m", "launch.tpu", "-z", "a", "run", "--"]
    assert proc.stdout.splitlines() == [shlex.join(tpu + args) for args in run_args]
    proc = sweep_cli("run", path, "--workdir", workdir, "--dry-run")
    local = ["python", "-m", "launch.run"]
    assert proc.stdout.splitlines() == [shlex.join(local + args) for args in run_args]
    bad = sweep_cli("run", path, "--workdir", workdir, *launcher)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --launcher_args")


def test_sweep_points_are_grouped_by_the_sweep(tmp_path):
    path = tmp_path / "s.py"
    path.write_text(
        "CONFIG = 'experiments/pretrain.py'\nFIXED = {'train.steps': 2}\n"
        "def get_sweep():\n    return [{'seed': 0}, {'seed': 1, 'log.wandb.group': 'mine'}]\n"
    )
    s = sweep.load_sweep(str(path))
    args = [sweep.run_args(s, i, str(tmp_path / "lr_sweep" / n)) for i, n in enumerate(s.names)]
    assert args[0][-1] == "--config.log.wandb.group=lr_sweep"
    assert args[1][-1] == "--config.log.wandb.group=mine"
    assert sum("log.wandb.group" in a for a in args[1]) == 1


# --- real sweeps --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def lr_sweep(tmp_path_factory, cache_dir):
    """The 4-point sweep, run once for the tests below (two points at a time)."""
    tmp = tmp_path_factory.mktemp("lr_sweep")
    path = write_sweep(tmp / "lr.py", "grid({'seed': [0, 1], 'train.lr': [1e-3, 3e-3]})")
    workdir = tmp / "w"
    proc = sweep_cli("run", path, "--workdir", workdir, "--parallel", 2, cache_dir=cache_dir)
    return path, workdir, proc


@pytest.mark.slow
def test_sweep_runs_every_point_and_skips_them_after(lr_sweep):
    path, workdir, proc = lr_sweep
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(n for n in os.listdir(workdir) if (workdir / n).is_dir()) == sorted(POINTS)
    for name, (seed, lr) in POINTS.items():
        point = json.loads((workdir / name / "sweep_point.json").read_text())
        assert point["status"] == "done" and point["exit_code"] == 0, point
        assert point["overrides"] == {"seed": seed, "train.lr": lr}
        assert f"--config.train.lr={lr}" in point["command"]
        assert set(point["code_version"]) == {"git", "source_hash"}
        assert os.listdir(workdir / name / "checkpoints") == ["2"]
        assert (workdir / name / "metrics.jsonl").exists()
        config = json.loads((workdir / name / "config.json").read_text())
        assert config["train"]["lr"] == lr and config["seed"] == seed
        assert config["train"]["steps"] == 2
    record = json.loads((workdir / "sweep.json").read_text())
    assert [p["name"] for p in record["points"]] == list(POINTS)

    before = point_files(workdir)
    again = sweep_cli("run", path, "--workdir", workdir, "--parallel", 2)
    assert again.returncode == 0, again.stdout + again.stderr
    assert [ln for ln in again.stdout.splitlines() if ln.startswith("skip")] == [
        f"skip {name} (done)" for name in POINTS
    ]
    assert "start" not in again.stdout
    assert point_files(workdir) == before


@pytest.mark.slow
def test_collect_tables_and_plots(lr_sweep):
    _, workdir, proc = lr_sweep
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = sweep_cli("collect", workdir, "--x", "train.lr", "--y", "train/loss", "--logx")
    assert out.returncode == 0, out.stderr
    written = out.stdout.split()
    assert written == [str(workdir / f) for f in ("sweep.csv", "sweep.md", "sweep_train_loss.png")]
    assert (workdir / "sweep_train_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    lines = (workdir / "sweep.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert header[:4] == ["seed", "train.lr", "status", "seconds"]
    assert header[4:] == sorted(header[4:]) and "train/loss" in header
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=True))
        name = f"seed={row['seed']}+lr={row['train.lr']}"
        assert row["status"] == "done"
        # the last value of every key, read straight from the point's metrics.jsonl
        last = {}
        for ln in (workdir / name / "metrics.jsonl").read_text().splitlines():
            last.update({k: v for k, v in json.loads(ln).items() if k not in ("step", "time")})
        assert last and {k: float(row[k]) for k in last} == last

    md = (workdir / "sweep.md").read_text().splitlines()
    assert md[0] == "| seed | train.lr | status | train/loss |" and len(md) == 2 + len(POINTS)

    bad = sweep_cli("collect", workdir, "--metrics", "train/los")
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: --metrics 'train/los'")
    assert "train/loss" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    # --together: both metrics in one plot named after x
    both = sweep_cli(
        "collect", workdir, "--x", "train.lr", "--y", "train/loss,seconds", "--together"
    )
    assert both.returncode == 0, both.stderr
    assert (workdir / "sweep_train.lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_failed_point_is_reported_and_rerun(tmp_path, cache_dir):
    fixed = {k: v for k, v in FIXED.items() if k != "train.steps"}
    path = write_sweep(tmp_path / "f.py", "grid({'train.steps': [2, 'many']})", fixed=fixed)
    workdir = tmp_path / "w"
    proc = sweep_cli("run", path, "--workdir", workdir, "--parallel", 2, cache_dir=cache_dir)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    good = json.loads((workdir / "steps=2" / "sweep_point.json").read_text())
    bad = json.loads((workdir / "steps=many" / "sweep_point.json").read_text())
    assert good["status"] == "done"
    assert bad["status"] == "failed" and bad["exit_code"] == 2
    assert "failed steps=many" in proc.stdout and "many" in proc.stdout  # launch.run's error
    assert "1 done, 1 failed" in proc.stdout

    before = point_files(workdir)["steps=2"]
    again = sweep_cli("run", path, "--workdir", workdir, cache_dir=cache_dir)
    assert again.returncode == 1
    assert "skip steps=2 (done)" in again.stdout and "start steps=2\n" not in again.stdout
    assert "start steps=many" in again.stdout
    assert point_files(workdir)["steps=2"] == before


@pytest.mark.parametrize("name", ["tiny_lr", "kl_overopt"])
def test_bundled_sweep_files_load_and_their_overrides_exist(name):
    """Every bundled sweep loads, and each override names a key its experiment config has."""
    import importlib

    s = sweep.load_sweep(os.path.join(ROOT, "experiments", "sweeps", f"{name}.py"))
    path, _, arg = s.config.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    config = module.get_config(arg or None)
    for point in s.points:
        for key in {**s.fixed, **point}:
            node = config
            for part in key.split("."):
                assert part in node, f"{name}: {key} is not a key of {s.config}"
                node = node[part]
