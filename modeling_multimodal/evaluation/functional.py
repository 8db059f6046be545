"""Plain-function metrics: the one place where each score is computed.

The `evaluate` modules in `metrics/` and the trainer both call these functions, so a score cannot
differ between `evaluate.load(...)` and the training loop. Inputs are plain Python lists, numpy arrays
or torch tensors; outputs are floats or dicts of floats.

Text normalisation (`normalize_text`) is shared by WER, CER and exact match: Unicode NFKC, lowercase,
punctuation removed, whitespace collapsed and stripped. So "The cat sat." equals "the  cat sat".
BLEU does not normalise: it follows sacrebleu's own tokenizer, as published BLEU scores do.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

import jiwer
import numpy as np
import sacrebleu

DEFAULT_RECALL_KS = (1, 5, 10)


def normalize_text(text: str) -> str:
    """NFKC, lowercase, drop Unicode punctuation (category P*), collapse and strip whitespace."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(char for char in text if not unicodedata.category(char).startswith("P"))
    return re.sub(r"\s+", " ", text).strip()


def _check_pair(predictions: Sequence[str], references: Sequence[str], metric: str) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{metric}: got {len(predictions)} predictions but {len(references)} references; "
            "they must pair up one to one."
        )
    if len(references) == 0:
        raise ValueError(f"{metric}: no references given.")


def _prepare(predictions, references, normalize: bool, metric: str) -> tuple[list[str], list[str]]:
    _check_pair(predictions, references, metric)
    if normalize:
        return [normalize_text(p) for p in predictions], [normalize_text(r) for r in references]
    return list(predictions), list(references)


def word_error_rate(predictions: Sequence[str], references: Sequence[str], normalize: bool = True) -> float:
    """Corpus WER: (substitutions + deletions + insertions) / reference words, over all pairs (jiwer).

    An empty reference is allowed (its predicted words count as insertions) as long as the corpus
    has at least one reference word; otherwise WER is undefined and a `ValueError` is raised.
    """
    predictions, references = _prepare(predictions, references, normalize, "WER")
    if sum(len(r.split()) for r in references) == 0:
        raise ValueError("WER: every reference is empty (after normalisation); WER is undefined.")
    return float(jiwer.wer(reference=references, hypothesis=predictions))


def character_error_rate(predictions: Sequence[str], references: Sequence[str], normalize: bool = True) -> float:
    """Corpus CER: character edits / reference characters, spaces included (jiwer)."""
    predictions, references = _prepare(predictions, references, normalize, "CER")
    if sum(len(r) for r in references) == 0:
        raise ValueError("CER: every reference is empty (after normalisation); CER is undefined.")
    return float(jiwer.cer(reference=references, hypothesis=predictions))


def exact_match(predictions: Sequence[str], references: Sequence[str], normalize: bool = True) -> float:
    """Fraction of predictions equal to their reference (after `normalize_text` unless disabled)."""
    predictions, references = _prepare(predictions, references, normalize, "exact match")
    return float(np.mean([p == r for p, r in zip(predictions, references)]))


def bleu(
    predictions: Sequence[str],
    references: Sequence[str] | Sequence[Sequence[str]],
    tokenize: str = "13a",
    lowercase: bool = False,
) -> dict[str, float | list[float]]:
    """Corpus BLEU from `sacrebleu.corpus_bleu`, on sacrebleu's 0-100 scale.

    `references` holds one string per prediction, or a list of strings per prediction (several
    references each; every prediction must have the same number, as sacrebleu requires).
    """
    _check_pair(predictions, references, "BLEU")
    per_prediction = [[r] if isinstance(r, str) else list(r) for r in references]
    num_refs = {len(refs) for refs in per_prediction}
    if len(num_refs) != 1:
        raise ValueError(f"BLEU: every prediction needs the same number of references, got counts {sorted(num_refs)}.")
    streams = [list(stream) for stream in zip(*per_prediction)]  # (num_refs, num_predictions)
    result = sacrebleu.corpus_bleu(list(predictions), streams, tokenize=tokenize, lowercase=lowercase)
    return {
        "bleu": float(result.score),
        "precisions": [float(p) for p in result.precisions],
        "brevity_penalty": float(result.bp),
        "length_ratio": float(result.ratio),
        "translation_length": int(result.sys_len),
        "reference_length": int(result.ref_len),
    }


