"""The report's statistics: paired differences over seeds with a 95% confidence interval."""
import math

import pytest

from teacherlm_jax.pipeline import report


def test_paired_delta_is_the_paired_t_interval():
  treated, control = [0.50, 0.55, 0.45, 0.60, 0.52], [0.25, 0.24, 0.27, 0.26, 0.23]
  delta = report.paired_delta(treated, control)
  differences = [a - b for a, b in zip(treated, control)]
  mean = sum(differences) / 5
  std = math.sqrt(sum((d - mean) ** 2 for d in differences) / 4)
  half = 2.7764451051977934 * std / math.sqrt(5)  # t(0.975, 4 degrees of freedom)
  assert delta["mean"] == pytest.approx(mean)
  assert delta["ci95"] == pytest.approx([mean - half, mean + half])
  assert delta["n"] == 5 and delta["per_seed"] == pytest.approx(differences)


def test_paired_delta_needs_pairs():
  with pytest.raises(ValueError, match="equally many"):
    report.paired_delta([0.5, 0.6], [0.2])
  assert math.isnan(report.paired_delta([0.5], [0.2])["ci95"][0])


def test_delta_table_compares_each_arm_with_the_first(tmp_path):
  accuracy = {"original": {"t": [0.25, 0.26]}, "teacher_annotated": {"t": [0.45, 0.50]}}
  gold = {"original": {"t": [-2.0, -2.1]}, "teacher_annotated": {"t": [-1.0, -1.1]}}
  table = report.delta_table(accuracy, gold, "t")
  assert "| teacher_annotated | 47.5 ± 3.5 (n=2) | +22.0 [" in table
  assert "| +1.000 [" in table
  path = report.write_report(tmp_path, title="t", accuracy=accuracy, loss_curves={},
                             annotation_summary={}, sample_annotations=[], gold_scores=gold,
                             chance=25.0, shortcut_baseline_accuracy=25.0, wrong_answer_rate=0.0,
                             teacher_loss=[(1, 2.0), (2, 1.0)])
  assert "options-only shortcut baseline" in path.read_text()
  assert (tmp_path / "teacher_loss.png").exists()
