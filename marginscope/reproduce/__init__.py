"""Reproduction studies: published findings of the seed papers, tested on our own tiny models.

    from marginscope import reproduce
    reproduce.names()                                    # ['sentiment', 'losses', 'mass-shift', 'spo-stability']
    [result] = reproduce.run("sentiment", "repro/sentiment")   # or "all" → repro/<name>/ for each
    for f in result.findings:
        print(f.claim, f.expected, f.observed, f.holds, f.numbers)

Each study trains tiny GPT-2 models from scratch on CPU (cached), runs preference optimization with
the tracker, writes its traces, figures and `results.json`, and returns a `StudyResult` whose
`Finding`s say, claim by claim, whether the published finding holds on our model — with the numbers.
One fixed setting per study (documented in its module and in docs/reproduce.md); a claim that does
not hold is reported as such.
"""

from .findings import Finding, StudyResult, load_result
from .registry import ALL, STUDIES, Study, get, names, run

__all__ = ["ALL", "STUDIES", "Finding", "Study", "StudyResult", "get", "load_result", "names", "run"]
