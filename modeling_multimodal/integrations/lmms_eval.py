"""Our model as an lmms-eval model class, and our manifests as lmms-eval tasks.

lmms-eval's generic `huggingface` model cannot run our checkpoints (it falls back to `AutoModel`, with no LM head,
passes `videos=[]` and `audios=`, and forces bfloat16 on "cuda"), so the package ships this class, registered
under the `lmms_eval.models` entry-point group as `modeling_multimodal` (setup.py). Use it as

    lmms-eval --model modeling_multimodal --model_args pretrained=CHECKPOINT --tasks TASK --include_path TASK_DIR

Requests carry the prompt as a string with `<image>` / `<audio>` / `<video>` placeholders (where each medium goes)
and the media as a list of paths in placeholder order (`lmms_eval_tasks/utils.py`). Both request types run
through the package's own evaluation code, so lmms-eval's scores equal `evaluate`'s on the same rows:
- `generate_until`: `evaluation.tasks.generate_responses` (greedy, left-padded batches), cut at the `until` strings;
- `loglikelihood`: `evaluation.tasks.pair_log_likelihoods` of the continuation as the assistant reply (with its
  EOS, as trained). lmms-eval's multiple-choice tasks take the *argmin* of what `loglikelihood` returns, so the
  first element is the loss -log p(continuation | context), not the log-probability; each pair goes back wrapped
  in a `GenerationResult`, since lmms-eval 0.7.3 turns a bare tuple into its string.

`manifest_to_lmms_eval_task` (CLI: `python -m modeling_multimodal.integrations.lmms_eval`) turns a manifest of
ours into a JSONL file plus a task YAML (`dataset_path: json`, `dataset_kwargs: {data_files: ...}`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from ..configuration.media_registry import PLACEHOLDERS
from ..data.examples import ExampleEncoder, build_example, load_manifest
from ..data.formats import MODALITY_OF_TOKEN, PLACEHOLDER
from ..evaluation.tasks import generate_responses, pair_log_likelihoods, split_prompt_response

try:  # lmms-eval is optional (the `eval` extra); the manifest conversion needs only the package
    from lmms_eval.api.instance import GenerationResult, Instance
    from lmms_eval.api.model import lmms
    from lmms_eval.models.registry_v2 import ModelManifest
except ImportError:  # pragma: no cover - exercised when lmms-eval is absent
    lmms, Instance, GenerationResult, ModelManifest = object, None, None, None

MODEL_NAME = "modeling_multimodal"
TASK_TEMPLATES = Path(__file__).parent / "lmms_eval_tasks"
# one template YAML per kind in lmms_eval_tasks/
TASK_KINDS = ("caption", "vqa", "multiple_choice", "transcription")


# --- prompts: chat content <-> a placeholder string ------------------------------------------------
def content_to_prompt(content: list[dict]) -> tuple[str, list[str]]:
    """A user turn's content items as (a prompt string with one placeholder per medium, the media in order)."""
    pieces, media = [], []
    for item in content:
        kind = item.get("type")
        if kind == "text":
            pieces.append(item["text"])
        else:
            pieces.append(PLACEHOLDERS[kind])
            media.append(next(value for key, value in item.items() if key not in ("type", "use_audio_in_video")))
    return " ".join(pieces), media


def prompt_to_content(prompt: str, media: list, request: str) -> list[dict]:
    """The inverse of `content_to_prompt`: "<image> describe it." + [path] -> [{"type": "image", ...}, {"type": "text", ...}].

    request: how errors name the request (lmms-eval's task and doc id)."""
    pieces = PLACEHOLDER.split(prompt)
    placeholders = sum(piece in MODALITY_OF_TOKEN for piece in pieces)
    if placeholders != len(media):
        raise ValueError(f"{request}: doc_to_visual gave {len(media)} media but the prompt has {placeholders} placeholders.")
    content, items = [], iter(media)
    for piece in pieces:
        if piece in MODALITY_OF_TOKEN:
            modality = MODALITY_OF_TOKEN[piece]
            content.append({"type": modality, modality: next(items)})
        elif piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    return content


def _truncate(text: str, until: list[str]) -> str:
    for stop in until or []:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text.strip()


