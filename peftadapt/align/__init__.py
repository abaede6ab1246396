"""Domain-alignment regularizers: MMD, CORAL, DANN, CDAN(+E), target entropy.

``build(name, **options)`` makes one from the registry ("mmd", "coral", "dann",
"cdan", "cdan+e", "entropy", or your own via ``register``); ``Alignment`` holds a
scheduled, weighted sum of several; ``DomainAdaptation`` is the whole DA step (feature
tap + terms + schedule) that every training loop calls. See docs/regularizers.md.

Modules: :mod:`.regularizer` (the interface), :mod:`.registry`, :mod:`.schedule`,
:mod:`.scope` (several processes), :mod:`.terms` (``Term``, ``Alignment``), :mod:`.step`
(``DomainAdaptation``), one
module per method (:mod:`.mmd`, :mod:`.coral`, :mod:`.adversarial`, :mod:`.entropy`).
"""

from .adversarial import CDAN, DANN, DomainDiscriminator, GradientReversal, grad_reverse
from .coral import CORAL
from .entropy import Entropy
from .mmd import MMD
from .registry import REGULARIZERS, build, register, regularizer_names
from .regularizer import Regularizer
from .schedule import SCHEDULES, dann_ramp, schedule_weight
from .scope import SCOPES
from .step import SOURCES, DomainAdaptation, Sources, source_domains
from .terms import Alignment, Term

__all__ = [
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
    "Term",
    "build",
    "dann_ramp",
    "grad_reverse",
    "register",
    "regularizer_names",
    "schedule_weight",
    "source_domains",
]
