"""Synthetic probe sets of the source papers: sentiment pairs (margin-pitfalls §4.2) and arithmetic
pairs with known answers (bilevel SPO §2.3). Deterministic: the same seed gives byte-identical JSONL.

    statements = sentiment_statements(240, seed=1000)      # the distribution behind sentiment()
    probes = sentiment(64, style="long", seed=0)            # ids sentiment-long-0 … sentiment-long-63
    probes = arithmetic(16, seed=0, pairs_per_question=4)   # ids arith-0-0 … arith-15-3
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import MarginscopeError
from .probeset import Probe, ProbeSet

# The bundled sentiment vocabulary: plain lowercase English words a tiny tokenizer learns quickly.
SUBJECTS = ("the movie", "the film", "this book", "the story", "the service", "the food", "the coffee",
            "the concert", "the show", "this phone", "the hotel", "the room", "the restaurant",
            "the game", "the album", "the song", "the lecture", "the museum", "the trip", "the class")
POSITIVE = ("good", "great", "wonderful", "excellent", "lovely", "amazing", "fantastic", "brilliant",
            "superb", "pleasant", "delightful", "perfect")
NEGATIVE = ("bad", "poor", "terrible", "awful", "horrible", "boring", "dreadful", "disappointing",
            "dull", "weak", "lousy", "miserable")
TEMPLATES = ("{subject} was {adjective}.", "{subject} is {adjective}.", "{subject} was really {adjective}.",
             "{subject} felt {adjective}.", "i think {subject} was {adjective}.",
             "honestly, {subject} was {adjective}.")
LABELS = ("positive", "negative")
SENTIMENT_CUE = "What is the sentiment?"
SENTIMENT_STYLES = ("single", "short", "long")
_RESPONSES = {"single": " {label}",                          # one token: the label word itself
              "short": " It has a {label} sentiment.",
              "long": " It has a {label} sentiment based on my judgement of the whole text."}

ARITHMETIC_FORMATS = (" {answer}", " The answer is {answer}.", " {a} {op} {b} = {answer}.",
                      " It is {answer}.", " {answer}, of course.")
_OPERATIONS = {"+": (lambda a, b: a + b, 1, 50), "-": (lambda a, b: a - b, 1, 50),
               "*": (lambda a, b: a * b, 2, 12)}  # operation: (result, smallest and largest operand)
_MAX_QUESTIONS = 3000  # of about 3,900 distinct questions, so drawing them stays quick


@dataclass(frozen=True)
class Statement:
    """A sentence with a clear sentiment, and its label ("positive" or "negative")."""

    text: str
    label: str


def sentiment_statements(n: int, seed: int = 0) -> list[Statement]:
    """`n` distinct statements, half positive and half negative (the odd one positive), in a seeded
    random order, from SUBJECTS × TEMPLATES × POSITIVE/NEGATIVE. The demo draws its SFT corpus here."""
    capacity = len(SUBJECTS) * len(TEMPLATES) * min(len(POSITIVE), len(NEGATIVE))
    _check_count("n", n, 2 * capacity)
    rng = random.Random(seed)
    labels = [LABELS[i % 2] for i in range(n)]
    rng.shuffle(labels)
    draws = {label: iter(rng.sample(range(capacity), labels.count(label))) for label in LABELS}
    return [_statement(next(draws[label]), label) for label in labels]


def _statement(index: int, label: str) -> Statement:
    """The `index`-th combination of template, subject and adjective of `label`."""
    adjectives = POSITIVE if label == "positive" else NEGATIVE
    index, adjective = divmod(index, len(adjectives))
    template, subject = divmod(index, len(SUBJECTS))
    text = TEMPLATES[template].format(subject=SUBJECTS[subject], adjective=adjectives[adjective])
    return Statement(text[0].upper() + text[1:], label)


def sentiment_response(label: str, style: str) -> str:
    """The response naming `label` in `style` (leading space included: it follows the prompt)."""
    return _RESPONSES[style].format(label=label)


def sentiment(n: int, style: str = "single", seed: int = 0) -> ProbeSet:
    """Sentiment pairs of margin-pitfalls §4.2: prompt = statement + SENTIMENT_CUE, chosen names the
    right sentiment, rejected the wrong one, the two differing in exactly one word. Styles: "single"
    (the label word), "short" (a short sentence around it), "long" (the short sentence + a longer
    shared suffix). For one seed, probe i has the same statement in every style."""
    if style not in _RESPONSES:
        raise MarginscopeError(f"sentiment style must be one of {', '.join(SENTIMENT_STYLES)}; got {style!r}")
    probes = []
    for i, statement in enumerate(sentiment_statements(n, seed)):
        wrong = LABELS[1 - LABELS.index(statement.label)]
        probes.append(Probe(f"sentiment-{style}-{i}", f"{statement.text} {SENTIMENT_CUE}",
                            sentiment_response(statement.label, style), sentiment_response(wrong, style)))
    return ProbeSet(probes, f"sentiment(style={style!r}, seed={seed})")


def arithmetic(n_questions: int, seed: int = 0, pairs_per_question: int = 4) -> ProbeSet:
    """Arithmetic pairs of bilevel SPO §2.3: `n_questions` distinct questions with a known answer
    ("What is 7 * 12? Answer:"), each with `pairs_per_question` pairs sharing the prompt (ids
    arith-<q>-<k>): pair k's chosen states the correct answer in ARITHMETIC_FORMATS[k], its rejected
    a distinct wrong answer in the same format, so the top output y* of a question is one per prompt."""
    _check_count("n_questions", n_questions, _MAX_QUESTIONS)
    _check_count("pairs_per_question", pairs_per_question, len(ARITHMETIC_FORMATS))
    rng = random.Random(seed)
    probes = []
    for q, (a, op, b) in enumerate(_questions(rng, n_questions)):
        answer = _OPERATIONS[op][0](a, b)
        prompt = f"What is {a} {op} {b}? Answer:"
        for k, wrong in enumerate(_wrong_answers(rng, answer, pairs_per_question)):
            form = ARITHMETIC_FORMATS[k]
            probes.append(Probe(f"arith-{q}-{k}", prompt, form.format(a=a, op=op, b=b, answer=answer),
                                form.format(a=a, op=op, b=b, answer=wrong)))
    return ProbeSet(probes, f"arithmetic(seed={seed})")


def _questions(rng: random.Random, n: int) -> list[tuple[int, str, int]]:
    """`n` distinct (a, op, b) with a non-negative answer."""
    seen: dict[tuple[int, str, int], None] = {}
    while len(seen) < n:
        op = rng.choice(sorted(_OPERATIONS))
        low, high = _OPERATIONS[op][1:]
        a, b = rng.randint(low, high), rng.randint(low, high)
        seen.setdefault((max(a, b), op, min(a, b)) if op == "-" else (a, op, b))
    return list(seen)


def _wrong_answers(rng: random.Random, answer: int, count: int) -> list[int]:
    """`count` distinct non-negative near misses of `answer` (off by 1 to 10)."""
    near = [answer + d for d in range(-10, 11) if d and answer + d >= 0]
    return rng.sample(near, count)


def _check_count(name: str, value: int, limit: int) -> None:
    if not 0 < value <= limit:
        raise MarginscopeError(f"{name} must be between 1 and {limit}; got {value}")
