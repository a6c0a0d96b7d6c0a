"""The experiment report: a markdown file plus PNG plots.

Inputs are plain data (what the pipeline stages wrote): per-student loss curves, per-student
accuracy per task (one entry per seed), the annotation quality summary and a few sample
annotations. Accuracies over seeds are reported as mean ± standard deviation with the seed
count, never a single best run; each arm's gain over the first ('original') is its paired
difference per seed with a 95% confidence interval (paired t).
"""
from __future__ import annotations

import io
import json
import math
import statistics
from typing import List, Mapping, Optional, Sequence, Tuple

import matplotlib
from scipy import stats

matplotlib.use("Agg")  # Headless: TPU VMs and CI have no display.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from teacherlm_jax.storage import files  # pylint: disable=g-import-not-at-top

LossCurve = Sequence[Tuple[int, float]]


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
  values = list(values)
  if not values:
    return float("nan"), float("nan")
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_delta(treated: Sequence[float], control: Sequence[float]) -> dict:
  """Mean of treated - control over paired seeds with its 95% paired-t confidence interval.

  Returns {'mean', 'ci95': [lo, hi], 'per_seed', 'n'}; the interval is NaN with one seed.
  """
  if len(treated) != len(control) or not treated:
    raise ValueError(f"paired_delta needs equally many values, at least one (got "
                     f"{len(treated)} and {len(control)})")
  differences = [a - b for a, b in zip(treated, control)]
  mean, std = mean_std(differences)
  n = len(differences)
  half = (stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else float("nan")
  return {"mean": mean, "ci95": [mean - half, mean + half], "per_seed": differences, "n": n}


def arm_deltas(values: Mapping[str, Sequence[float]], scale: float = 1.0) -> dict:
  """Arm -> paired_delta against the first arm, values multiplied by `scale`."""
  arms = list(values)
  control = [scale * v for v in values[arms[0]]]
  return {arm: paired_delta([scale * v for v in values[arm]], control) for arm in arms[1:]}


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


def delta_table(accuracy: Mapping[str, Mapping[str, Sequence[float]]],
                gold_scores: Mapping[str, Mapping[str, Sequence[float]]], task: str) -> str:
  """Markdown table of each arm on `task`: accuracy, Δ accuracy against the first arm with
  its 95% CI, mean gold-letter log-probability and its Δ."""
  arms = list(accuracy)
  deltas = arm_deltas({arm: accuracy[arm][task] for arm in arms}, scale=100.0)
  has_gold = all(None not in gold_scores.get(arm, {}).get(task, [None]) for arm in arms)
  gold_deltas = (arm_deltas({arm: gold_scores[arm][task] for arm in arms}) if has_gold else {})
  lines = [f"| arm ({task}) | accuracy % | Δ accuracy (points) [95% CI] | gold log-prob | "
           "Δ gold log-prob [95% CI] |", "|---|---|---|---|---|"]
  for arm in arms:
    mean, std = mean_std(accuracy[arm][task])
    cells = [f"{100 * mean:.1f} ± {100 * std:.1f} (n={len(accuracy[arm][task])})"]
    cells.append(_delta_cell(deltas.get(arm), "{:+.1f}") if arm in deltas else "–")
    cells.append(f"{mean_std(gold_scores[arm][task])[0]:.3f}" if has_gold else "–")
    cells.append(_delta_cell(gold_deltas.get(arm), "{:+.3f}") if arm in gold_deltas else "–")
    lines.append(f"| {arm} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _delta_cell(delta: dict, number: str) -> str:
  lo, hi = delta["ci95"]
  return f"{number.format(delta['mean'])} [{number.format(lo)}, {number.format(hi)}]"


def plot_losses(curves: Mapping[str, Sequence[LossCurve]], path,
                title: str = "Students: training loss") -> files.Path:
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
  ax.set_title(title)
  return _save(fig, ax, path)


def plot_accuracy(accuracy: Mapping[str, Mapping[str, Sequence[float]]], path,
                  chance: Optional[float] = None) -> files.Path:
  """Grouped bars of accuracy per task (mean over seeds, error bar = std), chance (%) as a
  dashed line."""
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
  if chance is not None:
    ax.axhline(chance, color="black", linestyle="--", linewidth=1, label=f"chance {chance:.0f}%")
  ax.set_ylabel("accuracy (%)")
  ax.set_title("Accuracy per student arm")
  return _save(fig, ax, path)


def write_report(directory, *, title: str, accuracy, loss_curves, annotation_summary: Mapping,
                 sample_annotations: List[Mapping], notes: Sequence[str] = (),
                 primary_task: Optional[str] = None, gold_scores=None,
                 chance: Optional[float] = None, shortcut_baseline_accuracy: Optional[float] = None,
                 wrong_answer_rate: Optional[float] = None,
                 teacher_loss: Optional[LossCurve] = None, steps=None) -> files.Path:
  """Writes report.md, report.json, loss.png, accuracy.png (and teacher_loss.png) into
  `directory`.

  Args:
    accuracy: arm -> task -> accuracy per seed (0..1); the first arm is the control.
    gold_scores: arm -> task -> mean gold-option log-probability per seed.
    primary_task: the task of the Δ table and of report.json's 'arms' / 'delta'.
    chance, shortcut_baseline_accuracy: percent; wrong_answer_rate: a fraction of the
      annotated records.
  """
  directory = files.makedirs(directory)
  gold_scores = gold_scores or {}
  plot_losses(loss_curves, directory / "loss.png")
  plot_accuracy(accuracy, directory / "accuracy.png", chance=chance)
  if teacher_loss:
    plot_losses({"teacher": [teacher_loss]}, directory / "teacher_loss.png",
                title="Teacher: training loss")
  primary_task = primary_task or _tasks(accuracy)[0]
  lines = [f"# {title}", ""]
  lines += list(notes) + [""] if notes else []
  lines += ["## Effect of the annotations", "",
            delta_table(accuracy, gold_scores, primary_task), "",
            f"- chance: {_percent(chance)}",
            f"- options-only shortcut baseline (sees the options, never the question): "
            f"{_percent(shortcut_baseline_accuracy)}",
            "- teacher annotations flagged wrong_answer: "
            + (f"{100 * wrong_answer_rate:.1f}%" if wrong_answer_rate is not None else "n/a"),
            "", "## Accuracy per task (rank classification)", "", comparison_table(accuracy), "",
            "![accuracy](accuracy.png)", "", "## Student training loss", "",
            "![loss](loss.png)", ""]
  if teacher_loss:
    lines += ["## Teacher training loss", "", "![teacher loss](teacher_loss.png)", ""]
  lines += ["## Annotation quality", ""]
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
  arms = {}
  for arm in accuracy:
    arms[arm] = {"accuracy": [100 * v for v in accuracy[arm].get(primary_task, [])],
                 "gold_logprob": list(gold_scores.get(arm, {}).get(primary_task, [])),
                 "steps": list((steps or {}).get(arm, []))}
  summary = {
      "primary_task": primary_task,
      "arms": arms,
      "delta": arm_deltas({arm: accuracy[arm][primary_task] for arm in accuracy}, scale=100.0),
      "delta_gold_logprob": (
          arm_deltas({arm: gold_scores[arm][primary_task] for arm in accuracy})
          if all(arm in gold_scores for arm in accuracy) else None),
      "shortcut_baseline_accuracy": shortcut_baseline_accuracy,
      "chance": chance,
      "wrong_answer_rate": wrong_answer_rate,
      "accuracy": accuracy,
      "teacher_loss": list(teacher_loss or []),
      "annotation_summary": annotation_summary,
      "samples": sample_annotations,
  }
  files.write_atomic(directory / "report.json", json.dumps(summary, indent=2, default=str))
  return directory / "report.md"


def _percent(value: Optional[float]) -> str:
  return f"{value:.1f}%" if value is not None else "n/a"
