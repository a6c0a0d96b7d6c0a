"""The experiment report: a markdown file plus PNG plots.

Inputs are plain data (what the pipeline stages wrote): per-student loss curves, per-student
accuracy per task (one entry per seed), the annotation quality summary and a few sample
annotations. Accuracies over seeds are reported as mean ± standard deviation with the seed
count, never a single best run.
"""
from __future__ import annotations

import io
import json
import statistics
from typing import List, Mapping, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # Headless: TPU VMs and CI have no display.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from teacherlm_jax.storage import files  # pylint: disable=g-import-not-at-top

LossCurve = Sequence[Tuple[int, float]]


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
  values = list(values)
  if not values:
    return float("nan"), float("nan")
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _tasks(accuracy: Mapping[str, Mapping[str, Sequence[float]]]) -> list:
  return sorted({task for per_task in accuracy.values() for task in per_task})


def _save(fig, ax, path) -> files.Path:
  ax.legend()
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=120)
  plt.close(fig)
  return files.write_atomic(path, png.getvalue())


def comparison_table(accuracy: Mapping[str, Mapping[str, Sequence[float]]]) -> str:
  """Markdown table: one row per task, one column per student, 'mean ± std (n)' in percent.

  Args:
    accuracy: student name -> task name -> accuracy per seed (0..1).
  """
  students = list(accuracy)
  tasks = _tasks(accuracy)
  lines = ["| task | " + " | ".join(students) + " |",
           "|---|" + "---|" * len(students)]
  for task in tasks:
    cells = []
    for student in students:
      values = accuracy[student].get(task, [])
      mean, std = mean_std(values)
      cells.append(f"{100 * mean:.1f} ± {100 * std:.1f} (n={len(values)})" if values else "–")
    lines.append(f"| {task} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_losses(curves: Mapping[str, Sequence[LossCurve]], path) -> files.Path:
  """Training loss of each student (one line per seed, same colour per student)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for color, (student, seeds) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"],
                                     curves.items()):
    for i, curve in enumerate(seeds):
      if curve:
        steps, losses = zip(*curve)
        ax.plot(steps, losses, color=color, alpha=0.8, label=student if i == 0 else None)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss")
  ax.set_title("Students: training loss")
  return _save(fig, ax, path)


def plot_accuracy(accuracy: Mapping[str, Mapping[str, Sequence[float]]], path) -> files.Path:
  """Grouped bars of accuracy per task (mean over seeds, error bar = std)."""
  students = list(accuracy)
  tasks = _tasks(accuracy)
  width = 0.8 / max(len(students), 1)
  fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(tasks) + 2), 4))
  for i, student in enumerate(students):
    stats = [mean_std(accuracy[student].get(task, [])) for task in tasks]
    ax.bar([t + i * width for t in range(len(tasks))], [100 * m for m, _ in stats], width,
           yerr=[100 * s for _, s in stats], capsize=3, label=student)
  ax.set_xticks([t + width * (len(students) - 1) / 2 for t in range(len(tasks))])
  ax.set_xticklabels(tasks, rotation=20, ha="right")
  ax.set_ylabel("accuracy (%)")
  ax.set_title("Accuracy: original vs annotated students")
  return _save(fig, ax, path)


def write_report(directory, *, title: str, accuracy, loss_curves, annotation_summary: Mapping,
                 sample_annotations: List[Mapping], notes: Sequence[str] = ()) -> files.Path:
  """Writes report.md, loss.png, accuracy.png and report.json into `directory`."""
  directory = files.makedirs(directory)
  plot_losses(loss_curves, directory / "loss.png")
  plot_accuracy(accuracy, directory / "accuracy.png")
  lines = [f"# {title}", ""]
  lines += list(notes) + [""] if notes else []
  lines += ["## Accuracy (rank classification)", "", comparison_table(accuracy), "",
            "![accuracy](accuracy.png)", "", "## Student training loss", "",
            "![loss](loss.png)", "", "## Annotation quality", ""]
  lines += [f"- {key}: {value}" for key, value in annotation_summary.items()]
  lines += ["", "## Sample annotations", ""]
  for sample in sample_annotations:
    lines.append(f"**{sample.get('id', '')}** — `{sample.get('prompt', '')}`")
    lines.append("")
    for key, value in sample.items():
      if key not in ("id", "prompt"):
        lines.append(f"- *{key}*: {value}")
    lines.append("")
  files.write_atomic(directory / "report.md", "\n".join(lines))
  files.write_atomic(directory / "report.json", json.dumps(
      {"accuracy": accuracy, "annotation_summary": annotation_summary,
       "samples": sample_annotations}, indent=2, default=str))
  return directory / "report.md"
