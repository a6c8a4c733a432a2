"""Published pretrained-model scores from Google's model cards, to set beside measured ones.

Sources: the Gemma 2 model card (google/gemma-2-2b, -9b, -27b, "Benchmark Results", PT
columns) and the Gemma 3 model card (ai.google.dev/gemma/docs/core/model_card_3, tables
"Gemma 3 PT 270M" and "Gemma 3 PT 1B/4B/12B/27B"). Scores are percentages; the second item is
the card's setting. The cards do not say which accuracy variant they report.

A model is matched by its architecture (model type, width, depth), never by its file name. The
cards cover pretrained weights: an instruction-tuned model of the same shape is matched too, so
compare with care.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    model: str  # e.g. "Gemma 3 PT 270M"
    score: float  # percent
    setting: str  # the card's wording, e.g. "25-shot"
    shots: int | None  # the shot count that setting means, when it names one


# (model_type, hidden_size, num_hidden_layers) -> card column
SHAPES = {
    ("gemma2", 2304, 26): "Gemma 2 PT 2B",
    ("gemma2", 3584, 42): "Gemma 2 PT 9B",
    ("gemma2", 4608, 46): "Gemma 2 PT 27B",
    ("gemma3_text", 640, 18): "Gemma 3 PT 270M",
    ("gemma3_text", 1152, 26): "Gemma 3 PT 1B",
    ("gemma3_text", 2560, 34): "Gemma 3 PT 4B",
    ("gemma3_text", 3840, 48): "Gemma 3 PT 12B",
    ("gemma3_text", 5376, 62): "Gemma 3 PT 27B",
}

_G2 = {  # task: (setting, 2B, 9B, 27B)
    "mmlu": ("5-shot, top-1", 51.3, 71.3, 75.2),
    "hellaswag": ("10-shot", 73.0, 81.9, 86.4),
    "piqa": ("0-shot", 77.8, 81.7, 83.2),
    "siqa": ("0-shot", 51.9, 53.4, 53.7),
    "boolq": ("0-shot", 72.5, 84.2, 84.8),
    "winogrande": ("partial score", 70.9, 80.6, 83.7),
    "arc_easy": ("0-shot", 80.1, 88.0, 88.6),
    "arc_challenge": ("25-shot", 55.4, 68.4, 71.4),
    "triviaqa": ("5-shot", 59.4, 76.6, 83.7),
    "nq_open": ("5-shot", 16.7, 29.2, 34.5),
    "humaneval": ("pass@1", 17.7, 40.2, 51.8),
    "mbpp": ("3-shot", 29.6, 52.4, 62.6),
    "gsm8k": ("5-shot, maj@1", 23.9, 68.6, 74.0),
    "math": ("4-shot", 15.0, 36.6, 42.3),
    "agieval": ("3-5-shot", 30.6, 52.8, 55.1),
    "drop": ("3-shot, F1", 52.0, 69.4, 72.2),
    "bbh": ("3-shot, CoT", 41.9, 68.2, 74.9),
}

_G3_270M = {
    "hellaswag": ("10-shot", 40.9),
    "boolq": ("0-shot", 61.4),
    "piqa": ("0-shot", 67.7),
    "triviaqa": ("5-shot", 15.4),
    "arc_challenge": ("25-shot", 29.0),
    "arc_easy": ("0-shot", 57.7),
    "winogrande": ("5-shot", 52.0),
}

_G3 = {  # task: (setting, 1B, 4B, 12B, 27B); None where the card has no figure
    "hellaswag": ("10-shot", 62.3, 77.2, 84.2, 85.6),
    "boolq": ("0-shot", 63.2, 72.3, 78.8, 82.4),
    "piqa": ("0-shot", 73.8, 79.6, 81.8, 83.3),
    "siqa": ("0-shot", 48.9, 51.9, 53.4, 54.9),
    "triviaqa": ("5-shot", 39.8, 65.8, 78.2, 85.5),
    "nq_open": ("5-shot", 9.48, 20.0, 31.4, 36.1),
    "arc_challenge": ("25-shot", 38.4, 56.2, 68.9, 70.6),
    "arc_easy": ("0-shot", 73.0, 82.4, 88.3, 89.0),
    "winogrande": ("5-shot", 58.2, 64.7, 74.3, 78.8),
    "bbh": ("few-shot", 28.4, 50.9, 72.6, 77.7),
    "drop": ("1-shot", 42.4, 60.1, 72.2, 77.2),
    "mmlu": ("5-shot", None, 59.6, 74.5, 78.6),
    "agieval": ("3-5-shot", None, 42.1, 57.4, 66.2),
    "math": ("4-shot", None, 24.2, 43.3, 50.0),
    "gsm8k": ("8-shot", None, 38.4, 71.0, 82.6),
    "mbpp": ("3-shot", None, 46.0, 60.4, 65.6),
    "humaneval": ("0-shot", None, 36.0, 45.7, 48.8),
}


def _shots(setting: str) -> int | None:
    head = setting.split(",")[0].strip()
    if head.endswith("-shot") and head[:-5].isdigit():
        return int(head[:-5])
    return {"pass@1": 0, "partial score": 0, "3-5-shot": None}.get(head)


def _table() -> dict[str, dict[str, Published]]:
    out: dict[str, dict[str, Published]] = {}
    for task, (setting, *scores) in _G2.items():
        for model, score in zip(("Gemma 2 PT 2B", "Gemma 2 PT 9B", "Gemma 2 PT 27B"), scores):
            out.setdefault(model, {})[task] = Published(model, score, setting, _shots(setting))
    for task, (setting, score) in _G3_270M.items():
        out.setdefault("Gemma 3 PT 270M", {})[task] = Published("Gemma 3 PT 270M", score, setting, _shots(setting))
    for task, (setting, *scores) in _G3.items():
        for model, score in zip(("Gemma 3 PT 1B", "Gemma 3 PT 4B", "Gemma 3 PT 12B", "Gemma 3 PT 27B"), scores):
            if score is not None:
                out.setdefault(model, {})[task] = Published(model, score, setting, _shots(setting))
    return out


CARD = _table()


def card_model(config) -> str | None:
    """The card column whose architecture matches `config`, if any."""
    return SHAPES.get((config.model_type, config.hidden_size, config.num_hidden_layers))


def published(config, task: str) -> Published | None:
    model = card_model(config)
    return CARD.get(model, {}).get(task) if model else None
