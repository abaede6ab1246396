"""The training loop: PEFT fine-tuning with optional domain alignment, on Accelerate.

One step, read top to bottom in :meth:`Trainer.train`::

    for each of gradient_accumulation_steps micro-batches:
        source batch -> model -> task loss            (features f_s tapped)
        target batch -> model                          (features f_t tapped; only if a term is on)
        loss = task loss + sum_k lambda_k(p) * D_k(f_s, f_t)
        backward(loss / gradient_accumulation_steps)
    clip grad norm; optimizer step; scheduler step
    log; evaluate / early-stop; checkpoint

``p`` = step / total steps is the training progress the regularizer weights
and the DANN gradient-reversal coefficient follow.

Reproducibility: the seed fixes the batch order (a function of seed and
epoch, see :mod:`peftadapt.train.data`), dropout and the regularizers' own
init; a checkpoint stores the step and the RNG states, so a run killed at
any point and resumed ends with the same weights and metrics as one that
was never interrupted.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core import comm
from ..core.hf import unwrap
from . import checkpoint as ckpt
from . import preflight
from .config import TASKS, TrainConfig
from .data import (BatchStream, TextData, as_text_data, check_labels, check_tokenizer, collate,
                   tokenize, warn_unused_target_labels)

LOWER_IS_BETTER = ("loss", "perplexity")


def _as_alignment(regularizers: Any):
    """None, an Alignment, a Term / Regularizer / name, or a list of those -> Alignment or None."""
    if regularizers is None or (isinstance(regularizers, (list, tuple)) and not regularizers):
        return None
    from ..align import Alignment
    if isinstance(regularizers, Alignment):
        return regularizers
    return Alignment(regularizers if isinstance(regularizers, (list, tuple)) else [regularizers])


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


def macro_f1(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    classes = sorted(set(preds) | set(labels))
    f1s = []
    for c in classes:
        tp = sum(1 for p, y in zip(preds, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(preds, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(preds, labels) if p != c and y == c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)


@torch.no_grad()
def evaluate_model(model: nn.Module, tokenizer, data: Mapping[str, TextData], *, task: str = "classification",
                   max_length: int = 128, batch_size: int = 32, accelerator=None,
                   progress: bool = False) -> dict[str, float]:
    """Evaluate ``model`` on each named dataset: ``{"<set>/<metric>": value}``.

    Classifiers: loss (mean cross-entropy), accuracy, macro_f1. Causal LMs:
    loss (mean next-token NLL over all real tokens) and perplexity = exp(loss).
    """
    check_tokenizer(tokenizer)
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for name, d in data.items():
        d = as_text_data(d, name)
        if task == "classification" and d.labels is None:
            raise ValueError(f"eval set {name!r} has no labels; a classifier is evaluated on labeled data")
        ids = tokenize(d.texts, tokenizer, max_length)
        preds, nll, count = [], 0.0, 0
        from tqdm.auto import tqdm
        for i in tqdm(range(0, len(ids), batch_size), desc=f"eval {name}", unit="batch", leave=False,
                      disable=not progress, dynamic_ncols=True):
            labels = None if d.labels is None else d.labels[i:i + batch_size]
            batch = collate(ids[i:i + batch_size], tokenizer.pad_token_id, labels, task)
            batch = {k: v.to(device) for k, v in batch.items()}
            y = batch.pop("labels", None)
            with autocast():
                logits = model(**batch).logits.float()
            if task == "classification":
                preds += logits.argmax(-1).tolist()
                nll += float(F.cross_entropy(logits, y, reduction="sum"))
                count += len(y)
            else:  # next-token loss, summed over real tokens
                nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             y[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"))
                count += int((y[:, 1:] != -100).sum())
        loss = nll / max(1, count)
        out[f"{name}/loss"] = loss
        if task == "classification":
            out[f"{name}/accuracy"] = sum(int(p == t) for p, t in zip(preds, d.labels)) / len(preds)
            out[f"{name}/macro_f1"] = macro_f1(preds, d.labels)
        else:
            out[f"{name}/perplexity"] = math.exp(min(loss, 50.0))
    model.train(was_training)
    return out


class Trainer:
    """Fine-tune a wrapped model on labeled source data, optionally aligning it to unlabeled target data.

    Args:
        model: a model returned by ``peftadapt.wrap`` (its trainable parameters
            are what gets trained).
        tokenizer: the model's tokenizer (must have a pad token).
        train: labeled source data: a :class:`TextData`, ``(texts, labels)``,
            or (causal LM) a list of texts.
        target: unlabeled target data for alignment (texts); None: plain fine-tuning.
        eval: evaluation sets, ``{name: TextData}`` (or one TextData, named "eval").
        regularizers: ``peftadapt.align.Alignment``, a list of ``Term`` /
            regularizers / names, or None.
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields.
        task: "classification" or "causal_lm".
        max_length: tokens per example (longer texts are truncated).
        feature_layer, pooling: where ``peftadapt.FeatureTap`` reads the
            alignment features (default: the task head's input, mean pooling).
        name: the label of the progress bar.

    ``train(resume=False)`` runs and returns the final evaluation metrics;
    ``evaluate()`` evaluates the current model on the eval sets.
    """

    def __init__(self, model: nn.Module, tokenizer, train: Any, *, target: Any = None,
                 eval: Mapping[str, Any] | Any = None, regularizers: Any = None,
                 config: TrainConfig | None = None, task: str = "classification",
                 max_length: int = 128, feature_layer: str | None = None, pooling: str = "mean",
                 name: str = "train", **overrides: Any):
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not supported; valid tasks: {list(TASKS)}")
        # an unknown or old (pre-TrainingArguments) option name is told the valid one
        config = TrainConfig.from_dict(overrides) if config is None else config.replace(**overrides)
        self.config, self.task, self.max_length = config, task, int(max_length)
        self.model, self.tokenizer = model, tokenizer
        self.feature_layer, self.pooling, self.name = feature_layer, pooling, name
        check_tokenizer(tokenizer)
        self.base = unwrap(model)
        if task == "classification":
            self.num_labels = int(getattr(self.base.config, "num_labels", 2))
            if getattr(self.base.config, "pad_token_id", None) is None:
                # decoder classifiers find each row's last token through the pad id
                self.base.config.pad_token_id = tokenizer.pad_token_id

        self.train_data = as_text_data(train, "train")
        self.target_data = None if target is None else as_text_data(target, "target")
        if eval is None:
            eval = {}
        elif not isinstance(eval, Mapping):
            eval = {"eval": eval}
        self.eval_data = {n: as_text_data(d, n) for n, d in eval.items()}
        if task == "classification":
            for d in [self.train_data, *self.eval_data.values()]:
                check_labels(d, self.num_labels)

        self.alignment = _as_alignment(regularizers)
        if self.alignment is not None and self.target_data is None:
            raise ValueError("regularizers need target data: pass target=... (unlabeled target texts)")
        if self.alignment is None and self.target_data is not None:
            warnings.warn("target data given without regularizers: it is not used (plain fine-tuning)",
                          stacklevel=2)
        if self.alignment is not None:
            warn_unused_target_labels(self.target_data)
            if task == "causal_lm" and self.alignment.needs_logits:
                raise ValueError("regularizers that read class logits (cdan, cdan+e, entropy) need "
                                 "task='classification'; for causal_lm use mmd, coral or dann")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the model has no trainable parameters; wrap it first: peftadapt.wrap(model, 'lora')")

        # which metric picks the best checkpoint (and drives early stopping)
        names = self.metric_names()
        best = config.metric_for_best_model
        if best is None and self.eval_data:
            best = f"{next(iter(self.eval_data))}/{'accuracy' if task == 'classification' else 'loss'}"
        if best is not None and best not in names:
            raise ValueError(f"training.metric_for_best_model: {best!r} is not a metric of this run; valid: {names}")
        if config.early_stopping_patience is not None and best is None:
            raise ValueError("training.early_stopping_patience needs eval data to watch (data.eval)")
        self.best_metric_name = best
        self.greater_is_better = (config.greater_is_better if config.greater_is_better is not None
                                  else best is not None and best.split("/")[-1] not in LOWER_IS_BETTER)
        self.history: list[dict[str, Any]] = []
        self.accelerator = None

    # -- helpers -----------------------------------------------------------------------
    def metric_names(self) -> list[str]:
        per = ["loss", "accuracy", "macro_f1"] if self.task == "classification" else ["loss", "perplexity"]
        return [f"{n}/{m}" for n in self.eval_data for m in per]

    def _batch_to(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def _make_accelerator(self):
        import importlib.util

        from accelerate import Accelerator

        mp = self.config.mixed_precision
        if mp == "auto":
            if torch.cuda.is_available():
                mp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            else:
                mp = "no"
        kwargs: dict[str, Any] = {"mixed_precision": mp}
        if self.config.report_to:
            for tracker in self.config.report_to:  # a clear error instead of Accelerate's
                module = {"tensorboard": "tensorboard"}.get(tracker, tracker)
                if importlib.util.find_spec(module) is None and not (
                        tracker == "tensorboard" and importlib.util.find_spec("tensorboardX")):
                    raise ImportError(f"training.report_to: {tracker!r} needs its package: pip install {module}")
            kwargs.update(log_with=list(self.config.report_to), project_dir=self.config.output_dir)
        return Accelerator(**kwargs)

    def _is_better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.greater_is_better else value < best

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.accelerator.is_main_process:
            with open(Path(self.config.output_dir) / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.config.report_to:
                self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"},
                                     step=record["step"])

    def _reduce_losses(self, record: dict[str, Any], reg_names: Sequence[str]) -> None:
        """Replace the logged losses by their mean over the processes (one all-reduce; a
        collective: every process calls it at the same log steps). Global-scope alignment
        values are already whole-batch values, equal on every process."""
        keys = ["task_loss"] + (["reg_loss"] if "reg_loss" in record else []) + [f"reg/{k}" for k in reg_names]
        vals = self.accelerator.reduce(torch.tensor([float(record[k]) for k in keys], dtype=torch.float64,
                                                    device=self.accelerator.device), reduction="mean")
        for k, v in zip(keys, vals.tolist()):
            record[k] = v
        record["loss"] = record["task_loss"] + record.get("reg_loss", 0.0)

    # -- evaluation --------------------------------------------------------------------
    def evaluate(self, data: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Metrics of the current model on each eval set: ``{"<set>/<metric>": value}``
        (see :func:`evaluate_model`)."""
        data = self.eval_data if data is None else {n: as_text_data(d, n) for n, d in data.items()}
        if self.accelerator is None:
            self.accelerator = self._make_accelerator()
            self.model.to(self.accelerator.device)
        return evaluate_model(self.model, self.tokenizer, data, task=self.task, max_length=self.max_length,
                              batch_size=(self.config.per_device_eval_batch_size
                                          or 2 * self.config.per_device_train_batch_size),
                              accelerator=self.accelerator,
                              progress=not self.config.disable_tqdm and self.accelerator.is_main_process)

    # -- training ----------------------------------------------------------------------
    def train(self, resume: bool | str = False) -> dict[str, float]:
        """Run training; return the final metrics (of the best checkpoint if restored).

        ``resume=True`` continues from the newest complete checkpoint in
        ``output_dir`` (a fresh start if there is none); a path resumes from that checkpoint.
        """
        from accelerate.utils import set_seed
        from ..features import FeatureTap

        cfg = self.config
        out_dir = Path(cfg.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        set_seed(cfg.seed)
        acc = self.accelerator = self._make_accelerator()
        model, alignment = self.model, self.alignment
        if cfg.gradient_checkpointing:
            self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.base.config.use_cache = False

        # data: tokenized once; batches drawn by index from endless seeded streams
        pad = self.tokenizer.pad_token_id
        bs, tbs = preflight.batch_sizes(cfg, acc.num_processes)
        src = BatchStream(tokenize(self.train_data.texts, self.tokenizer, self.max_length),
                          self.train_data.labels if self.task == "classification" else None,
                          bs, seed=cfg.seed, pad_id=pad, task=self.task,
                          rank=acc.process_index, world=acc.num_processes)
        tgt = None
        if alignment is not None:
            tgt = BatchStream(tokenize(self.target_data.texts, self.tokenizer, self.max_length), None,
                              tbs, seed=cfg.seed + 1, pad_id=pad,
                              task="target", rank=acc.process_index, world=acc.num_processes)
        if alignment is not None:
            alignment.set_default_scope(cfg.align_scope)
        preflight.preflight(self, acc, src, tgt)
        total = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * src.batches_per_epoch
                                                   / cfg.gradient_accumulation_steps))
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total)

        # optimizer: adapter/head params (no decay on biases and norms) + discriminators at discriminator_learning_rate
        decay, no_decay = [], []
        for n, p in model.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        disc = []
        if alignment is not None:
            alignment.to(acc.device)
            disc = [p for p in alignment.parameters() if p.requires_grad]
            # every process starts from rank 0's discriminator (DDP would broadcast it when wrapping)
            comm.broadcast_parameters(alignment)
        optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate)
        tap = FeatureTap(model, layer=self.feature_layer, pooling=self.pooling) if alignment is not None else None
        # Only the model goes through Accelerate (DDP / FSDP / DeepSpeed wrap one model; FSDP2
        # swaps the optimizer's parameters for their shards and rejects any it does not know).
        # The discriminators join the optimizer afterwards as a plain, replicated group; their
        # gradients are averaged over the processes by hand (distributed.average_gradients),
        # which also covers a term that is still off (no gradient) on a step.
        model, optimizer = acc.prepare(model, optimizer)
        if disc:
            optimizer.optimizer.add_param_group({"params": disc, "weight_decay": cfg.weight_decay,
                                                 "lr": cfg.discriminator_learning_rate or cfg.learning_rate})
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer,
                                                      _lr_lambda(cfg.lr_scheduler_type, warmup, total))
        self.optimizer, self.scheduler = optimizer, scheduler
        trainable = [p for g in optimizer.param_groups for p in g["params"]]

        # state; restored from a checkpoint on resume
        step, best, best_step, best_path, bad_evals, last_eval = 0, None, None, None, 0, {}
        start = None
        if resume:
            start = Path(resume) if isinstance(resume, (str, Path)) else ckpt.latest_checkpoint(out_dir)
        if start is None and ckpt.list_checkpoints(out_dir):
            if not cfg.overwrite_output_dir:
                raise ValueError(
                    f"{str(out_dir)!r} already holds checkpoints of another run; resume it (resume=True, "
                    "peftadapt train --resume), choose another output_dir, or set training.overwrite_output_dir: true"
                )
            if acc.is_main_process:
                for _, p in ckpt.list_checkpoints(out_dir):
                    shutil.rmtree(p)
        if start is not None:
            st = ckpt.load_checkpoint(start, model=acc.unwrap_model(model), alignment=self.alignment,
                                      optimizer=optimizer, scheduler=scheduler)
            step, best, best_step, bad_evals = st["step"], st["best"], st["best_step"], st["bad_evals"]
            best_path = out_dir / f"checkpoint-{best_step}" if best_step is not None else None
            self.history = [r for r in st["history"] if r["step"] <= step]
            last_eval = st.get("last_eval", {})
            stopped_early = st.get("stopped_early", False)
        else:
            stopped_early = False
            self.history = []
        # every process must resume from the same step (e.g. output_dir not shared between machines)
        preflight.check_same_resume_step(step, acc.device)
        if acc.is_main_process:  # drop log lines written after the checkpoint by a killed run
            with open(out_dir / "metrics.jsonl", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)
        if cfg.report_to:
            acc.init_trackers("peftadapt", config={k: v for k, v in cfg.to_dict().items()
                                                   if isinstance(v, (int, float, str, bool))})

        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=step, desc=self.name, unit="step", dynamic_ncols=True,
                   disable=cfg.disable_tqdm or not acc.is_main_process)
        t0, steps_done = time.perf_counter(), 0
        model.train()
        if alignment is not None:
            alignment.train()
        while step < total and not stopped_early:
            progress = step / total
            term_on = alignment is not None and any(w > 0 for w in self.alignment.weights(progress).values())
            task_sum, reg_sum, reg_vals = 0.0, 0.0, {}
            for micro in range(cfg.gradient_accumulation_steps):
                m = step * cfg.gradient_accumulation_steps + micro
                batch = self._batch_to(src.batch(m))
                with acc.autocast():
                    out = model(**batch)
                    task_loss = out.loss
                    loss = task_loss
                    if term_on:
                        fs = tap.pooled(batch["attention_mask"])
                        tb = self._batch_to(tgt.batch(m))
                        out_t = model(**tb)
                        ft = tap.pooled(tb["attention_mask"])
                        ls = out.logits if self.task == "classification" else None
                        lt = out_t.logits if self.task == "classification" else None
                        reg_loss, vals = alignment(fs, ft, ls, lt, progress=progress)
                        loss = loss + reg_loss
                        reg_sum += float(reg_loss.detach()) / cfg.gradient_accumulation_steps
                        for k, v in vals.items():
                            reg_vals[k] = reg_vals.get(k, 0.0) + v / cfg.gradient_accumulation_steps
                # mean over micro-batches: accumulating k batches of b equals one batch of k*b
                acc.backward(loss / cfg.gradient_accumulation_steps)
                task_sum += float(task_loss.detach()) / cfg.gradient_accumulation_steps
            if disc and acc.num_processes > 1:
                comm.average_gradients(disc)
            grad_norm = None
            if cfg.max_grad_norm is not None:
                grad_norm = float(acc.clip_grad_norm_(trainable, cfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_done += 1

            record: dict[str, Any] = {"step": step, "split": "train", "loss": task_sum + reg_sum,
                                      "task_loss": task_sum, "lr": scheduler.get_last_lr()[0]}
            if alignment is not None:
                record["reg_loss"] = reg_sum
                record.update({f"reg/{k}": v for k, v in reg_vals.items()})
                record.update({f"weight/{k}": w for k, w in self.alignment.weights(progress).items()})
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if step % cfg.logging_steps == 0 or step == total:
                if acc.num_processes > 1:  # the mean over processes, not rank 0's shard (same steps on every rank)
                    self._reduce_losses(record, list(reg_vals))
                self._log(record)

            # evaluate, track the best, stop early
            do_eval = bool(self.eval_data) and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == total)
            new_best = False
            if do_eval:
                last_eval = self.evaluate()
                self._log({"step": step, "split": "eval", **last_eval})
                model.train()
                value = last_eval[self.best_metric_name]
                if self._is_better(value, best):
                    best, best_step, bad_evals, new_best = value, step, 0, True
                else:
                    bad_evals += 1
                if cfg.early_stopping_patience is not None and bad_evals >= cfg.early_stopping_patience:
                    stopped_early = True
            postfix = {"loss": f"{record['loss']:.4f}"}
            if self.best_metric_name and last_eval:
                postfix[self.best_metric_name] = f"{last_eval[self.best_metric_name]:.4f}"
            bar.set_postfix(postfix)
            bar.update(1)

            # checkpoint: every save_steps steps (default: every evaluation), at each new best, at the end
            due = (step % cfg.save_steps == 0) if cfg.save_steps else do_eval
            if due or new_best or step == total or stopped_early:
                state = {"step": step, "best": best, "best_step": best_step, "bad_evals": bad_evals,
                         "total": total, "history": self.history, "last_eval": last_eval,
                         "metric_for_best": self.best_metric_name, "stopped_early": stopped_early,
                         "config": cfg.to_dict()}
                acc.wait_for_everyone()
                # every process gathers (a collective with sharded parameters); the main one writes
                path = ckpt.save_checkpoint(out_dir / f"checkpoint-{step}", model=acc.unwrap_model(model),
                                            alignment=self.alignment, optimizer=optimizer,
                                            scheduler=scheduler, state=state, write=acc.is_main_process)
                if new_best:
                    best_path = path
                if acc.is_main_process:
                    ckpt.rotate(out_dir, cfg.save_total_limit, best_path)
                acc.wait_for_everyone()
            if stopped_early:
                break
        bar.close()
        elapsed = time.perf_counter() - t0

        # restore the best weights, then write the final adapter
        final = dict(last_eval)
        train_losses = [r["loss"] for r in self.history if r["split"] == "train"]
        if train_losses:
            final["train/loss"] = train_losses[-1]
        if cfg.load_best_model_at_end and best_step is not None and best_step != step:
            from safetensors.torch import load_file
            ckpt.load_trainable_state(acc.unwrap_model(model),
                                      load_file(str(out_dir / f"checkpoint-{best_step}" / "trainable.safetensors")))
            final = next(r for r in reversed(self.history) if r["split"] == "eval" and r["step"] == best_step)
            final = {**{k: v for k, v in final.items() if k not in ("step", "split")},
                     "train/loss": final.get("train/loss", train_losses[-1] if train_losses else float("nan"))}
        acc.wait_for_everyone()
        unwrapped = acc.unwrap_model(model)
        # with sharded parameters every process takes part in the gather; otherwise only the writer
        weights = (ckpt.trainable_state(unwrapped)
                   if acc.is_main_process or ckpt.is_sharded(unwrapped) else None)
        if not acc.is_main_process:
            ckpt.write_adapter(unwrapped, out_dir / ".tmp-final" / "adapter", weights, write=False)
        else:
            final_dir = out_dir / "final"
            tmp = out_dir / ".tmp-final"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            ckpt.write_adapter(unwrapped, tmp / "adapter", weights, write=True)
            from safetensors.torch import save_file
            save_file(weights, str(tmp / "trainable.safetensors"))
            summary = {"step": step, "total_steps": total, "stopped_early": stopped_early,
                       "best_step": best_step, "metric_for_best": self.best_metric_name, "best": best,
                       "final_metrics": final, "seconds": elapsed,
                       "seconds_per_step": elapsed / max(1, steps_done)}
            ckpt.write_json(tmp / "summary.json", summary)
            shutil.rmtree(final_dir, ignore_errors=True)
            tmp.rename(final_dir)
            ckpt.write_json(out_dir / "summary.json", summary)
            if cfg.plot:
                from .plots import plot_history
                plot_history(self.history, out_dir / "training_curves.png")
        if cfg.report_to:
            acc.end_training()
        if tap is not None:
            tap.remove()
        self.summary = {"step": step, "stopped_early": stopped_early, "best_step": best_step,
                        "final_metrics": final, "seconds": elapsed}
        return final
