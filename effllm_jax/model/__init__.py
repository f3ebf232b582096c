"""The Llama-family model: dense masked source (llama.py) and compact sliced twin (compact.py)."""
from effllm_jax.model.llama import ModelConfig, Llama, Masks, apply, abstract_params, full_masks, init_params, param_axes

__all__ = ["ModelConfig", "Llama", "Masks", "apply", "abstract_params", "full_masks", "init_params", "param_axes"]
