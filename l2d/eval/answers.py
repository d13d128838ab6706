"""Math answers: extract them from generated text, normalise them, decide equivalence.

Extraction follows the two common conventions: GSM8K ends a solution with ``#### 42``; MATH puts
the answer in ``\\boxed{...}`` (or ``\\fbox{...}``). Without either, the last number in the text
is taken.

Equivalence (``is_equivalent(pred, gold)``) goes from cheap to expensive: equal normalised
strings; equal numbers (``\\frac{1}{2}``, ``1/2``, ``0.5``, ``.5`` and ``1,000`` vs ``1000`` all
parse to exact fractions); equal simple expressions (``2\\sqrt{2}`` vs ``\\sqrt{8}``), checked with
sympy when it is installed and numerically otherwise; element-wise for tuples and lists. Text is
never passed to ``eval`` or to ``sympy.sympify``: expressions are parsed with ``ast`` and only
numbers, single-letter symbols, arithmetic operators and a few named functions are accepted.
"""

from __future__ import annotations

import ast
import math
import re
from fractions import Fraction

try:  # optional: exact symbolic comparison
    import sympy
except ImportError:  # pragma: no cover - exercised only where sympy is missing
    sympy = None

__all__ = [
    "extract_gsm8k_answer", "extract_last_number", "extract_boxed", "extract_math_answer",
    "extract_answer", "normalize_answer", "parse_number", "is_equivalent",
]

_NUMBER = re.compile(
    r"(?<![\w.])[-+−]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?|(?<![\w.])[-+−]?\$?\.\d+%?")


def _clean_number(text: str) -> str:
    text = text.replace("−", "-").replace("$", "").replace(",", "").replace(" ", "").rstrip("%")
    text = text.lstrip("+")
    if "." in text:  # 5.0 -> 5, 2.50 -> 2.5
        text = text.rstrip("0").rstrip(".") or "0"
    if text.startswith((".", "-.")):
        text = text.replace(".", "0.", 1)
    if text in ("-0", ""):
        text = "0"
    return text


def extract_last_number(text: str) -> str | None:
    """The last number in ``text`` as a plain string (``"$1,234.50"`` -> ``"1234.5"``), or None."""
    if not text:
        return None
    matches = _NUMBER.findall(text)
    return _clean_number(matches[-1]) if matches else None


def extract_gsm8k_answer(text: str) -> str | None:
    """The number after the last ``####`` (GSM8K's answer marker), or None if there is none."""
    if not text or "####" not in text:
        return None
    return extract_last_number(text.rsplit("####", 1)[1].split("\n", 1)[0]) or None


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at ``text[start] == '{'`` and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces kept), or None.

    ``\\boxed 5`` (no braces) gives ``"5"``.
    """
    if not text:
        return None
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    rest = idx + (len("\\boxed") if text.startswith("\\boxed", idx) else len("\\fbox"))
    while rest < len(text) and text[rest] == " ":
        rest += 1
    if rest < len(text) and text[rest] == "{":
        group = _braced(text, rest)
        return group[0].strip() if group else None
    match = re.match(r"[^\s$]+", text[rest:])
    return match.group(0) if match else None


def extract_math_answer(text: str) -> str | None:
    """MATH-style: the last boxed answer, else "the answer is X", else the last number."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    match = re.findall(r"answer is[:\s]*\$?([^\n$]+?)\$?\s*(?:\.\s*)?(?:\n|$)", text or "")
    if match:
        return match[-1].strip()
    return extract_last_number(text)


def extract_answer(text: str) -> str | None:
    """Any convention: ``####``, then ``\\boxed``, then the last number."""
    for extract in (extract_gsm8k_answer, extract_boxed, extract_last_number):
        answer = extract(text)
        if answer is not None:
            return answer
    return None


# ----------------------------------------------------------------------------- normalisation

_UNITS = (
    "degrees", "degree", "cm", "mm", "km", "m", "meters", "meter", "inches", "inch", "feet",
    "foot", "ft", "yards", "miles", "mph", "units", "unit", "dollars", "dollar", "cents", "hours",
    "hour", "minutes", "minute", "seconds", "second", "days", "day", "sq", "square", "cubic",
    "pounds", "lbs", "kg", "g", "liters", "ml", "percent",
)
_UNIT_TAIL = re.compile(r"(?<=[\d}.\s])(?:\s*\b(?:%s)\b(?:\^\{?\d\}?)?\.?)+\s*$" % "|".join(_UNITS))


