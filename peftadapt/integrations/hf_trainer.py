"""``add_alignment``: peftadapt's domain-alignment step inside transformers' ``Trainer`` and TRL's ``SFTTrainer``.

::

    trainer = SFTTrainer(model=model, args=args, train_dataset=source, ...)   # or transformers.Trainer
    add_alignment(trainer, target=target_texts, regularizers=[Term("mmd", weight=0.3, start=0.5)])
    trainer.train()

The trainer keeps computing its own loss (label smoothing, ``compute_loss_func``, TRL's
fused LM head, ``num_items_in_batch`` normalisation); :func:`add_alignment` adds

    sum_k lambda_k(p) * D_k(f_s, f_t),   p = global_step / max_steps

through :meth:`peftadapt.align.DomainAdaptation.alignment_loss`, the one DA step every
peftadapt loop calls. It patches these methods of the *instance* (not the class):

- ``compute_loss``: after the trainer's own loss, draw the target batch of this micro-step
  (:class:`~peftadapt.integrations.target.TargetBatches`) and add the alignment loss, scaled
  like the trainer scales its loss for gradient accumulation. While every term is off the
  target forward is skipped;
- ``create_optimizer``: the terms' parameters (DANN / CDAN discriminators) join the optimizer
  as their own group (``discriminator_learning_rate``);
- ``training_step``: under several processes the discriminators' gradients are averaged
  (``core.comm.average_gradients``) on the step that syncs gradients, before clipping;
- ``log``: ``task_loss``, ``reg_loss``, ``reg/<term>`` and ``weight/<term>``, averaged over the
  logging interval and the processes like the trainer's own ``loss``;
- ``train``: every process starts from rank 0's discriminators; ``resume_from_checkpoint``
  restores the terms' state from ``checkpoint-N/alignment.safetensors``, which a callback
  writes next to the trainer's files on every save. The same callback runs the wrapped method's
  step hook (:func:`peftadapt.wrap.after_optimizer_step`: AdaLoRA's rank allocation, which
  transformers' ``Trainer`` never calls) after each optimizer step.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..align.step import DomainAdaptation, as_alignment
from ..align.verbalizer import class_token_ids
from ..core import comm
from ..core.hf import is_causal_lm, unwrap
from ..core.io import write_atomic
from ..features import Pooling, last_hidden_layer
from ..wrap import after_optimizer_step
from .target import TargetBatches, prepare_for_trainer

__all__ = ["STATE_FILE", "AlignmentPlugin", "add_alignment"]

STATE_FILE = "alignment.safetensors"  # in checkpoint-N/, next to the trainer's own files
_ATTR = "peftadapt_alignment"


def _is_sft(trainer: Any) -> bool:
    """Whether ``trainer`` is (a subclass of) TRL's SFTTrainer, without importing trl."""
    return any(c.__name__ == "SFTTrainer" and c.__module__.startswith("trl") for c in type(trainer).__mro__)


def _max_steps(trainer: Any) -> None:
    args, data = trainer.args, getattr(trainer, "train_dataset", None)
    if args.max_steps is not None and args.max_steps > 0:
        return
    has_len = data is not None and hasattr(data, "__len__")
    if not has_len or not args.num_train_epochs or args.num_train_epochs <= 0:
        raise ValueError(
            f"add_alignment needs the run's length to schedule the terms (p = global_step / max_steps), but "
            f"max_steps={args.max_steps} and the train dataset ({type(data).__name__}) has no length; "
            "set TrainingArguments(max_steps=...)"
        )


