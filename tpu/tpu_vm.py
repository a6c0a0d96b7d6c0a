r"""Cloud TPU VMs and pod slices for teacherlm_jax: create, install, launch, watch, stop, delete.

One action per call, each a short list of `gcloud` commands; `--dry_run` prints them as a shell
script instead of running them (tests check those). Usage:

  python tpu/tpu_vm.py create    --name=tlm --accelerator_type=v4-32 [--queued] [--spot]
  python tpu/tpu_vm.py install   --name=tlm --accelerator_type=v4-32 [--repo=URL --git_ref=main]
  python tpu/tpu_vm.py launch    --name=tlm --accelerator_type=v4-32 [--detach] -- \
      scripts/annotate.py --gin_file=gin/annotate.gin --gin.MODEL_DIR="'gs://b/x'" ...
  python tpu/tpu_vm.py status    --name=tlm --accelerator_type=v4-32 [--log_name=annotate]
  python tpu/tpu_vm.py logs      --name=tlm --accelerator_type=v4-32 [--lines=50] [--follow]
  python tpu/tpu_vm.py stop      --name=tlm --accelerator_type=v4-32 [--log_name=annotate]
  python tpu/tpu_vm.py copy_out  --name=tlm --src=gs://b/x/report --dest=./report
  python tpu/tpu_vm.py delete    --name=tlm [--queued]

Every worker of a slice runs the same launch command; tpu/run_multihost.py calls
jax.distributed.initialize(), which finds the other workers from the TPU metadata.
"""
import dataclasses
import importlib.metadata
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Paths on the workers, relative to the login user's home (where ssh and scp start).
REMOTE_REPO = "teacherlm_jax"
REMOTE_VENV = "teacherlm_venv"
REMOTE_LOGS = "teacherlm_logs"
REMOTE_TARBALL = "teacherlm_jax.tar.gz"
ACTIONS = ("create", "install", "launch", "status", "logs", "stop", "copy_out", "delete")


@dataclasses.dataclass(frozen=True)
class Family:
  """How one TPU generation names its slices and lays chips on hosts."""
  cores_per_chip: int  # the N in 'v4-N' counts TensorCores (2 per chip) on v4/v5p, chips on v5e/v6e.
  chips_per_host: int  # in multi-host slices.
  max_single_host_chips: int  # slices up to this many chips are one host.
  sizes: str  # human-readable list of valid N, for errors.
  runtime_version: str
  zone: str


