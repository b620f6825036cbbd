"""Hugging Face interoperability: our megatron-core checkpoints to and from ``transformers`` folders.

One adapter module per target format (``hunyuan_v1_moe`` for Hunyuan MoE models, ``nemotron_h`` for
TurboS-style hybrids) maps a single-process model's per-layer parameters to the format's tensors and
back; the export / import machinery around them is format-agnostic.
"""
