"""``training.procedure: adda``: source training, then ADDA's adversarial phase, in one run.

:class:`ADDATrainer` runs

1. **the source phase**: a plain :class:`~peftadapt.train.Trainer` on the labeled source data
   (task loss only) into ``OUTPUT_DIR/source/`` (its own checkpoints, ``final/``); evaluated on
   ``data.source_validation`` only, so no target label picks its best weights;
2. **the adversarial phase** (:class:`peftadapt.align.ADDA`): the trained adapter is snapshotted
   as the frozen source encoder; the live adapter (the target encoder, starting equal to it) and
   a domain discriminator D take alternating steps each optimizer step:

       D:       0.5 [mean BCE(D(M_s(x_s)), 1) + mean BCE(D(M_t(x_t)), 0)]  at discriminator_learning_rate
       target:  mean BCE(D(M_t(x_t)), 1)   (inverted labels; head frozen)  at adda_learning_rate

   for ``adda_steps`` steps into ``OUTPUT_DIR`` (checkpoints hold the target adapter + head, D and
   the source snapshot, the optimizer, the RNGs: a run killed in either phase resumes).

``OUTPUT_DIR/final/`` holds the target adapter and the source head in the usual format
(``peftadapt eval`` reads it); ``final/source_adapter/`` the source adapter.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file

from ..align.adda import ADDA, head_parameter_names
from ..core import comm
from ..features import FeatureTap
from ..quant.optim import make_optimizer
from ..wrap import after_optimizer_step
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import BatchStream, tokenize, warn_unused_target_labels
from .loop import RunState, StepOutput, Trainer, _lr_lambda
from .nonfinite import describe_step, step_is_finite
from .preflight import batch_sizes

__all__ = ["ADDATrainer", "check_adda_backend", "check_adda_run"]

SOURCE_DIR = "source"  # the source phase's output folder inside output_dir


def check_adda_run(run: Any) -> None:
    """The run-file rules of ``training.procedure: adda``, before anything is loaded (one line each)."""
    if run.training.procedure != "adda":
        return
    if run.model.task != "classification":
        raise ValueError(
            f"training.procedure: adda adapts a classifier (its head classifies the target features); "
            f"model.task is {run.model.task!r}: use procedure: standard with regularizers (mmd, coral, dann)"
        )
    if run.data.target is None:
        raise ValueError("training.procedure: adda needs unlabeled target data: add data.target")
    if run.regularizers:
        raise ValueError(
            "training.procedure: adda is its own alignment (a discriminator against a target adapter); "
            "remove the regularizers, or use procedure: standard"
        )


def check_adda_backend(distributed_type: Any) -> None:
    """``procedure: adda`` runs on one process or under DDP. FSDP shards the parameters the source
    snapshot is swapped into, and DeepSpeed's engine would not hold the discriminator: one line, before
    the source phase spends its time."""
    kind = str(distributed_type or "").split(".")[-1]
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ValueError(
            f"training.procedure: adda runs on one process or under DDP (multi-GPU / multi-CPU), not under "
            f"{kind}; launch it without the {kind.lower()} config (an adapter is small enough to replicate)"
        )


class ADDATrainer(Trainer):
    """:class:`Trainer` for ``training.procedure: adda`` (see the module docstring); same arguments
    (``target`` required, no ``regularizers``; ``procedure`` defaults to ``"adda"``). ``train()`` returns
    the adversarial phase's final metrics; ``self.source_metrics`` holds the source phase's."""

    procedures: ClassVar[tuple[str, ...]] = ("adda",)

    def __init__(self, model: Any, tokenizer: Any, train: Any, *, config: TrainConfig | None = None, **kwargs: Any):
        # the class is the procedure: a config left on the default ("standard") means adda here
        if "procedure" not in kwargs and (config is None or config.procedure == "standard"):
            kwargs["procedure"] = "adda"
        super().__init__(model, tokenizer, train, config=config, **kwargs)

    def _init_alignment(self, regularizers: Any) -> None:
        if regularizers is not None:
            raise ValueError(
                "training.procedure: adda is its own alignment (a discriminator against a target adapter); "
                "pass no regularizers, or use procedure: standard"
            )
        if self.task != "classification":
            raise ValueError(f"training.procedure: adda adapts a classifier; task is {self.task!r}")
        if self.target_data is None:
            raise ValueError("training.procedure: adda needs unlabeled target data: pass target=... (texts)")
        heads = set(head_parameter_names(self.model))
        if not any(p.requires_grad for n, p in self.model.named_parameters() if n not in heads):
            raise ValueError(
                "training.procedure: adda trains a second adapter for the target, but this model trains only "
                f"its head ({sorted(heads)[:2]}); use a method with an adapter (method: lora, houlsby, ...)"
            )
        warn_unused_target_labels(self.target_data)
        self.alignment = None
        self.adda: ADDA | None = None
        self.source_metrics: dict[str, float] = {}

    def _adapts(self) -> bool:
        return True

    def _saved_modules(self) -> Any:
        return self.adda

    # -- the two phases --------------------------------------------------------------------
    def train(self, resume: bool | str = False) -> dict[str, float]:
        try:
            return super().train(resume)
        finally:
            if self.adda is not None:
                self.adda.remove()

    def setup(self, resume: bool | str = False) -> None:
        check_adda_backend(self._make_accelerator().distributed_type)
        self._train_source(resume)
        super().setup(resume)

    def _train_source(self, resume: bool | str) -> None:
        """The source phase into ``output_dir/source``; skipped on a resume when it finished
        (its final weights are loaded instead: the weights it ended with)."""
        cfg = self.config
        out = Path(cfg.output_dir) / SOURCE_DIR
        done = out / "final" / "trainable.safetensors"
        if resume and done.is_file():
            ckpt.load_trainable_state(self.model, load_file(str(done)))
            return
        sv = self.source_validation
        phase = Trainer(
            self.model,
            self.tokenizer,
            self.train_data,
            eval={sv: self.eval_data[sv]} if sv else None,
            config=cfg.replace(
                output_dir=str(out),
                procedure="standard",
                metric_for_best_model=None,
                greater_is_better=None,
                early_stopping_patience=None,
            ),
            task=self.task,
            max_length=self.max_length,
            name=f"{self.name} (source)",
            source_validation=sv,
        )
        self.source_metrics = phase.train(resume=bool(resume))

    def _setup_data(self) -> None:
        super()._setup_data()  # the source stream, preflight, the source phase's total
        cfg, acc = self.config, self.accelerator
        assert self.target_data is not None  # checked in __init__
        _, tbs = batch_sizes(cfg, acc.num_processes)
        self._target = BatchStream(
            tokenize(self.target_data.texts, self.tokenizer, self.max_length),
            None,
            tbs,
            seed=cfg.seed + 1,
            pad_id=self.tokenizer.pad_token_id,
            task="target",
            rank=acc.process_index,
            world=acc.num_processes,
        )
        self.state = RunState(total=cfg.adda_steps or self.state.total)

    def _setup_alignment(self) -> None:
        """ADDA on the source-trained model: the snapshot is taken now."""
        self.adda = ADDA(
            self.model,
            layer=self.feature_layer,
            pooling=self.pooling,
            in_features=None if self.feature_layer is None else self._feature_width(),
            seed=self.config.seed,
        ).to(self.accelerator.device)
        comm.broadcast_parameters(self.adda.discriminator)

    def _feature_width(self) -> int:
        batch = {k: v for k, v in self._batch_to(self._source.batch(0)).items() if k != "labels"}
        was = self.model.training
        self.model.eval()
        with FeatureTap(self.model, layer=self.feature_layer, pooling=self.pooling) as tap, torch.no_grad():
            self.model(**batch)
            width = tap.pooled(batch["attention_mask"]).shape[-1]
        self.model.train(was)
        return int(width)

    def _setup_optimizer(self) -> None:
        """One optimizer, two groups: the target adapter (no head) at ``adda_learning_rate``, D at
        ``discriminator_learning_rate``. Each alternating step leaves the other group's gradients
        None, so an optimizer step moves only its own group."""
        cfg, acc = self.config, self.accelerator
        assert self.adda is not None
        target = self.adda.target_parameters()
        lr = cfg.adda_learning_rate or cfg.learning_rate
        groups = [
            g
            for g in (
                {"params": [p for p in target if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                {"params": [p for p in target if p.ndim < 2], "weight_decay": 0.0},
            )
            if g["params"]
        ]
        optimizer = make_optimizer(groups, cfg.optim, lr=lr, weight_decay=cfg.weight_decay, device=acc.device)
        # The head gets no gradient in this phase: DDP must not wait for one (it tracks the parameters that
        # require grad when it wraps), yet it stays trainable for the checkpoints and final/.
        named = dict(self.model.named_parameters())
        heads = [named[n] for n in self.adda.head_names]
        for p in heads:
            p.requires_grad_(False)
        try:
            self._train_model, self.optimizer = acc.prepare(self.model, optimizer)
        finally:
            for p in heads:
                p.requires_grad_(True)
        self._disc = [p for p in self.adda.discriminator.parameters() if p.requires_grad]
        self.optimizer.add_param_group(
            {"params": self._disc, "weight_decay": cfg.weight_decay, "lr": cfg.discriminator_learning_rate or lr}
        )
        self._target_params = [p for g in self.optimizer.param_groups[:-1] for p in g["params"]]
        self._trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * self.state.total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(cfg.lr_scheduler_type, warmup, self.state.total)
        )

    # -- one step ---------------------------------------------------------------------------
    def train_step(self) -> StepOutput:
        """D's step on every micro-batch's L_D, then the target adapter's on L_M against the
        updated D; each with its own finite check (a non-finite half stops the run or, under
        ``nan_policy: skip``, drops that half's update)."""
        cfg, st, adda = self.config, self.state, self.adda
        assert adda is not None and self._target is not None
        ga = cfg.gradient_accumulation_steps
        micro = range(st.step * ga, (st.step + 1) * ga)
        losses: dict[str, list[torch.Tensor]] = {"d_loss": [], "d_accuracy": [], "t_loss": []}
        adda.train()
        for m in micro:  # 1. the discriminator
            with self.accelerator.autocast():
                fs = adda.source_features(self._batch_to(self._source.batch(m)))
            with torch.no_grad(), self.accelerator.autocast():
                ft = adda.target_features(self._batch_to(self._target.batch(m)), model=self._train_model)
            d_loss = adda.discriminator_loss(fs, ft)
            self.accelerator.backward(d_loss / ga)
            losses["d_loss"].append(d_loss.detach())
            losses["d_accuracy"].append(adda.discriminator_accuracy(fs, ft))
        if self.accelerator.num_processes > 1:
            comm.average_gradients(self._disc)
        if not self._half_step({"d_loss": losses["d_loss"]}, self._disc, clip=False):
            return StepOutput(losses, {}, None, skipped=True)
        for m in micro:  # 2. the target adapter, inverted labels
            with self.accelerator.autocast():
                ft = adda.target_features(self._batch_to(self._target.batch(m)), model=self._train_model)
            t_loss = adda.target_loss(ft)
            self.accelerator.backward(t_loss / ga)
            losses["t_loss"].append(t_loss.detach())
        adda.drop_head_grads()
        grad_norm = self._half_step({"t_loss": losses["t_loss"]}, self._target_params, clip=True)
        if grad_norm is False:
            return StepOutput(losses, {}, None, skipped=True)
        after_optimizer_step(self.model, st.step)
        self.scheduler.step()
        return StepOutput(losses, {}, None if grad_norm is True else grad_norm)

    def _half_step(self, losses: dict[str, list[torch.Tensor]], params: list, clip: bool) -> Any:
        """Clip (``clip``), check finite, step the optimizer over whatever has gradients, zero them.
        False: not finite, skipped (``nan_policy: skip``; ``stop`` raises); else the gradient norm
        (True when not clipped)."""
        cfg, acc = self.config, self.accelerator
        grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm) if clip and cfg.max_grad_norm else None
        grads = None if grad_norm is not None else [p.grad for p in params if p.grad is not None]
        ok = step_is_finite(losses, grad_norm, grads)
        if acc.num_processes > 1:
            ok = acc.reduce(ok.float(), reduction="sum") == acc.num_processes
        if not bool(ok):
            self._skip_step(describe_step(losses, grad_norm))
            return False
        self.state.skipped_in_a_row = 0
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True if grad_norm is None else grad_norm

    def _train_record(self, out: StepOutput) -> dict[str, Any]:
        ga = self.config.gradient_accumulation_steps
        keys = [k for k, vs in out.losses.items() if vs]
        flat = torch.stack([torch.stack([v.float() for v in out.losses[k]]).sum() / ga for k in keys])
        if self.accelerator.num_processes > 1:
            flat = self.accelerator.reduce(flat.to(torch.float64), reduction="mean")
        means = dict(zip(keys, flat.tolist(), strict=True))
        record: dict[str, Any] = {"step": self.state.step, "split": "train", **means}
        record["loss"] = means.get("t_loss", float("nan"))  # the target adapter's objective
        record["lr"] = self.scheduler.get_last_lr()[0]
        record["discriminator_lr"] = self.scheduler.get_last_lr()[-1]
        if out.grad_norm is not None:
            record["grad_norm"] = float(out.grad_norm)
        if out.skipped:
            record["skipped"] = True
        return record

    # -- the end ----------------------------------------------------------------------------
    def _write_final(self, summary: dict[str, Any]) -> None:
        """``final/`` (the target adapter + head) as usual, plus ``final/source_adapter`` (the source
        phase's adapter) and the source phase's metrics in the summary."""
        super()._write_final({**summary, "procedure": "adda", "source_metrics": self.source_metrics})
        if self.accelerator.is_main_process:
            src = Path(self.config.output_dir) / SOURCE_DIR / "final" / "adapter"
            shutil.copytree(src, self.output_dir / "final" / "source_adapter")
