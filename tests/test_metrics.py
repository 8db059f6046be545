"""Metrics against hand-computed values, sacrebleu itself, and through offline `evaluate.load`."""

import math

import numpy as np
import pytest
import sacrebleu
import torch

import evaluate
from modeling_multimodal.evaluation import (
    METRIC_NAMES,
    bleu,
    character_error_rate,
    exact_match,
    load_metric,
    metric_path,
    normalize_text,
    retrieval_recall,
    retrieval_recall_from_embeddings,
    word_error_rate,
)

# (name, predictions, references, kwargs, expected)
WER_CASES = [
    ("substitution", ["the cat sit"], ["the cat sat"], {}, 1 / 3),
    ("perfect", ["a red circle"], ["a red circle"], {}, 0.0),
    ("deletion", ["the cat"], ["the cat sat"], {}, 1 / 3),
    ("insertion", ["the big cat sat"], ["the cat sat"], {}, 1 / 3),
    ("empty prediction", [""], ["the cat sat"], {}, 1.0),
    ("corpus pools words", ["the cat sit", "a dog"], ["the cat sat", "a dog ran"], {}, 2 / 6),
    ("case and punctuation normalised", ["The cat, sat."], ["the  cat sat"], {}, 0.0),
    ("raw strings when normalize=False", ["The cat sat"], ["the cat sat"], {"normalize": False}, 1 / 3),
    ("more errors than words", ["a b c d"], ["x"], {}, 4.0),
]

CER_CASES = [
    ("substitution", ["abd"], ["abc"], {}, 1 / 3),
    ("deletion", ["ac"], ["abc"], {}, 1 / 3),
    ("spaces count", ["the bat"], ["the cat"], {}, 1 / 7),
    ("corpus pools characters", ["abd", "xy"], ["abc", "xy"], {}, 1 / 5),
    ("case normalised", ["ABC"], ["abc"], {}, 0.0),
    ("case kept when normalize=False", ["ABC"], ["abc"], {"normalize": False}, 1.0),
]

EXACT_MATCH_CASES = [
    ("identical", ["a red circle"], ["a red circle"], {}, 1.0),
    ("case, punctuation, outer and inner whitespace", ["  A Red  circle. "], ["a red circle"], {}, 1.0),
    ("different word", ["a red square"], ["a red circle"], {}, 0.0),
    ("half right", ["a red circle", "a blue star"], ["a red circle", "a red star"], {}, 0.5),
    ("byte-exact when normalize=False", ["A red circle"], ["a red circle"], {"normalize": False}, 0.0),
]


@pytest.mark.parametrize("name,predictions,references,kwargs,expected", WER_CASES, ids=[c[0] for c in WER_CASES])
def test_word_error_rate(name, predictions, references, kwargs, expected):
    assert word_error_rate(predictions, references, **kwargs) == pytest.approx(expected)


@pytest.mark.parametrize("name,predictions,references,kwargs,expected", CER_CASES, ids=[c[0] for c in CER_CASES])
def test_character_error_rate(name, predictions, references, kwargs, expected):
    assert character_error_rate(predictions, references, **kwargs) == pytest.approx(expected)


@pytest.mark.parametrize(
    "name,predictions,references,kwargs,expected", EXACT_MATCH_CASES, ids=[c[0] for c in EXACT_MATCH_CASES]
)
def test_exact_match(name, predictions, references, kwargs, expected):
    assert exact_match(predictions, references, **kwargs) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text,expected",
    [("The Cat SAT.", "the cat sat"), ("  a\tb\n c ", "a b c"), ("don't!", "dont"), ("ﬁne", "fine")],
)
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


BLEU_CASES = [
    ("one reference", ["the cat sat on the mat", "a red circle in the top left"],
     ["the cat sat on a mat", "a red circle in the top right"]),
    ("short hypothesis, brevity penalty", ["the cat"], ["the cat sat on the mat"]),
    ("two references each", ["the cat sat on the mat", "a blue star moving left"],
     [["the cat sat on a mat", "a cat sat on the mat"], ["a blue star moving right", "the blue star moves left"]]),
]


