"""Memory and speed benchmarks of PEFT methods (``peftadapt bench``), with an analytic memory model.

    from peftadapt.bench import analytic_memory, Arch, run
    arch = Arch.from_config(model.config, head="causal")
    analytic_memory(arch, "lora", batch=4, seq=512)      # predicted bytes, by part
    run({"model": "llama-20m", "method": "lora"})         # measure one configuration in this process

Heavy imports (transformers, peft, matplotlib) happen only when a benchmark runs.
"""

from .memory_model import Arch, analytic_memory, activation_bytes, trainable_params, weight_bytes  # noqa: F401


def run(spec):
    """Measure one configuration in this process (see :mod:`peftadapt.bench.harness`)."""
    from .harness import run as _run

    return _run(spec)


def main(argv=None) -> int:
    """The ``peftadapt bench`` command line."""
    from .cli import main as _main

    return _main(argv)
