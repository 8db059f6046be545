"""Task-level evaluation of a model on manifest rows: generation scores and retrieval recall.

- caption / question tasks: greedy generation (left-padded batches), exact match and BLEU;
- transcription: greedy generation, WER and CER;
- retrieval: media and paired-text embeddings from `get_retrieval_embeddings`, recall@1/5/10 in both directions;
  optionally each query's top k candidates re-ranked by the generative score log p(text | media), the
  retrieve-then-rerank scheme of ALBEF / BLIP (there with an image-text matching head), reported under
  `reranked_*` keys next to the embedding-only scores.
Scores come from `evaluation.functional`, the same code the shipped `evaluate` modules run.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..constants import IGNORE_INDEX
from ..data.collator import MultimodalCollator, collate_media
from ..data.examples import MEDIA_TENSOR_KEYS, ExampleEncoder, build_example, get_task
from .distributed import Ranks, batches_of, cpu, media_signature
from .functional import bleu, character_error_rate, cosine_similarity, exact_match, retrieval_recall, word_error_rate

MEDIA_ARGUMENTS = (("images", "image"), ("audio", "audio"), ("videos", "video"))


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _process(processor, examples: list[dict], texts: list[str], padding_side: str):
    media = {arg: [e["media"][modality] for e in examples] for arg, modality in MEDIA_ARGUMENTS}
    media = {arg: value for arg, value in media.items() if any(value)}
    tracks = [flag for e in examples for flag in e["use_audio_in_video"]]
    if any(tracks):
        media["use_audio_in_video"] = tracks
    return processor(text=texts, return_tensors="pt", padding=True, padding_side=padding_side, **media)


@torch.no_grad()
def generate_responses(
    model, processor, rows: list[dict], task, batch_size: int = 16, max_new_tokens: int = 32, require_response: bool = True,
    distributed: bool = False,
):
    """Greedy responses for `rows`; returns (predictions, references, examples). require_response=False takes chat
    rows that end on the user's turn (prompts only, as lmms-eval sends them; their references are None).

    distributed: every rank of the process group calls this with the same rows; each generates its share and all
    get every prediction (`evaluation.distributed`)."""
    examples = [build_example(row, task, require_response=require_response) for row in rows]
    ranks = Ranks.of(model, distributed)
    keys = [media_signature(e) for e in examples] if ranks.world > 1 else None
    predictions = {}
    for chunk in batches_of(ranks.share(keys if keys is not None else [None] * len(examples)), keys, batch_size):
        chosen = [examples[index] for index, _ in chunk]
        prompts = [processor.apply_chat_template(e["prompt"], add_generation_prompt=True, tokenize=False) for e in chosen]
        inputs = _process(processor, chosen, prompts, padding_side="left").to(model.device)
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, synced_gpus=ranks.sharded)
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]
        texts = processor.batch_decode(new_tokens, skip_special_tokens=True)
        predictions.update((index, text.strip()) for (index, padding), text in zip(chunk, texts) if not padding)
    return ranks.gather(predictions, len(examples)), [e["response"] for e in examples], examples


def split_prompt_response(example: dict) -> tuple[dict, torch.Tensor]:
    """An encoded example (`ExampleEncoder` output) as (its prompt: media tensors and the unlabelled `input_ids`,
    its response: the labelled token ids), the two inputs `pair_log_likelihoods` takes."""
    labelled = example["labels"] != IGNORE_INDEX
    prompt = {key: example[key] for key in MEDIA_TENSOR_KEYS if key in example}
    return {**prompt, "input_ids": example["input_ids"][~labelled]}, example["labels"][labelled]


@torch.no_grad()
def pair_log_likelihoods(
    model, prompts: list[dict] | dict[int, dict], responses: list[torch.Tensor], pairs: list[tuple[int, int]], pad_token_id: int,
    batch_size: int = 32,
) -> torch.Tensor:
    """log p(responses[t] | prompts[m]) of each (t, m) in `pairs`, as a (len(pairs),) float tensor.

    prompts, responses: each encoded example's two parts (`split_prompt_response`). Each prompt runs once, with its media, and
    keeps its KV cache; its candidate responses then run as one batch on that cache, so a medium's tower
    and prompt are not recomputed per candidate (re-ranking k candidates costs k short response passes).
    The result equals the summed token log-probabilities of the prompt and response run as one sequence.
    """
    collator = MultimodalCollator(pad_token_id)
    by_prompt: dict[int, list[int]] = {}
    for index, (_, prompt) in enumerate(pairs):
        by_prompt.setdefault(prompt, []).append(index)
    scores = torch.zeros(len(pairs))
    for prompt, indices in by_prompt.items():
        example = {**prompts[prompt], "labels": torch.full_like(prompts[prompt]["input_ids"], IGNORE_INDEX)}
        batch = collator([example])
        inputs = {k: v.to(model.device) for k, v in batch.items() if k not in ("labels", "ctc_labels", "pair_input_ids", "pair_attention_mask")}
        prefix = model(**inputs, use_cache=True, logits_to_keep=1)  # only the last position's logits are read
        first = prefix.logits[0, -1].float().log_softmax(-1)  # predicts each response's first token
        prefix_length = inputs["input_ids"].shape[1]
        for chunk in _batches(indices, batch_size):
            cache = prefix.cache if len(chunk) == len(indices) else copy.deepcopy(prefix.cache)
            cache.batch_repeat_interleave(len(chunk))
            texts = [responses[pairs[i][0]] for i in chunk]
            lengths = torch.tensor([len(t) for t in texts])
            if int(lengths.min()) == 0:
                empty = [pairs[i][0] for i, length in zip(chunk, lengths.tolist()) if length == 0]
                raise ValueError(f"responses {empty} are empty: each scored response needs at least one token")
            ids = torch.full((len(chunk), int(lengths.max())), pad_token_id, dtype=torch.long)
            for row, text in enumerate(texts):
                ids[row, : len(text)] = text
            real = torch.arange(ids.shape[1]) < lengths[:, None]
            mask = torch.cat([torch.ones(len(chunk), prefix_length, dtype=torch.long), real.long()], dim=1)
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), cache=cache, use_cache=True).logits
            token_scores = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None].to(logits.device)).squeeze(-1).cpu()
            token_scores = (token_scores * real[:, 1:]).sum(-1) + first.cpu()[ids[:, 0]]
            scores[torch.tensor(chunk)] = token_scores
    return scores


def _top_k_pairs(similarity: np.ndarray, k: int) -> set[tuple[int, int]]:
    """(text, media) index pairs in each text's top k media and each medium's top k texts."""
    pairs = set()
    for text, row in enumerate(similarity):
        pairs.update((text, int(m)) for m in np.argsort(-row, kind="stable")[:k])
    for media, column in enumerate(similarity.T):
        pairs.update((int(t), media) for t in np.argsort(-column, kind="stable")[:k])
    return pairs


def reranked_recall(similarity: np.ndarray, pair_scores: dict[tuple[int, int], float], k: int) -> dict[str, float]:
    """Recall@1/5/10 after re-ranking: each text's top k media (by `similarity`, texts x media, pairs on the
    diagonal) are re-ordered by `pair_scores[(text, media)]` and stay above the rest; likewise each medium's
    top k texts. The two directions re-rank different candidate lists, so they are scored separately."""
    offset = np.abs(similarity).max() + 1.0  # lifts every re-ranked candidate above all the others

    def reorder(matrix: np.ndarray, key) -> np.ndarray:
        out = matrix.copy()
        for query, row in enumerate(matrix):
            top = np.argsort(-row, kind="stable")[:k]
            values = np.array([pair_scores[key(query, int(c))] for c in top])
            ranks = np.argsort(np.argsort(-values, kind="stable"), kind="stable")  # 0 = best score
            out[query, top] = offset + (len(top) - ranks)
        return out

    text_to_media = retrieval_recall(reorder(similarity, lambda t, m: (t, m)))
    media_to_text = retrieval_recall(reorder(similarity.T, lambda m, t: (t, m)).T)
    result = {key: value for key, value in text_to_media.items() if key.startswith("text_to_media")}
    result.update({key: value for key, value in media_to_text.items() if key.startswith("media_to_text")})
    return {f"reranked_{key}": value for key, value in result.items()}


@torch.no_grad()
def retrieval_scores(
    model, processor, rows: list[dict], task, batch_size: int = 32, rerank_top_k: int = 0, distributed: bool = False
) -> dict[str, float]:
    """Recall@1/5/10 text→media and media→text over rows with distinct paired texts.

    rerank_top_k: also re-rank each query's top k candidates by log p(text | media) (`reranked_*` keys).
    The task's own prompt and response format are used, so the task must have a response (captions,
    transcripts); the cost is one LM pass per candidate pair, at most 2·k per query.
    distributed: each rank embeds its share of the rows (`evaluation.distributed`); re-ranking is split by query
    unless the model is sharded, where its passes (a different number per query) run on every rank alike.
    """
    spec = get_task(task)
    if rerank_top_k < 0:
        raise ValueError(f"rerank_top_k must be >= 0 (0: no re-ranking), got {rerank_top_k}.")
    if rerank_top_k > 0 and (spec is None or not spec.response_field):
        raise ValueError(f"rerank_top_k needs a task whose response is the paired text (a caption or transcript); got {task!r}.")
    encoder = ExampleEncoder(processor, task)
    chosen, seen = [], set()
    for row in rows:
        pair_text = build_example(row, task)["pair_text"]
        if pair_text and pair_text not in seen:
            seen.add(pair_text)
            # the pair text as the response, so one encoding (one media decode) serves embeddings and re-ranking
            chosen.append({**row, spec.response_field: pair_text} if rerank_top_k > 0 else row)
    if len(chosen) < 2:
        return {}
    ranks = Ranks.of(model, distributed)
    tokenizer = processor.tokenizer
    encoded, embeddings = {}, {}  # by row index: this rank's share
    for chunk in batches_of(ranks.share([None] * len(chosen)), None, batch_size):
        examples = [encoder(chosen[index]) for index, _ in chunk]
        inputs = {key: value.to(model.device) for key, value in collate_media(examples, tokenizer.pad_token_id).items()}
        media = {key: inputs[key] for key in MEDIA_TENSOR_KEYS if key in inputs}  # one modality per retrieval task
        media_embeds = cpu(model.get_retrieval_embeddings(**media)).float()
        text_embeds = cpu(model.get_retrieval_embeddings(inputs["pair_input_ids"], inputs["pair_attention_mask"])).float()
        for row, ((index, padding), example) in enumerate(zip(chunk, examples)):
            if not padding:
                encoded[index], embeddings[index] = example, (text_embeds[row], media_embeds[row])
    text_embeds, media_embeds = (torch.stack(side) for side in zip(*ranks.gather(embeddings, len(chosen))))
    similarity = cosine_similarity(text_embeds, media_embeds)
    scores = retrieval_recall(similarity)
    if rerank_top_k > 0:
        pairs = sorted(_top_k_pairs(similarity, rerank_top_k))
        # Each rank scores the pairs of the media it encoded. Sharded, every rank scores every pair instead: a
        # prompt's pass count depends on its candidates, and collective forwards must match across ranks.
        if ranks.sharded:
            encoded.update((i, encoder(chosen[i])) for i in range(len(chosen)) if i not in encoded)
        parts = {index: split_prompt_response(example) for index, example in encoded.items()}
        responses = ranks.gather({index: response for index, (_, response) in parts.items()}, len(chosen))
        mine = [position for position, (_, media) in enumerate(pairs) if media in parts]
        log_likelihoods = pair_log_likelihoods(
            model, {index: prompt for index, (prompt, _) in parts.items()}, responses, [pairs[p] for p in mine],
            tokenizer.pad_token_id, batch_size,
        )
        pair_scores = dict(zip(pairs, ranks.gather(dict(zip(mine, log_likelihoods.tolist())), len(pairs))))
        scores.update(reranked_recall(similarity, pair_scores, rerank_top_k))
    return scores


def check_scorable(rows: list[dict], task, retrieval: bool = True) -> None:
    """Raise a ValueError when `evaluate_task` would score nothing: a retrieval-only task (`image_text_pair`) with
    retrieval off, or with fewer than 2 distinct paired texts (recall needs candidates to rank). Reads no media."""
    spec = get_task(task)
    if spec is None or spec.response_field:
        return  # generation scores every row
    if not retrieval:
        raise ValueError(f"task {spec.name!r} is scored by retrieval only, and retrieval is off (--no-retrieval): nothing would be scored")
    texts = {build_example(row, spec)["pair_text"] for row in rows} - {None, ""}
    if len(texts) < 2:
        raise ValueError(
            f"task {spec.name!r} is scored by retrieval, which needs at least 2 rows with distinct {spec.pair_field!r} "
            f"texts to rank; got {len(rows)} row(s) with {len(texts)} distinct"
        )


def evaluate_task(
    model, processor, rows: list[dict], task, batch_size: int = 16, max_new_tokens: int = 32, num_examples: int | None = 3,
    rerank_top_k: int = 0, retrieval: bool = True, distributed: bool = False,
):
    """All scores that apply to `task` (task None: chat rows, their last assistant turn scored by exact match and
    BLEU, and by WER / CER too when every row holds only audio), plus the first `num_examples` (prediction, reference) examples (None: all).

    rerank_top_k: passed to `retrieval_scores` (0: embedding retrieval only). retrieval=False skips retrieval, and so
    does a generation task on a model without a retrieval head. distributed: every rank of the process group calls
    this with the same rows, scores its share and returns the scores of all rows (`evaluation.distributed`)."""
    spec = get_task(task)
    check_scorable(rows, task, retrieval)
    was_training = model.training
    model.eval()
    scores, samples = {}, []
    if spec is None or spec.response_field:
        predictions, references, examples = generate_responses(model, processor, rows, task, batch_size, max_new_tokens, distributed=distributed)
        transcription = spec.ctc_field if spec is not None else all(e["media"]["audio"] for e in examples) and not any(
            e["media"]["image"] or e["media"]["video"] for e in examples
        )  # chat rows: speech-only rows are transcripts (or spoken answers), scored by WER like the task
        if transcription:
            scores["wer"] = word_error_rate(predictions, references)
            scores["cer"] = character_error_rate(predictions, references)
        if not (spec is not None and spec.ctc_field):
            scores["exact_match"] = exact_match(predictions, references)
            scores["bleu"] = bleu(predictions, references)["bleu"]
        samples = [
            {"id": e["id"], "media": {k: [str(x) for x in v] for k, v in e["media"].items() if v}, "prediction": p, "reference": r}
            for e, p, r in list(zip(examples, predictions, references))[:num_examples]
        ]
    # A generation task's retrieval scores need the retrieval head (built with α > 0 or `retrieval_head=True`); a
    # retrieval-only task (nothing generated) asks for them anyway, so a model without the head is refused by name.
    has_head = getattr(model, "retrieval_head", None) is not None
    if retrieval and spec is not None and spec.pair_field and (has_head or not spec.response_field):
        scores.update(retrieval_scores(model, processor, rows, task, batch_size, rerank_top_k, distributed))
    model.train(was_training)
    return scores, samples
