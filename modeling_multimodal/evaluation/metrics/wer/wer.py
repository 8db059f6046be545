"""Word error rate as an `evaluate` module that loads offline (`evaluate.load("<this folder>")`).

The computation lives in `modeling_multimodal.evaluation.functional.word_error_rate`; this file only
declares the inputs, so the score is identical inside and outside `evaluate`.
"""

import datasets
import evaluate

from modeling_multimodal.evaluation.functional import word_error_rate

_DESCRIPTION = """Corpus word error rate, (substitutions + deletions + insertions) / reference words,
computed with jiwer. By default both sides are normalised first: NFKC, lowercase, punctuation removed,
whitespace collapsed (pass normalize=False to score the raw strings)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): transcripts produced by the model.
    references (`list[str]`): the reference transcripts, one per prediction.
    normalize (`bool`, default True): apply `normalize_text` to both sides first.
Returns:
    {"wer": float}; 0.0 is perfect and the value can exceed 1.0 when the model inserts words.
Example:
    >>> wer = evaluate.load(path_of_this_folder)
    >>> wer.compute(predictions=["the cat sit"], references=["the cat sat"])
    {'wer': 0.3333333333333333}
"""


class WordErrorRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://github.com/jitsi/jiwer"],
        )

    def _compute(self, predictions, references, normalize=True):
        return {"wer": word_error_rate(predictions, references, normalize=normalize)}