# --- the model class -------------------------------------------------------------------------------
class MultimodalLMMS(lmms):
    """lmms-eval model over a checkpoint of ours (a folder or a Hub id; quantized checkpoints too).

    model_args: pretrained (required), batch_size (generation batch, default 8; lmms-eval's --batch_size), max_new_tokens (default 32, a
    task's `generation_kwargs.max_new_tokens` wins), device ("cpu" default), dtype ("float32" default).
    """

    def __init__(
        self, pretrained: str, batch_size: int = 8, max_new_tokens: int = 32, device: str | None = "cpu", dtype: str = "float32",
        max_batch_size: int | None = None, **kwargs,
    ):
        if Instance is None:
            raise ImportError("lmms-eval is not installed: pip install 'modeling-multimodal[eval]' (see docs/EVALUATION.md)")
        super().__init__()
        if kwargs:
            raise ValueError(f"unknown model_args for {MODEL_NAME}: {sorted(kwargs)} (known: pretrained, batch_size, max_new_tokens, device, dtype)")
        from ..cli import _checkpoint, _load_checkpoint

        self.model, self.processor = _load_checkpoint(_checkpoint(str(pretrained)), "lmms-eval")
        self.model.to(device=device or "cpu", dtype=getattr(torch, dtype))
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)

    def _request_content(self, request) -> tuple[list[dict], str]:
        context, _, doc_to_visual, doc_id, task, split = request.args
        media = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        name = f"task {task!r} doc {doc_id}"
        return prompt_to_content(context, list(media or []), name), name

    def generate_until(self, requests) -> list[str]:
        rows, settings = [], []
        for request in requests:
            content, name = self._request_content(request)
            rows.append({"id": name, "messages": [{"role": "user", "content": content}]})
            kwargs = dict(request.args[1] or {})
            until = kwargs.get("until", [])
            settings.append((int(kwargs.get("max_new_tokens", self.max_new_tokens)), [until] if isinstance(until, str) else list(until)))
        outputs = [None] * len(rows)
        for max_new_tokens in sorted({m for m, _ in settings}):  # one generation run per length budget
            indices = [i for i, (m, _) in enumerate(settings) if m == max_new_tokens]
            predictions, _, _ = generate_responses(
                self.model, self.processor, [rows[i] for i in indices], None, self.batch_size, max_new_tokens,
                require_response=False,  # lmms-eval's requests are prompts; it holds the answers itself
            )
            for i, prediction in zip(indices, predictions):
                outputs[i] = _truncate(prediction, settings[i][1])
        return outputs

    @torch.no_grad()
    def loglikelihood(self, requests) -> list:
        """(loss = -log p(continuation | context), whether greedy decoding gives the continuation) per request,
        each in a `GenerationResult` (its `text` is the pair)."""
        encoder = ExampleEncoder(self.processor)
        results = []
        for request in requests:
            content, name = self._request_content(request)
            continuation = request.args[1]
            if not continuation.strip():
                raise ValueError(f"{name}: an empty continuation cannot be scored")
            row = {"id": name, "messages": [{"role": "user", "content": content}, {"role": "assistant", "content": continuation.strip()}]}
            prompt, response = split_prompt_response(encoder(row))
            log_p = pair_log_likelihoods(self.model, [prompt], [response], [(0, 0)], self.processor.tokenizer.pad_token_id)[0]
            # wrapped: lmms-eval 0.7.3's evaluator turns any other non-string output, tuples too, into its str()
            results.append(GenerationResult(text=(-float(log_p), self._is_greedy(prompt, response))))
        return results

    def _is_greedy(self, prompt: dict, response: torch.Tensor) -> bool:
        inputs = {key: value[None] if key == "input_ids" else value for key, value in prompt.items()}
        inputs = {key: value.to(self.model.device) for key, value in inputs.items()}
        generated = self.model.generate(**inputs, max_new_tokens=len(response), do_sample=False)
        new = generated[0, inputs["input_ids"].shape[1] :].cpu()
        return len(new) == len(response) and bool((new == response).all())

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME} answers single-round requests only (generate_until, loglikelihood)")