def _to_numpy(array) -> np.ndarray:
    """numpy view of a list, numpy array or torch tensor (without importing torch)."""
    if hasattr(array, "detach"):
        array = array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float64)


def _recall_at_ks(scores: np.ndarray, correct: list[np.ndarray], ks: Sequence[int]) -> dict[int, float]:
    """Recall@k of each row of `scores` (queries x candidates), `correct[i]` the right columns of row i.

    A row counts as a hit at k when fewer than k wrong candidates score >= its best right candidate.
    Ties count against the model, so a constant similarity matrix scores 0, not 1.
    """
    ranks = []
    for row, right in zip(scores, correct):
        wrong = np.ones(row.shape[0], dtype=bool)
        wrong[right] = False
        ranks.append(int(np.sum(row[wrong] >= row[right].max())))
    ranks = np.asarray(ranks)
    return {k: float(np.mean(ranks < k)) for k in ks}


def retrieval_recall(
    similarity,
    references: Sequence[int] | None = None,
    ks: Sequence[int] = DEFAULT_RECALL_KS,
) -> dict[str, float]:
    """Recall@k in both directions from a (num_texts, num_media) similarity matrix.

    Rows are text queries, columns media candidates; `references[i]` is the column of text i's media
    (default: the diagonal, for a square matrix of pairs). Returns `text_to_media_recall@k` (rank the
    columns of each row) and `media_to_text_recall@k` (rank the rows of each column; a medium with
    several captions is a hit when any of them is in its top k; a medium no text refers to is skipped).
    With k >= the number of candidates recall@k is trivially 1.0.
    """
    scores = _to_numpy(similarity)
    if scores.ndim != 2:
        raise ValueError(f"retrieval: similarity must be 2-D (num_texts, num_media), got shape {scores.shape}.")
    num_texts, num_media = scores.shape
    if references is None:
        if num_texts != num_media:
            raise ValueError(
                f"retrieval: a {num_texts}x{num_media} similarity matrix is not square; pass `references`, "
                "the media column of each text row."
            )
        references = range(num_texts)
    references = np.asarray(list(references), dtype=np.int64)
    if references.shape != (num_texts,):
        raise ValueError(f"retrieval: need one reference per text row ({num_texts}), got {references.shape[0]}.")
    if references.min(initial=0) < 0 or references.max(initial=0) >= num_media:
        raise ValueError(f"retrieval: references must be column indices in [0, {num_media}), got {references.tolist()}.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("retrieval: the similarity matrix has NaN or infinite entries.")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"retrieval: every k must be >= 1, got {tuple(ks)}.")

    text_to_media = _recall_at_ks(scores, [np.array([r]) for r in references], ks)
    media_with_text = [m for m in range(num_media) if np.any(references == m)]
    media_to_text = _recall_at_ks(
        scores.T[media_with_text], [np.flatnonzero(references == m) for m in media_with_text], ks
    )
    result = {f"text_to_media_recall@{k}": v for k, v in text_to_media.items()}
    result.update({f"media_to_text_recall@{k}": v for k, v in media_to_text.items()})
    return result


def retrieval_recall_from_embeddings(
    text_embeddings,
    media_embeddings,
    references: Sequence[int] | None = None,
    ks: Sequence[int] = DEFAULT_RECALL_KS,
) -> dict[str, float]:
    """`retrieval_recall` on the cosine similarity of (num_texts, dim) and (num_media, dim) embeddings."""
    return retrieval_recall(cosine_similarity(text_embeddings, media_embeddings), references, ks)


def cosine_similarity(text_embeddings, media_embeddings) -> np.ndarray:
    """(num_texts, num_media) cosine similarity of (num_texts, dim) and (num_media, dim) embeddings, float64."""
    texts, media = _to_numpy(text_embeddings), _to_numpy(media_embeddings)
    if texts.ndim != 2 or media.ndim != 2 or texts.shape[1] != media.shape[1]:
        raise ValueError(
            f"retrieval: embeddings must be (num_texts, dim) and (num_media, dim), got {texts.shape} and {media.shape}."
        )
    texts = texts / np.clip(np.linalg.norm(texts, axis=1, keepdims=True), 1e-12, None)
    media = media / np.clip(np.linalg.norm(media, axis=1, keepdims=True), 1e-12, None)
    return texts @ media.T
