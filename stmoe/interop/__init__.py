"""Hugging Face interop: T5 / mT5 (`hf_t5`) and SwitchTransformers (`hf_switch`) import and export.

``load_pretrained(source)`` imports a save_pretrained directory or an in-memory transformers model as
(stmoe model, params); ``save_pretrained(params, config, directory)`` writes a directory transformers loads.
Shared conversion code is split by job: `files` (checkpoint I/O), `config_map` (config fields and checks),
`param_layout` (parameter names and layouts), `verify` (nothing dropped, tree matches the model); `common`
re-exports them for one release (deprecated). Submodules are imported on demand
(``from stmoe.interop import hf_t5``) so that importing stmoe never imports torch or transformers; a
safetensors checkpoint directory needs neither. See docs/interop.md.
"""
