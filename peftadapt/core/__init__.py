"""The bottom layer: facts about transformers models, autograd ops, communication, files.

Nothing here imports another peftadapt module, and every other layer may import
it: the task-head name table (:mod:`.hf`), the gradient-scaling autograd op
(:mod:`.autograd`), the process-group primitives (:mod:`.comm`), atomic file
writes (:mod:`.io`) and the help-carrying dataclass field (:mod:`.fields`).
"""
