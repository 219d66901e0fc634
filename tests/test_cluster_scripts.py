"""launch.tpu and launch.slurm: the commands they print, and the shell they generate, run for real.

No cloud or cluster here: --dry-run output is compared with commands built independently, and the
remote / batch scripts are executed by bash against fake `python`, `srun`, `scontrol`, `sbatch`.
"""

import os
import shlex
import stat
import subprocess
import sys
import time

import pytest

from launch import slurm, tpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GCLOUD = ["gcloud", "compute", "tpus", "tpu-vm"]
# Quoting matters: one argument has a space and one a single quote.
RUN_ARGS = [
    "--config",
    "experiments/pretrain.py:size=small",
    "--workdir",
    "/mnt/bkt/runs/p1",
    "--config.data.train=my corpus/*.jsonl",
    "--config.tokenizer.path=it's.model",
]


def cli(module, *argv):
    return subprocess.run(
        [sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def one_error_line(proc):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


# ---- launch.tpu -------------------------------------------------------------------------------


def test_tpu_all_dry_run_prints_the_exact_commands():
    opts = "--name t1 --zone us-central2-b --accelerator v4-8 --spot --bucket bkt --dry-run"
    proc = cli("launch.tpu", *opts.split(), "all", "--", *RUN_ARGS)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    zone = "--zone=us-central2-b"
    create = f"create t1 {zone} --accelerator-type=v4-8 --version=tpu-ubuntu2204-base --spot"
    assert lines[0] == shlex.join([*GCLOUD, *create.split()])
    assert lines[1] == "git archive --format=tar.gz --output=build/t1-code.tar.gz HEAD"
    assert lines[2] == shlex.join(
        [*GCLOUD, "scp", "build/t1-code.tar.gz", "t1:t1-code.tar.gz", zone, "--worker=all"]
    )
    ssh_all = [*GCLOUD, "ssh", "t1", zone, "--worker=all"]
    untar = "mkdir -p ~/rlhf-jax && tar -xzf ~/t1-code.tar.gz -C ~/rlhf-jax"
    untar += " && rm -f ~/t1-code.tar.gz"
    assert lines[3] == shlex.join([*ssh_all, f"--command={untar}"])
    setup = shlex.split(lines[4])
    assert setup[:-1] == ssh_all and setup[-1].startswith("--command=cd ~/rlhf-jax && ")
    assert "python3 -m venv .venv" in setup[-1] and '-e . "jax[tpu]"' in setup[-1]
    assert "gcsfuse --implicit-dirs bkt /mnt/bkt" in setup[-1]
    start = shlex.split(lines[5])
    assert start[:-1] == ssh_all
    # The launch.run args survive two levels of quoting (ssh --command, then bash -c).
    words = shlex.split(start[-1].removeprefix("--command="))
    job = words[words.index("-c") + 1]
    args_text = job.split(" -m launch.run ", 1)[1].split("; echo $? > run.rc", 1)[0]
    assert shlex.split(args_text) == RUN_ARGS
    follow = shlex.split(lines[6])
    assert follow[:-1] == [*GCLOUD, "ssh", "t1", zone, "--worker=0"]
    assert "tail -n 100 -F" in follow[-1]
    assert lines[7] == shlex.join([*GCLOUD, "delete", "t1", zone, "--quiet"])
    assert len(lines) == 8


FAMILIES = [
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v5litepod-256", "v2-alpha-tpuv5-lite"),
    ("v5p-128", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
]


@pytest.mark.parametrize("accel,version", FAMILIES)
def test_tpu_create_runtime_default_per_family(capsys, accel, version):
    argv = ["--name", "n", "--zone", "z", "--project", "p", "--accelerator", accel]
    assert tpu.main([*argv, "--preemptible", "--dry-run", "create"]) == 0
    create = f"create n --zone=z --project=p --accelerator-type={accel} --version={version}"
    expected = shlex.join([*GCLOUD, *create.split(), "--preemptible"])
    assert capsys.readouterr().out == expected + "\n"
    # An explicit --version wins, and unknown families are fine with one.
    argv = ["--name", "n", "--zone", "z", "--accelerator", "v9-8", "--version", "rt"]
    argv += ["--dry-run", "create"]
    assert tpu.main(argv) == 0
    assert "--accelerator-type=v9-8 --version=rt\n" in capsys.readouterr().out


def test_tpu_logs_stop_delete_and_git_code(capsys):
    base = ["--name", "n", "--zone", "z", "--dir", "/opt/code dir", "--dry-run"]
    for action in ("logs", "stop", "delete"):
        assert tpu.main([*base, action]) == 0
    logs, stop, delete = capsys.readouterr().out.splitlines()
    assert shlex.split(logs)[:-1] == [*GCLOUD, "ssh", "n", "--zone=z", "--worker=0"]
    assert shlex.split(logs)[-1].startswith("--command=cd '/opt/code dir' && ")
    assert shlex.split(stop)[:-1] == [*GCLOUD, "ssh", "n", "--zone=z", "--worker=all"]
    assert 'kill -TERM -- -"$(cat run.pid)"' in stop
    assert delete == shlex.join([*GCLOUD, "delete", "n", "--zone=z", "--quiet"])

    git = ["--code", "git", "--repo", "https://example.org/r.git", "--ref", "v1"]
    assert tpu.main(["--name", "n", "--zone", "z", *git, "--dry-run", "setup"]) == 0
    clone = shlex.split(capsys.readouterr().out.splitlines()[0])[-1]
    assert "git clone --depth=1 --branch v1 https://example.org/r.git ~/rlhf-jax" in clone


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--zone", "z", "--accelerator", "v4-8", "create"], "--name is required"),
        (["--name", "n", "--accelerator", "v4-8", "create"], "--zone is required"),
        (["--name", "n", "--zone", "z", "--accelerator", "v9x-8", "create"], "pass --version"),
        (["--name", "n", "--zone", "z", "run"], "needs the launch.run args"),
        (["--name", "n", "--zone", "z", "--code", "git", "setup"], "--repo"),
    ],
)
def test_tpu_errors_are_one_line(argv, needle):
    assert needle in one_error_line(cli("launch.tpu", *argv))


def _fake_worker(tmp_path, python_body):
    """A worker checkout dir whose .venv/bin/python is a bash stand-in for launch.run."""
    work = tmp_path / "work dir"
    (work / ".venv" / "bin").mkdir(parents=True)
    executable(work / ".venv" / "bin" / "python", "#!/bin/bash\n" + python_body)
    args, _ = tpu.parse(["--name", "n", "--zone", "z", "--dir", str(work), "run", "--", "x"])
    return work, args


def _bash(script, env=None):
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=30, env=env
    )


