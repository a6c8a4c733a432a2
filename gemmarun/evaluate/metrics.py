"""Answer normalisation and scoring as the public benchmarks' own scorers define them.

- SQuAD v1.1 `normalize_answer` (Natural Questions open, exact match and token F1);
- TriviaQA's `normalize_answer` (its official evaluation script: punctuation becomes a space);
- DROP's `get_metrics` (numbers normalised, bags of spans aligned for the best F1);
- GSM8K answer extraction (`#### 42`, and the last number as lm-evaluation-harness's flexible filter);
- MATH answer extraction and normalisation as in Minerva (Lewkowycz et al., 2022, appendix D.1).
"""

from __future__ import annotations

import itertools
import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


# -- SQuAD ---------------------------------------------------------------------------------------


def squad_normalize(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, answers: list[str]) -> float:
    p = squad_normalize(prediction)
    return float(any(p == squad_normalize(a) for a in answers))


def token_f1(prediction: str, truth: str) -> float:
    pred, gold = squad_normalize(prediction).split(), squad_normalize(truth).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def max_f1(prediction: str, answers: list[str]) -> float:
    return max((token_f1(prediction, a) for a in answers), default=0.0)


# -- TriviaQA ------------------------------------------------------------------------------------


def triviaqa_normalize(s: str) -> str:
    """TriviaQA's official normaliser: punctuation (and typographic quotes) become spaces."""
    exclude = _PUNCT | set("‘’´`")
    s = s.lower().replace("_", " ")
    s = "".join(" " if ch in exclude else ch for ch in s)
    return " ".join(_ARTICLES.sub(" ", s).split())


def triviaqa_match(prediction: str, aliases: list[str]) -> float:
    p = triviaqa_normalize(prediction)
    return float(any(p == triviaqa_normalize(a) for a in aliases))


# -- DROP ----------------------------------------------------------------------------------------


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def drop_normalize(answer: str) -> str:
    """DROP's _normalize_answer: per token (split on spaces and hyphens) lower case, punctuation
    removed unless the token is a number, numbers as floats ("3" == "3.0"), articles dropped."""
    parts = []
    for token in re.split(" |-", answer):
        token = token.lower()
        if not _is_number(token):
            token = "".join(ch for ch in token if ch not in _PUNCT)
        if _is_number(token):
            token = str(float(token))
        token = " ".join(_ARTICLES.sub(" ", token).split())
        if token.strip():
            parts.append(token)
    return " ".join(parts).strip()


def _bag_f1(pred: set[str], gold: set[str]) -> float:
    # A gold bag with numbers only counts when one of its numbers is predicted.
    gold_numbers = {w for w in gold if _is_number(w)}
    if gold_numbers and not gold_numbers & {w for w in pred if _is_number(w)}:
        return 0.0
    common = len(pred & gold)
    precision = common / len(pred) if pred else 1.0
    recall = common / len(gold) if gold else 1.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def drop_metrics(predicted: list[str], gold: list[str]) -> tuple[float, float]:
    """(exact match, F1) of a predicted bag of spans against one gold bag, as DROP's get_metrics:
    spans are aligned one to one for the best total F1, averaged over the larger bag."""
    pred_norm = [drop_normalize(p) for p in predicted]
    gold_norm = [drop_normalize(g) for g in gold]
    em = float(set(pred_norm) == set(gold_norm) and len(pred_norm) == len(gold_norm))
    pb, gb = [set(p.split()) for p in pred_norm], [set(g.split()) for g in gold_norm]
    scores = [[_bag_f1(p, g) for p in pb] for g in gb]  # (gold, predicted)
    # The bags hold a handful of spans, so trying every assignment is exact and cheap; a bag of
    # more than 7 spans (none in DROP) pairs spans in order instead.
    best = 0.0
    if max(len(gb), len(pb)) > 7:
        assignments = iter([(range(len(gb)), range(len(pb)))])
    elif len(gb) <= len(pb):
        assignments = ((range(len(gb)), cols) for cols in itertools.permutations(range(len(pb)), len(gb)))
    else:
        assignments = ((rows, range(len(pb))) for rows in itertools.permutations(range(len(gb)), len(pb)))
    for rows, cols in assignments:
        best = max(best, sum(scores[r][c] for r, c in zip(rows, cols)))
    return em, round(best / max(len(pb), len(gb), 1), 2)


