"""LoRA: read the common file formats (`formats`), match them to a model's linear layers and
check them whole (`matching`), apply them cold or hot (`apply`).

    handle = load_lora(pipe.dit, "lora.safetensors", alpha=0.8)           # cold
    handle = load_lora(pipe.dit, "other.safetensors", alpha=0.5, hot=True)
    handle.set_alpha(0.3)                                                 # in place
    clear_lora(pipe.dit)                                                  # base weights, bit for bit
"""
from .apply import LoraHandle, clear_lora, load_lora, loaded_loras, lora_context
from .formats import KNOWN_PREFIXES, LoraError, LoraFile, LoraSource, lora_format, read_lora
from .matching import LoraLayer, PreparedLora, linear_layers, prepare_lora

__all__ = [
    "KNOWN_PREFIXES", "LoraError", "LoraFile", "LoraHandle", "LoraLayer", "LoraSource", "PreparedLora", "clear_lora",
    "linear_layers", "load_lora", "loaded_loras", "lora_context", "lora_format", "prepare_lora", "read_lora",
]