def test_tpu_remote_scripts_start_follow_and_stop(tmp_path):
    # launch.run stand-in: records its argv, then waits for SIGTERM and exits 75 like launch.run.
    body = (
        'printf "%s\\n" "$@" > argv.txt\n'
        "trap 'echo checkpointed; exit 75' TERM\n"
        'echo "step 1"\nsleep 30 & wait\n'
    )
    work, args = _fake_worker(tmp_path, body)
    try:
        assert _bash(tpu.start_script(args, RUN_ARGS)).returncode == 0
        again = _bash(tpu.start_script(args, RUN_ARGS))  # must not launch a second job
        assert "already going" in again.stdout
        for _ in range(100):  # the job is detached: wait for it to record its args
            if (work / "argv.txt").exists() and (work / "argv.txt").read_text():
                break
            time.sleep(0.05)
        assert (work / "argv.txt").read_text().splitlines() == ["-m", "launch.run", *RUN_ARGS]
        stopped = _bash(tpu.stop_script(args))
        assert "sent SIGTERM" in stopped.stdout
        follow = _bash(tpu.follow_script(args))
        assert follow.returncode == tpu.PREEMPTED, follow.stderr
        assert "step 1" in follow.stdout and "checkpointed" in follow.stdout
    finally:
        assert "no run" in _bash(tpu.stop_script(args)).stdout  # nothing left behind