def _check_compatible(trainer: Any, da: DomainAdaptation, sft: bool, has_disc: bool) -> None:
    args = trainer.args
    if getattr(args, "n_gpu", 1) > 1:
        raise ValueError(
            f"add_alignment does not support torch.nn.DataParallel (n_gpu={args.n_gpu}): the feature "
            "tap lives on one replica. Launch one process per GPU (torchrun / accelerate launch: DDP) "
            "or set CUDA_VISIBLE_DEVICES to one GPU"
        )
    if sft and (getattr(args, "packing", False) or getattr(args, "padding_free", False)):
        raise ValueError(
            f"add_alignment cannot pool features per example with packing={args.packing}, "
            f"padding_free={args.padding_free}: several examples share one row and there is no "
            "per-example attention_mask. Set SFTConfig(packing=False, padding_free=False)"
        )
    if has_disc and (getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False)):
        raise ValueError(
            "regularizers with parameters (DANN / CDAN discriminators) join the trainer's optimizer "
            "as a plain replicated group, which DeepSpeed and FSDP do not accept; use DDP, or a "
            "regularizer without parameters (mmd, coral, entropy)"
        )
    if has_disc and trainer.optimizer is not None and trainer.lr_scheduler is not None:
        raise ValueError(
            "the trainer was given its own optimizer and lr_scheduler (optimizers=(...)): the "
            "discriminators cannot join that schedule. Pass optimizers=(None, None), or build the "
            "optimizer with their parameters (DomainAdaptation(...).parameters())"
        )
    gc_kwargs = getattr(args, "gradient_checkpointing_kwargs", None) or {}
    if getattr(args, "gradient_checkpointing", False) and gc_kwargs.get("use_reentrant") is True:
        # lazy: transformers.modeling_layers is only needed for this check
        from transformers.modeling_layers import GradientCheckpointingLayer

        name = da.tap.layer_name
        parts = name.split(".")
        mods = dict(trainer.model.named_modules())
        inside = [
            ".".join(parts[:i])
            for i in range(1, len(parts) + 1)
            if isinstance(mods.get(".".join(parts[:i])), GradientCheckpointingLayer)
        ]
        if inside:
            raise ValueError(
                f"the feature tap on {name!r} sits inside the checkpointed layer {inside[-1]!r}, "
                "and reentrant gradient checkpointing (use_reentrant=True) runs it without autograd: "
                "the alignment loss would not reach the adapter. Set gradient_checkpointing_kwargs="
                "{'use_reentrant': False}, or tap a layer outside the stack (layer=None)"
            )