@pytest.mark.parametrize("name,predictions,references", BLEU_CASES, ids=[c[0] for c in BLEU_CASES])
def test_bleu_matches_sacrebleu(name, predictions, references):
    per_prediction = [[r] if isinstance(r, str) else r for r in references]
    expected = sacrebleu.corpus_bleu(predictions, [list(s) for s in zip(*per_prediction)])
    result = bleu(predictions, references)
    assert result["bleu"] == pytest.approx(expected.score)
    assert result["precisions"] == pytest.approx(expected.precisions)
    assert result["brevity_penalty"] == pytest.approx(expected.bp)


def test_bleu_perfect_is_100():
    assert bleu(["a small red circle in the centre"], ["a small red circle in the centre"])["bleu"] == pytest.approx(100)


# Rows: text queries, columns: media. Worked by hand: for each row (column) count the wrong entries that
# score >= the right one; a hit at k when that count is < k.
SQUARE = [
    [0.9, 0.1, 0.2, 0.0],  # text 0 -> media 0: rank 0
    [0.8, 0.5, 0.1, 0.0],  # text 1 -> media 1: 0.8 above it, rank 1
    [0.1, 0.2, 0.3, 0.4],  # text 2 -> media 2: 0.4 above it, rank 1
    [0.7, 0.6, 0.5, 0.1],  # text 3 -> media 3: three above it, rank 3
]
# Columns: media 0 rank 0; media 1 (0.5 vs 0.6) rank 1; media 2 (0.3 vs 0.5) rank 1; media 3 (0.1 vs 0.4) rank 1.
TWO_CAPTIONS = [  # texts 0 and 1 describe media 0, text 2 describes media 1
    [0.2, 0.9],  # text 0 -> media 0: rank 1
    [0.8, 0.1],  # text 1 -> media 0: rank 0
    [0.3, 0.4],  # text 2 -> media 1: rank 0
]
# Columns: media 0's best caption (0.8) beats text 2 (0.3): rank 0; media 1 (0.4) loses to text 0 (0.9): rank 1.

RECALL_CASES = [
    ("square, diagonal pairs", SQUARE, None, (1, 2, 3, 4),
     {"text_to_media": [1 / 4, 3 / 4, 3 / 4, 1.0], "media_to_text": [1 / 4, 1.0, 1.0, 1.0]}),
    ("two captions for one medium", TWO_CAPTIONS, [0, 0, 1], (1, 2),
     {"text_to_media": [2 / 3, 1.0], "media_to_text": [1 / 2, 1.0]}),
    ("ties count against the model", np.ones((3, 3)), None, (1, 2, 3),
     {"text_to_media": [0.0, 0.0, 1.0], "media_to_text": [0.0, 0.0, 1.0]}),
    ("identity is perfect", np.eye(12), None, (1, 5, 10),
     {"text_to_media": [1.0, 1.0, 1.0], "media_to_text": [1.0, 1.0, 1.0]}),
    ("torch tensor input", torch.tensor(SQUARE), None, (1, 2),
     {"text_to_media": [1 / 4, 3 / 4], "media_to_text": [1 / 4, 1.0]}),
]


@pytest.mark.parametrize("name,similarity,references,ks,expected", RECALL_CASES, ids=[c[0] for c in RECALL_CASES])
def test_retrieval_recall(name, similarity, references, ks, expected):
    result = retrieval_recall(similarity, references, ks=ks)
    assert set(result) == {f"{d}_recall@{k}" for d in ("text_to_media", "media_to_text") for k in ks}
    for direction, values in expected.items():
        assert [result[f"{direction}_recall@{k}"] for k in ks] == pytest.approx(values), direction


def test_retrieval_recall_from_embeddings_is_cosine():
    rng = np.random.default_rng(0)
    texts, media = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
    cosine = (texts / np.linalg.norm(texts, axis=1, keepdims=True)) @ (media / np.linalg.norm(media, axis=1, keepdims=True)).T
    assert retrieval_recall_from_embeddings(texts, media) == retrieval_recall(cosine)
    # Scaling an embedding must not change cosine retrieval: matched pairs differ only by norm.
    perfect = retrieval_recall_from_embeddings(texts, texts * rng.uniform(0.1, 10, size=(20, 1)))
    assert all(value == 1.0 for value in perfect.values())


