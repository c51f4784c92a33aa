"""A job's curve: the solver's relative gradient norm per iteration (LQF) or loss and
validation accuracy per epoch (fine-tuning). Live from the job's progress events; once a
model exists, from the complete history the training stored with it."""

from __future__ import annotations

from typing import Any

from markupsafe import Markup

from app.ui.charts import line_chart

# (metric, chart label, y label, log scale, fixed y range)
SOLVER = ("relative_grad_norm", "Solver: relative gradient norm per iteration",
          "relative gradient norm", True, None)
EPOCH_CHARTS = [("train_loss", "Training loss per epoch", "training loss", False, None),
                ("val_accuracy", "Validation accuracy per epoch", "validation accuracy", False,
                 (0.0, 1.0))]


def points_from_events(events: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, dict[int, float]] = {}
    for event in events:
        progress, metrics = event.get("progress") or {}, event.get("metrics") or {}
        if event.get("type") != "progress" or progress.get("stage") not in {"solve", "epoch"}:
            continue
        for name, value in metrics.items():
            series.setdefault(name, {})[int(progress.get("step", 0))] = float(value)
    return {name: sorted(points.items()) for name, points in series.items()}


def points_from_info(info: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for step_key, history in (("iteration", info.get("solver_history")),
                              ("epoch", info.get("epoch_history"))):
        for row in history or []:
            for name, value in row.items():
                if name != step_key:
                    out.setdefault(name, []).append((float(row[step_key]), float(value)))
    return out


def charts(series: dict[str, list[tuple[float, float]]]) -> list[Markup]:
    out = []
    for metric, label, y_label, log_y, y_range in [SOLVER, *EPOCH_CHARTS]:
        if series.get(metric):
            x_label = "iteration" if metric == SOLVER[0] else "epoch"
            out.append(line_chart(series[metric], label=label, x_label=x_label,
                                  y_label=y_label, log_y=log_y, y_range=y_range))
    return out
