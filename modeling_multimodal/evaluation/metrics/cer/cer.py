"""Character error rate as an `evaluate` module that loads offline (`evaluate.load("<this folder>")`).

The computation lives in `modeling_multimodal.evaluation.functional.character_error_rate`.
"""

import datasets
import evaluate

from modeling_multimodal.evaluation.functional import character_error_rate

_DESCRIPTION = """Corpus character error rate, character edits / reference characters (spaces included),
computed with jiwer. By default both sides are normalised first: NFKC, lowercase, punctuation removed,
whitespace collapsed (pass normalize=False to score the raw strings)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): transcripts produced by the model.
    references (`list[str]`): the reference transcripts, one per prediction.
    normalize (`bool`, default True): apply `normalize_text` to both sides first.
Returns:
    {"cer": float}; 0.0 is perfect.
Example:
    >>> cer = evaluate.load(path_of_this_folder)
    >>> cer.compute(predictions=["abd"], references=["abc"])
    {'cer': 0.3333333333333333}
"""


class CharacterErrorRate(evaluate.Metric):
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
        return {"cer": character_error_rate(predictions, references, normalize=normalize)}
