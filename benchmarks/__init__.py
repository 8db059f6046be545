"""Speed and memory of modeling_multimodal against transformers' reference classes, measured side by side.

Run from the repository root: `python -m benchmarks.run --out benchmarks/results.json` (add `--quick` for a
tiny smoke run, `--device cuda` on a GPU). See benchmarks/RESULTS.md for the latest table.
"""
