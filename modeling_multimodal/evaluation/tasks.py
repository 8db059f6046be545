"""Task-level evaluation of a model on manifest rows: generation scores and retrieval recall.

- caption / question tasks: greedy generation (left-padded batches), exact match and BLEU;
- transcription: greedy generation, WER and CER;
- retrieval: media and paired-text embeddings from `get_*_features`, recall@1/5/10 in both directions.
Scores come from `evaluation.functional`, the same code the shipped `evaluate` modules run.
"""

from __future__ import annotations

import torch

from ..training.data import build_example, get_task
from .functional import bleu, character_error_rate, exact_match, retrieval_recall_from_embeddings, word_error_rate

MEDIA_ARGUMENTS = (("images", "image"), ("audio", "audio"), ("videos", "video"))


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _process(processor, examples: list[dict], texts: list[str], padding_side: str):
    media = {arg: [e["media"][modality] for e in examples] for arg, modality in MEDIA_ARGUMENTS}
    media = {arg: value for arg, value in media.items() if any(value)}
    return processor(text=texts, return_tensors="pt", padding=True, padding_side=padding_side, **media)


@torch.no_grad()
def generate_responses(model, processor, rows: list[dict], task, batch_size: int = 16, max_new_tokens: int = 32):
    """Greedy responses for `rows`; returns (predictions, references, examples)."""
    examples = [build_example(row, task) for row in rows]
    predictions = []
    for chunk in _batches(examples, batch_size):
        prompts = [processor.apply_chat_template(e["prompt"], add_generation_prompt=True, tokenize=False) for e in chunk]
        inputs = _process(processor, chunk, prompts, padding_side="left").to(model.device)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        predictions += [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return predictions, [e["response"] for e in examples], examples


@torch.no_grad()
def retrieval_scores(model, processor, rows: list[dict], task, batch_size: int = 32) -> dict[str, float]:
    """Recall@1/5/10 text→media and media→text over rows with distinct paired texts."""
    examples, seen = [], set()
    for example in (build_example(row, task) for row in rows):
        if example["pair_text"] and example["pair_text"] not in seen:
            seen.add(example["pair_text"])
            examples.append(example)
    if len(examples) < 2:
        return {}
    media_embeds, text_embeds = [], []
    tokenizer = processor.tokenizer
    for chunk in _batches(examples, batch_size):
        placeholders = [" ".join(processor.placeholder(m) for m in ("image", "audio", "video") for _ in e["media"][m]) for e in chunk]
        inputs = _process(processor, chunk, placeholders, padding_side="right").to(model.device)
        if "pixel_values" in inputs:
            media_embeds.append(model.get_image_features(inputs["pixel_values"]))
        elif "pixel_values_videos" in inputs:
            media_embeds.append(model.get_video_features(inputs["pixel_values_videos"]))
        else:
            media_embeds.append(model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]))
        texts = tokenizer([e["pair_text"] for e in chunk], add_special_tokens=False, padding=True, return_tensors="pt")
        text_embeds.append(model.get_text_features(texts["input_ids"].to(model.device), texts["attention_mask"].to(model.device)))
    return retrieval_recall_from_embeddings(torch.cat(text_embeds).float().cpu(), torch.cat(media_embeds).float().cpu())


def evaluate_task(model, processor, rows: list[dict], task, batch_size: int = 16, max_new_tokens: int = 32, num_examples: int = 3):
    """All scores that apply to `task`, plus a few (prediction, reference) examples for reports."""
    spec = get_task(task)
    was_training = model.training
    model.eval()
    scores, samples = {}, []
    if spec is None or spec.response_field:
        predictions, references, examples = generate_responses(model, processor, rows, task, batch_size, max_new_tokens)
        if spec is not None and spec.ctc_field:  # transcription
            scores["wer"] = word_error_rate(predictions, references)
            scores["cer"] = character_error_rate(predictions, references)
        else:
            scores["exact_match"] = exact_match(predictions, references)
            scores["bleu"] = bleu(predictions, references)["bleu"]
        samples = [
            {"id": e["id"], "media": {k: [str(x) for x in v] for k, v in e["media"].items() if v}, "prediction": p, "reference": r}
            for e, p, r in list(zip(examples, predictions, references))[:num_examples]
        ]
    if spec is not None and spec.pair_field:
        scores.update(retrieval_scores(model, processor, rows, task, batch_size))
    model.train(was_training)
    return scores, samples
