"""Exact match as an `evaluate` module that loads offline (`evaluate.load("<this folder>")`).

The computation lives in `modeling_multimodal.evaluation.functional.exact_match`.
"""

import datasets
import evaluate

from modeling_multimodal.evaluation.functional import exact_match

_DESCRIPTION = """Fraction of generated texts equal to their reference. By default both sides are
normalised first: NFKC, lowercase, punctuation removed, whitespace collapsed, so "A red circle." matches
"a red circle" (pass normalize=False for byte-exact comparison)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated texts.
    references (`list[str]`): the reference texts, one per prediction.
    normalize (`bool`, default True): apply `normalize_text` to both sides first.
Returns:
    {"exact_match": float} in [0, 1].
Example:
    >>> exact_match = evaluate.load(path_of_this_folder)
    >>> exact_match.compute(predictions=["A red circle.", "a blue star"], references=["a red circle", "a red star"])
    {'exact_match': 0.5}
"""


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, normalize=True):
        return {"exact_match": exact_match(predictions, references, normalize=normalize)}
