"""A job's loss curve as a PNG (matplotlib): training loss per step, and the loss on
the validation data where there is one.  The trainer writes it into the job folder at
the end (``loss.png``); the gateway draws the same from the job's stored events, for a
job still running or on another machine's disk."""

from __future__ import annotations

import io
from collections.abc import Sequence

Points = Sequence[tuple[int, float]]


def loss_png(train: Points, evaluation: Points = (), title: str = "") -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display, no GUI toolkit
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.subplots()
    if train:
        axes.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evaluation:
        axes.plot(*zip(*evaluation), "o-", label="eval loss", linewidth=1.2, markersize=4)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    if title:
        axes.set_title(title, fontsize=10)
    if train or evaluation:
        axes.legend()
    out = io.BytesIO()
    figure.savefig(out, format="png", bbox_inches="tight")
    return out.getvalue()
