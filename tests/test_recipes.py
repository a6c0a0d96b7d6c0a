"""Every command line the docs give (tpu/README.md, gin file headers) parses as written.

Each `python scripts/X.py ...` is parsed by the script's own absl flags and gin configuration
(tests/recipes.py, one subprocess per script); each `python tpu/tpu_vm.py ...` runs with
--dry_run, and a `launch` also has its script command parsed. A flag or gin binding that a
script does not know fails here, not on a pod slice.
"""
import json
import os
import pathlib
import subprocess
import sys
from typing import Dict, List

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
import recipes  # pylint: disable=g-import-not-at-top,wrong-import-position

# Which script a gin file configures, for the `--gin.X=...` fragments in its header.
GIN_FILE_SCRIPTS = {"annotate": "scripts/annotate.py", "eval": "scripts/evaluate.py",
                    "teacher_sft": "scripts/train.py", "student": "scripts/train.py",
                    "pipeline": "scripts/pipeline.py"}
# Required flags a header fragment leaves out (the fragment adds to a full command).
FRAGMENT_FLAGS = {"scripts/pipeline.py": ["--experiment_dir=/tmp/recipe"],
                  "scripts/evaluate.py": ["--checkpoint=/ckpt", "--output_dir=/tmp/eval"],
                  "scripts/annotate.py": ["--input=x.jsonl", "--output=/tmp/ann"],
                  "scripts/train.py": ["--model_dir=/tmp/run"]}


def _script_of_gin_file(path: pathlib.Path) -> str:
  return next(script for prefix, script in GIN_FILE_SCRIPTS.items()
              if path.stem.startswith(prefix))


def documented_commands() -> List[tuple]:
  """(where, argv) for every python command of the docs, header fragments made whole."""
  found = [("tpu/README.md", argv)
           for argv in recipes.markdown_commands((REPO_ROOT / "tpu" / "README.md").read_text())]
  for path in sorted((REPO_ROOT / "gin").glob("*.gin")):
    for argv in recipes.gin_header_commands(path):
      if argv[0].startswith("--"):
        script = _script_of_gin_file(path)
        argv = ["python", script, f"--gin_file=gin/{path.name}", *argv,
                *FRAGMENT_FLAGS[script]]
      found.append((f"gin/{path.name}", argv))
  return [(where, argv) for where, argv in found if argv[0] in ("python", "python3")]


def _script_commands(commands: List[tuple]) -> Dict[str, List[tuple]]:
  """{script: [(where, argv from the script on)]}, launch's remote scripts included."""
  by_script: Dict[str, List[tuple]] = {}
  for where, argv in commands:
    argv = argv[1:]
    if argv[0] == "tpu/tpu_vm.py":
      if argv[1] != "launch":
        continue
      argv = argv[argv.index("--") + 1:]
    by_script.setdefault(argv[0], []).append((where, argv))
  return by_script


def parse_errors(commands: List[tuple]) -> List[str]:
  """'where: command: error' for every command that does not parse."""
  env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu",
         "TF_CPP_MIN_LOG_LEVEL": "3"}
  errors = []
  for where, argv in commands:
    if argv[1] == "tpu/tpu_vm.py":
      result = subprocess.run([sys.executable, *argv[1:3], "--dry_run", *argv[3:]], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=60, env=env)
      if result.returncode:
        errors.append(f"{where}: {' '.join(argv)}: {result.stderr.strip().splitlines()[-1]}")
  for script, script_commands in _script_commands(commands).items():
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tests" / "recipes.py"), script], cwd=REPO_ROOT,
        input=json.dumps([argv for _, argv in script_commands]), capture_output=True, text=True,
        timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    errors += [f"{where}: {' '.join(argv)}: {error}"
               for (where, argv), error in zip(script_commands, outcomes) if error]
  return errors


def test_every_documented_command_parses():
  commands = documented_commands()
  scripts = {argv[1] for _, argv in commands}
  assert {"tpu/tpu_vm.py", "scripts/pipeline.py", "scripts/evaluate.py"} <= scripts
  launched = {script for script in _script_commands(commands)}
  assert {"scripts/annotate.py", "scripts/train.py"} <= launched  # tpu/README.md's recipes.
  errors = parse_errors(commands)
  assert not errors, "documented commands that do not parse:\n" + "\n".join(errors)


def test_a_recipe_with_an_unknown_flag_or_binding_fails():
  mistakes = {"--modle_dir=gs://b/m": "modle_dir",
              "--gin.annotate.mesh_shapee='(1, 1, 4)'": "mesh_shapee",
              "--mesh=1,4": "--mesh=1,4"}
  readme = ["```bash", "GS=gs://bucket/run"]
  for words in [""] + list(mistakes):
    readme += ["python tpu/tpu_vm.py launch --accelerator_type=v4-32 -- \\",
               "    scripts/annotate.py --gin_file=gin/annotate.gin --model_dir=$GS/teacher \\",
               f"    --input=$GS/in.jsonl --output=$GS/out {words}"]
  commands = [("README", argv) for argv in recipes.markdown_commands("\n".join(readme + ["```"]))]
  assert len(commands) == 4 and "--model_dir=gs://bucket/run/teacher" in commands[0][1]
  errors = parse_errors(commands)
  assert len(errors) == 3  # The command without a mistake parses.
  for error, message in zip(errors, mistakes.values()):
    assert message in error, error


def test_header_fragments_become_whole_commands(tmp_path):
  gin_file = tmp_path / "student_x.gin"
  gin_file.write_text("# Students.\n#   --gin.TrainConfig.num_steps=5   # fewer steps\n"
                      "DataConfig.seq_len = 8\n# --not.a.header=1\n")
  assert recipes.gin_header_commands(gin_file) == [["--gin.TrainConfig.num_steps=5"]]
