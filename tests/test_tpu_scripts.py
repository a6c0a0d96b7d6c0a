"""tpu/tpu_vm.py: the gcloud commands its --dry_run prints, and the launch command run for real.

The CLI runs in a subprocess (as a user runs it; its absl flags stay out of the test process).
The launch command is executed by a local bash against a fake worker home, with
tpu/run_multihost.py initializing a 2-process CPU JAX job, so the quoting and the multi-host
entry point are checked end to end, not by string matching alone.
"""
import importlib.metadata
import json
import os
import pathlib
import shlex
import socket
import stat
import subprocess
import sys
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU_VM = REPO_ROOT / "tpu" / "tpu_vm.py"
LOCATION = ["--name=tlm", "--zone=us-central2-b", "--project=my-proj"]
# Words a shell would mangle if any layer forgot to quote them.
NASTY_ARGS = [
    "--gin_file=gin/annotate.gin",
    "--gin.MODEL_DIR='gs://bucket/run 1'",
    '--gin_bindings=annotate.prompt = "Q: $x; `id` & more"',
    "--model_dir=gs://bucket/run 1/model",
    "--input=gs://bucket/creak train.jsonl",
    "--output=gs://bucket/out",
]


def tpu_vm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
  result = subprocess.run([sys.executable, str(TPU_VM), *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def dry_run(action: str, *args: str) -> list[list[str]]:
  """The printed commands, each split back into its argv; comment lines kept as ['#', text]."""
  lines = tpu_vm(action, "--dry_run", *args).stdout.strip().splitlines()
  return [["#", line[2:]] if line.startswith("# ") else shlex.split(line) for line in lines]


def gcloud_commands(commands: list[list[str]]) -> list[list[str]]:
  return [c for c in commands if c[0] == "gcloud"]


def flag_value(argv: list[str], name: str) -> str:
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def test_create_v4_32_slice():
  commands = dry_run("create", "--accelerator_type=v4-32", *LOCATION)
  assert ["#", "v4-32: 16 chips, 4 workers x 4 chips, runtime tpu-ubuntu2204-base"] in commands
  (create,) = gcloud_commands(commands)
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "tlm"]
  assert "--accelerator-type=v4-32" in create
  assert "--version=tpu-ubuntu2204-base" in create
  assert "--zone=us-central2-b" in create and "--project=my-proj" in create


@pytest.mark.parametrize("accelerator_type, chips, workers", [
    ("v4-8", 4, 1), ("v4-32", 16, 4), ("v4-128", 64, 16), ("v5p-16", 8, 2),
    ("v5litepod-4", 4, 1), ("v5litepod-8", 8, 1), ("v5litepod-16", 16, 4),
    ("v6e-256", 256, 64),
])
def test_worker_count(accelerator_type, chips, workers):
  (summary,) = [c[1] for c in dry_run("create", f"--accelerator_type={accelerator_type}")
                if c[0] == "#"]
  assert summary.startswith(f"{accelerator_type}: {chips} chips, {workers} workers x ")


@pytest.mark.parametrize("accelerator_type", ["v4-33", "v4-4", "v5litepod-12", "v3-8", "tpu"])
def test_unknown_accelerator_type_is_an_error(accelerator_type):
  result = tpu_vm("create", "--dry_run", f"--accelerator_type={accelerator_type}", check=False)
  assert result.returncode != 0
  assert f"--accelerator_type='{accelerator_type}'" in result.stderr
  assert result.stdout == ""


def test_default_runtime_and_zone_follow_the_family():
  (create,) = gcloud_commands(dry_run("create", "--accelerator_type=v5litepod-16"))
  assert "--version=v2-alpha-tpuv5-lite" in create
  assert "--zone=us-west4-a" in create
  assert not any(a.startswith("--project") for a in create)  # gcloud's configured project.


def test_queued_create_waits_for_active_and_delete_forces():
  create, wait = gcloud_commands(dry_run("create", "--accelerator_type=v4-32", "--queued",
                                         "--spot", *LOCATION))
  assert create[:7] == ["gcloud", "compute", "tpus", "queued-resources", "create", "tlm",
                        "--node-id=tlm"]
  assert {"--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot"} <= set(create)
  assert wait[4:6] == ["describe", "tlm"] and "--format=value(state.state)" in wait
  (delete,) = gcloud_commands(dry_run("delete", "--queued", *LOCATION))
  assert delete[3:6] == ["queued-resources", "delete", "tlm"] and "--force" in delete
  (delete,) = gcloud_commands(dry_run("delete", *LOCATION))
  assert delete[3:6] == ["tpu-vm", "delete", "tlm"] and "--quiet" in delete


def test_install_ships_head_to_all_workers():
  commands = dry_run("install", "--accelerator_type=v4-32", *LOCATION)
  archive, scp, ssh = [c for c in commands if c[0] != "#"]
  assert archive[:4] == ["git", "-C", str(REPO_ROOT), "archive"] and archive[-1] == "HEAD"
  assert scp[3:5] == ["tpu-vm", "scp"] and "--worker=all" in scp
  assert scp[5] == flag_value(archive, "--output") and scp[6] == "tlm:teacherlm_jax.tar.gz"
  assert ssh[3:6] == ["tpu-vm", "ssh", "tlm"] and "--worker=all" in ssh
  remote = flag_value(ssh, "--command")
  assert "tar xzf teacherlm_jax.tar.gz" in remote
  install = next(part for part in remote.split(" && ") if part.startswith("uv pip install"))
  # The workers get the jax (and libtpu) this clone runs with, not whatever is newest.
  jax_version = importlib.metadata.version("jax")
  assert shlex.split(install)[-3:-1] == ["-e ./teacherlm_jax", f"jax[tpu]=={jax_version}"]
  assert shlex.split(install)[-1] == f"libtpu=={importlib.metadata.version('libtpu')}"
  assert "torch" not in remote


def test_install_takes_an_explicit_jax_spec():
  *_, ssh = gcloud_commands(dry_run("install", *LOCATION, "--jax_spec=jax[tpu]==0.9.0"))
  install = next(part for part in flag_value(ssh, "--command").split(" && ")
                 if part.startswith("uv pip install"))
  assert shlex.split(install)[-1] == "jax[tpu]==0.9.0"


def test_install_from_git_checks_out_the_ref():
  (ssh,) = gcloud_commands(dry_run("install", "--accelerator_type=v4-32", *LOCATION,
                                   "--repo=https://github.com/x/teacherlm_jax.git",
                                   "--git_ref=v0.1", "--extras=hf"))
  remote = flag_value(ssh, "--command")
  assert "git clone https://github.com/x/teacherlm_jax.git teacherlm_jax" in remote
  assert "checkout --quiet v0.1" in remote
  assert "'-e ./teacherlm_jax[hf]'" in remote


def test_launch_quotes_script_and_flags():
  (ssh,) = gcloud_commands(dry_run("launch", "--accelerator_type=v4-32", *LOCATION, "--",
                                   "scripts/annotate.py", *NASTY_ARGS))
  assert ssh[3:6] == ["tpu-vm", "ssh", "tlm"] and "--worker=all" in ssh
  remote_argv = shlex.split(flag_value(ssh, "--command"))
  start = remote_argv.index("tpu/run_multihost.py") + 1
  assert remote_argv[start:] == ["scripts/annotate.py", *NASTY_ARGS]


@pytest.mark.parametrize("script_args, message", [
    (["train.py"], "must be scripts/<name>.py"),
    (["scripts/../../evil.py"], "must be scripts/<name>.py"),
    (["scripts/train.py", "--model_dir=/tmp/run"], "--model_dir must be a gs:// path"),
    (["scripts/train.py", "--output", "out/"], "--output must be a gs:// path"),
    ([], "needs a script"),
])
def test_launch_rejects(script_args, message):
  result = tpu_vm("launch", "--dry_run", "--accelerator_type=v4-32", "--", *script_args,
                  check=False)
  assert result.returncode != 0 and message in result.stderr


def test_single_host_launch_may_write_locally():
  (ssh,) = gcloud_commands(dry_run("launch", "--accelerator_type=v4-8", "--",
                                   "scripts/train.py", "--model_dir=/tmp/run"))
  assert "--model_dir=/tmp/run" in flag_value(ssh, "--command")


def test_copy_out():
  mkdir, cp = dry_run("copy_out", *LOCATION, "--src=gs://bucket/run/report", "--dest=out")
  assert mkdir == ["mkdir", "-p", "out"]
  assert cp == ["gcloud", "storage", "cp", "-r", "gs://bucket/run/report", "out"]
  commands = gcloud_commands(dry_run("copy_out", *LOCATION, "--src=experiments/run1",
                                     "--dest=out"))
  (scp,) = commands
  assert scp[3:6] == ["tpu-vm", "scp", "--recurse"]
  assert scp[6:8] == ["tlm:teacherlm_jax/experiments/run1", "out"] and "--worker=0" in scp


@pytest.fixture
def fake_worker_home(tmp_path):
  """A worker's home as install leaves it: the repo (launcher + a test script) and the venv."""
  repo = tmp_path / "teacherlm_jax"
  (repo / "tpu").mkdir(parents=True)
  (repo / "tpu" / "run_multihost.py").symlink_to(REPO_ROOT / "tpu" / "run_multihost.py")
  (repo / "scripts").mkdir()
  (repo / "scripts" / "echo_args.py").write_text(
      "import json, sys\nimport jax\n"
      "print(json.dumps({'argv': sys.argv, 'name': __name__, "
      "'process_index': jax.process_index(), 'process_count': jax.process_count()}))\n")
  python = tmp_path / "teacherlm_venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
  python.chmod(python.stat().st_mode | stat.S_IEXEC)
  return tmp_path


def remote_command(*args: str) -> str:
  (ssh,) = gcloud_commands(dry_run("launch", "--accelerator_type=v4-32", *args))
  return flag_value(ssh, "--command")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_launch_command_runs_the_script_as_one_multihost_job(fake_worker_home):
  coordinator = f"--env=JAX_COORDINATOR_ADDRESS=localhost:{free_port()}"
  env = {**os.environ, "HOME": str(fake_worker_home)}
  workers = [
      subprocess.Popen(["bash", "-c", remote_command(
          coordinator, "--env=JAX_NUM_PROCESSES=2", f"--env=JAX_PROCESS_ID={i}", "--",
          "scripts/echo_args.py", *NASTY_ARGS)], env=env, stdout=subprocess.PIPE, text=True)
      for i in range(2)
  ]
  outputs = [json.loads(w.communicate(timeout=120)[0].strip().splitlines()[-1]) for w in workers]
  assert [w.returncode for w in workers] == [0, 0]
  assert sorted(o["process_index"] for o in outputs) == [0, 1]
  for output in outputs:
    assert output["process_count"] == 2 and output["name"] == "__main__"
    assert output["argv"] == ["scripts/echo_args.py", *NASTY_ARGS]


def test_detached_launch_logs_to_the_worker(fake_worker_home):
  command = remote_command("--detach", "--log_name=run1",
                           f"--env=JAX_COORDINATOR_ADDRESS=localhost:{free_port()}",
                           "--env=JAX_NUM_PROCESSES=1", "--env=JAX_PROCESS_ID=0", "--",
                           "scripts/echo_args.py", "--x=1")
  result = subprocess.run(["bash", "-c", command], env={**os.environ, "HOME": str(fake_worker_home)},
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 0 and "logging to" in result.stdout  # returns before the script ends.
  log = fake_worker_home / "teacherlm_logs" / "run1.log"
  deadline = time.time() + 60
  while time.time() < deadline and '"argv"' not in (log.read_text() if log.exists() else ""):
    time.sleep(0.2)
  last_line = log.read_text().strip().splitlines()[-1]
  assert json.loads(last_line)["argv"] == ["scripts/echo_args.py", "--x=1"]


def run_remote(command: str, home: pathlib.Path) -> str:
  result = subprocess.run(["bash", "-c", command], env={**os.environ, "HOME": str(home)},
                          capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  return result.stdout


def remote_commands(action: str, *args: str) -> list[str]:
  return [flag_value(ssh, "--command")
          for ssh in gcloud_commands(dry_run(action, "--accelerator_type=v4-32", *LOCATION, *args))
          if ssh[4] == "ssh"]


def test_status_logs_and_stop_follow_a_detached_job(fake_worker_home):
  (fake_worker_home / "teacherlm_jax" / "scripts" / "wait_for_term.py").write_text(
      "import signal, sys, time\n"
      "signal.signal(signal.SIGTERM, lambda *_: (print('saved at step 7', flush=True), "
      "sys.exit(0)))\n"
      "print('step 1', flush=True)\n"
      "for _ in range(600):\n  time.sleep(0.1)\n")
  (status,) = remote_commands("status")
  assert "no job launched" in run_remote(status, fake_worker_home)
  launch = remote_command("--detach", "--log_name=job1",
                          f"--env=JAX_COORDINATOR_ADDRESS=localhost:{free_port()}",
                          "--env=JAX_NUM_PROCESSES=1", "--env=JAX_PROCESS_ID=0", "--",
                          "scripts/wait_for_term.py")
  run_remote(launch, fake_worker_home)
  pid = int((fake_worker_home / "teacherlm_logs" / "job1.pid").read_text())
  log = fake_worker_home / "teacherlm_logs" / "job1.log"
  deadline = time.time() + 60
  while time.time() < deadline and "step 1" not in (log.read_text() if log.exists() else ""):
    time.sleep(0.2)
  try:
    host = socket.gethostname()
    assert run_remote(status, fake_worker_home).strip() == f"{host} job1: running pid {pid}"
    (logs,) = remote_commands("logs", "--log_name=job1", "--lines=5")
    assert f"{host}: step 1" in run_remote(logs, fake_worker_home).splitlines()
    (stop,) = remote_commands("stop", "--log_name=job1")
    assert f"sent SIGTERM to job1, pid {pid}" in run_remote(stop, fake_worker_home)
    while time.time() < deadline and "exited" not in run_remote(status, fake_worker_home):
      time.sleep(0.2)
    assert run_remote(status, fake_worker_home).strip() == f"{host} job1: exited"
    assert "saved at step 7" in log.read_text()  # The job saw SIGTERM, not SIGKILL.
    assert "job1 is not running" in run_remote(stop, fake_worker_home)
  finally:
    if "running" in run_remote(status, fake_worker_home):
      os.kill(pid, 9)


def test_stop_needs_the_job_name():
  result = tpu_vm("stop", "--dry_run", check=False)
  assert result.returncode != 0 and "stop needs --log_name" in result.stderr