def _strip_text_commands(s: str) -> str:
    """``\\text{abc}`` -> ``abc`` (also ``\\textbf``, ``\\mbox``, ``\\mathrm``, ``\\mathbf``)."""
    pattern = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|mathbf|operatorname)\s*\{")
    while True:
        match = pattern.search(s)
        if not match:
            return s
        group = _braced(s, match.end() - 1)
        if group is None:
            return s[:match.start()] + s[match.end():]
        s = s[:match.start()] + group[0] + s[group[1]:]


def normalize_answer(answer: str) -> str:
    """Canonical string form of a math answer: latex cruft, units, spaces and ``x =`` removed.

    ``"\\left( \\dfrac12, 3 \\right)"`` -> ``"(\\frac{1}{2},3)"``; ``"90^\\circ"`` -> ``"90"``;
    ``"\\$1,000.00"`` -> ``"1000"``; ``"x = 5"`` -> ``"5"``.
    """
    if answer is None:
        return ""
    s = str(answer).strip()
    s = s.replace("\n", " ").replace("\\!", "").replace("\\,", "").replace("\\;", "")
    s = s.replace("\\:", "").replace("\\quad", " ").replace("\\ ", " ").replace("~", " ")
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)\b\s*", "", s)
    s = re.sub(r"\\(?:left|right)(?=[(\[|.])", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("°", "")
    s = s.replace("\\%", "%").replace("\\$", "").replace("$", "")
    s = _strip_text_commands(s)
    s = _UNIT_TAIL.sub("", s).strip()
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = s.rstrip(".").rstrip("%").strip()
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt\s*(\d+|[a-z])", r"\\sqrt{\1}", s)  # \sqrt2 -> \sqrt{2}
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # thousands separators
    s = s.replace(" ", "")
    if re.fullmatch(r"[-+]?\d*\.\d+|[-+]?\d+\.\d*", s):
        s = _clean_number(s)
    return s


# ----------------------------------------------------------------------------- safe parsing

_MAX_EXPR_CHARS = 200
_MAX_POWER = 64  # exponents beyond this are refused: 9**9**9 must not hang the scorer


def _latex_to_python(s: str) -> str:
    """Rewrite the latex of a simple expression as Python syntax (for ``ast.parse`` only)."""
    for _ in range(10):  # innermost \frac / \sqrt first
        new = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        new = re.sub(r"\\sqrt\[([^\[\]{}]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", new)
        new = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", new)
        if new == s:
            break
        s = new
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/")
    s = s.replace("\\pi", "pi").replace("^", "**").replace("{", "(").replace("}", ")")
    s = re.sub(r"\\(?:infty|inf)", "oo", s)
    # implicit multiplication: 2pi, 2sqrt(3), 3x, )( , )x, 2(
    s = re.sub(r"(?<=[\d)])\s*(?=[a-zA-Z(])", "*", s)
    s = re.sub(r"(?<=\))\s*(?=\d)", "*", s)
    s = re.sub(r"(?<=\bpi)\s*(?=[a-zA-Z(\d])", "*", s)
    return s


_FUNCS = {"sqrt"}
_CONSTS = {"pi", "e", "oo"}


class _Unsafe(ValueError):
    pass


def _parse_ast(text: str) -> ast.AST:
    if len(text) > _MAX_EXPR_CHARS:
        raise _Unsafe("too long")
    tree = ast.parse(_latex_to_python(text), mode="eval")
    for node in ast.walk(tree):
        if isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Load, ast.Add, ast.Sub,
                             ast.Mult, ast.Div, ast.Pow, ast.USub, ast.UAdd)):
            continue
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                and not isinstance(node.value, bool):
            continue
        if isinstance(node, ast.Name) and (node.id in _CONSTS or node.id in _FUNCS
                                           or re.fullmatch(r"[a-zA-Z]", node.id)):
            continue
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in _FUNCS and len(node.args) == 1 and not node.keywords:
            continue
        raise _Unsafe(f"unsupported syntax: {type(node).__name__}")
    return tree.body


def _check_power(exponent) -> None:
    try:
        if abs(float(exponent)) > _MAX_POWER:
            raise _Unsafe("exponent too large")
    except TypeError:  # symbolic exponent
        pass


