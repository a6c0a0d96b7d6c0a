"""absl + gin glue shared by every `scripts/*.py` entry point (T5X conventions).

  --gin_file=gin/x.gin            parsed in order; `include 'gin/y.gin'` resolves from the repo
  --gin_bindings='A.b = 1'        repeated
  --gin.A.b=1                     T5X-style shorthand for a binding

`run(main)` splits the `--gin.X=` arguments off before absl parses flags and passes them to
`main(argv, gin_bindings)`; `parse(files, bindings)` parses everything and turns gin's errors
into one message that says which binding to fix.
"""
from __future__ import annotations

import pathlib
import sys
from typing import Callable, List, Sequence, Tuple

from absl import app
from absl import flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "gin files, parsed in order")
GIN_BINDINGS = flags.DEFINE_multi_string(
    "gin_bindings", [], "gin bindings, e.g. 'TrainConfig.num_steps = 10' (also --gin.X=value)")


def split_gin_flags(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
  """(argv without `--gin.NAME=value` arguments, bindings 'NAME = value')."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      name, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        raise app.UsageError(f"{arg}: expected --gin.NAME=VALUE")
      bindings.append(f"{name} = {value}")
    else:
      rest.append(arg)
  return rest, bindings


def parse(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses gin files then bindings; errors name the offending binding and what to change."""
  import gin  # pylint: disable=g-import-not-at-top
  gin.add_config_file_search_path(str(REPO_ROOT))
  try:
    gin.parse_config_files_and_bindings(list(gin_files), list(bindings))
  except (ValueError, IOError, KeyError) as e:
    raise ValueError(f"gin configuration error: {e}\nFix the gin file or the --gin_bindings / "
                     "--gin.NAME=value flag named above (unknown names are typos or bindings "
                     "for a module that this script does not import).") from e


def parse_flags_and_gin(gin_bindings: Sequence[str]) -> None:
  """Parses --gin_file / --gin_bindings flags plus the split-off `--gin.X=` bindings."""
  parse(GIN_FILES.value, list(GIN_BINDINGS.value) + list(gin_bindings))


def run(main: Callable[..., None]) -> None:
  """`app.run` for a `main(argv, gin_bindings)` that accepts T5X-style `--gin.X=` flags."""
  argv, bindings = split_gin_flags(sys.argv)
  app.run(lambda a: main(a, bindings), argv=argv)
