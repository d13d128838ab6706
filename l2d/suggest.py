"""Close-match hints for error messages: ``unknown task 'gsm9k' (did you mean gsm8k?)``."""
from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``known``, or an empty string when none is close."""
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def one_line(text: str) -> str:
    """An error message on one line (transformers' and the hub's messages span several)."""
    return " ".join(str(text).split())