BAD_INPUTS = [
    ("WER length mismatch", lambda: word_error_rate(["a"], ["a", "b"]), "2 references"),
    ("WER all references empty", lambda: word_error_rate(["a"], ["..."]), "undefined"),
    ("CER no references", lambda: character_error_rate([], []), "no references"),
    ("BLEU ragged references", lambda: bleu(["a", "b"], [["a"], ["b", "c"]]), "same number of references"),
    ("recall not square, no references", lambda: retrieval_recall(np.zeros((2, 3))), "not square"),
    ("recall reference out of range", lambda: retrieval_recall(np.zeros((2, 2)), [0, 2]), "column indices"),
    ("recall NaN", lambda: retrieval_recall(np.array([[np.nan, 0], [0, 1]])), "NaN"),
    ("recall 1-D", lambda: retrieval_recall(np.zeros(3)), "2-D"),
    ("recall k=0", lambda: retrieval_recall(np.eye(2), ks=(0,)), "k must be"),
    ("embedding dims differ", lambda: retrieval_recall_from_embeddings(np.zeros((2, 3)), np.zeros((2, 4))), "dim"),
    ("unknown metric", lambda: metric_path("rouge"), "Unknown metric"),
]


@pytest.mark.parametrize("name,call,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(name, call, message):
    with pytest.raises(ValueError, match=message):
        call()


# (metric, compute kwargs, expected subset of the result)
EVALUATE_CASES = [
    ("wer", {"predictions": ["the cat sit"], "references": ["the cat sat"]}, {"wer": 1 / 3}),
    ("cer", {"predictions": ["abd"], "references": ["abc"]}, {"cer": 1 / 3}),
    ("exact_match", {"predictions": ["A red circle.", "a star"], "references": ["a red circle", "a circle"]},
     {"exact_match": 0.5}),
    ("bleu", {"predictions": BLEU_CASES[0][1], "references": BLEU_CASES[0][2]},
     {"bleu": sacrebleu.corpus_bleu(BLEU_CASES[0][1], [BLEU_CASES[0][2]]).score}),
    ("bleu", {"predictions": BLEU_CASES[2][1], "references": BLEU_CASES[2][2]},
     {"bleu": bleu(BLEU_CASES[2][1], BLEU_CASES[2][2])["bleu"]}),
    ("retrieval_recall", {"predictions": SQUARE, "references": [0, 1, 2, 3], "ks": (1, 2)},
     {"text_to_media_recall@1": 1 / 4, "text_to_media_recall@2": 3 / 4, "media_to_text_recall@2": 1.0}),
    ("retrieval_recall", {"predictions": [[1.0, 0.0], [0.0, 2.0]], "references": [0, 1],
                          "media_embeddings": [[3.0, 0.0], [0.0, 1.0]], "ks": (1,)},
     {"text_to_media_recall@1": 1.0, "media_to_text_recall@1": 1.0}),
]


def test_every_metric_has_a_script():
    for name in METRIC_NAMES:
        assert (metric_path(name) / f"{name}.py").is_file()


@pytest.mark.parametrize("name,inputs,expected", EVALUATE_CASES, ids=[c[0] for c in EVALUATE_CASES])
def test_evaluate_load_offline(name, inputs, expected, tmp_path, monkeypatch):
    """`load_metric` must never reach for the Hub: make any Hub factory fail loudly."""

    def no_hub(*args, **kwargs):
        raise AssertionError("evaluate tried to fetch a metric from the Hub")

    monkeypatch.setattr(evaluate.loading, "HubEvaluationModuleFactory", no_hub)
    metric = load_metric(name, cache_dir=str(tmp_path))
    assert isinstance(metric, evaluate.Metric)
    result = metric.compute(**inputs)
    for key, value in expected.items():
        assert math.isclose(result[key], value, rel_tol=1e-9), (key, result[key], value)


def test_evaluate_accumulates_batches(tmp_path):
    """`add_batch` then `compute` pools the corpus, as a trainer's evaluation loop uses it."""
    metric = load_metric("wer", cache_dir=str(tmp_path))
    metric.add_batch(predictions=["the cat sit"], references=["the cat sat"])
    metric.add_batch(predictions=["a dog"], references=["a dog ran"])
    assert metric.compute()["wer"] == pytest.approx(2 / 6)
