"""Progress bar, results as a markdown table and as JSON."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field


@dataclass
class TaskResult:
    task: str
    title: str
    model: str  # the source the model was loaded from
    metrics: dict[str, float]  # fractions in [0, 1]
    primary: str  # the metric compared with the card
    items: int
    split: str  # the split scored
    shots: int
    shot_split: str  # where the few-shot examples came from
    source: str  # the data file or folder read
    wall_s: float
    settings: dict = field(default_factory=dict)
    card_model: str | None = None  # e.g. "Gemma 3 PT 270M"
    published: float | None = None  # percent, when the card reports this task in these settings
    published_setting: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


class Progress:
    """done/total with rate and ETA on stderr: redrawn in place on a terminal, else every ~10%."""

    def __init__(self, total: int, label: str, stream=None, enabled: bool = True):
        self.total, self.label, self.done = max(total, 1), label, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty() if hasattr(self.stream, "isatty") else False
        self.start = time.monotonic()
        self.shown = -1

    def __call__(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if not self.enabled:
            return
        step = self.done * 10 // self.total
        if self.tty or step != self.shown or self.done == self.total:
            self.shown = step
            self._draw()

    def _draw(self) -> None:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        width = 24
        filled = width * self.done // self.total
        bar = "#" * filled + "-" * (width - filled)
        line = f"{self.label} [{bar}] {self.done}/{self.total} {rate:.2f}/s elapsed {_clock(elapsed)} eta {_clock(eta)}"
        end = "\n" if not self.tty or self.done == self.total else ""
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "--:--"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


def markdown(results: list[TaskResult]) -> str:
    """One row per metric, the card's number beside the task's primary metric."""
    rows = [
        "| task | metric | score | card | Δ | items | split | shots (from) | wall |",
        "|---|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in results:
        for name, value in r.metrics.items():
            card = delta = ""
            if name == r.primary and r.published is not None:
                card = f"{r.published:.1f} ({r.card_model}, {r.published_setting})"
                delta = f"{100 * value - r.published:+.1f}"
            rows.append(
                f"| {r.title} | {name} | {100 * value:.1f} | {card} | {delta} | {r.items} | {r.split} | "
                f"{r.shots} ({r.shot_split}) | {r.wall_s:.0f} s |"
            )
    lines = ["\n".join(rows), ""]
    models = sorted({r.model for r in results})
    lines.append(f"model: {', '.join(models)}")
    for r in results:
        settings = ", ".join(f"{k}={v!r}" for k, v in r.settings.items())
        lines.append(f"{r.task}: data {r.source}; {settings}")
    return "\n".join(lines)


def write_json(results: list[TaskResult], path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"results": [r.to_json() for r in results]}, f, indent=2)
        f.write("\n")
