"""Hugging Face interop: import T5 / mT5 (`hf_t5`) and SwitchTransformers (`hf_switch`) checkpoints.

Submodules are imported on demand (``from stmoe.interop import hf_t5``) so that importing stmoe never
imports torch or transformers; a safetensors checkpoint directory needs neither.
"""
