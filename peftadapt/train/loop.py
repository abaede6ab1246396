"""The training recipe: PEFT fine-tuning with optional domain alignment, on Accelerate.

:meth:`Trainer.train` reads top to bottom (the shape of torchtune's recipes and
nanoGPT's ``train.py``)::

    setup()                     accelerator, data, DomainAdaptation, optimizer, scheduler, resume
    while step < total:
        train_step()            gradient_accumulation_steps micro-batches through DomainAdaptation.loss, backward;
                                discriminator gradients averaged; clip; a NaN / inf loss or gradient stops
                                the run (or skips the update: nan_policy); optimizer + scheduler step
        log                     on log steps only: the one host sync of the step
        evaluate()              on eval steps: track the best metric, maybe stop early
        save_checkpoint()       when due
    finalize()                  restore the best weights, final adapter, summary, plot

The DA step itself (source forward, target forward while a term is on,
``loss = task loss + sum_k lambda_k(p) * D_k(f_s, f_t)``) is
:class:`peftadapt.align.DomainAdaptation`, the same object a plain PyTorch
loop or a transformers ``Trainer`` plugin calls. ``p`` = step / total steps
is the training progress the term weights and the DANN gradient-reversal
coefficient follow.

Reproducibility: the seed fixes the batch order (a function of seed and
epoch, see :mod:`peftadapt.train.data`), dropout and the regularizers' own
init; a checkpoint stores the step and the RNG states, so a run killed at
any point and resumed ends with the same weights and metrics as one that
was never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..align.step import DomainAdaptation, as_alignment, check_alignment
from ..align.verbalizer import check_answers, class_token_ids
from ..core import comm
from ..core.hf import hf_config, unwrap, wrapped_reason
from ..core.io import check_writable_dir, json_text, write_json
from ..features import Pooling
from ..quant.optim import make_optimizer
from ..quant.prepare import checkpoint_kwargs, enable_checkpointing
from ..wrap import after_optimizer_step
from . import checkpoint as ckpt
from . import preflight
from .config import PROCEDURES, TASKS, Task, TrainConfig
from .data import (
    BatchStream,
    Encoded,
    as_text_data,
    check_domain_labels,
    check_labels,
    check_tokenizer,
    token_rows,
    warn_unused_target_labels,
)
from .evaluate import LOWER_IS_BETTER, evaluate_model, macro_f1, metric_names  # noqa: F401  (public here too)
from .meta import MLDG
from .nonfinite import NonFiniteError, count_nonfinite, describe_step, nonfinite_names, step_is_finite, way_out
from .plots import plot_history
from .progress import PlainProgress, on_terminal
from .validation import (
    check_validators,
    default_metric_for_best,
    validator_metric_names,
    validator_metrics,
    warn_if_target_labels,
)


def _as_data(obj: Any, name: str, task: Task) -> Any:
    """Training / eval data as the Trainer keeps it: a causal LM's :class:`Encoded` as is, else TextData."""
    if isinstance(obj, Encoded):
        if task != "causal_lm":
            raise ValueError(f"{name}: tokenized (Encoded) data is for task causal_lm; a classifier takes TextData")
        return obj
    return as_text_data(obj, name)


def _lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the base learning rate at a step: linear warm-up, then
    linear decay to 0, half-cosine decay to 0, or constant."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        rest = max(1, total - warmup)
        q = min(1.0, (step - warmup) / rest)
        return 1.0 - q if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * q))

    return f


@dataclasses.dataclass
class RunState:
    """Where the run is: what a checkpoint's ``trainer_state.json`` restores besides the tensors."""

    total: int  # optimizer steps of the whole run
    step: int = 0  # optimizer steps done
    best: float | None = None  # best value of the metric_for_best so far
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the best (early stopping)
    last_eval: dict[str, float] = dataclasses.field(default_factory=dict)
    stopped_early: bool = False
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite value (nan_policy: skip)
    skipped_in_a_row: int = 0


@dataclasses.dataclass
class StepOutput:
    """What :meth:`Trainer.train_step` leaves for the log: device tensors, not yet synced."""

    losses: dict[str, list[torch.Tensor]]  # "task_loss", "reg_loss", "reg/<term>": one per micro-batch
    weights: dict[str, float]  # "<term>": lambda_k(p) at this step
    grad_norm: torch.Tensor | None
    skipped: bool = False  # the update was skipped: a loss or the gradient was not finite (nan_policy: skip)


