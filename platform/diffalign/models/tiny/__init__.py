"""Tiny random models, built offline, for tests and CPU demos.

Submodules, imported on their own so each caller pays only for the library it needs:
``tokenizer`` (the offline tokenizers), ``diffusion`` (SD1.5 / SDXL bundles, ``build_tiny_bundle``),
``language`` (the prompt-extraction LLM and the VLM judge, saved to disk) and ``scorers`` (reward-scorer
checkpoints in the layouts the scorers load).
"""
