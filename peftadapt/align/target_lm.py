"""The target language-modeling term (UDALM, Karouzos et al., NAACL 2021): a causal LM's own
next-token loss on the unlabeled target batch."""

from __future__ import annotations

import torch

from .registry import register
from .regularizer import Regularizer


@register("target_lm")
class TargetLM(Regularizer):
    r"""The model's own language-modeling loss on the target batch (UDALM-style mixed objective):

        L = L_task(source) + lambda * CE_next-token(target)

    Keeping the model a good language model of the target domain while it learns the task
    on the source is the strongest published result on the Amazon review domains (UDALM,
    Karouzos et al., NAACL 2021, +3.49 over source-only with BERT's masked-LM loss; this is the
    causal-LM form). Causal LMs only.

    :class:`~peftadapt.align.DomainAdaptation` computes it: while the term is on, the target
    forward gets ``labels = input_ids`` with the padding (``attention_mask == 0``) and each row's
    first token (nothing precedes it) set to -100; the target batch's own labels are dropped
    (target data is unlabeled). The term's value is that forward's ``outputs.loss``: the mean
    next-token cross-entropy over the target's tokens, the same left or right padded. Features
    and logits are not read. Logged as ``reg/target_lm``.

    It is a mean of per-token losses, not a batch statistic: with several processes each
    computes it on its own shard (``scope="auto"`` is local).
    """

    needs_lm_loss = True
    batch_statistic = False

    def forward(
        self,
        source_features: torch.Tensor | None = None,
        target_features: torch.Tensor | None = None,
        source_logits: torch.Tensor | None = None,
        target_logits: torch.Tensor | None = None,
        target_lm_loss: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if target_lm_loss is None:
            raise ValueError(
                "target_lm needs the target batch's language-modeling loss (a causal LM's outputs.loss with "
                "labels = input_ids), which DomainAdaptation computes: use the term through DomainAdaptation "
                "(or peftadapt's Trainer / add_alignment), not Alignment alone"
            )
        if not isinstance(target_lm_loss, torch.Tensor) or target_lm_loss.dim() != 0:
            raise ValueError(f"target_lm: target_lm_loss must be a 0-dim tensor, got {target_lm_loss!r:.80}")
        return target_lm_loss