# -- GSM8K ---------------------------------------------------------------------------------------

_GSM_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_GSM_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _clean_number(s: str) -> str:
    return s.replace(",", "").replace("$", "").strip().rstrip(".")


def gsm8k_target(answer: str) -> str:
    m = _GSM_STRICT.search(answer)
    return _clean_number(m.group(1)) if m else answer.strip()


def gsm8k_extract(completion: str, strict: bool) -> str | None:
    """`#### N` (strict), or the last number in the text (flexible)."""
    if strict:
        m = _GSM_STRICT.search(completion)
        return _clean_number(m.group(1)) if m else None
    found = [a or b for a, b in _GSM_FLEX.findall(completion)]
    return _clean_number(found[-1]) if found else None


# -- MATH (Minerva) ------------------------------------------------------------------------------


def last_boxed(s: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    idx = max(s.rfind("\\boxed"), s.rfind("\\fbox"))
    if idx < 0:
        return None
    if s.startswith("\\boxed ", idx):  # "\boxed 5"
        return s[idx + len("\\boxed ") :].split("$")[0].strip()
    start = s.find("{", idx)
    if start < 0:
        return None
    depth = 0
    for i in range(start, len(s)):
        depth += {"{": 1, "}": -1}.get(s[i], 0)
        if depth == 0:
            return s[start + 1 : i]
    return None


_SUBSTITUTIONS = [
    ("an ", ""), ("a ", ""), (".$", "$"), ("\\$", ""), (r"\ ", ""), (" ", ""), ("mbox", "text"),
    (",\\text{and}", ","), ("\\text{and}", ","), ("\\text{m}", "\\text{}"),
]  # fmt: skip
_REMOVED = [
    "square", "ways", "integers", "dollars", "mph", "inches", "ft", "hours", "km", "units", "\\ldots", "sue",
    "points", "feet", "minutes", "digits", "cents", "degrees", "cm", "gm", "pounds", "meters", "meals", "edges",
    "students", "childrentickets", "multiples", "\\text{s}", "\\text{.}", "\\text{\ns}", "\\text{}^2",
    "\\text{}^3", "\\text{\n}", "\\text{}", r"\mathrm{th}", r"^\circ", r"^{\circ}", r"\;", r",\!", "{,}", '"',
    "\\dots",
]  # fmt: skip


def math_normalize(answer: str) -> str:
    """Minerva's normalize_final_answer."""
    answer = answer.split("=")[-1]
    for before, after in _SUBSTITUTIONS:
        answer = answer.replace(before, after)
    for expr in _REMOVED:
        answer = answer.replace(expr, "")
    answer = re.sub(r"(.*?)(\$)(.*?)(\$)(.*)", "$\\3$", answer)
    answer = re.sub(r"(\\text\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\textbf\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\overline\{)(.*?)(\})", "\\2", answer)
    answer = re.sub(r"(\\boxed\{)(.*)(\})", "\\2", answer)
    answer = re.sub(r"(frac)([^{])(.)", "frac{\\2}{\\3}", answer)  # \frac12 -> \frac{1}{2}
    answer = re.sub(r"(sqrt)([^{])", "sqrt{\\2}", answer)
    answer = answer.replace("$", "")
    if answer.replace(",", "").isdigit():
        answer = answer.replace(",", "")
    return answer


_MINERVA_ANSWER = re.compile(r"Final Answer: The final answer is(.*?)\. I hope it is correct\.", re.DOTALL)


def math_extract(completion: str) -> str | None:
    """The answer of a Minerva-format solution, else the last \\boxed{} of the text."""
    m = _MINERVA_ANSWER.search(completion)
    if m:
        return math_normalize(m.group(1).strip())
    boxed = last_boxed(completion)
    return math_normalize(boxed) if boxed is not None else None
