"""peftadapt: parameter-efficient domain adaptation for Hugging Face transformers.

The public API, re-exported; nothing else lives here.
"""

__version__ = "0.1.0"

from .methods.base import MethodConfig, METHODS, register_method  # noqa: F401
