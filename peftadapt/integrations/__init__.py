"""Integrations with the training loops people already run.

:func:`add_alignment` puts peftadapt's domain-alignment step (:class:`peftadapt.DomainAdaptation`)
into a transformers ``Trainer`` or a TRL ``SFTTrainer``. Neither trl nor datasets is imported
until it is called.
"""

from .hf_trainer import STATE_FILE, AlignmentPlugin, add_alignment
from .target import TargetBatches, target_indices

__all__ = ["STATE_FILE", "AlignmentPlugin", "TargetBatches", "add_alignment", "target_indices"]
