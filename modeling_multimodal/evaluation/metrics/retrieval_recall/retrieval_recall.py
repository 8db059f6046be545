"""Text<->media retrieval recall@k as an `evaluate` module that loads offline.

The computation lives in `modeling_multimodal.evaluation.functional.retrieval_recall`. Each prediction
is one text query's row: either its similarities to every media candidate, or (when
`media_embeddings` is passed to `compute`) the text's embedding, compared by cosine similarity.
"""

import datasets
import evaluate

from modeling_multimodal.evaluation.functional import (
    DEFAULT_RECALL_KS,
    retrieval_recall,
    retrieval_recall_from_embeddings,
)

_DESCRIPTION = """Recall@k in both directions for text<->media retrieval. Rows are text queries, columns
media candidates; reference i is the column of text i's medium. Returns text_to_media_recall@k and
media_to_text_recall@k (a medium with several texts is a hit when any of them ranks in its top k). Ties
count against the model: a right candidate only ranks above the wrong ones that score strictly lower."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]`): per text query, its similarity to each of the num_media candidates;
        or its embedding when `media_embeddings` is given.
    references (`list[int]`): per text query, the column (media index) of its correct match.
    media_embeddings (`list[list[float]]`, optional): (num_media, dim) embeddings; turns predictions into
        text embeddings and the similarity into cosine similarity.
    ks (`tuple[int]`, default (1, 5, 10)): the cut-offs.
Returns:
    {"text_to_media_recall@1": float, ..., "media_to_text_recall@10": float}
Example:
    >>> recall = evaluate.load(path_of_this_folder)
    >>> recall.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[0, 1], ks=(1,))
    {'text_to_media_recall@1': 1.0, 'media_to_text_recall@1': 1.0}
"""


class RetrievalRecall(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, media_embeddings=None, ks=DEFAULT_RECALL_KS):
        if media_embeddings is not None:
            return retrieval_recall_from_embeddings(predictions, media_embeddings, references, ks=ks)
        return retrieval_recall(predictions, references, ks=ks)
