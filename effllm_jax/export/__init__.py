"""Export and interop: compact Flax exports, Hugging Face safetensors, GGUF import.

  export_run(workdir, out, 'flax'|'hf')      a training checkpoint -> an export directory
  export_model(out, spec, params, fmt)        compact params -> an export directory
  load_language_model(path)                   workdir | flax export | HF dir | .gguf -> LanguageModel
  load_exported(dir)                          flax export | HF dir -> LanguageModel
  import_hf(dir) / import_gguf(file)          -> (ModelConfig, dense params, full masks)
"""
from effllm_jax.export.api import (export_model, export_run, is_gguf, load_exported,
                                   load_language_model, load_run)
from effllm_jax.export.flax_io import load_compact, save_compact
from effllm_jax.export.gguf_import import (fetch_smollm2, gguf_tokenizer, import_gguf, load_gguf,
                                           load_gguf_compact)
from effllm_jax.export.hf import export_hf, import_hf, load_hf_compact
from effllm_jax.export.widths import round_widths

__all__ = [
    "export_model", "export_run", "is_gguf", "load_exported", "load_language_model", "load_run",
    "load_compact", "save_compact", "fetch_smollm2", "gguf_tokenizer", "import_gguf",
    "load_gguf", "load_gguf_compact", "export_hf", "import_hf", "load_hf_compact",
    "round_widths",
]
