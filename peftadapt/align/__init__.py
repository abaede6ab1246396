"""Domain-alignment regularizers: MMD, CORAL, DANN, CDAN(+E), target entropy.

``build(name, **options)`` makes one from the registry ("mmd", "coral", "dann",
"cdan", "cdan+e", "entropy", or your own via ``register``); ``Alignment`` holds a
scheduled, weighted sum of several. See docs/regularizers.md.

Modules: :mod:`.regularizer` (the interface), :mod:`.registry`, :mod:`.schedule`,
:mod:`.scope` (several processes), :mod:`.terms` (``Term``, ``Alignment``), one
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
from .terms import Alignment, Term

__all__ = [
    "Regularizer", "register", "build", "regularizer_names", "REGULARIZERS",
    "Term", "Alignment", "schedule_weight", "dann_ramp", "SCHEDULES", "SCOPES",
    "MMD", "CORAL", "DANN", "CDAN", "Entropy",
    "GradientReversal", "grad_reverse", "DomainDiscriminator",
]