def test_tpu_follow_returns_the_jobs_exit_code_and_coordinator(tmp_path):
    """On a TPU VM the job learns worker 0's address from the metadata server (a fake curl)."""
    work, args = _fake_worker(tmp_path, 'echo "coordinator=$JAX_COORDINATOR_ADDRESS"; exit 3\n')
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    executable(fake_bin / "curl", "#!/bin/bash\necho t1-w-0:0:10.0.0.5,t1-w-1:1:10.0.0.6\n")
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    assert _bash(tpu.start_script(args, RUN_ARGS), env).returncode == 0
    follow = _bash(tpu.follow_script(args))
    assert follow.returncode == 3, follow.stderr
    assert "coordinator=10.0.0.5:8482" in follow.stdout


class FakeCloud:
    """Records commands; `codes` gives exit codes by gcloud verb (ssh to worker 0 = follow)."""

    def __init__(self, codes, state):
        self.codes, self.state, self.log = {k: list(v) for k, v in codes.items()}, state, []

    @staticmethod
    def verb(cmd):
        if cmd[0] != "gcloud":
            return cmd[0]
        if cmd[4] == "ssh":
            return "follow" if "--worker=0" in cmd else "ssh"
        return cmd[4]

    def execute(self, cmd):
        v = self.verb(cmd)
        self.log.append(v)
        return self.codes[v].pop(0) if self.codes.get(v) else 0

    def query(self, cmd):
        self.log.append("describe")
        return (0, self.state) if self.state else (1, "")


SPOT = ["--name", "n", "--zone", "z", "--accelerator", "v5litepod-16", "--spot"]


def test_tpu_retries_recreate_a_preempted_vm_and_resume():
    cloud = FakeCloud({"follow": [tpu.SSH_LOST, 0]}, state="PREEMPTED")
    rc = tpu.main([*SPOT, "--retries", "2", "run", "--", *RUN_ARGS], cloud.execute, cloud.query)
    assert rc == 0
    # start+follow, lost; describe; delete, create, code copy (archive, scp, untar), setup, run.
    assert cloud.log == ["ssh", "follow", "describe", "delete", "create"] + [
        "git", "scp", "ssh", "ssh", "ssh", "follow"
    ]  # fmt: skip


def test_tpu_retries_stop_on_a_live_vm_and_reattach_after_a_dropped_connection():
    stopped = FakeCloud({"follow": [tpu.PREEMPTED]}, state="READY")
    rc = tpu.main([*SPOT, "--retries", "3", "run", "--", "x"], stopped.execute, stopped.query)
    assert rc == tpu.PREEMPTED
    assert stopped.log == ["ssh", "follow", "describe"]
    dropped = FakeCloud({"follow": [tpu.SSH_LOST, 0]}, state="READY")
    rc = tpu.main([*SPOT, "--retries", "3", "run", "--", "x"], dropped.execute, dropped.query)
    assert rc == 0
    assert dropped.log == ["ssh", "follow", "describe", "follow"]
    no_retry = FakeCloud({"follow": [tpu.SSH_LOST]}, state=None)
    assert tpu.main([*SPOT, "run", "--", "x"], no_retry.execute, no_retry.query) == tpu.SSH_LOST


def test_tpu_all_deletes_only_what_it_created():
    failed_run = FakeCloud({"follow": [1]}, state="READY")
    assert tpu.main([*SPOT, "all", "--", "x"], failed_run.execute, failed_run.query) == 1
    assert failed_run.log[0] == "create" and failed_run.log[-1] == "delete"
    name_taken = FakeCloud({"create": [1]}, state="READY")
    assert tpu.main([*SPOT, "all", "--", "x"], name_taken.execute, name_taken.query) == 1
    assert name_taken.log == ["create"]
    kept = FakeCloud({}, state="READY")
    assert tpu.main([*SPOT, "--keep", "all", "--", "x"], kept.execute, kept.query) == 0
    assert "delete" not in kept.log


# ---- launch.slurm -----------------------------------------------------------------------------

SLURM_RUN = ["--config", "experiments/ppo_ptx.py:size=1.3b", "--workdir", "/shared/runs/ppo 1"]
SLURM_RUN += ["--config.mesh.dcn.data=-1"]


