"""Corpus BLEU (sacrebleu) as an `evaluate` module that loads offline (`evaluate.load("<this folder>")`).

The computation lives in `modeling_multimodal.evaluation.functional.bleu`. Two input shapes are
accepted, like the Hub's `sacrebleu` metric: one reference string per prediction, or a list of them.
"""

import datasets
import evaluate

from modeling_multimodal.evaluation.functional import bleu

_DESCRIPTION = """Corpus BLEU computed by sacrebleu.corpus_bleu on its 0-100 scale, with sacrebleu's own
tokenizer (default "13a") and no other normalisation, so scores compare with published sacrebleu numbers."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): generated texts.
    references (`list[str]` or `list[list[str]]`): one reference, or the same number of references,
        per prediction.
    tokenize (`str`, default "13a"): sacrebleu tokenizer name.
    lowercase (`bool`, default False): case-insensitive BLEU.
Returns:
    {"bleu": float, "precisions": list[float], "brevity_penalty": float, "length_ratio": float,
     "translation_length": int, "reference_length": int}
"""


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("string"),
                        "references": datasets.Sequence(datasets.Value("string")),
                    }
                ),
                datasets.Features(
                    {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
                ),
            ],
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions, references, tokenize="13a", lowercase=False):
        return bleu(predictions, references, tokenize=tokenize, lowercase=lowercase)
