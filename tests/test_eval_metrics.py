"""Wilson intervals, pass@k, the steps plot and the terminal table."""

import random
import struct
import zlib
from math import comb

import pytest

from l2d.eval.metrics import (accuracy, format_table, mean_pass_at_k, pass_at_k, plot_steps,
                              wilson_interval)


@pytest.mark.parametrize("correct, total", [(0, 10), (3, 10), (10, 10), (1, 1), (50, 100), (999, 1000)])
def test_wilson_contains_the_estimate_and_stays_in_unit_interval(correct, total):
    low, high = wilson_interval(correct, total)
    assert 0.0 <= low <= correct / total <= high <= 1.0
    assert high - low > 0  # never degenerate, even at 0/n or n/n


def test_wilson_known_value():
    # 0.95 Wilson interval for 8/10, a textbook value: about (0.490, 0.943)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)


def test_wilson_shrinks_with_n_and_grows_with_confidence():
    widths = [wilson_interval(n // 2, n)[1] - wilson_interval(n // 2, n)[0] for n in (10, 100, 1000)]
    assert widths[0] > widths[1] > widths[2]
    narrow, wide = wilson_interval(30, 100, 0.8), wilson_interval(30, 100, 0.99)
    assert wide[0] < narrow[0] and wide[1] > narrow[1]


def test_wilson_is_symmetric_under_swapping_success_and_failure():
    low, high = wilson_interval(3, 20)
    low2, high2 = wilson_interval(17, 20)
    assert low == pytest.approx(1 - high2) and high == pytest.approx(1 - low2)


def test_wilson_covers_the_true_rate_about_95_percent_of_the_time():
    rng = random.Random(0)
    p, n, hits = 0.3, 60, 0
    for _ in range(2000):
        c = sum(rng.random() < p for _ in range(n))
        low, high = wilson_interval(c, n)
        hits += low <= p <= high
    assert 0.92 < hits / 2000 < 0.98


def test_wilson_rejects_bad_counts_and_handles_empty():
    with pytest.raises(ValueError):
        wilson_interval(5, 3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_accuracy_object():
    acc = accuracy([True, False, True, True])
    assert acc.correct == 3 and acc.total == 4 and acc.value == 0.75
    assert acc.low < 0.75 < acc.high
    assert "75.0%" in str(acc)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20])
def test_pass_at_k_matches_the_combinatorial_formula(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = 1 - comb(n - c, k) / comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_properties():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    assert all(pass_at_k(10, 3, k) <= pass_at_k(10, 3, k + 1) for k in range(1, 10))
    assert pass_at_k(200, 2, 100) == pytest.approx(1 - comb(198, 100) / comb(200, 100))
    assert mean_pass_at_k([(4, 1), (4, 3)], 1) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def _png_chunks(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc
        chunks.append((kind, body))
        pos += 12 + length
    return chunks


def test_plot_steps_writes_a_valid_png(tmp_path):
    results = {
        "L2D": [{"steps": s, "accuracy": a, "low": a - 0.05, "high": a + 0.05, "nfe_per_token": s}
                for s, a in [(0, 0.2), (2, 0.3), (8, 0.4), (16, 0.42)]],
        "LoRA": [{"steps": 0, "accuracy": 0.35}],
    }
    path = plot_steps(results, str(tmp_path / "steps.png"), title="gsm8k")
    chunks = _png_chunks(open(path, "rb").read())
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert width > 300 and height > 200


def test_format_table_aligns_columns():
    rows = [{"method": "base", "steps": 0, "acc": 0.125}, {"method": "L2D", "steps": 16, "acc": 0.5}]
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["method", "steps", "acc"]
    assert set(lines[1]) <= {"-", " "}
    assert len({len(l) for l in lines[1:]}) == 1  # all data rows as wide as the rule
    assert lines[2].split() == ["base", "0", "0.125"]
    # numbers right-aligned: the column ends line up
    assert lines[2].index("0 ") + 1 == lines[3].index("16") + 2
    assert format_table([]) == ""
    assert format_table([[1, "a"]], headers=["n", "s"]).splitlines()[0].split() == ["n", "s"]
