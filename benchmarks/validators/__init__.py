"""How well each validator of ``peftadapt.validators`` picks the regularizer weight (Amazon reviews)."""
