"""modeling-multimodal: vision, audio and video encoders projected into any causal LM.

`configuration/` and `processing/` live at the repository root (the layout the design card fixes) but
install as subpackages of the single import root `modeling_multimodal`.
"""

from setuptools import find_packages, setup

# Every package under modeling_multimodal/ (training, evaluation metrics, demo data, ...), plus the two root folders.
PACKAGES = ["modeling_multimodal"] + [f"modeling_multimodal.{p}" for p in find_packages("modeling_multimodal")]
# The `evaluate` metric scripts are folders without __init__.py (evaluate loads them by path): ship them as data.
PACKAGE_DATA = {
    "modeling_multimodal.evaluation": ["metrics/*/*.py", "english_reference.txt"],
    "modeling_multimodal.model_cards": ["*.md"],
    "modeling_multimodal.recipes": ["*.yaml"],
    "modeling_multimodal.integrations": ["lmms_eval_tasks/*.yaml", "lmms_eval_tasks/*.py"],
}

setup(
    name="modeling-multimodal",
    version="0.1.0",
    description="A Transformers-style multimodal LLM: image, audio and video encoders projected into any causal LM.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=PACKAGES
    + ["modeling_multimodal.configuration", "modeling_multimodal.processing", "modeling_multimodal.model_cards"]
    + ["modeling_multimodal.recipes"],
    package_dir={
        "modeling_multimodal": "modeling_multimodal",
        "modeling_multimodal.configuration": "configuration",
        "modeling_multimodal.processing": "processing",
        "modeling_multimodal.model_cards": "model_cards",
        "modeling_multimodal.recipes": "recipes",
    },
    package_data=PACKAGE_DATA,
    install_requires=[
        "torch>=2.4",
        "transformers>=5.20,<6",
        "accelerate>=1.10",
        "peft>=0.18",
        "datasets>=3.0",
        "safetensors>=0.4",
        "evaluate>=0.4",
        "huggingface_hub>=1.0",
        "httpx2",  # imported directly (cli.py, hub/push.py: timeouts, transport errors); huggingface_hub 1.x uses it
        "numpy",
        "pillow",
        "av>=12",
        "soundfile>=0.12",
        "jiwer>=3.0",
        "sacrebleu>=2.4",
        "pyyaml",
        "tokenizers",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "trl==1.16.0", "parameterized"],  # parameterized: transformers' common tests
        # DeepSpeed ZeRO through `accelerate launch` (GPUs; on CPU processes it does not start: docs/TRAINING.md).
        "deepspeed": ["deepspeed>=0.19,<1"],
        # Converters of the shipped real weights (GGUF, ONNX) and the runtimes their parity tests compare with.
        "convert": ["gguf>=0.17,<1", "onnx>=1.17,<2", "ctranslate2>=4.5,<5", "onnxruntime>=1.20,<2"],
        # `quantize --method int8-weight-only / int4-weight-only` (CPU); QLoRA (`lora.quantize: 4bit`, CUDA only).
        "quantize": ["optimum-quanto>=0.2.7,<0.3"],
        "qlora": ["bitsandbytes>=0.45"],
        # lmms-eval's model class (modeling_multimodal/integrations/lmms_eval.py). Its own requirements pull a CUDA
        # torch: on CPU install it with scripts/setup_eval.sh (--no-deps plus the few modules it imports).
        "eval": ["lmms-eval==0.7.3"],
    },
    entry_points={
        "console_scripts": ["modeling-multimodal=modeling_multimodal.cli:main"],
        "lmms_eval.models": ["modeling_multimodal=modeling_multimodal.integrations.lmms_eval:lmms_eval_manifest"],
    },
)
