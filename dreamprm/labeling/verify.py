"""Is a final answer right? Pluggable verifiers, chosen by name (``--verifier``).

    exact   the normalised strings are equal (`dreamprm.bestofn.candidates.normalize_answer`)
    number  both sides read as one number ("1,234", "3/4", "12 cm", "45%") and agree within a
            relative tolerance
    choice  multiple choice: the answer names the same option as the ground truth, by letter
            ("B", "(b)", "B. 42") or by the option's text
    math    math-verify (HF's verifier: LaTeX, fractions, sets, units in ``\\text{}``); needs the
            ``label`` extra
    auto    choice when the question has options; else right when number says so (a numeric ground
            truth) or math does (exact when math-verify is not installed)

A verifier is ``(answer, ground_truth, choices) -> bool``; an answer of None (the chain gave none)
is wrong. Register another with `register`.
"""
from __future__ import annotations

import math
import re
import threading
from typing import Callable, Optional

from dreamprm.bestofn.candidates import normalize_answer

Verifier = Callable[[Optional[str], str, tuple], bool]

DEFAULT_TOLERANCE = 1e-4

_UNITS_OR_WORDS = r"[a-zA-Z°%\\{}\s^]*"
_NUMBER_ONLY = re.compile(r"^\s*\$?\s*(?:\\text\{)?\s*([-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+)"
                          r"(?:\s*/\s*(\d[\d,]*(?:\.\d+)?))?\s*(%?)\s*" + _UNITS_OR_WORDS + r"\$?\s*$")
_LETTER = re.compile(r"^\s*(?:option\s+|answer\s*:?\s*)?[(\[]?\s*([A-Za-z])\s*[)\].:]?(?:\s+.*)?$",
                     re.IGNORECASE | re.DOTALL)


def read_number(text: str) -> float | None:
    """One number in `text`, with thousands commas, an optional fraction, percent or unit words.

    >>> read_number("1,234"), read_number("3/4"), read_number("12 cm"), read_number("45%"), read_number("x+1")
    (1234.0, 0.75, 12.0, 0.45, None)
    """
    match = _NUMBER_ONLY.match(text)
    if not match:
        return None
    head, denominator, percent = match.groups()
    # Commas only as thousands separators: "1,234" but not "1,2" (a list).
    if "," in head and not re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", head):
        return None
    value = float(head.replace(",", ""))
    if denominator is not None:
        den = float(denominator.replace(",", ""))
        if den == 0:
            return None
        value /= den
    return value / 100 if percent else value


def verify_exact(answer: str | None, truth: str, choices: tuple = ()) -> bool:
    return answer is not None and normalize_answer(answer) == normalize_answer(truth)


def verify_number(answer: str | None, truth: str, choices: tuple = (), tolerance: float = DEFAULT_TOLERANCE) -> bool:
    if answer is None:
        return False
    a, t = read_number(answer), read_number(truth)
    if a is None or t is None:
        return False
    return math.isclose(a, t, rel_tol=tolerance, abs_tol=tolerance * 1e-3)


def _option_index(text: str, choices: tuple) -> int | None:
    """Which option `text` names: by its letter, or by the option's text (normalised)."""
    norm = normalize_answer(text)
    for j, choice in enumerate(choices):
        if norm == normalize_answer(choice):
            return j
    match = _LETTER.match(text.strip().strip("*$"))
    if match:
        j = ord(match.group(1).upper()) - ord("A")
        # A bare letter, or a letter followed by that option's text ("B. 42").
        rest = text.strip().strip("*$")[match.end(1):].strip(" ).].:")
        if 0 <= j < max(len(choices), 26 if not choices else 0) and (not rest or not choices
                                                                     or normalize_answer(rest) == normalize_answer(choices[j])):
            return j
    return None


def verify_choice(answer: str | None, truth: str, choices: tuple = ()) -> bool:
    if answer is None:
        return False
    a, t = _option_index(answer, choices), _option_index(truth, choices)
    return a is not None and a == t


def _math_verify():
    try:
        import math_verify
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("the 'math' verifier needs math-verify: pip install '.[label]' "
                          "(or pip install math-verify)") from err
    return math_verify


def _timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    return 5 if threading.current_thread() is threading.main_thread() else None


def _math_parse(math_verify, text: str):
    # Wrapped in $...$ first: bare "1+x^2" would otherwise parse as its first number.
    if "$" not in text and "\\boxed" not in text:
        parsed = math_verify.parse(f"${text}$", parsing_timeout=_timeout())
        if parsed:
            return parsed
    return math_verify.parse(text, parsing_timeout=_timeout())


def verify_math(answer: str | None, truth: str, choices: tuple = ()) -> bool:
    if answer is None:
        return False
    mv = _math_verify()
    gold, pred = _math_parse(mv, truth), _math_parse(mv, answer)
    if not gold or not pred:
        return verify_exact(answer, truth)
    return bool(mv.verify(gold, pred, timeout_seconds=_timeout())) or verify_exact(answer, truth)


def _math_available() -> bool:
    try:
        _math_verify()
    except ImportError:
        return False
    return True


def verify_auto(answer: str | None, truth: str, choices: tuple = ()) -> bool:
    if answer is None:
        return False
    if choices:
        return verify_choice(answer, truth, choices)
    if read_number(truth) is not None and verify_number(answer, truth):
        return True
    # A number written another way ("\\frac{1}{2}" for 0.5) or an expression: math-verify decides.
    if _math_available():
        return verify_math(answer, truth)
    return verify_exact(answer, truth)


VERIFIERS: dict[str, Verifier] = {"auto": verify_auto, "exact": verify_exact, "number": verify_number,
                                  "choice": verify_choice, "math": verify_math}


def register(name: str, verifier: Verifier) -> None:
    """Add a verifier under `name` (then ``--verifier name``)."""
    VERIFIERS[name] = verifier


def get_verifier(name: str, tolerance: float = DEFAULT_TOLERANCE) -> Verifier:
    if name not in VERIFIERS:
        raise KeyError(f"unknown verifier {name!r} (one of {', '.join(sorted(VERIFIERS))})")
    if name == "number":
        return lambda a, t, c=(): verify_number(a, t, c, tolerance)
    if name == "math":
        _math_verify()  # fail now, before any model is loaded, when the extra is missing
    return VERIFIERS[name]