def lmms_eval_manifest():
    """The `lmms_eval.models` entry point's payload: registers `MultimodalLMMS` as model `modeling_multimodal`."""
    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.MultimodalLMMS")


# --- manifests -> lmms-eval tasks ------------------------------------------------------------------
def manifest_to_lmms_eval_task(
    manifest: str | Path, out_dir: str | Path, kind: str, task: str | None = None, root: str | Path | None = None,
    name: str | None = None, choices_field: str = "choices", answer_field: str = "answer",
) -> Path:
    """Write `<out_dir>/<name>.jsonl` (one row per manifest row: "id", "prompt", "media" as absolute paths,
    "target"; plus "choices"/"answer" for multiple choice) and `<out_dir>/<name>.yaml`; returns the YAML's path.

    kind: caption | vqa | transcription (generation; the row's response is the target) or multiple_choice (the
    row's `choices_field` list and `answer_field`, an index or the right choice's text). task: our task name
    (image_caption, speech_transcription, ...; None for chat `messages` rows). Pass `--include_path out_dir`.
    """
    if kind not in TASK_KINDS:
        raise ValueError(f"unknown lmms-eval task kind {kind!r}; expected one of {TASK_KINDS}")
    manifest, out_dir = Path(manifest), Path(out_dir)
    root = Path(root) if root is not None else manifest.parent
    name = name or f"mm_{manifest.stem}"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for row in load_manifest(manifest, root=root, task=task):
        example = build_example(row, task, require_response=False)  # multiple-choice rows keep the answer apart
        (user,) = [m for m in example["prompt"] if m["role"] == "user"][-1:] or [None]
        if user is None or isinstance(user["content"], str):
            content = [{"type": "text", "text": user["content"] if user else ""}]
        else:
            content = user["content"]
        prompt, media = content_to_prompt(content)
        out = {"id": example["id"], "prompt": prompt, "media": [str(Path(m).resolve()) for m in media]}
        if kind == "multiple_choice":
            choices, answer = row.get(choices_field), row.get(answer_field)
            if not isinstance(choices, list) or len(choices) < 2:
                raise ValueError(f"{manifest} row {example['id']!r}: {choices_field!r} must be a list of >= 2 choices, got {choices!r}")
            if isinstance(answer, str):
                if answer not in choices:
                    raise ValueError(f"{manifest} row {example['id']!r}: answer {answer!r} is not one of {choices}")
                answer = choices.index(answer)
            if not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise ValueError(f"{manifest} row {example['id']!r}: {answer_field!r} must index {choices}, got {row.get(answer_field)!r}")
            out.update(choices=choices, answer=answer)
        else:
            if example["response"] is None:
                raise ValueError(f"{manifest} row {example['id']!r}: no response to score a {kind} task against")
            out["target"] = example["response"]
        rows.append(out)
    data_file = out_dir / f"{name}.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    template = (TASK_TEMPLATES / f"{kind}.yaml").read_text(encoding="utf-8")
    text = template.replace("__TASK__", name).replace("__DATA_FILE__", json.dumps(str(data_file.resolve())))
    shutil.copy(TASK_TEMPLATES / "utils.py", out_dir / "utils.py")  # the `!function utils.*` the YAML names
    path = out_dir / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Turn a manifest into an lmms-eval task (JSONL + YAML).")
    parser.add_argument("manifest")
    parser.add_argument("out_dir")
    parser.add_argument("--kind", required=True, choices=TASK_KINDS)
    parser.add_argument("--task", default=None, help="our task name (image_caption, speech_transcription, ...)")
    parser.add_argument("--root", default=None, help="folder media paths are relative to (default: the manifest's)")
    parser.add_argument("--name", default=None, help="the lmms-eval task name (default: mm_<manifest stem>)")
    args = parser.parse_args(argv)
    path = manifest_to_lmms_eval_task(args.manifest, args.out_dir, args.kind, args.task, args.root, args.name)
    print(f"wrote {path}; run: lmms-eval --model {MODEL_NAME} --model_args pretrained=CHECKPOINT "
          f"--tasks {path.stem} --include_path {path.parent} --output_path OUT")


if __name__ == "__main__":
    main()