FAMILIES = {
    "v4": Family(2, 4, 4, "8, 16, 32, ..., 4096 (a multiple of 8)", "tpu-ubuntu2204-base",
                 "us-central2-b"),
    "v5p": Family(2, 4, 4, "8, 16, 32, ..., 12288 (a multiple of 8)", "v2-alpha-tpuv5",
                  "us-east5-a"),
    "v5litepod": Family(1, 4, 8, "1, 4, 8, 16, 32, 64, 128, 256", "v2-alpha-tpuv5-lite",
                        "us-west4-a"),
    "v6e": Family(1, 4, 8, "1, 4, 8, 16, 32, 64, 128, 256", "v2-alpha-tpuv6e", "us-east5-b"),
}
_V5E_SIZES = (1, 4, 8, 16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class SliceSpec:
  accelerator_type: str
  family: str
  num_chips: int
  num_workers: int

  @property
  def chips_per_worker(self) -> int:
    return self.num_chips // self.num_workers


def slice_spec(accelerator_type: str) -> SliceSpec:
  """Parses 'v4-32' / 'v5litepod-16' / ... into chips and workers (hosts); errors name the flag."""
  match = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", accelerator_type)
  if not match:
    known = ", ".join(f"{name}-N (N in {f.sizes})" for name, f in FAMILIES.items())
    raise ValueError(f"--accelerator_type={accelerator_type!r} is not a known TPU type; "
                     f"expected one of: {known}")
  family_name, size = match.group(1), int(match.group(2))
  family = FAMILIES[family_name]
  if family.cores_per_chip == 2:
    upper = 4096 if family_name == "v4" else 12288
    valid = size % 8 == 0 and 8 <= size <= upper
  else:
    valid = size in _V5E_SIZES
  if not valid:
    raise ValueError(f"--accelerator_type={accelerator_type!r}: {family_name} slices have "
                     f"N in {family.sizes}")
  num_chips = size // family.cores_per_chip
  if num_chips <= family.max_single_host_chips:
    num_workers = 1
  else:
    num_workers = num_chips // family.chips_per_host
  return SliceSpec(accelerator_type, family_name, num_chips, num_workers)


@dataclasses.dataclass(frozen=True)
class Target:
  """Which TPU VM the commands address."""
  name: str
  zone: str
  project: str | None = None

  def location_flags(self) -> list[str]:
    flags_ = [f"--zone={self.zone}"]
    if self.project:
      flags_.append(f"--project={self.project}")
    return flags_


@dataclasses.dataclass(frozen=True)
class Step:
  """One command; with `until`, it is repeated every `poll_s` until its stdout equals `until`."""
  argv: list[str]
  comment: str = ""
  until: str | None = None
  fail_on: tuple[str, ...] = ()
  poll_s: int = 30


def _tpu_vm(target: Target, verb: str, *args: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, *target.location_flags()]


def _queued(target: Target, verb: str, *args: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", verb, target.name, *args,
          *target.location_flags()]


def ssh_all(target: Target, remote_command: str, worker: str = "all") -> list[str]:
  return _tpu_vm(target, "ssh", target.name, f"--worker={worker}", f"--command={remote_command}")


def create_steps(target: Target, spec: SliceSpec, runtime_version: str, queued: bool,
                 spot: bool) -> list[Step]:
  summary = (f"{spec.accelerator_type}: {spec.num_chips} chips, {spec.num_workers} workers x "
             f"{spec.chips_per_worker} chips, runtime {runtime_version}")
  extra = ["--spot"] if spot else []
  if not queued:
    return [Step(_tpu_vm(target, "create", target.name, f"--accelerator-type={spec.accelerator_type}",
                         f"--version={runtime_version}", *extra), comment=summary)]
  # A queued resource waits for capacity instead of failing at once; the node appears when ACTIVE.
  return [
      Step(_queued(target, "create", f"--node-id={target.name}",
                   f"--accelerator-type={spec.accelerator_type}",
                   f"--runtime-version={runtime_version}", *extra), comment=summary),
      Step(_queued(target, "describe", "--format=value(state.state)"),
           comment="repeated until it prints ACTIVE", until="ACTIVE",
           fail_on=("FAILED", "SUSPENDED")),
  ]


def pinned_jax_spec() -> str:
  """jax[tpu] at this machine's jax version, and libtpu at its version when installed: the
  workers then run the JAX this clone was tested with (and compiles for, ahead of time)."""
  try:
    specs = [f"jax[tpu]=={importlib.metadata.version('jax')}"]
  except importlib.metadata.PackageNotFoundError as e:
    raise ValueError("jax is not installed here, so there is no version to pin: pass "
                     "--jax_spec='jax[tpu]==X.Y.Z'") from e
  try:
    specs.append(f"libtpu=={importlib.metadata.version('libtpu')}")
  except importlib.metadata.PackageNotFoundError:
    pass  # jax[tpu]==X already pins a libtpu release series.
  return " ".join(specs)


def install_steps(target: Target, repo: str, git_ref: str, python_version: str, jax_spec: str,
                  extras: str) -> list[Step]:
  """Puts the code on every worker and installs it into a venv with jax[tpu] (no torch)."""
  steps = []
  if repo:
    fetch = (f"(test -d {REMOTE_REPO}/.git || git clone {shlex.quote(repo)} {REMOTE_REPO}) && "
             f"git -C {REMOTE_REPO} fetch --quiet origin && "
             f"git -C {REMOTE_REPO} checkout --quiet {shlex.quote(git_ref)}")
  else:
    # Ships the committed HEAD of this clone (uncommitted edits do not travel).
    tarball = f"/tmp/{REMOTE_TARBALL}"
    steps.append(Step(["git", "-C", str(REPO_ROOT), "archive", "--format=tar.gz",
                       f"--prefix={REMOTE_REPO}/", f"--output={tarball}", "HEAD"],
                      comment="this clone's HEAD"))
    steps.append(Step(_tpu_vm(target, "scp", tarball, f"{target.name}:{REMOTE_TARBALL}",
                              "--worker=all")))
    fetch = f"rm -rf {REMOTE_REPO} && tar xzf {REMOTE_TARBALL}"
  package = "-e ./" + REMOTE_REPO + (f"[{extras}]" if extras else "")
  # uv brings its own Python, so the image's system Python (3.10 on Ubuntu 22.04) does not matter.
  remote = " && ".join([
      fetch,
      "(command -v uv >/dev/null || test -x ~/.local/bin/uv || "
      "curl -LsSf https://astral.sh/uv/install.sh | sh)",
      "export PATH=$HOME/.local/bin:$PATH",
      f"uv venv --quiet --allow-existing --python {shlex.quote(python_version)} {REMOTE_VENV}",
      f"uv pip install --quiet --python {REMOTE_VENV}/bin/python {shlex.quote(package)} "
      + " ".join(shlex.quote(spec) for spec in jax_spec.split()),
      f"{REMOTE_VENV}/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'",
  ])
  steps.append(Step(ssh_all(target, remote), comment="install on every worker"))
  return steps


_SHARED_PATH_FLAGS = ("--model_dir", "--output")


def check_script_args(script_argv: Sequence[str], spec: SliceSpec) -> None:
  """Rejects what cannot work on all workers: a non-scripts/ entry point, per-host output dirs."""
  if not script_argv:
    raise ValueError("launch needs a script after '--', e.g. -- scripts/train.py --gin_file=...")
  script = script_argv[0]
  if not re.fullmatch(r"scripts/[\w.-]+\.py", script):
    raise ValueError(f"launch script {script!r} must be scripts/<name>.py (relative to the repo)")
  if spec.num_workers == 1:
    return
  args = list(script_argv[1:])
  for i, arg in enumerate(args):
    name, has_value, value = arg.partition("=")
    if not has_value and i + 1 < len(args):  # '--model_dir gs://...' form.
      value = args[i + 1]
    if name in _SHARED_PATH_FLAGS and not value.startswith("gs://"):
      raise ValueError(f"{arg!r}: on {spec.accelerator_type} ({spec.num_workers} workers) every "
                       f"worker writes its part, so {name} must be a gs:// path")


def launch_command(script_argv: Sequence[str], env: Sequence[str], detach: bool,
                   log_name: str) -> str:
  """The shell command each worker runs; every user-supplied word is quoted for the remote shell."""
  for assignment in env:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", assignment, re.DOTALL):
      raise ValueError(f"--env={assignment!r} must be NAME=VALUE")
  command = " ".join([
      *(["env", *(shlex.quote(a) for a in env)] if env else []),
      f"$HOME/{REMOTE_VENV}/bin/python", "tpu/run_multihost.py",
      *(shlex.quote(a) for a in script_argv),
  ])
  if detach:
    # Survives the ssh session: long annotation runs must not die with the laptop's connection.
    # The pid file lets `stop` signal exactly this job and `status` ask whether it still runs.
    log, pid = _log_path(log_name), _pid_path(log_name)
    command = (f"mkdir -p $HOME/{REMOTE_LOGS} && {{ nohup {command} > {log} 2>&1 < /dev/null & "
               f"echo $! > {pid}; }} && echo \"$(hostname): logging to {log}\"")
  return f"cd $HOME/{REMOTE_REPO} && {command}"


def _check_log_name(log_name: str) -> str:
  if not re.fullmatch(r"[\w.-]+", log_name or ""):
    raise ValueError(f"--log_name={log_name!r}: expected letters, digits, '_', '.' or '-'")
  return log_name


def _log_path(log_name: str) -> str:
  return f"$HOME/{REMOTE_LOGS}/{_check_log_name(log_name)}.log"


def _pid_path(log_name: str) -> str:
  return f"$HOME/{REMOTE_LOGS}/{_check_log_name(log_name)}.pid"


def launch_steps(target: Target, spec: SliceSpec, script_argv: Sequence[str], env: Sequence[str],
                 detach: bool, log_name: str) -> list[Step]:
  check_script_args(script_argv, spec)
  remote = launch_command(script_argv, env, detach, log_name)
  return [Step(ssh_all(target, remote),
               comment=f"same command on all {spec.num_workers} workers of {spec.accelerator_type}")]


def job_state_command(log_name: str | None) -> str:
  """Prints '<host> <job>: running pid N' or '... exited' per launched job on one worker."""
  pids = _pid_path(log_name) if log_name else f"$HOME/{REMOTE_LOGS}/*.pid"
  return (f"for p in {pids}; do test -f \"$p\" || {{ echo \"$(hostname): no job launched\"; "
          f"continue; }}; job=$(basename \"$p\" .pid); "
          f"if kill -0 $(cat \"$p\") 2>/dev/null; "
          f"then echo \"$(hostname) $job: running pid $(cat \"$p\")\"; "
          f"else echo \"$(hostname) $job: exited\"; fi; done")


def status_steps(target: Target, queued: bool, log_name: str | None) -> list[Step]:
  """The node's state (and the queued resource's), then which jobs run on each worker."""
  steps = []
  if queued:
    steps.append(Step(_queued(target, "describe", "--format=value(state.state)"),
                      comment="queued resource state"))
  steps.append(Step(_tpu_vm(target, "describe", target.name,
                            "--format=value(state,acceleratorType,health)"),
                    comment="node state, accelerator type, health"))
  steps.append(Step(ssh_all(target, job_state_command(log_name)),
                    comment=f"is {log_name or 'each detached job'} running on each worker"))
  return steps


def logs_steps(target: Target, log_name: str | None, lines: int, follow: bool) -> list[Step]:
  """Tails each worker's log(s) of detached launches, every line prefixed with its host."""
  if lines < 1:
    raise ValueError(f"--lines={lines}: expected a count >= 1")
  log = _log_path(log_name) if log_name else f"$HOME/{REMOTE_LOGS}/*.log"
  tail = f"tail -n {lines}" + (" -F" if follow else "")
  # A host prefix on every line tells apart the interleaved output of --worker=all.
  remote = f"{tail} {log} 2>&1 | sed -u \"s/^/$(hostname): /\""
  return [Step(ssh_all(target, remote), comment=f"last {lines} lines of "
               f"{(log_name + '.log') if log_name else 'every log'} on every worker"
               + (", following" if follow else ""))]


def stop_steps(target: Target, log_name: str | None) -> list[Step]:
  """SIGTERM to one detached job on every worker: the trainer saves a checkpoint and exits."""
  if not log_name:
    raise ValueError("stop needs --log_name (the job's log stem, e.g. --log_name=train); "
                     "`status` lists the jobs")
  pid = _pid_path(log_name)
  remote = (f"if test -f {pid} && kill -TERM $(cat {pid}) 2>/dev/null; "
            f"then echo \"$(hostname): sent SIGTERM to {log_name}, pid $(cat {pid})\"; "
            f"else echo \"$(hostname): {log_name} is not running\"; fi")
  return [Step(ssh_all(target, remote), comment=f"stop {log_name} on every worker (SIGTERM: "
               "the trainer checkpoints, then exits)")]


def copy_out_steps(target: Target, src: str, dest: str, worker: int) -> list[Step]:
  if not src:
    raise ValueError("copy_out needs --src (a gs:// path or a path on the worker)")
  if src.startswith("gs://"):
    return [Step(["mkdir", "-p", dest]), Step(["gcloud", "storage", "cp", "-r", src, dest])]
  # Relative paths are relative to the repo on the worker, where launch runs the scripts.
  remote = src if src.startswith(("/", "~")) else f"{REMOTE_REPO}/{src}"
  return [Step(["mkdir", "-p", dest]),
          Step(_tpu_vm(target, "scp", "--recurse", f"{target.name}:{remote}", dest,
                       f"--worker={worker}"), comment=f"from worker {worker}")]


def delete_steps(target: Target, queued: bool) -> list[Step]:
  if queued:
    # --force also deletes the node the queued resource created.
    return [Step(_queued(target, "delete", "--force", "--quiet"))]
  return [Step(_tpu_vm(target, "delete", target.name, "--quiet"))]


def format_steps(steps: Sequence[Step]) -> str:
  """The steps as a shell script: what --dry_run prints."""
  lines = []
  for step in steps:
    if step.comment:
      lines.append(f"# {step.comment}")
    lines.append(shlex.join(step.argv))
  return "\n".join(lines)


def run_steps(steps: Sequence[Step]) -> None:
  for step in steps:
    logging.info("running: %s", shlex.join(step.argv))
    if step.until is None:
      subprocess.run(step.argv, check=True)
      continue
    start = time.time()
    while True:
      state = subprocess.run(step.argv, check=True, capture_output=True,
                             text=True).stdout.strip()
      if state == step.until:
        break
      if state in step.fail_on:
        raise RuntimeError(f"{shlex.join(step.argv)} printed {state}")
      print(f"\rstate {state or '?'} after {time.time() - start:.0f}s, waiting for {step.until}",
            end="", file=sys.stderr, flush=True)
      time.sleep(step.poll_s)
    print(file=sys.stderr)


# --- command line -------------------------------------------------------------------------------

_NAME = flags.DEFINE_string("name", "teacherlm", "TPU VM (node) name; also the queued resource id.")
_ACCELERATOR_TYPE = flags.DEFINE_string(
    "accelerator_type", "v4-8", "v4-N, v5p-N (N = TensorCores), v5litepod-N, v6e-N (N = chips).")
_ZONE = flags.DEFINE_string("zone", None, "GCE zone; default: one that offers the TPU family.")
_PROJECT = flags.DEFINE_string("project", None, "GCP project; default: gcloud's configured one.")
_RUNTIME_VERSION = flags.DEFINE_string(
    "runtime_version", None, "TPU VM image; default per family (tpu-ubuntu2204-base for v4, "
    "v2-alpha-tpuv5-lite for v5e, ...).")
_QUEUED = flags.DEFINE_bool("queued", False, "create/delete through a queued resource.")
_SPOT = flags.DEFINE_bool("spot", False, "Spot (preemptible) capacity.")
_REPO = flags.DEFINE_string("repo", "", "install: git URL to clone on the workers; empty ships "
                            "this clone's HEAD with git archive + scp.")
_GIT_REF = flags.DEFINE_string("git_ref", "main", "install: branch, tag or commit for --repo.")
_PYTHON_VERSION = flags.DEFINE_string("python_version", "3.11", "install: venv Python (via uv).")
_JAX_SPEC = flags.DEFINE_string(
    "jax_spec", None, "install: pip specs of JAX for TPU, space-separated; default: this "
    "machine's jax as jax[tpu]==VERSION plus its libtpu==VERSION when installed.")
_EXTRAS = flags.DEFINE_string("extras", "", "install: package extras, e.g. 'hf' (pulls torch).")
_ENV = flags.DEFINE_multi_string("env", [], "launch: NAME=VALUE set for the script.")
_DETACH = flags.DEFINE_bool("detach", False, "launch: run under nohup, log to "
                            f"~/{REMOTE_LOGS}/<log_name>.log on each worker.")
_LOG_NAME = flags.DEFINE_string(
    "log_name", None, "launch/status/logs/stop: the job's log and pid file stem in "
    f"~/{REMOTE_LOGS}; launch defaults to the script's name, status and logs to every job.")
_LINES = flags.DEFINE_integer("lines", 50, "logs: lines of each worker's log to print.")
_FOLLOW = flags.DEFINE_bool("follow", False, "logs: keep following the logs (tail -F).")
_SRC = flags.DEFINE_string("src", "", "copy_out: gs:// path, or a path on the worker "
                           f"(relative to ~/{REMOTE_REPO}).")
_DEST = flags.DEFINE_string("dest", ".", "copy_out: local directory.")
_WORKER = flags.DEFINE_integer("worker", 0, "copy_out: worker to copy from.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")


def build_steps(action: str, extra_argv: Sequence[str]) -> list[Step]:
  spec = slice_spec(_ACCELERATOR_TYPE.value)
  family = FAMILIES[spec.family]
  target = Target(_NAME.value, _ZONE.value or family.zone, _PROJECT.value)
  if action != "launch" and extra_argv:
    raise ValueError(f"{action} takes no positional arguments, got {list(extra_argv)}")
  if action == "create":
    return create_steps(target, spec, _RUNTIME_VERSION.value or family.runtime_version,
                        _QUEUED.value, _SPOT.value)
  if action == "install":
    return install_steps(target, _REPO.value, _GIT_REF.value, _PYTHON_VERSION.value,
                         _JAX_SPEC.value or pinned_jax_spec(), _EXTRAS.value)
  if action == "launch":
    log_name = _LOG_NAME.value or (pathlib.Path(extra_argv[0]).stem if extra_argv else "")
    return launch_steps(target, spec, extra_argv, _ENV.value, _DETACH.value, log_name)
  if action == "status":
    return status_steps(target, _QUEUED.value, _LOG_NAME.value)
  if action == "logs":
    return logs_steps(target, _LOG_NAME.value, _LINES.value, _FOLLOW.value)
  if action == "stop":
    return stop_steps(target, _LOG_NAME.value)
  if action == "copy_out":
    return copy_out_steps(target, _SRC.value, _DEST.value, _WORKER.value)
  if action == "delete":
    return delete_steps(target, _QUEUED.value)
  raise ValueError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")


def main(argv: Sequence[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError(f"usage: tpu_vm.py {{{'|'.join(ACTIONS)}}} [flags] [-- script args]")
  try:
    steps = build_steps(argv[1], argv[2:])
  except ValueError as e:
    raise SystemExit(f"tpu_vm.py {argv[1]}: {e}") from e
  if _DRY_RUN.value:
    print(format_steps(steps))
  else:
    run_steps(steps)


if __name__ == "__main__":
  os.environ.setdefault("CLOUDSDK_CORE_DISABLE_PROMPTS", "1")
  app.run(main)
