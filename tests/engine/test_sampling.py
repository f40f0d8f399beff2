"""Sampling filters on known distributions, the seeded draw, stop strings and greedy-on-DSML."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dwarfstar.chat.parser import OutputParser
from dwarfstar.chat.tokens import DSML
from dwarfstar.engine.sampling import Sampler, SamplingParams, StopMatcher, token_probabilities

# A known distribution over 8 tokens, listed out of order so that id order != rank order.
PROBS = np.array([0.05, 0.30, 0.02, 0.20, 0.01, 0.25, 0.12, 0.05])
LOGITS = torch.tensor(np.log(PROBS), dtype=torch.float32)


def expected(keep: list[int], temperature: float = 1.0) -> np.ndarray:
    """PROBS at ``temperature``, restricted to ``keep`` and renormalised (computed by hand here)."""
    tempered = PROBS ** (1 / temperature)
    out = np.zeros_like(PROBS)
    out[keep] = tempered[keep]
    return out / out.sum()


@pytest.mark.parametrize(
    "options, keep",
    [
        ({}, list(range(8))),
        ({"top_k": 3}, [1, 5, 3]),
        ({"top_k": 1}, [1]),
        ({"min_p": 0.5}, [1, 5, 3]),  # >= 0.15
        ({"min_p": 0.2}, [1, 5, 3, 6]),  # >= 0.06
        ({"top_p": 0.5}, [1, 5]),  # 0.30 + 0.25 reaches 0.5
        ({"top_p": 0.55}, [1, 5]),
        ({"top_p": 0.56}, [1, 5, 3]),
        ({"top_p": 0.01}, [1]),  # the top token is always kept
        ({"top_k": 4, "top_p": 0.7}, [1, 5, 3]),  # within the top 4 (0.87): 0.55/0.87 < 0.7 <= 0.75/0.87
        ({"min_p": 0.2, "top_p": 0.9}, [1, 5, 3, 6]),
    ],
)
def test_filters_keep_the_right_set_with_the_right_weights(options, keep):
    probs = token_probabilities(LOGITS, 1.0, **options).numpy()
    np.testing.assert_allclose(probs, expected(keep), atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_reshapes_before_min_p(temperature):
    # min_p compares with the top token after temperature: at T=0.5 token 6 (0.12/0.30 = 0.4,
    # squared 0.16) falls under 0.2; at T=2 only token 4 does (sqrt(0.01/0.30) = 0.18) while
    # token 2 stays (sqrt(0.02/0.30) = 0.26).
    probs = token_probabilities(LOGITS, temperature, min_p=0.2).numpy()
    keep = [1, 5, 3] if temperature == 0.5 else [0, 1, 2, 3, 5, 6, 7]
    np.testing.assert_allclose(probs, expected(keep, temperature), atol=1e-6)


def test_temperature_zero_and_greedy_take_the_argmax():
    sampler = Sampler(SamplingParams(temperature=0, seed=1))
    assert {sampler.sample(LOGITS) for _ in range(20)} == {1}
    sampler = Sampler(SamplingParams(temperature=5.0, min_p=0, seed=1))
    assert {sampler.sample(LOGITS, greedy=True) for _ in range(20)} == {1}
    with_nan = LOGITS.clone()
    with_nan[2] = float("nan")
    assert Sampler(SamplingParams(temperature=0)).sample(with_nan) == 1


@pytest.mark.parametrize(
    "params, keep",
    [
        (SamplingParams(min_p=0, seed=7), list(range(8))),
        (SamplingParams(min_p=0, temperature=0.7, seed=8), list(range(8))),
        (SamplingParams(top_k=3, min_p=0, seed=9), [1, 5, 3]),
        (SamplingParams(top_p=0.8, seed=10), [1, 5, 3, 6]),
        (SamplingParams(seed=11), [0, 1, 2, 3, 5, 6, 7]),  # default min_p 0.05: under 0.015 goes
    ],
)
def test_draw_frequencies_match_the_distribution(params, keep):
    n = 20000
    sampler = Sampler(params)
    counts = np.bincount([sampler.sample(LOGITS) for _ in range(n)], minlength=8)
    want = expected(keep, params.temperature)
    assert set(np.nonzero(counts)[0]) == set(keep)
    # Each frequency within 5 standard deviations of its probability (binomial).
    sigma = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(counts / n - want) <= 5 * sigma + 1e-12), (counts / n, want)
    # And the whole histogram passes a chi-square test at a 1e-4 false-alarm rate.
    chi2 = sum((counts[i] - n * want[i]) ** 2 / (n * want[i]) for i in keep)
    assert chi2 < _chi2_quantile(len(keep) - 1)


def _chi2_quantile(dof: int) -> float:
    """Wilson-Hilferty approximation of the chi-square 1 - 1e-4 quantile."""
    z = 3.719
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_a_seed_repeats_and_another_seed_differs():
    logits = torch.randn(129280, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.5, min_p=0, seed=1234)
    first = [Sampler(params).sample(logits) for _ in range(1)]
    a = Sampler(params)
    b = Sampler(params)
    run_a = [a.sample(logits) for _ in range(50)]
    assert run_a == [b.sample(logits) for _ in range(50)]
    assert run_a[:1] == first
    c = Sampler(SamplingParams(temperature=1.5, min_p=0, seed=1235))
    assert run_a != [c.sample(logits) for _ in range(50)]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 2}, "min_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": -3}, "max_tokens"),
    ],
)
def test_bad_parameters_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**options)


# ---- stop strings -------------------------------------------------------------------------------


def cut(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = "".join(matcher.push(p) for p in pieces)
    return out + matcher.flush(), matcher.stopped


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="ab\nXY", max_size=40),
    stops=st.lists(st.text(alphabet="ab\nXY", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_stop_strings_cut_at_the_first_match_however_the_text_is_split(text, stops, cuts):
    """Generation ends with the first piece after which some stop string has appeared; the text
    is cut where the earliest stop string seen by then starts (a longer stop string that began
    earlier but would complete only later never gets the chance, as in OpenAI's and vLLM's)."""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    want, stopped = text, False
    for end in bounds[1:]:
        hits = [i for i in (text[:end].find(s) for s in stops if s) if i >= 0]
        if hits:
            want, stopped = text[: min(hits)], True
            break
    assert cut(pieces, stops) == (want, stopped)


def test_a_stop_string_that_completes_first_wins_over_a_longer_one_that_began_earlier():
    assert cut(["YX", "X"], ["X", "YXX"]) == ("Y", True)
    assert cut(["YXX"], ["X", "YXX"]) == ("", True)


def test_held_back_text_is_released_when_it_cannot_be_a_stop():
    matcher = StopMatcher(["</end>"])
    assert matcher.push("ab</e") == "ab"
    assert matcher.push("x") == "</ex"
    assert matcher.push("</") == ""
    assert matcher.push("end>tail") == "" and matcher.stopped
    assert cut(["one ST", "O", "P two"], ["STOP"]) == ("one ", True)


# ---- greedy sampling on DSML structure, driven by the parser's state ----------------------------


def structure_marks(pieces: list[str], thinking: bool = False) -> list[bool]:
    """``in_structure`` after each piece is fed."""
    parser = OutputParser(thinking)
    marks = []
    for piece in pieces:
        parser.feed(piece)
        marks.append(parser.in_structure)
    return marks


def test_parser_marks_dsml_structure_and_free_text():
    pieces_and_marks = [
        ("Let me look.", False),
        ("\n\n", False),
        (f"<{DSML}", True),
        ("tool_calls>", True),
        ("\n", True),
        (f'<{DSML}invoke name="read', True),
        ('">\n', True),
        (f'<{DSML}parameter name="path" string="true">', False),  # a string value: free text
        ("src/a.py", False),
        ("</", True),  # a closing tag begun
        (f"{DSML}parameter>\n", True),
        (f'<{DSML}parameter name="opts" string="false">', True),  # JSON structure
        ('{"mode": ', True),
        ('"fa', False),  # inside a JSON string literal
        ('st \\"x', False),  # an escaped quote keeps it open
        ('\\""', True),  # closed
        (", [1, 2]}", True),
        (f"</{DSML}parameter>\n</{DSML}invoke>\n", True),
        (f"</{DSML}tool_calls>", False),
    ]
    pieces = [p for p, _ in pieces_and_marks]
    assert structure_marks(pieces) == [m for _, m in pieces_and_marks]
    parser = OutputParser(False)
    for piece in pieces:
        parser.feed(piece)
    assert parser.tool_calls_closed


def test_dsml_inside_reasoning_is_free_text():
    marks = structure_marks(["Thinking about ", f"<{DSML}invoke", ' name="x">', "</think>", "Answer"], True)
    assert marks == [False] * 5


def test_structure_steps_are_sampled_greedily_and_values_normally():
    """What the engine does at each step: ``sample(logits, greedy=parser.in_structure)``."""
    logits = torch.zeros(50)
    logits[7] = 0.5  # the argmax, but far from certain at temperature 1
    sampler = Sampler(SamplingParams(min_p=0, seed=3))
    parser = OutputParser(False)
    parser.feed(f'\n\n<{DSML}tool_calls>\n<{DSML}invoke name="f">\n<{DSML}parameter name="x" string="')
    assert {sampler.sample(logits, greedy=parser.in_structure) for _ in range(200)} == {7}
    parser.feed('true">')
    assert len({sampler.sample(logits, greedy=parser.in_structure) for _ in range(200)}) > 20