class AlignmentPlugin:
    """What :func:`add_alignment` attaches to a trainer (``trainer.peftadapt_alignment``).

    ``da`` is the :class:`DomainAdaptation` (tap + terms), ``target`` the
    :class:`TargetBatches`; ``remove()`` takes the tap's hooks off the model.
    """

    def __init__(
        self,
        trainer: Any,
        da: DomainAdaptation,
        target: TargetBatches,
        *,
        discriminator_learning_rate: float | None,
        target_extra: dict[str, Any],
    ) -> None:
        self.trainer = trainer
        self.da = da
        self.target = target
        self.discriminators: list[nn.Parameter] = da.parameters()
        self.discriminator_learning_rate = discriminator_learning_rate
        self.target_extra = target_extra  # e.g. logits_to_keep=1, use_cache=False for a causal LM
        self._orig: dict[str, Callable[..., Any]] = {}
        self._step, self._micro = -1, 0
        self._reset_log(0)

    # -- progress and the micro-step -------------------------------------------------------
    def progress(self) -> float:
        st, args = self.trainer.state, self.trainer.args
        total = st.max_steps if st.max_steps and st.max_steps > 0 else args.max_steps
        if not total or total <= 0:
            raise RuntimeError("add_alignment: the trainer's state has no max_steps yet; call trainer.train()")
        return min(1.0, st.global_step / total)

    def micro_step(self) -> int:
        """Index of this micro-batch over the whole run: global_step * GA + its place in the step."""
        step = int(self.trainer.state.global_step)
        if step != self._step:
            self._step, self._micro = step, 0
        k = step * int(self.trainer.args.gradient_accumulation_steps) + self._micro
        self._micro += 1
        return k

    def _scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Whether the trainer treats its loss as already normalised over the accumulated batch
        (then ``training_step`` does not divide it by the accumulation steps): its own rule."""
        tr = self.trainer
        flag = getattr(tr, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool(
            (getattr(tr, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(tr, "compute_loss_func", None) is not None
        )

    # -- the patched methods ---------------------------------------------------------------
    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        orig = self._orig["compute_loss"]
        if not model.training:  # evaluation: the trainer's own loss, nothing else
            out = orig(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            self.da.tap.clear()
            return out
        p = self.progress()
        k = self.micro_step()
        ga = int(
            getattr(self.trainer, "current_gradient_accumulation_steps", 0)
            or self.trainer.args.gradient_accumulation_steps
        )
        scaled = self._scaled_for_ga(num_items_in_batch)
        weights = self.da.weights(p)
        if not any(w > 0 for w in weights.values()):  # every term off: no target forward
            out = orig(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            self.da.tap.clear()
            loss = out[0] if return_outputs else out
            self._record(loss.detach() * (1.0 if scaled else 1.0 / ga), None, {}, weights)
            return out
        mask = inputs.get("attention_mask")
        if not isinstance(mask, torch.Tensor):  # a missing key, not a wrong type: ValueError
            raise ValueError(
                f"the training batch has no attention_mask (keys {sorted(inputs)}): the alignment "
                "features are pooled over each example's tokens. Use a data collator that returns "
                "one (e.g. DataCollatorWithPadding; TRL: padding_free=False)"
            )
        need_outputs = return_outputs or self.da.alignment.needs_logits
        out = orig(model, inputs, return_outputs=need_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = (out[0], out[1]) if need_outputs else (out, None)
        tr = self.trainer
        target = self.target.batch(k, tr.args.device, rank=comm.rank(), world=comm.world_size())
        target.update(self.target_extra)
        labels = inputs.get("labels")  # the answer-only labels locate a causal LM's class logits (class_tokens)
        reg, logs = self.da.alignment_loss(outputs, mask, target, p, model=model, source_labels=labels)
        # the trainer divides an unscaled loss by the accumulation steps itself; a scaled one it leaves as is
        total = loss + (reg / ga if scaled else reg)
        self._record(loss.detach() * (1.0 if scaled else 1.0 / ga), reg.detach() / ga, logs, weights)
        return (total, outputs) if return_outputs else total

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        out = self._orig["training_step"](*args, **kwargs)
        # the step that syncs gradients (the last micro-batch): average the discriminators' before clipping
        if self.discriminators and comm.is_distributed() and self.trainer.accelerator.sync_gradients:
            comm.average_gradients(self.discriminators)
        return out

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        out = self._orig["create_optimizer"](*args, **kwargs)
        self.add_to_optimizer(self.trainer.optimizer)
        return out

    def add_to_optimizer(self, optimizer: Any) -> None:
        """The discriminators as their own parameter group (once)."""
        if optimizer is None or not self.discriminators:
            return
        have = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if all(id(p) in have for p in self.discriminators):
            return
        args = self.trainer.args
        optimizer.add_param_group(
            {
                "params": self.discriminators,
                "weight_decay": args.weight_decay,
                "lr": self.discriminator_learning_rate or args.learning_rate,
            }
        )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> Any:
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            logs.update(self._interval_logs())
        return self._orig["log"](logs, *args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        comm.broadcast_parameters(self.da.alignment)  # every process starts from rank 0's discriminators
        path: str | None = None
        if isinstance(resume_from_checkpoint, bool):
            if resume_from_checkpoint:
                # lazy: transformers.trainer_utils is needed only to find the newest checkpoint
                from transformers.trainer_utils import get_last_checkpoint

                path = get_last_checkpoint(self.trainer.args.output_dir)
        elif resume_from_checkpoint is not None:
            path = str(resume_from_checkpoint)
        if path is not None:
            self.load(path)
        return self._orig["train"](resume_from_checkpoint, *args, **kwargs)

    # -- logging ---------------------------------------------------------------------------
    def _reset_log(self, step: int) -> None:
        self._last_logged = step
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, float] = {}
        self._weights: dict[str, float] = {}
        self._weight_counts = 0

    def _add(self, key: str, value: torch.Tensor, count: float) -> None:
        v = value.float()
        self._sums[key] = self._sums[key] + v if key in self._sums else v
        self._counts[key] = self._counts.get(key, 0.0) + count

    def _record(
        self, task: torch.Tensor, reg: torch.Tensor | None, logs: dict[str, Any], weights: dict[str, float]
    ) -> None:
        """Accumulate on the device; nothing syncs with the host until a logging step."""
        self._add("task_loss", task, 0.0)
        self._add("reg_loss", reg if reg is not None else torch.zeros_like(task), 0.0)
        for key, v in logs.items():
            if key.startswith("reg/"):
                self._add(key, v, 1.0)
        for name, w in weights.items():
            self._weights[name] = self._weights.get(name, 0.0) + w
        self._weight_counts += 1

    def _interval_logs(self) -> dict[str, float]:
        """Means over the logging interval (``task_loss`` / ``reg_loss`` per optimizer step, like the
        trainer's ``loss``; raw term values per micro-batch where the term was on), then over processes."""
        step = int(self.trainer.state.global_step)
        steps = max(1, step - self._last_logged)
        names = ["task_loss", "reg_loss"] + [f"reg/{t.name}" for t in self.da.terms]
        ref = self._sums.get("task_loss")
        device = ref.device if ref is not None else self.trainer.args.device
        vals = torch.stack(
            [
                (self._sums[n] / (steps if n in ("task_loss", "reg_loss") else max(self._counts[n], 1.0)))
                if n in self._sums
                else torch.zeros((), device=device)
                for n in names
            ]
        )
        have = torch.tensor([float(n in self._sums) for n in names], device=vals.device)
        if comm.is_distributed():
            vals = torch.stack(comm.all_gather_fixed(vals)).mean(0)
        out = {n: float(v) for n, v, h in zip(names, vals.tolist(), have.tolist(), strict=True) if h}
        if self._weight_counts:
            out.update({f"weight/{k}": w / self._weight_counts for k, w in self._weights.items()})
        self._reset_log(step)
        return out

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the terms' state to ``folder/alignment.safetensors`` (atomically)."""
        path = Path(folder) / STATE_FILE
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.da.state_dict().items()}
        meta = {"format": "peftadapt-alignment", "terms": json.dumps([t.name for t in self.da.terms])}
        write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        return path

    def load(self, folder: str | os.PathLike[str]) -> None:
        path = Path(folder) / STATE_FILE
        if not path.exists():
            if self.da.state_dict():
                raise ValueError(
                    f"{str(path)!r} does not exist: the checkpoint {str(folder)!r} holds no alignment "
                    "state (written without add_alignment?); resume from a checkpoint of this run or "
                    "train without resume_from_checkpoint"
                )
            return
        state = load_file(str(path))
        self.da.load_state_dict({k: v.to(self.trainer.args.device) for k, v in state.items()})

    def zero_grad(self) -> None:
        """The trainer zeroes only its model's gradients (``model.zero_grad()``) after a step; the
        discriminators are not in the model, so theirs are dropped here (else they would accumulate)."""
        for p in self.discriminators:
            p.grad = None

    def remove(self) -> None:
        """Take the feature tap's hooks off the model (the patched methods stay; do not train on)."""
        self.da.remove()