class Trainer:
    """Fine-tune a wrapped model on labeled source data, optionally aligning it to unlabeled target data.

    Args:
        model: a model returned by ``peftadapt.wrap`` (its trainable parameters
            are what gets trained; ``wrap(model, "full")`` for full fine-tuning). An
            unwrapped model is refused.
        tokenizer: the model's tokenizer (must have a pad token).
        train: labeled source data: a :class:`TextData`, ``(texts, labels)``,
            or (causal LM) a list of texts; several source domains: ``{domain name: data}``
            (each step draws ``per_device_train_batch_size`` examples from every domain; an
            epoch is a pass over the largest domain; the config's ``align_sources`` says how
            the terms see them, ``procedure: "mldg"`` meta-learns across them).
        target: unlabeled target data for alignment (texts); None: plain fine-tuning.
        eval: evaluation sets, ``{name: TextData}`` (or one TextData, named "eval"); a set
            with validators may be unlabeled.
        validators: ``{eval set name: [validator names]}`` (``peftadapt.validators``), logged as
            ``<set>/<validator>`` at each evaluation; ``metric_for_best_model`` may name them.
        source_validation: the eval set holding labeled source validation data (read by
            ``dev``, ``reverse_validation``, ``source_accuracy`` and a DA run's default selection).
        regularizers: ``peftadapt.align.Alignment``, a list of ``Term`` /
            regularizers / names, or None.
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields.
        task: "classification" or "causal_lm".
        max_length: tokens per example (longer texts are truncated).
        feature_layer, pooling: where ``peftadapt.FeatureTap`` reads the alignment
            features (default: the task head's input, mean pooling); ``feature_layer`` is a
            module name or a block index of the layer stack (``-1``: the last block).
        class_tokens: causal LM: the answers (strings, tokenized with ``tokenizer``, or token
            ids), one per class in class order, whose LM logits at the last prompt position are
            the class logits entropy / CDAN / CDAN+E read (``DomainAdaptation(class_tokens=...)``).
        name: the label of the progress bar.

    ``train(resume=False)`` runs and returns the final evaluation metrics;
    ``evaluate()`` evaluates the current model on the eval sets. The recipe's
    parts (``setup``, ``train_step``, ``save_checkpoint``, ``finalize``) are
    methods, so a subclass can replace one and keep the rest.
    """

    # the training.procedure values this class runs (ADDATrainer: "adda" only)
    procedures: ClassVar[tuple[str, ...]] = tuple(p for p in PROCEDURES if p != "adda")

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        train: Any,
        *,
        target: Any = None,
        eval: Mapping[str, Any] | Any = None,
        regularizers: Any = None,
        config: TrainConfig | None = None,
        task: Task = "classification",
        max_length: int = 128,
        feature_layer: str | int | None = None,
        pooling: Pooling = "mean",
        name: str = "train",
        validators: Mapping[str, Sequence[str]] | None = None,
        source_validation: str | None = None,
        class_tokens: Sequence[str | int] | None = None,
        **overrides: Any,
    ):
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not supported; valid tasks: {list(TASKS)}")
        self.config = _make_config(config, overrides)
        if self.config.procedure not in self.procedures:
            raise ValueError(
                f"training.procedure: {self.config.procedure!r} is not run by {type(self).__name__} (it runs "
                f"{list(self.procedures)}); procedure 'adda' runs through peftadapt.train.ADDATrainer "
                "(peftadapt train picks it)"
            )
        check_writable_dir(self.config.output_dir, "output_dir")  # before any work, not at the first save
        self.task, self.max_length = task, int(max_length)
        self.model, self.tokenizer = model, tokenizer
        self.feature_layer, self.pooling, self.name = feature_layer, pooling, name
        check_tokenizer(tokenizer)
        self.base = unwrap(model)
        if task == "classification":
            hf_cfg = hf_config(self.base)
            self.num_labels = int(getattr(hf_cfg, "num_labels", 2))
            if getattr(hf_cfg, "pad_token_id", None) is None:
                # decoder classifiers find each row's last token through the pad id
                hf_cfg.pad_token_id = tokenizer.pad_token_id

        self.class_tokens = None if class_tokens is None else class_token_ids(tokenizer, class_tokens)
        self._init_data(train, target, eval, validators, source_validation)
        self._init_alignment(regularizers)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trainable parameters; wrap it first: peftadapt.wrap(model, 'lora')")
        if wrapped_reason(model) is None:  # it would train every weight and save them as an "adapter"
            raise ValueError(
                f"this {type(model).__name__} is not wrapped; wrap it with a method (peftadapt.wrap(model, 'lora')), "
                "or to train every weight say so: peftadapt.wrap(model, 'full') (run file: method: full)"
            )
        self._pick_best_metric()
        self.history: list[dict[str, Any]] = []
        # an accelerate.Accelerator from setup() on (accelerate ships no types, so Any loses nothing)
        self.accelerator: Any = None
        self.da: DomainAdaptation | None = None
        self.meta: MLDG | None = None  # procedure mldg, from setup() on
        self._term_checks: dict[Any, bool] = {}  # each term's own check_finite, while train() turns it off

    def _init_data(self, train: Any, target: Any, eval: Any, validators: Any, source_validation: str | None) -> None:
        """The training, target and eval data as the Trainer keeps them, and the validators named per eval set."""
        task = self.task
        if isinstance(train, Mapping):  # several source domains
            if not train:
                raise ValueError("train: an empty mapping of source domains; give {domain name: data}, one or more")
            self.train_data: Any = {str(n): _as_data(d, f"train[{n!r}]", task) for n, d in train.items()}
        else:
            self.train_data = _as_data(train, "train", task)
        # a causal LM's target may come tokenized (chat prompts rendered with the generation prompt)
        self.target_data = None if target is None else _as_data(target, "target", task)
        if eval is None:
            eval = {}
        elif not isinstance(eval, Mapping):
            eval = {"eval": eval}
        self.eval_data = {n: _as_data(d, n, task) for n, d in eval.items()}
        self.source_validation = source_validation
        self.validators = check_validators(
            validators or {},
            list(self.eval_data),
            source_validation,
            {n: d.labels is not None for n, d in self.eval_data.items()},
            task,
        )
        if task == "classification":
            sources = self.source_domains()
            for d in [*sources.values(), *self.eval_data.values()]:
                if any(d is x for x in sources.values()) or d.labels is not None or not self.validators.get(d.name):
                    check_labels(d, self.num_labels)  # an unlabeled eval set is fine when validators score it
            if isinstance(self.train_data, dict):
                check_domain_labels(sources, "train")
        self._check_procedure()

    def source_domains(self) -> dict[str, Any]:
        """The training data by source domain (one source: ``{"source": data}``)."""
        return dict(self.train_data) if isinstance(self.train_data, dict) else {"source": self.train_data}

    def _check_procedure(self) -> None:
        cfg, n = self.config, len(self.source_domains())
        if cfg.procedure == "mldg" and (not isinstance(self.train_data, dict) or n <= cfg.meta_test_domains):
            raise ValueError(
                f"procedure mldg holds out meta_test_domains={cfg.meta_test_domains} source domain(s) each step and "
                f"needs more source domains than that; got {n if isinstance(self.train_data, dict) else 1}. Pass "
                "train={domain: data, ...} (run file: data.source as a list, or data.domain_column)"
            )

    def _init_alignment(self, regularizers: Any) -> None:
        """The alignment terms, checked against the data (target given, nothing packed) and the model."""
        self.alignment = as_alignment(regularizers)
        if self.alignment is not None and self.target_data is None:
            raise ValueError("regularizers need target data: pass target=... (unlabeled target texts)")
        if self.alignment is None and self.target_data is not None:
            warnings.warn("target data given without regularizers: it is not used (plain fine-tuning)", stacklevel=3)
        packed = any(getattr(d, "position_ids", None) is not None for d in self.source_domains().values())
        if self.alignment is not None and packed:
            raise ValueError(
                "packed training data cannot be combined with regularizers: a packed row holds several "
                "examples, so its pooled features are no one example's; pass unpacked data"
            )
        if self.alignment is not None:
            if not isinstance(self.target_data, Encoded):  # tokenized target rows are prompts: no labels to warn of
                warn_unused_target_labels(self.target_data)
            check_alignment(self.alignment, self.model, self.task == "causal_lm", self.class_tokens)
            if self.class_tokens is not None and isinstance(self.train_data, Encoded):
                check_answers(self.train_data.labels, self.class_tokens, "train", self.tokenizer.decode)

    def _pick_best_metric(self) -> None:
        """Which metric picks the best checkpoint (and drives early stopping), and its direction."""
        cfg, names = self.config, self.metric_names()
        best = cfg.metric_for_best_model
        da = self._adapts()
        if best is None:
            best = default_metric_for_best(list(self.eval_data), self.validators, self.source_validation, self.task, da)
        warn_if_target_labels(best, self.source_validation, da, self.task)
        if best is not None and best not in names:
            raise ValueError(f"training.metric_for_best_model: {best!r} is not a metric of this run; valid: {names}")
        if cfg.early_stopping_patience is not None and best is None:
            raise ValueError(
                "training.early_stopping_patience needs a metric to watch: data.eval (and, for a DA run, "
                "validators or training.metric_for_best_model)"
            )
        self.best_metric_name = best
        self.greater_is_better = (
            cfg.greater_is_better
            if cfg.greater_is_better is not None
            else best is not None and best.split("/")[-1] not in LOWER_IS_BETTER
        )

    # -- the recipe ----------------------------------------------------------------------
    def train(self, resume: bool | str = False) -> dict[str, float]:
        """Run training; return the final metrics (of the best checkpoint if restored).

        ``resume=True`` continues from the newest complete checkpoint in
        ``output_dir`` (a fresh start if there is none); a path resumes from that checkpoint.
        """
        try:
            self.setup(resume)
            cfg, st = self.config, self.state
            t0, steps_done = time.perf_counter(), 0
            shown = not cfg.disable_tqdm and self.accelerator.is_main_process
            # off a terminal (a log file): plain lines instead of a bar that redraws
            plain = PlainProgress(self.name, st.total) if shown and not on_terminal() else None
            with tqdm(
                total=st.total,
                initial=st.step,
                desc=self.name,
                unit="step",
                dynamic_ncols=True,
                disable=not shown or plain is not None,
            ) as bar:
                while st.step < st.total and not st.stopped_early:
                    out = self.train_step()
                    st.step += 1
                    steps_done += 1
                    if st.step % cfg.logging_steps == 0 or st.step == st.total:
                        record = self._train_record(out)  # the step's only host sync
                        self._log(record)
                        bar.set_postfix(self._postfix(record))
                        if plain is not None:
                            plain.step(st.step, self._postfix(record))
                    do_eval = bool(self.eval_data) and (
                        (cfg.eval_steps and st.step % cfg.eval_steps == 0) or st.step == st.total
                    )
                    new_best = self._evaluate_and_track() if do_eval else False
                    if do_eval and plain is not None:
                        plain.eval(st.step, st.last_eval)
                    bar.update(1)
                    # checkpoint: every save_steps steps (default: every evaluation), each new best, the end
                    due = (st.step % cfg.save_steps == 0) if cfg.save_steps else do_eval
                    if due or new_best or st.step == st.total or st.stopped_early:
                        self.save_checkpoint()
            return self.finalize(time.perf_counter() - t0, steps_done)
        finally:  # a failing step must not leave the feature tap's hooks on the user's model
            if self.da is not None:
                self.da.remove()
                self.da = None
            for reg, check in self._term_checks.items():  # the terms' own finite checks back as they were
                reg.check_finite = check

    def setup(self, resume: bool | str = False) -> None:
        """Everything before the first step: seed, accelerator, data, the DA step, optimizer, resume."""
        cfg = self.config
        self.output_dir = Path(cfg.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        from accelerate.utils import (
            set_seed,  # accelerate costs ~0.3 s to import; only training needs it
        )

        set_seed(cfg.seed)
        self.accelerator = self._make_accelerator()
        if cfg.gradient_checkpointing:
            enable_checkpointing(self.base, **checkpoint_kwargs(cfg.gradient_checkpointing_kwargs))
            hf_config(self.base).use_cache = False
        self._setup_data()
        self._setup_alignment()
        self._setup_optimizer()
        self._setup_meta()
        self._resume(resume)
        if cfg.report_to:
            self.accelerator.init_trackers(
                "peftadapt", config={k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))}
            )
        self._train_model.train()
        if self.da is not None:
            self.da.train()

    def _setup_data(self) -> None:
        """Tokenize once; batches are drawn by index from endless seeded streams. Then the
        pre-flight checks across processes (same config everywhere, batches big enough)."""
        cfg, acc, pad = self.config, self.accelerator, self.tokenizer.pad_token_id
        bs, tbs = preflight.batch_sizes(cfg, acc.num_processes)
        self._sources: dict[str, BatchStream] = {}
        for i, (name, data) in enumerate(self.source_domains().items()):
            ids, labels, positions = token_rows(data, self.tokenizer, self.max_length, self.task)
            if positions is not None:  # packed rows: transformers keeps examples apart only without a cache
                hf_config(self.base).use_cache = False
            self._sources[name] = BatchStream(
                ids,
                labels,
                bs,
                seed=cfg.seed if i == 0 else cfg.seed + 1 + i,  # seed + 1 is the target's
                pad_id=pad,
                task=self.task,
                rank=acc.process_index,
                world=acc.num_processes,
                positions=positions,
            )
        self._source = next(iter(self._sources.values()))
        epoch = max(b.batches_per_epoch for b in self._sources.values())  # an epoch: a pass over the largest domain
        self._target = None
        if self.alignment is not None and self.target_data is not None:  # both or neither (checked in __init__)
            self._target = BatchStream(
                token_rows(self.target_data, self.tokenizer, self.max_length, "causal_lm")[0],  # ids only
                None,
                tbs,
                seed=cfg.seed + 1,
                pad_id=pad,
                task="target",
                rank=acc.process_index,
                world=acc.num_processes,
            )
        if self.alignment is not None:  # the run-wide scope fills in terms left on "auto"
            self.alignment.set_default_scope(cfg.align_scope)
        for stream in self._sources.values():  # every domain's batches must be big enough for the estimators
            preflight.preflight(self, acc, stream, self._target)
        total = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * epoch / cfg.gradient_accumulation_steps))
        self.state = RunState(total=total)

    def _setup_alignment(self) -> None:
        """The DA step (feature tap on the user's model + the terms), on the device; every
        process starts from rank 0's discriminator (what DDP would broadcast when wrapping)."""
        if self.alignment is None:
            return
        self.da = DomainAdaptation(
            self.model,
            self.alignment,
            layer=self.feature_layer,
            pooling=self.pooling,
            causal_lm=self.task == "causal_lm",
            class_tokens=self.class_tokens,
            sources=self.config.align_sources,
        ).to(self.accelerator.device)
        comm.broadcast_parameters(self.alignment)
        # The step's finite check covers the terms: a NaN / inf feature makes the loss non-finite, which
        # stops the run naming the step (or is skipped: nan_policy). A term's own input check would raise a
        # ValueError instead, and costs a host sync per call; it is off while this trainer runs.
        self._term_checks = {t.regularizer: t.regularizer.check_finite for t in self.alignment.members}
        for reg in self._term_checks:
            reg.check_finite = False

    def _setup_meta(self) -> None:
        """The MLDG meta-step (``procedure: mldg``) over the model's trainable parameters. Its meta-test
        domains are drawn from (seed, micro-batch index), so a resumed run draws the same ones."""
        cfg, acc = self.config, self.accelerator
        self.meta = None
        if cfg.procedure != "mldg":
            return
        if acc.num_processes > 1 or acc.mixed_precision == "fp16":
            why = f"{acc.num_processes} processes" if acc.num_processes > 1 else "fp16 loss scaling"
            raise ValueError(
                f"procedure mldg runs on one process without fp16 loss scaling (it backpropagates its own "
                f"meta-gradient); got {why}: launch one process, mixed_precision: bf16 or no"
            )
        self.meta = MLDG(
            self.model,
            inner_lr=cfg.meta_learning_rate or cfg.learning_rate,
            meta_weight=cfg.meta_weight,
            first_order=cfg.meta_first_order,
            meta_test_domains=cfg.meta_test_domains,
            seed=cfg.seed,
        )

    def _setup_optimizer(self) -> None:
        """Adapter / head parameters (no weight decay on biases and norms) through the
        optimizer factory, the discriminators in their own group at ``discriminator_learning_rate``, the
        learning-rate schedule."""
        cfg, acc = self.config, self.accelerator
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [
            g
            for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]
        ]
        # built before prepare (FSDP2 swaps the optimizer's parameters for their shards), hence the device
        optimizer = make_optimizer(
            groups, cfg.optim, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, device=acc.device
        )
        # Only the model goes through Accelerate (DDP / FSDP / DeepSpeed wrap one model; FSDP2
        # rejects optimizer parameters it does not know). The discriminators join the optimizer
        # afterwards as a plain, replicated group; their gradients are averaged over the processes
        # by hand (comm.average_gradients), which also covers a term that is still off.
        self._train_model, self.optimizer = acc.prepare(self.model, optimizer)
        self._disc = self.da.parameters() if self.da is not None else []
        if self._disc:
            self.optimizer.add_param_group(
                {
                    "params": self._disc,
                    "weight_decay": cfg.weight_decay,
                    "lr": cfg.discriminator_learning_rate or cfg.learning_rate,
                }
            )
        self._trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        # Not passed to acc.prepare: AcceleratedScheduler steps num_processes times per step (it assumes
        # a total counted in single-process batches; ours is per process) and skips fp16-overflow steps.
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * self.state.total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(cfg.lr_scheduler_type, warmup, self.state.total)
        )

    def _resume(self, resume: bool | str) -> None:
        """Load the checkpoint to resume from (or refuse a folder holding another run's), and
        cut ``metrics.jsonl`` back to it: lines written after it by a killed run are dropped.
        ``resume=True`` takes the newest checkpoint that verifies (damaged newer ones are
        skipped with a warning, :func:`checkpoint.load_newest`); a path must verify itself."""
        cfg, acc, out_dir, st = self.config, self.accelerator, self.output_dir, self.state
        saved = None
        if resume:
            parts = dict(
                model=acc.unwrap_model(self._train_model),
                alignment=self._saved_modules(),
                optimizer=self.optimizer,
                scheduler=self.scheduler,
            )
            if isinstance(resume, (str, Path)):
                saved = ckpt.load_checkpoint(resume, **parts)
            else:
                found = ckpt.load_newest(out_dir, set_aside=acc.is_main_process, **parts)
                saved = found[1] if found is not None else None
        if saved is None and ckpt.list_checkpoints(out_dir):
            if not cfg.overwrite_output_dir:
                raise ValueError(
                    f"{str(out_dir)!r} already holds checkpoints of another run; resume it (resume=True, "
                    "peftadapt train --resume), choose another output_dir, or set training.overwrite_output_dir: true"
                )
            if acc.is_main_process:
                for _, p in ckpt.list_checkpoints(out_dir):
                    shutil.rmtree(p)
        self.history = []
        if saved is not None:
            st.step, st.best, st.best_step, st.bad_evals = (
                saved["step"],
                saved["best"],
                saved["best_step"],
                saved["bad_evals"],
            )
            st.last_eval, st.stopped_early = saved.get("last_eval", {}), saved.get("stopped_early", False)
            st.skipped_steps, st.skipped_in_a_row = saved.get("skipped_steps", 0), saved.get("skipped_in_a_row", 0)
            self.history = [r for r in saved["history"] if r["step"] <= st.step]
        # every process must resume from the same step (e.g. output_dir not shared between machines)
        preflight.check_same_resume_step(st.step, acc.device)
        if acc.is_main_process:
            with open(out_dir / "metrics.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)

    def train_step(self) -> StepOutput:
        """One optimizer step: ``gradient_accumulation_steps`` micro-batches through the DA step and backward,
        the discriminators' gradients averaged over the processes, clip, the finite check, optimizer and
        scheduler step. One host sync of one flag (is every loss and the gradient finite?); the losses
        stay device tensors."""
        cfg, acc, st = self.config, self.accelerator, self.state
        progress = st.step / st.total
        need_target = self.da is not None and self.da.active(progress)  # else skip loading it
        losses: dict[str, list[torch.Tensor]] = {}
        weights: dict[str, float] = {}
        for micro in range(cfg.gradient_accumulation_steps):
            m = st.step * cfg.gradient_accumulation_steps + micro
            batch = self._source_batch(m)
            # need_target implies alignment, hence a target stream
            target = self._batch_to(self._target.batch(m)) if need_target and self._target is not None else None
            with acc.autocast():
                if self.meta is not None:  # backpropagates its own meta-gradient (one process, checked)
                    self.meta.step = m
                    logs = self.meta.backward(
                        batch, target, progress, da=self.da, model=self._train_model,
                        scale=1 / cfg.gradient_accumulation_steps,
                    )  # fmt: skip
                    logs.pop("loss")
                    loss = None
                elif self.da is None:
                    loss, logs = self._task_loss(batch)
                else:
                    loss, logs = self.da.loss(batch, target, progress, model=self._train_model)
            if loss is not None:  # mean over micro-batches: accumulating k batches of b equals one batch of k*b
                acc.backward(loss / cfg.gradient_accumulation_steps)
            for k, v in logs.items():
                if k.startswith("weight/"):
                    weights[k[len("weight/") :]] = v
                else:
                    losses.setdefault(k, []).append(v)
        if self._disc and acc.num_processes > 1:
            comm.average_gradients(self._disc)
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = acc.clip_grad_norm_(self._trainable, cfg.max_grad_norm)
        if not self._step_is_finite(losses, grad_norm):
            self._skip_step(describe_step(losses, grad_norm))  # raises under nan_policy: stop
            return StepOutput(losses, weights, grad_norm, skipped=True)
        st.skipped_in_a_row = 0
        self.optimizer.step()
        after_optimizer_step(self.model, st.step)  # AdaLoRA's rank allocation reads this step's gradients
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(losses, weights, grad_norm)

    def _source_batch(self, m: int) -> Any:
        """Micro-batch ``m`` of the source data on the device: one batch, or ``{domain: batch}``."""
        if not isinstance(self.train_data, dict):
            return self._batch_to(self._source.batch(m))
        return {name: self._batch_to(s.batch(m)) for name, s in self._sources.items()}

    def _task_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """The task loss without alignment: several domains count the same (the mean of their losses)."""
        if not isinstance(self.train_data, dict):
            loss = self._train_model(**batch).loss
            return loss, {"task_loss": loss.detach()}
        per = {name: self._train_model(**b).loss for name, b in batch.items()}
        loss = torch.stack(list(per.values())).mean()
        return loss, {"task_loss": loss.detach(), **{f"task_loss/{k}": v.detach() for k, v in per.items()}}

    def _step_is_finite(self, losses: dict[str, list[torch.Tensor]], grad_norm: torch.Tensor | None) -> bool:
        """Every loss of the step and the gradient norm finite, on every process (one host sync). Without
        clipping the gradients themselves are checked. Under fp16 loss scaling a non-finite gradient is the
        GradScaler's to handle (it skips that update and lowers the scale): only the losses count."""
        acc = self.accelerator
        scaled = getattr(acc, "scaler", None) is not None
        grads = None if grad_norm is not None or scaled else [p.grad for p in self._trainable if p.grad is not None]
        ok = step_is_finite(losses, None if scaled else grad_norm, grads)
        if acc.num_processes > 1:  # one process's NaN is everyone's: they must all skip or all stop
            ok = acc.reduce(ok.float(), reduction="sum") == acc.num_processes
        return bool(ok)

    def _skip_step(self, what: str) -> None:
        """A non-finite step: raise :class:`NonFiniteError` (``nan_policy: stop``, or too many skipped in a
        row), else drop its gradients, leave the weights and optimizer state as they are, count it and warn.
        The scheduler still steps: the learning rate stays a function of the step."""
        cfg, st, step = self.config, self.state, self.state.step + 1
        if cfg.nan_policy == "stop":
            raise NonFiniteError(f"step {step}: {what}; {way_out(cfg)}, or set training.nan_policy: skip", step)
        st.skipped_steps += 1
        st.skipped_in_a_row += 1
        if st.skipped_in_a_row > cfg.max_skipped_steps_in_a_row:
            raise NonFiniteError(
                f"step {step}: {st.skipped_in_a_row} steps in a row were non-finite (nan_policy: skip, "
                f"max_skipped_steps_in_a_row: {cfg.max_skipped_steps_in_a_row}); the last: {what}; {way_out(cfg)}",
                step,
            )
        if getattr(self.accelerator, "scaler", None) is not None:
            # fp16: the GradScaler's bookkeeping wants its step. Not unscaled yet (no clipping): NaN gradients
            # make it skip the update and lower the scale; unscaled by clipping: no gradients, no update.
            if cfg.max_grad_norm is None:
                for p in self._trainable:
                    if p.grad is not None:
                        p.grad.fill_(float("nan"))
            else:
                self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # torch warns when the very first step skipped the optimizer
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()
        if self.accelerator.is_main_process:
            warnings.warn(
                f"step {step}: update skipped, {what} ({st.skipped_in_a_row} in a row, {st.skipped_steps} in all; "
                f"nan_policy: skip)",
                stacklevel=2,
            )

    def _evaluate_and_track(self) -> bool:
        """Evaluate, log, track the best metric, count evaluations without improvement
        (early stopping). Returns whether this evaluation is a new best."""
        st = self.state
        st.last_eval = self.evaluate()
        self._log({"step": st.step, "split": "eval", **st.last_eval})
        self._train_model.train()
        if self.best_metric_name is None:  # a DA run with nothing label-free to select by keeps its last weights
            return False
        value = st.last_eval[self.best_metric_name]
        if self._is_better(value, st.best):
            st.best, st.best_step, st.bad_evals = value, st.step, 0
            return True
        st.bad_evals += 1
        patience = self.config.early_stopping_patience
        if patience is not None and st.bad_evals >= patience:
            st.stopped_early = True
        return False

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-<step>`` (every process gathers sharded parameters; the main one
        writes), then rotate: keep the newest ``save_total_limit`` and the best."""
        cfg, acc, st = self.config, self.accelerator, self.state
        self._check_weights_finite(f"checkpoint-{st.step}")
        state = {
            "step": st.step,
            "best": st.best,
            "best_step": st.best_step,
            "bad_evals": st.bad_evals,
            "total": st.total,
            "history": self.history,
            "last_eval": st.last_eval,
            "metric_for_best": self.best_metric_name,
            "stopped_early": st.stopped_early,
            "skipped_steps": st.skipped_steps,
            "skipped_in_a_row": st.skipped_in_a_row,
            "config": cfg.to_dict(),
        }
        acc.wait_for_everyone()
        path = ckpt.save_checkpoint(
            self.output_dir / f"checkpoint-{st.step}",
            model=acc.unwrap_model(self._train_model),
            alignment=self._saved_modules(),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=state,
            write=acc.is_main_process,
        )
        if acc.is_main_process:
            ckpt.rotate(self.output_dir, cfg.save_total_limit, self._best_path())
        acc.wait_for_everyone()
        return path

    def finalize(self, seconds: float, steps_done: int) -> dict[str, float]:
        """Restore the best weights (``load_best_model_at_end``), write ``final/`` and ``summary.json``,
        the curves PNG; return the final metrics."""
        cfg, st = self.config, self.state
        final = dict(st.last_eval)
        train_losses = [r["loss"] for r in self.history if r["split"] == "train"]
        if train_losses:
            final["train/loss"] = train_losses[-1]
        restored = None
        if cfg.load_best_model_at_end and st.best_step is not None and st.best_step != st.step:
            restored = self._restore_best()
        if restored is not None:
            best = next(r for r in reversed(self.history) if r["split"] == "eval" and r["step"] == restored)
            final = {
                **{k: v for k, v in best.items() if k not in ("step", "split")},
                "train/loss": best.get("train/loss", train_losses[-1] if train_losses else float("nan")),
            }
        summary = {
            "step": st.step,
            "total_steps": st.total,
            "stopped_early": st.stopped_early,
            "best_step": st.best_step,
            "metric_for_best": self.best_metric_name,
            "best": st.best,
            "final_metrics": final,
            "skipped_steps": st.skipped_steps,
            "seconds": seconds,
            "seconds_per_step": seconds / max(1, steps_done),
            "restored_step": restored,  # whose weights final/ holds; None: the last step's
        }
        self._write_final(summary)
        if cfg.report_to:
            self.accelerator.end_training()
        self.summary = {
            "step": st.step,
            "stopped_early": st.stopped_early,
            "best_step": st.best_step,
            "final_metrics": final,
            "skipped_steps": st.skipped_steps,
            "seconds": seconds,
        }
        return final

    def _restore_best(self) -> int | None:
        """Load the trainable weights of the best checkpoint that verifies and return its step.
        A damaged best one is skipped, with one warning naming its bad file, for the next best
        checkpoint still better than the last step's weights; if none is, the last step's
        weights stay (None)."""
        st, name = self.state, self.best_metric_name
        assert name is not None  # a best step implies a metric to rank by
        on_disk = dict(ckpt.list_checkpoints(self.output_dir))
        last = st.last_eval.get(name)
        evals = {
            r["step"]: r[name]
            for r in self.history
            if r["split"] == "eval" and r["step"] in on_disk and r["step"] != st.step and math.isfinite(r[name])
        }
        ranked = sorted(evals, key=lambda s: -evals[s] if self.greater_is_better else evals[s])  # stable: earliest
        bad: list[str] = []
        for step in ranked:
            if step != st.best_step and last is not None and not self._is_better(evals[step], last):
                break  # a fallback must beat the last step's weights
            try:
                weights = ckpt.read_trainable(on_disk[step])
            except ckpt.CheckpointError as e:
                bad.append(str(e))
                continue
            ckpt.load_trainable_state(self.accelerator.unwrap_model(self._train_model), weights)
            if bad:
                warnings.warn(
                    f"restored the weights of checkpoint-{step}, not the damaged {'; '.join(bad)}", stacklevel=2
                )
            return step
        why = f"the better ones are damaged: {'; '.join(bad)}" if bad else f"checkpoint-{st.best_step} is gone"
        warnings.warn(f"final/ keeps the last step's weights: {why}", stacklevel=2)
        return None

    def _write_final(self, summary: dict[str, Any]) -> None:
        """``final/`` (adapter, trainable tensors, summary) written to a temp folder and renamed;
        with sharded parameters every process takes part in the gather, otherwise only the writer."""
        acc, out_dir = self.accelerator, self.output_dir
        self._check_weights_finite("final/")
        acc.wait_for_everyone()
        unwrapped = acc.unwrap_model(self._train_model)
        weights = ckpt.trainable_state(unwrapped) if acc.is_main_process or ckpt.is_sharded(unwrapped) else None
        if not acc.is_main_process:
            ckpt.write_adapter(unwrapped, out_dir / ".tmp-final" / "adapter", weights, write=False)
            return
        assert weights is not None  # gathered above on the main process
        tmp = out_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        ckpt.write_adapter(unwrapped, tmp / "adapter", weights, write=True)
        save_file(weights, str(tmp / "trainable.safetensors"))
        write_json(tmp / "summary.json", summary)
        shutil.rmtree(out_dir / "final", ignore_errors=True)
        tmp.rename(out_dir / "final")
        write_json(out_dir / "summary.json", summary)
        if self.config.plot:
            plot_history(self.history, out_dir / "training_curves.png")

    def _check_weights_finite(self, what: str) -> None:
        """Raise :class:`NonFiniteError` before ``what`` is written if a trainable weight (adapter, head,
        discriminator) is NaN or inf: nothing non-finite is ever saved. Every process calls it (a collective
        with several); one pass over the trainable tensors, one host sync."""
        acc, st = self.accelerator, self.state
        bad = count_nonfinite(self._trainable).to(acc.device)
        if acc.num_processes > 1:
            bad = acc.reduce(bad, reduction="sum")
        n = int(bad)
        if n:
            named = [(k, p) for k, p in self.model.named_parameters() if p.requires_grad]
            if self.alignment is not None:
                named += [(f"regularizers.{k}", p) for k, p in self.alignment.named_parameters() if p.requires_grad]
            names = nonfinite_names(named)  # this process's shards: may miss another process's
            raise NonFiniteError(
                f"step {st.step}: {n} trainable weight values are NaN or inf"
                + (f" (in {', '.join(names)})" if names else "")
                + f", so {what} was not written; {way_out(self.config)}",
                st.step,
            )

    # -- evaluation ----------------------------------------------------------------------
    def evaluate(self, data: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Metrics of the current model on each eval set: ``{"<set>/<metric>": value}``
        (see :func:`evaluate_model`)."""
        data = self.eval_data if data is None else {n: as_text_data(d, n) for n, d in data.items()}
        if self.accelerator is None:
            self.accelerator = self._make_accelerator()
            self.model.to(self.accelerator.device)
        batch_size = self.config.per_device_eval_batch_size or 2 * self.config.per_device_train_batch_size
        scored = {n: v for n, v in self.validators.items() if n in data}
        labeled = {n: d for n, d in data.items() if d.labels is not None or self.task != "classification"}
        out = evaluate_model(
            self.model,
            self.tokenizer,
            labeled if scored else data,
            task=self.task,
            max_length=self.max_length,
            batch_size=batch_size,
            accelerator=self.accelerator,
            progress=not self.config.disable_tqdm and self.accelerator.is_main_process and on_terminal(),
        )
        return out | validator_metrics(
            self.model,
            self.tokenizer,
            data,
            scored,
            self.source_validation if self.source_validation in data else None,
            max_length=self.max_length,
            batch_size=batch_size,
            feature_layer=self.feature_layer,
            pooling=self.pooling,
            accelerator=self.accelerator,
        )

    def metric_names(self) -> list[str]:
        labeled = [n for n, d in self.eval_data.items() if d.labels is not None or self.task != "classification"]
        return metric_names(labeled, self.task) + validator_metric_names(self.validators)

    # -- helpers -------------------------------------------------------------------------
    def _adapts(self) -> bool:
        """Whether this run adapts to target data (then the best checkpoint is never picked by target labels)."""
        return self.alignment is not None

    def _saved_modules(self) -> Any:
        """What a checkpoint saves besides the model, optimizer and scheduler (``state_dict`` /
        ``load_state_dict``): the alignment terms (discriminators)."""
        return self.alignment

    def _best_path(self) -> Path | None:
        st = self.state
        return None if st.best_step is None else self.output_dir / f"checkpoint-{st.best_step}"

    def _batch_to(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def _make_accelerator(self):
        import importlib.util

        from accelerate import (
            Accelerator,  # accelerate costs ~0.3 s to import; only training needs it
        )

        mp = self.config.mixed_precision
        if mp == "auto":
            mp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if torch.cuda.is_available() else "no"
        kwargs: dict[str, Any] = {"mixed_precision": mp}
        if self.config.report_to:
            for tracker in self.config.report_to:  # a clear error instead of Accelerate's
                module = {"tensorboard": "tensorboard"}.get(tracker, tracker)
                if importlib.util.find_spec(module) is None and not (
                    tracker == "tensorboard" and importlib.util.find_spec("tensorboardX")
                ):
                    raise ImportError(f"training.report_to: {tracker!r} needs its package: pip install {module}")
            kwargs.update(log_with=list(self.config.report_to), project_dir=self.config.output_dir)
        return Accelerator(**kwargs)

    def _is_better(self, value: float, best: float | None) -> bool:
        if not math.isfinite(value):  # a NaN / inf metric is never the best (nor restored at the end)
            return False
        if best is None:
            return True
        return value > best if self.greater_is_better else value < best

    def _train_record(self, out: StepOutput) -> dict[str, Any]:
        """The step's log line. One device-to-host copy for all the loss tensors (nanoGPT's
        rule: sync only on logging steps); each value is the mean over the micro-batches."""
        ga = self.config.gradient_accumulation_steps
        flat = iter(torch.stack([v.float() for vs in out.losses.values() for v in vs]).tolist())
        means = {}
        for k, vs in out.losses.items():
            total = 0.0
            for _ in vs:
                total += next(flat) / ga
            means[k] = total
        record: dict[str, Any] = {
            "step": self.state.step,
            "split": "train",
            "loss": means["task_loss"] + means.get("reg_loss", 0.0),
            "task_loss": means["task_loss"],
            "lr": self.scheduler.get_last_lr()[0],
        }
        record.update({k: v for k, v in means.items() if k.startswith(("task_loss/", "meta_test"))})
        if self.meta is not None:
            record["loss"] += self.meta.meta_weight * means["meta_test_loss"]
        if self.da is not None:
            record["reg_loss"] = means["reg_loss"]
            record.update({k: v for k, v in means.items() if k.startswith("reg/")})
            record.update({f"weight/{k}": w for k, w in out.weights.items()})
        if out.grad_norm is not None:
            record["grad_norm"] = float(out.grad_norm)
        if out.skipped:
            record["skipped"] = True
        if self.accelerator.num_processes > 1:  # the mean over processes, not rank 0's shard
            self._reduce_losses(record, [k[len("reg/") :] for k in means if k.startswith("reg/")])
        return record

    def _postfix(self, record: dict[str, Any]) -> dict[str, str]:
        postfix = {"loss": f"{record['loss']:.4f}"}
        if self.best_metric_name and self.state.last_eval:
            postfix[self.best_metric_name] = f"{self.state.last_eval[self.best_metric_name]:.4f}"
        return postfix

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.accelerator.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json_text(record, indent=None) + "\n")  # NaN: null, valid JSON
            if self.config.report_to:
                self.accelerator.log(
                    {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                    step=record["step"],
                )

    def _reduce_losses(self, record: dict[str, Any], reg_names: Sequence[str]) -> None:
        """Replace the logged losses by their mean over the processes (one all-reduce; a
        collective: every process calls it at the same log steps). Global-scope alignment
        values are already whole-batch values, equal on every process."""
        keys = ["task_loss"] + (["reg_loss"] if "reg_loss" in record else []) + [f"reg/{k}" for k in reg_names]
        keys += [k for k in record if k.startswith("task_loss/")]  # several source domains
        vals = self.accelerator.reduce(
            torch.tensor([float(record[k]) for k in keys], dtype=torch.float64, device=self.accelerator.device),
            reduction="mean",
        )
        for k, v in zip(keys, vals.tolist(), strict=False):
            record[k] = v
        record["loss"] = record["task_loss"] + record.get("reg_loss", 0.0)


def _make_config(config: TrainConfig | None, overrides: Mapping[str, Any]) -> TrainConfig:
    """``config`` with keyword overrides applied; an unknown or renamed keyword names the valid one."""
    return TrainConfig.from_dict(dict(overrides)) if config is None else config.replace(**overrides)