def test_slurm_dry_run_per_node():
    opts = "--nodes 4 --partition gpu --account acct --time 1-02:00:00 --requeue"
    opts += " --signal_seconds 300 --dry-run"
    proc = cli("launch.slurm", *opts.split(), "--", *SLURM_RUN)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    sbatch = [ln for ln in lines if ln.startswith("#SBATCH ")]
    assert sbatch == [
        "#SBATCH --job-name=ppo 1",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=1-02:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=acct",
        "#SBATCH --signal=TERM@300",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=/shared/runs/ppo 1-%j.log",
    ]
    assert lines[0] == "#!/bin/bash"
    srun = ["srun", "--nodes=4", "--ntasks-per-node=1", "python", "-m", "launch.run", *SLURM_RUN]
    assert shlex.join(srun) in lines
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines
    assert f"cd {shlex.quote(ROOT)}" in lines and "source .venv/bin/activate" in lines
    assert '  scontrol requeue "$SLURM_JOB_ID"' in lines
    assert lines[-1] == shlex.join(["sbatch", "/shared/runs/ppo 1.sbatch"])


def test_slurm_dry_run_per_gpu(capsys):
    argv = ["--gpus_per_node", "4", "--per", "gpu", "--script_dir", "slurm", "--job_name", "j"]
    assert slurm.main([*argv, "--dry-run", "--", *SLURM_RUN]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "#SBATCH --ntasks-per-node=4" in lines and "#SBATCH --gpus-per-node=4" in lines
    srun = ["srun", "--nodes=1", "--ntasks-per-node=4", "--gpu-bind=none", "python", "-m"]
    srun += ["launch.run", *SLURM_RUN]
    assert shlex.join(srun) in lines
    assert not any("JAX_LOCAL_DEVICE_IDS" in ln or "requeue" in ln for ln in lines)
    assert not any(ln.startswith("#SBATCH --time") for ln in lines)
    assert f"#SBATCH --output={os.getcwd()}/slurm/j-%j.log" in lines
    assert lines[-1] == f"sbatch {os.getcwd()}/slurm/j.sbatch"


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--", "--config", "c.py"], "need --workdir"),
        (["--", "--workdir", "w"], "need --config"),
        (["--time", "90", "--", "--config", "c", "--workdir", "w"], "HH:MM:SS"),
        (["--time", "00:01:00", "--", "--config", "c", "--workdir", "w"], "no time to run"),
        (["--per", "task", "--", "--config", "c", "--workdir", "w"], "--per"),
    ],
)
def test_slurm_errors_are_one_line(argv, needle):
    assert needle in one_error_line(cli("launch.slurm", *argv))


@pytest.mark.parametrize("srun_rc,requeued", [(75, True), (0, False), (1, False)])
def test_slurm_script_requeues_only_on_75(tmp_path, srun_rc, requeued):
    """Submits for real against fake sbatch/srun/scontrol, then runs the written batch script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    for tool, code in (("sbatch", 0), ("scontrol", 0), ("srun", srun_rc)):
        executable(
            bin_dir / tool,
            f'#!/bin/bash\n{{ printf {tool}; printf " %s|" "$@"; echo; }} >> "{calls}"\n'
            f'echo "LOCAL_IDS=$JAX_LOCAL_DEVICE_IDS" >> "{calls}"\nexit {code}\n',
        )
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42")
    workdir = tmp_path / "runs" / "r1"
    argv = ["--nodes", "2", "--gpus_per_node", "2", "--setup", "true"]
    argv += ["--requeue", "--", "--config", "c.py", "--workdir", str(workdir), "a b"]
    cmd = [sys.executable, "-m", "launch.slurm", *argv]
    submit = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    script = tmp_path / "runs" / "r1.sbatch"
    assert calls.read_text() == f"sbatch {script}|\nLOCAL_IDS=\n"
    calls.write_text("")
    ran = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert ran.returncode == srun_rc
    srun_call = "srun --nodes=2| --ntasks-per-node=1| python| -m| launch.run| --config| c.py|"
    srun_call += f" --workdir| {workdir}| a b|\nLOCAL_IDS=0,1\n"
    requeue = "scontrol requeue| 42|\nLOCAL_IDS=0,1\n"
    assert calls.read_text() == srun_call + (requeue if requeued else "")