def _callback(plugin: AlignmentPlugin) -> Any:
    # lazy: transformers.trainer_callback is only needed once a trainer exists
    from transformers.trainer_callback import TrainerCallback

    class _AlignmentCallback(TrainerCallback):
        """Reset the logging interval at train start; run the method's step hook (AdaLoRA); write the
        terms' state with each checkpoint."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            plugin._reset_log(int(state.global_step))
            plugin.da.train()
            plugin.zero_grad()

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # after optimizer.step(), before zero_grad(): AdaLoRA's rank allocation (the trainer does not call it)
            after_optimizer_step(plugin.trainer.model, int(state.global_step))

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            plugin.zero_grad()

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not args.should_save:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not folder.is_dir():
                raise RuntimeError(
                    f"add_alignment: the trainer's checkpoint folder {str(folder)!r} was not found "
                    "(hyperparameter search runs are not supported)"
                )
            plugin.save(folder)

    return _AlignmentCallback()


def add_alignment(
    trainer: Any,
    *,
    target: Any,
    regularizers: Any,
    layer: str | int | nn.Module | None = None,
    pooling: Pooling = "mean",
    class_tokens: Sequence[str | int] | None = None,
    discriminator_learning_rate: float | None = None,
    target_batch_size: int | None = None,
    max_length: int | None = None,
) -> Any:
    """Add peftadapt's domain alignment to a transformers ``Trainer`` or TRL ``SFTTrainer``; return it.

    Args:
        trainer: a built ``transformers.Trainer`` / ``trl.SFTTrainer`` (or a subclass) whose
            model has trainable parameters (e.g. LoRA).
        target: unlabeled target data: a list of strings, or a ``datasets.Dataset`` with a
            ``text`` column (an SFTTrainer also reads ``messages``), or an ``input_ids`` column.
            Tokenized like the trainer's own data and batched by its ``data_collator``.
        regularizers: a :class:`~peftadapt.Term`, regularizer or name, or a list of them,
            e.g. ``[Term("mmd", weight=0.3, start=0.5)]``.
        layer, pooling: where the feature tap reads (default: the task head's input of a
            classifier, the final norm of a causal LM; a module name, or a block index of the
            layer stack, ``-1`` the last block) and how it pools (``"mean"``, ``"cls"``,
            ``"last"``; ``"last"`` for decoders).
        class_tokens: a causal LM's answers (strings, tokenized with the trainer's
            ``processing_class``, or token ids), one per class in class order: entropy / CDAN /
            CDAN+E then read the LM logits at the last prompt position at these tokens
            (``DomainAdaptation(class_tokens=...)``; the training batches need answer-only labels).
        discriminator_learning_rate: learning rate of the DANN / CDAN discriminators
            (default: ``args.learning_rate``).
        target_batch_size: target examples per process and micro-batch (default:
            ``args.per_device_train_batch_size``).
        max_length: truncation of target texts for a plain ``Trainer`` (default: the
            tokenizer's ``model_max_length``); an SFTTrainer uses ``args.max_length``.

    Raises ``ValueError`` for what cannot work: no or empty target, a second call, a run
    without a known length, logits terms on a causal LM, packing / padding-free batches,
    DataParallel, discriminators under DeepSpeed / FSDP.
    """
    # lazy: transformers.trainer imports datasets (~1 s); peftadapt's import must not
    from transformers import Trainer

    if not isinstance(trainer, Trainer):
        raise TypeError(
            f"add_alignment needs a transformers.Trainer (or trl.SFTTrainer, or a subclass), got "
            f"{type(trainer).__name__}; in a plain PyTorch loop use DomainAdaptation.loss"
        )
    if getattr(trainer, _ATTR, None) is not None:
        raise ValueError(
            "add_alignment was already called on this trainer; call it once with every term in regularizers=[...]"
        )
    alignment = as_alignment(regularizers)
    if alignment is None:
        raise ValueError(
            f"add_alignment needs at least one term, got regularizers={regularizers!r}; e.g. "
            "regularizers=[Term('mmd', weight=0.3)]"
        )
    _max_steps(trainer)
    sft = _is_sft(trainer)
    model = trainer.model
    if model is None:
        raise ValueError("the trainer has no model (model_init without a model is not supported); pass model=...")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "the trainer's model has no trainable parameters; wrap it first (peftadapt.wrap(model, "
            "'lora') or peft.get_peft_model)"
        )
    causal = is_causal_lm(model)
    if layer is None and causal:
        # TRL's fused LM head never calls lm_head, so a tap on its input would see nothing
        layer = last_hidden_layer(model)
    ids = None if class_tokens is None else class_token_ids(getattr(trainer, "processing_class", None), class_tokens)
    da = DomainAdaptation(model, alignment, layer=layer, pooling=pooling, causal_lm=causal, class_tokens=ids)
    try:
        da.to(trainer.args.device)
        has_disc = bool(da.parameters())
        _check_compatible(trainer, da, sft, has_disc)
        if target_batch_size is not None and (
            isinstance(target_batch_size, bool) or not isinstance(target_batch_size, int) or target_batch_size < 1
        ):
            raise ValueError(f"target_batch_size must be a positive int, got {target_batch_size!r}")
        if discriminator_learning_rate is not None and not discriminator_learning_rate > 0:
            raise ValueError(f"discriminator_learning_rate must be > 0, got {discriminator_learning_rate!r}")
        examples = prepare_for_trainer(target, trainer, sft=sft, max_length=max_length)
        batches = TargetBatches(
            examples,
            trainer.data_collator,
            target_batch_size or trainer.args.per_device_train_batch_size,
            trainer.args.seed,
        )
        extra: dict[str, Any] = {}
        if causal:
            params = inspect.signature(unwrap(model).forward).parameters
            if "logits_to_keep" in params and not da.needs_target_logits:
                extra["logits_to_keep"] = 1  # the target forward needs features, not (B, T, vocab) logits
            extra["use_cache"] = False
    except BaseException:
        da.remove()
        raise
    plugin = AlignmentPlugin(
        trainer, da, batches, discriminator_learning_rate=discriminator_learning_rate, target_extra=extra
    )
    for name in ("compute_loss", "training_step", "create_optimizer", "log", "train"):
        plugin._orig[name] = getattr(trainer, name)
        setattr(trainer, name, getattr(plugin, name))  # on the instance: the class stays untouched
    plugin.add_to_optimizer(trainer.optimizer)  # an optimizer the user built already
    trainer.add_callback(_callback(plugin))
    setattr(trainer, _ATTR, plugin)
    return trainer