def _to_value(node: ast.AST, symbolic: bool):
    """Evaluate a vetted AST: to a Fraction/float (numeric) or a sympy expression (symbolic)."""
    if isinstance(node, ast.Constant):
        if symbolic:
            return sympy.Rational(str(node.value)) if isinstance(node.value, float) else sympy.Integer(node.value)
        return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.Name):
        if symbolic:
            return {"pi": sympy.pi, "e": sympy.E, "oo": sympy.oo}.get(node.id) or sympy.Symbol(node.id)
        if node.id == "pi":
            return math.pi
        if node.id == "e":
            return math.e
        raise _Unsafe("symbol in a numeric expression")
    if isinstance(node, ast.UnaryOp):
        value = _to_value(node.operand, symbolic)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Call):
        value = _to_value(node.args[0], symbolic)
        if symbolic:
            return sympy.sqrt(value)
        if value < 0:
            raise _Unsafe("sqrt of a negative number")
        root = math.isqrt(int(value)) if isinstance(value, Fraction) and value.denominator == 1 else None
        return Fraction(root) if root is not None and root * root == value else math.sqrt(value)
    if isinstance(node, ast.BinOp):
        left, right = _to_value(node.left, symbolic), _to_value(node.right, symbolic)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if isinstance(node.op, ast.Div):
            if right == 0:
                raise _Unsafe("division by zero")
            return left / right
        if isinstance(node.op, ast.Pow):
            _check_power(right)
            if not symbolic and isinstance(right, Fraction) and right.denominator != 1:
                return float(left) ** float(right)
            return left ** right
    raise _Unsafe(f"unsupported node {type(node).__name__}")


def parse_number(answer: str) -> Fraction | float | None:
    """The numeric value of an answer (exact when possible), or None when it is not a number.

    ``"\\frac{1}{2}"``, ``"1/2"``, ``"0.5"`` -> ``Fraction(1, 2)``; ``"2\\sqrt{2}"`` -> float.
    """
    s = normalize_answer(answer)
    if not s:
        return None
    try:
        value = _to_value(_parse_ast(s), symbolic=False)
    except (SyntaxError, _Unsafe, ValueError, TypeError, OverflowError, ZeroDivisionError,
            RecursionError, MemoryError):
        return None
    if isinstance(value, complex):
        return None
    return value


def _split_top_level(s: str) -> list[str]:
    """Split ``(1,2)`` / ``[1,2]`` / ``1,2`` on commas outside nested brackets."""
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}":
        s = s[1:-1]
    parts, depth, current = [], 0, ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def _brackets(s: str) -> str:
    return s[0] + s[-1] if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}" else ""


def _numbers_equal(a, b, rel_tol: float) -> bool:
    if a == b:
        return True
    if isinstance(a, Fraction) and isinstance(b, Fraction) and a.denominator == b.denominator == 1:
        return False  # integers (GSM8K answers) compare exactly, however large
    return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=1e-12)


def _symbolic_equal(a: str, b: str) -> bool:
    if sympy is None:
        return False
    try:
        ea = _to_value(_parse_ast(a), symbolic=True)
        eb = _to_value(_parse_ast(b), symbolic=True)
        if ea == eb:
            return True
        return sympy.simplify(ea - eb) == 0
    except Exception:  # sympy raises many types on odd input; any failure means "not shown equal"
        return False


def _scalar_equivalent(pred: str, gold: str, rel_tol: float) -> bool:
    if pred == gold:
        return True
    a, b = parse_number(pred), parse_number(gold)
    if a is not None and b is not None:
        return _numbers_equal(a, b, rel_tol)
    return _symbolic_equal(pred, gold)


def is_equivalent(pred: str | None, gold: str | None, rel_tol: float = 1e-6) -> bool:
    """Whether the predicted answer equals the gold answer up to notation.

    Both are answers, not whole solutions: extract first (``extract_answer``). Numbers compare
    exactly when both are rational, else with relative tolerance ``rel_tol``.
    """
    if pred is None or gold is None:
        return False
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p or not g:
        return False
    if _scalar_equivalent(p, g, rel_tol):
        return True
    p_parts, g_parts = _split_top_level(p), _split_top_level(g)
    if len(g_parts) > 1 and len(p_parts) == len(g_parts):
        p_wrap, g_wrap = _brackets(p), _brackets(g)
        if p_wrap != g_wrap and p_wrap and g_wrap:  # [1,2) is not (1,2]
            return False
        if all(_scalar_equivalent(x, y, rel_tol) for x, y in zip(p_parts, g_parts)):
            return True
        if g_wrap:  # a point or an interval: order matters
            return False
        remaining = list(g_parts)  # an unordered list of solutions
        for x in p_parts:
            match = next((y for y in remaining if _scalar_equivalent(x, y, rel_tol)), None)
            if match is None:
                return False
            remaining.remove(match)
        return True
    return False
