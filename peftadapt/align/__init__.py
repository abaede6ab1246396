"""Domain-alignment regularizers: MMD, CORAL, DANN, CDAN(+E), target entropy, target LM loss.

``build(name, **options)`` makes one from the registry ("mmd", "coral", "dann",
"cdan", "cdan+e", "entropy", "target_lm", or your own via ``register``); ``Alignment`` holds a
scheduled, weighted sum of several; ``DomainAdaptation`` is the whole DA step (feature
tap + terms + schedule) that every training loop calls; ``ADDA`` is the GAN-style
adversarial phase after source training (two adapters on one base). See docs/regularizers.md.

Modules: :mod:`.regularizer` (the interface), :mod:`.registry`, :mod:`.schedule`,
:mod:`.scope` (several processes), :mod:`.terms` (``Term``, ``Alignment``), :mod:`.step`
(``DomainAdaptation``), :mod:`.adda` (``ADDA``), one
module per method (:mod:`.mmd`, :mod:`.coral`, :mod:`.adversarial`, :mod:`.entropy`, :mod:`.target_lm`),
:mod:`.verbalizer` (class logits of a causal LM from answer tokens).
"""

from .adda import ADDA
from .adversarial import CDAN, DANN, DomainDiscriminator, GradientReversal, grad_reverse
from .coral import CORAL
from .entropy import Entropy
from .mmd import MMD
from .registry import REGULARIZERS, build, register, regularizer_names
from .regularizer import Regularizer
from .schedule import SCHEDULES, dann_ramp, schedule_weight
from .scope import SCOPES
from .step import SOURCES, DomainAdaptation, Sources, source_domains
from .target_lm import TargetLM
from .terms import Alignment, Term
from .verbalizer import class_logits, class_token_ids, prompt_positions

__all__ = [
    "ADDA",
    "CDAN",
    "CORAL",
    "DANN",
    "MMD",
    "REGULARIZERS",
    "SCHEDULES",
    "SCOPES",
    "SOURCES",
    "Alignment",
    "DomainAdaptation",
    "DomainDiscriminator",
    "Entropy",
    "GradientReversal",
    "Regularizer",
    "Sources",
    "TargetLM",
    "Term",
    "build",
    "class_logits",
    "class_token_ids",
    "dann_ramp",
    "grad_reverse",
    "prompt_positions",
    "register",
    "regularizer_names",
    "schedule_weight",
    "source_domains",
]
