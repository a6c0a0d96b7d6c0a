"""Command lines of the docs (tpu/README.md, gin file headers), and a parser that checks them.

Extraction: shell lines of ```bash blocks (backslash continuations joined, `NAME=value`
assignments expanded in later lines) and the `python ...` / `--flag` lines of a gin file's
leading comment. Checking runs in a subprocess per script, as a user's run would:

  python tests/recipes.py scripts/train.py < commands.json

loads the script without running main, then for every argv: absl parses its flags (an unknown
or missing required flag fails) and the script's `configure` parses its gin files and bindings
(an unknown binding fails). Prints one JSON error (or null) per argv.
"""
import json
import pathlib
import re
import runpy
import shlex
import sys
from typing import Dict, Iterator, List

_ASSIGNMENT = re.compile(r"([A-Z_][A-Z0-9_]*)=(.*)")
_VARIABLE = re.compile(r"\$\{?([A-Z_][A-Z0-9_]*)\}?")


def _logical_lines(lines: List[str]) -> Iterator[str]:
  """Lines with trailing-backslash continuations joined."""
  current = ""
  for line in lines:
    stripped = line.rstrip()
    if stripped.endswith("\\"):
      current += stripped[:-1] + " "
      continue
    yield current + stripped
    current = ""
  if current:
    yield current


def shell_commands(lines: List[str]) -> List[List[str]]:
  """argv of every command in shell `lines`; `NAME=value` assignments are expanded later on."""
  variables: Dict[str, str] = {}
  commands = []
  for line in _logical_lines(lines):
    expanded = _VARIABLE.sub(lambda m: variables.get(m.group(1), m.group(0)), line)
    argv = shlex.split(expanded, comments=True)
    if not argv:
      continue
    assignment = _ASSIGNMENT.fullmatch(argv[0])
    if assignment and len(argv) == 1:
      variables[assignment.group(1)] = assignment.group(2)
      continue
    commands.append(argv)
  return commands


def markdown_commands(text: str) -> List[List[str]]:
  """Commands of the ```bash blocks of a markdown text, read as one shell session."""
  blocks = re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.DOTALL)
  return shell_commands([line for block in blocks for line in block.splitlines()])


def gin_header_commands(path: pathlib.Path) -> List[List[str]]:
  """Commands (`python ...`) and flag fragments (`--gin.X=...`) in a gin file's first comment."""
  lines = []
  for line in path.read_text().splitlines():
    if not line.startswith("#"):
      break
    lines.append(line[1:].strip())
  commands = []
  for line in _logical_lines(lines):
    if line.startswith(("python ", "--")):
      commands.append(shlex.split(line, comments=True))
  return commands


def _check(script_globals: dict, argv: List[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  from teacherlm_jax import cli  # pylint: disable=g-import-not-at-top
  flags.FLAGS.unparse_flags()
  gin.clear_config()
  rest, bindings = cli.split_gin_flags(argv)
  remaining = flags.FLAGS(rest)
  if len(remaining) > 1:
    raise ValueError(f"unexpected arguments {remaining[1:]}")
  if "configure" in script_globals:
    script_globals["configure"](bindings)
  elif bindings:
    raise ValueError(f"{argv[0]} takes no gin bindings, got {bindings}")


def main() -> None:
  script = sys.argv[1]
  script_globals = runpy.run_path(script, run_name="recipe_check")
  results = []
  for argv in json.load(sys.stdin):
    try:
      _check(script_globals, argv)
      results.append(None)
    except BaseException as e:  # absl's flag errors and app.UsageError alike.  pylint: disable=broad-except
      results.append(f"{type(e).__name__}: {e}")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
