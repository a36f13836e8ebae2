"""Tiny random models, built offline, for tests and CPU demos.

Submodules, imported on their own so each caller pays only for the library it needs:
``tokenizer`` (the offline tokenizers), ``diffusion`` (SD1.5 / SDXL bundles, ``build_tiny_bundle``),
``flow`` (SD3 / FLUX.1 / Qwen-Image bundles, ``build_tiny_flow_bundle``; text towers: ``text_encoders``),
``language`` (the prompt-extraction LLM and the VLM judge, saved to disk) and ``scorers`` (reward-scorer
checkpoints in the layouts the scorers load).
"""
