"""Domain-alignment regularizers: MMD, CORAL, DANN, CDAN(+E), target entropy.

``build(name, **options)`` makes one from the registry ("mmd", "coral", "dann",
"cdan", "cdan+e", "entropy", or your own via ``register``); ``Alignment`` holds a
scheduled, weighted sum of several; ``DomainAdaptation`` is the whole DA step (feature
tap + terms + schedule) that every training loop calls. See docs/regularizers.md.
"""

from .base import (  # noqa: F401
    REGULARIZERS,
    SCHEDULES,
    Alignment,
    Regularizer,
    Term,
    build,
    dann_ramp,
    register,
    regularizer_names,
    schedule_weight,
)
from .mmd import MMD  # noqa: F401
from .coral import CORAL  # noqa: F401
from .adversarial import CDAN, DANN, DomainDiscriminator, GradientReversal, grad_reverse  # noqa: F401
from .entropy import Entropy  # noqa: F401
from .step import DomainAdaptation  # noqa: F401

__all__ = [
    "Regularizer", "register", "build", "regularizer_names", "REGULARIZERS",
    "Term", "Alignment", "schedule_weight", "dann_ramp", "SCHEDULES",
    "MMD", "CORAL", "DANN", "CDAN", "Entropy",
    "GradientReversal", "grad_reverse", "DomainDiscriminator", "DomainAdaptation",
]
