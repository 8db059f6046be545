"""Task evaluation: retrieval re-ranked by the model's own log p(text | media), against brute-force references."""

from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_multimodal.demo_data import make_demo_data
from modeling_multimodal.evaluation.functional import retrieval_recall
from modeling_multimodal.evaluation.tasks import pair_log_likelihoods, reranked_recall, retrieval_scores, split_prompt_response
from modeling_multimodal.constants import IGNORE_INDEX
from modeling_multimodal.data import ExampleEncoder, MultimodalCollator, load_manifest
from modeling_multimodal.training.recipe import load_recipe
from modeling_multimodal.training.mixture import load_rows
from modeling_multimodal.training.model_builder import build_model_and_processor

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_test.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_data")
    make_demo_data(root, seed=0, sizes={"image": {"train": 8, "validation": 0, "test": 8}, "video": {"train": 0, "validation": 0, "test": 0}, "speech": {"train": 0, "validation": 0, "test": 0}})
    recipe = load_recipe(RECIPE, [f"data.root={root}", "data.train=[{manifest: image_train.jsonl, task: image_caption}]", "data.eval=[]"])
    torch.manual_seed(0)
    model, processor = build_model_and_processor(recipe, load_rows(recipe, recipe.data.train))
    rows = list(load_manifest(root / "image_test.jsonl", root=root))
    return model.eval(), processor, rows


def summed_log_likelihood(model, processor, media_row, caption) -> float:
    """log p(caption | media_row's image): the example run as one sequence, its mean token loss times its count."""
    example = ExampleEncoder(processor, "image_caption")({**media_row, "caption": caption})
    batch = MultimodalCollator(processor.tokenizer.pad_token_id)([example])
    batch = {k: v for k, v in batch.items() if k not in ("pair_input_ids", "pair_attention_mask")}
    with torch.no_grad():
        loss = model(**batch).loss_text  # mean over the labelled tokens
    return -loss.item() * int((example["labels"][1:] != IGNORE_INDEX).sum())


def test_pair_log_likelihoods_reuse_each_prompt_and_equal_the_whole_sequence_score(setup):
    model, processor, rows = setup
    encoder = ExampleEncoder(processor, "image_caption")
    encoded = [encoder(row) for row in rows[:3]]
    prompts, responses = zip(*map(split_prompt_response, encoded))
    pairs = [(0, 0), (1, 0), (2, 0), (2, 1), (0, 2)]  # prompt 0 has 3 candidates: batches of 2 and 1 on its cache
    scores = pair_log_likelihoods(model, prompts, responses, pairs, processor.tokenizer.pad_token_id, batch_size=2)
    for (text, media), score in zip(pairs, scores):
        assert score.item() == pytest.approx(summed_log_likelihood(model, processor, rows[media], rows[text]["caption"]), rel=1e-4)
    with pytest.raises(ValueError, match=r"responses \[1\] are empty"):
        pair_log_likelihoods(model, prompts, [responses[0], responses[1][:0]], [(1, 0)], processor.tokenizer.pad_token_id)


def test_reranked_recall_reorders_only_each_querys_top_k():
    # Embeddings rank text 0's medium second and text 1's medium third; the pair scores know better.
    similarity = np.array([[0.5, 0.9, 0.1], [0.8, 0.6, 0.7], [0.0, 0.1, 0.9]])
    pair_scores = {(t, m): (0.0 if t == m else -5.0) for t in range(3) for m in range(3)}
    assert reranked_recall(similarity, pair_scores, k=2)["reranked_text_to_media_recall@1"] == pytest.approx(2 / 3)
    full = reranked_recall(similarity, pair_scores, k=3)
    assert full["reranked_text_to_media_recall@1"] == 1.0 and full["reranked_media_to_text_recall@1"] == 1.0
    # k = 1 re-orders nothing: the embedding scores come back.
    plain = retrieval_recall(similarity)
    assert {k.removeprefix("reranked_"): v for k, v in reranked_recall(similarity, pair_scores, k=1).items()} == plain


def test_retrieval_reranked_over_every_candidate_equals_ranking_by_log_likelihood(setup):
    model, processor, rows = setup
    n = len(rows)
    scores = retrieval_scores(model, processor, rows, "image_caption", batch_size=4, rerank_top_k=n)
    # Reference: log p(caption_i | image_j) of every pair, one pair at a time, ranked directly.
    matrix = np.zeros((n, n))
    for j, media_row in enumerate(rows):
        for i, text_row in enumerate(rows):
            matrix[i, j] = summed_log_likelihood(model, processor, media_row, text_row["caption"])
    reference = retrieval_recall(matrix)
    for key, value in reference.items():
        assert scores[f"reranked_{key}"] == pytest.approx(value)
    assert "text_to_media_recall@1" in scores  # the embedding-only scores stay next to the re-ranked ones


def test_rerank_needs_a_task_with_a_response(setup):
    model, processor, rows = setup
    with pytest.raises(ValueError, match="rerank_top_k needs a task whose response is the paired text"):
        retrieval_scores(model, processor, rows, "image_text_pair", rerank_top_k=2)
    with pytest.raises(ValueError, match="rerank_top_k must be >= 0"):
        retrieval_scores(model, processor, rows, "image_caption", rerank_top_k=-1)
