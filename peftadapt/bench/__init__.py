"""Memory and speed benchmarks of PEFT methods (``peftadapt bench``), with an analytic memory model.

    from peftadapt.bench import analytic_memory, Arch, run
    arch = Arch.from_config(model.config, head="causal")
    analytic_memory(arch, "lora", batch=4, seq=512)      # predicted bytes, by part
    run({"model": "llama-20m", "method": "lora"})         # measure one configuration in this process

Heavy imports (transformers' model classes, peft, matplotlib) happen only when a benchmark runs.
"""

from .cli import main
from .harness import run
from .memory_model import Arch, activation_bytes, analytic_memory, trainable_params, weight_bytes

__all__ = ["Arch", "activation_bytes", "analytic_memory", "main", "run", "trainable_params", "weight_bytes"]
