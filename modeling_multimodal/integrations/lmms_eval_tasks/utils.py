"""Functions the lmms-eval task templates name (`!function utils.*`); copied next to each generated task YAML.

Scores are corpus-level and come from `modeling_multimodal.evaluation.functional`, the code our own `evaluate`
runs, so lmms-eval reports the same numbers on the same rows: `process_*` returns each row's (prediction,
reference) pair and `aggregate_*` scores the whole list at once (WER is total errors over total words, not a mean
of per-row rates).
"""

from modeling_multimodal.evaluation.functional import bleu, character_error_rate, exact_match, word_error_rate


def doc_to_visual(doc):
    """The row's media paths, in the order of the prompt's placeholders."""
    return list(doc["media"])


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The prompt with its <image>/<audio>/<video> placeholders (the model class puts the media there)."""
    return doc["prompt"]


def _pair(doc, results):
    return (results[0].strip() if results[0] is not None else "", doc["target"])


def process_caption(doc, results):
    return {"exact_match": _pair(doc, results), "bleu": _pair(doc, results)}


process_vqa = process_caption


def process_transcription(doc, results):
    return {"wer": _pair(doc, results), "cer": _pair(doc, results)}


def _split(pairs):
    return [p for p, _ in pairs], [r for _, r in pairs]


def aggregate_exact_match(pairs):
    return exact_match(*_split(pairs))


def aggregate_bleu(pairs):
    return bleu(*_split(pairs))["bleu"]


def aggregate_wer(pairs):
    return word_error_rate(*_split(pairs))


def aggregate_cer(pairs):
    return character_error_rate(*_split(pairs))
