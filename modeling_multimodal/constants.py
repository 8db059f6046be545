"""Values that the model, the data pipeline and the evaluation must agree on, defined once."""

# The label of a position that takes no loss: prompt, padding and media tokens in `labels`, padding in
# `ctc_labels`. PyTorch's `cross_entropy` and transformers use the same default `ignore_index`.
IGNORE_INDEX = -100

QUANTIZATION_FILE = "quantization.json"  # written beside the quantized weights by compression.quantize_checkpoint
