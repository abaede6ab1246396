"""The regularizer interface, the registry, weight schedules and ``Alignment``.

A regularizer ``D`` is an ``nn.Module`` whose forward takes source features
``(B_s, d)``, target features ``(B_t, d)`` and, where the method needs them,
source / target logits ``(B, C)``, and returns a scalar loss. Training
minimises

    L_task(source) + sum_k  w_k(p) * D_k(f_s, f_t, g_s, g_t)

where ``p`` in [0, 1] is the training progress and ``w_k(p)`` the term's
weight schedule (:class:`Term`); :class:`Alignment` holds the sum.

Writing your own (a few lines)::

    import peftadapt

    @peftadapt.align.register("mean_l2")
    class MeanL2(peftadapt.align.Regularizer):
        '''||mean(f_s) - mean(f_t)||^2.'''
        def forward(self, source_features, target_features,
                    source_logits=None, target_logits=None):
            fs, ft = self.check_features(source_features, target_features)
            return (fs.mean(0) - ft.mean(0)).pow(2).sum()

    reg = peftadapt.align.build("mean_l2")

A plain function ``f(fs, ft, source_logits=None, target_logits=None)`` can be
registered the same way; it is wrapped into a :class:`Regularizer`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn as nn

__all__ = [
    "Regularizer",
    "register",
    "build",
    "regularizer_names",
    "REGULARIZERS",
    "Term",
    "Alignment",
    "schedule_weight",
    "dann_ramp",
    "SCHEDULES",
]

# name -> (class, preset options). Presets let one class serve two names
# ("cdan" and "cdan+e").
REGULARIZERS: dict[str, tuple[type, dict[str, Any]]] = {}
SCHEDULES = ("constant", "linear", "dann")


# ---------------------------------------------------------------------------
# Numerics helpers shared by the regularizers
# ---------------------------------------------------------------------------
def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics run in at least fp32: bf16/fp16 sums of squares overflow or lose all precision."""
    return torch.promote_types(x.dtype, torch.float32)


@contextlib.contextmanager
def _full_precision(*tensors: torch.Tensor):
    """Disable autocast for the enclosed block (on the tensors' device type).

    Under ``torch.autocast`` a matmul would silently run in bf16 again even
    after we upcast the inputs; the statistics must stay in fp32.
    """
    device_type = tensors[0].device.type if tensors else "cpu"
    try:
        ctx = torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to disable
        ctx = contextlib.nullcontext()
    with ctx:
        yield


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` in backward."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``factor`` in the backward pass
    (gradient reversal: a negative factor; the global-batch gather: the world size)."""
    return _ScaleGrad.apply(x, float(factor))


def dann_ramp(progress: float, gamma: float = 10.0) -> float:
    """The DANN schedule ``2 / (1 + exp(-gamma * p)) - 1`` (Ganin et al. 2016, Sec. 5.2.2; gamma = 10).

    0 at p = 0, 0.987 at p = 0.5, 0.99991 at p = 1.
    """
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


def _check_progress(p: float) -> float:
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise TypeError(f"progress must be a number in [0, 1], got {p!r}") from None
    if not (0.0 <= p <= 1.0) or math.isnan(p):
        raise ValueError(f"progress must be in [0, 1] (fraction of training done), got {p}")
    return p


# ---------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------
class Regularizer(nn.Module):
    """Base class of every alignment regularizer.

    Subclasses implement ``forward(source_features, target_features,
    source_logits=None, target_logits=None) -> scalar tensor`` and call
    :meth:`check_features` / :meth:`check_logits` first so bad input is a
    ``ValueError`` that names the problem.

    Class attributes:
        name: registry name (set by :func:`register`).
        needs_logits: whether forward needs ``source_logits``/``target_logits``.
        min_batch: the smallest batch per domain the estimator is defined for.
        check_finite: reject NaN/inf features (one device sync per call;
            set to False on an instance to skip the check).
    """

    name: str = "regularizer"
    needs_logits: bool = False
    min_batch: int = 1
    check_finite: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.progress = 0.0

    # -- training progress ---------------------------------------------------
    def set_progress(self, p: float) -> None:
        """Tell the regularizer how far training is (p in [0, 1]). No-op by default
        apart from storing ``self.progress``; DANN/CDAN ramp their GRL coefficient with it."""
        self.progress = _check_progress(p)

    @property
    def has_parameters(self) -> bool:
        """True if this regularizer has trainable parameters (a discriminator) that
        the trainer must put in an optimizer (``self.parameters()``)."""
        return any(p.requires_grad for p in self.parameters())

    # -- input checks --------------------------------------------------------
    def _label(self) -> str:
        return type(self).__name__

    def _check_one(self, x: Any, what: str, min_batch: int) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self._label()}: {what} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{self._label()}: {what} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 2:
            raise ValueError(
                f"{self._label()}: {what} must be 2-D (batch, width), got shape {tuple(x.shape)}"
                + ("; pool token features first (peftadapt.FeatureTap)" if x.dim() == 3 else "")
            )
        if x.shape[0] == 0:
            raise ValueError(f"{self._label()}: {what} is an empty batch (shape {tuple(x.shape)})")
        if x.shape[0] < min_batch:
            raise ValueError(
                f"{self._label()}: {what} has batch size {x.shape[0]}, but this estimator needs at "
                f"least {min_batch} samples per domain{self._min_batch_reason()}"
            )
        if x.shape[1] == 0:
            raise ValueError(f"{self._label()}: {what} has width 0 (shape {tuple(x.shape)})")
        if self.check_finite and not bool(torch.isfinite(x).all()):
            n_nan = int(torch.isnan(x).sum())
            n_inf = int(torch.isinf(x).sum())
            raise ValueError(f"{self._label()}: {what} contains non-finite values ({n_nan} NaN, {n_inf} inf)")
        return x

    def _min_batch_reason(self) -> str:
        return ""

    def check_features(self, source_features: Any, target_features: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate the two feature batches; returns them unchanged."""
        fs = self._check_one(source_features, "source_features", self.min_batch)
        ft = self._check_one(target_features, "target_features", self.min_batch)
        if fs.shape[1] != ft.shape[1]:
            raise ValueError(
                f"{self._label()}: source features have width {fs.shape[1]} but target features "
                f"have width {ft.shape[1]}; both domains must come from the same layer"
            )
        return fs, ft

    def check_logits(self, logits: Any, what: str, batch: int | None, num_classes: int | None) -> torch.Tensor:
        """Validate a logits batch: present, 2-D, matching batch size and class count."""
        if logits is None:
            raise ValueError(
                f"{self._label()} needs {what} (the classifier's logits, shape (batch, num_classes)); got None"
            )
        x = self._check_one(logits, what, 1)
        if batch is not None and x.shape[0] != batch:
            raise ValueError(
                f"{self._label()}: {what} has batch size {x.shape[0]} but the matching features have {batch}"
            )
        if num_classes is not None and x.shape[1] != num_classes:
            raise ValueError(
                f"{self._label()}: {what} has {x.shape[1]} classes but this regularizer was built "
                f"with num_classes={num_classes}"
            )
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class _FunctionRegularizer(Regularizer):
    """A registered plain function, wrapped."""

    fn: Callable[..., torch.Tensor]

    def forward(self, source_features, target_features, source_logits=None, target_logits=None):
        fs, ft = self.check_features(source_features, target_features)
        out = type(self).fn(fs, ft, source_logits=source_logits, target_logits=target_logits)
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            raise TypeError(f"regularizer {self.name!r} must return a scalar tensor, got {out!r:.80}")
        return out


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------
def regularizer_names() -> list[str]:
    """The registered names, sorted."""
    return sorted(REGULARIZERS)


def register(name: str, obj: Any = None, *, needs_logits: bool = False, override: bool = False, **preset: Any):
    """Register a regularizer under ``name``; usable as a decorator.

    ``obj`` is a :class:`Regularizer` subclass or a plain function
    ``f(fs, ft, source_logits=None, target_logits=None) -> scalar``
    (``needs_logits`` then says whether it needs the logits). ``preset`` fixes
    constructor options for this name (e.g. ``"cdan+e"`` is CDAN with
    ``entropy=True``). Registering a taken name raises unless ``override=True``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"regularizer name must be a non-empty string, got {name!r}")
    key = name.strip().lower()

    def deco(o):
        if key in REGULARIZERS and not override:
            raise ValueError(
                f"a regularizer named {key!r} is already registered ({REGULARIZERS[key][0].__name__}); "
                f"pass override=True to replace it"
            )
        if inspect.isclass(o) and issubclass(o, Regularizer):
            cls = o
            if not preset:
                cls.name = key
        elif inspect.isclass(o):
            raise TypeError(
                f"register({key!r}): {o.__name__} must subclass peftadapt.align.Regularizer "
                f"(or be a plain function)"
            )
        elif callable(o):
            cls = type(
                f"Regularizer_{o.__name__}",
                (_FunctionRegularizer,),
                {"fn": staticmethod(o), "name": key, "needs_logits": bool(needs_logits), "__doc__": o.__doc__},
            )
        else:
            raise TypeError(f"register({key!r}) needs a Regularizer subclass or a function, got {o!r}")
        if preset:
            _validate_options(key, cls, preset)
        REGULARIZERS[key] = (cls, dict(preset))
        return o

    return deco if obj is None else deco(obj)


def _init_params(cls: type) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(cls.__init__)
    return {
        k: p
        for k, p in list(sig.parameters.items())[1:]
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def _validate_options(name: str, cls: type, options: Mapping[str, Any]) -> None:
    valid = _init_params(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for regularizer {name!r}; valid options: {sorted(valid)}"
        )


def build(name: str, **options: Any) -> Regularizer:
    """Build the regularizer registered as ``name`` with keyword ``options``.

    Unknown names / options are a ``ValueError`` listing the valid ones;
    a missing required option (``in_features`` for "dann") names it.
    """
    if isinstance(name, Regularizer):
        if options:
            raise ValueError("build() got a Regularizer instance and options; pass options to its constructor")
        return name
    if not isinstance(name, str):
        raise TypeError(f"regularizer name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; valid names: {regularizer_names()}")
    cls, preset = REGULARIZERS[key]
    _validate_options(key, cls, options)
    clash = sorted(k for k in options if k in preset and options[k] != preset[k])
    if clash:
        raise ValueError(f"regularizer {key!r} fixes option(s) {clash} to {({k: preset[k] for k in clash})}")
    kwargs = {**preset, **options}
    missing = [
        k for k, p in _init_params(cls).items() if p.default is inspect.Parameter.empty and k not in kwargs
    ]
    if missing:
        raise ValueError(f"regularizer {key!r} needs option(s) {missing}; e.g. build({key!r}, "
                         + ", ".join(f"{k}=..." for k in missing) + ")")
    reg = cls(**kwargs)
    if preset:
        reg.name = key  # instance-level: "cdan+e" vs "cdan" share a class
    return reg


# ---------------------------------------------------------------------------
# Schedules and the weighted sum
# ---------------------------------------------------------------------------
def schedule_weight(schedule: str | Callable[[float], float], progress: float,
                    warmup: float = 0.0, start: float = 0.0) -> float:
    """The multiplier in [0, 1] that a schedule gives at training progress ``progress``.

    Before ``start`` the term is off (0). After it, with ``q = progress - start``
    and ramp length ``L = warmup`` if ``warmup > 0`` else ``1 - start``
    (the rest of training), ``r = min(1, q / L)``:

    - ``"constant"``: 1
    - ``"linear"``:   r                         (linear warm-up)
    - ``"dann"``:     2 / (1 + exp(-10 r)) - 1  (Ganin et al. 2016; with start=0,
      warmup=0 this is exactly the paper's ramp over p)

    A callable ``schedule(progress) -> float`` is used as is (after ``start``).
    """
    p = _check_progress(progress)
    if p < start:
        return 0.0
    if callable(schedule):
        return float(schedule(p))
    if schedule == "constant":
        return 1.0
    length = warmup if warmup > 0 else 1.0 - start
    r = 1.0 if length <= 0 else min(1.0, (p - start) / length)
    if schedule == "linear":
        return r
    if schedule == "dann":
        return dann_ramp(r)
    raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {list(SCHEDULES)} or a callable")


class Term(nn.Module):
    """One weighted regularizer: ``weight * schedule(progress) * regularizer(...)``.

    Args:
        regularizer: a :class:`Regularizer` or a registered name (built with
            default options; use :func:`build` for options).
        weight: the term's maximum weight lambda (>= 0).
        schedule: "constant", "linear" (warm-up), "dann" (2/(1+exp(-10r))-1)
            or a callable progress -> multiplier.
        warmup: ramp length as a fraction of training ("linear"/"dann"; 0 means
            the ramp spans from ``start`` to the end of training).
        start: fraction of training before which the term is off. Aligning
            from step 0 can wreck a classifier that has not learnt the task yet.
        name: the key of this term in the logged values (default: regularizer name).
        scope: with several processes, "global" (loss over the whole batch of all processes),
            "local" (each process on its shard) or "auto" (global for batch statistics such as
            MMD / CORAL, local for per-sample losses); see :mod:`peftadapt.distributed`.
    """

    def __init__(self, regularizer: Regularizer | str, weight: float = 1.0,
                 schedule: str | Callable[[float], float] = "constant", warmup: float = 0.0,
                 start: float = 0.0, name: str | None = None, scope: str = "auto") -> None:
        super().__init__()
        reg = build(regularizer) if isinstance(regularizer, str) else regularizer
        if not isinstance(reg, nn.Module):
            raise TypeError(f"Term needs a Regularizer or a registered name, got {type(regularizer).__name__}")
        if isinstance(schedule, str) and schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {list(SCHEDULES)} or a callable")
        if not callable(schedule) and not isinstance(schedule, str):
            raise TypeError(f"schedule must be a name {list(SCHEDULES)} or a callable, got {schedule!r}")
        for label, v, hi in (("weight", weight, math.inf), ("warmup", warmup, 1.0), ("start", start, 1.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or not (0.0 <= v <= hi):
                raise ValueError(f"Term {label} must be a number in [0, {hi}], got {v!r}")
        if schedule == "constant" and warmup > 0:
            raise ValueError("warmup has no effect with schedule='constant'; use schedule='linear' or 'dann'")
        if start + warmup > 1.0 + 1e-12:
            raise ValueError(f"start + warmup must be <= 1 (fractions of training), got {start} + {warmup}")
        self.regularizer = reg
        self.weight = float(weight)
        self.schedule = schedule
        self.warmup = float(warmup)
        self.start = float(start)
        self.name = name or getattr(reg, "name", type(reg).__name__.lower())
        from ..distributed import check_scope
        self.scope = check_scope(scope)

    def weight_at(self, progress: float) -> float:
        """The effective weight lambda(progress)."""
        return self.weight * schedule_weight(self.schedule, progress, self.warmup, self.start)

    def forward(self, fs, ft, source_logits=None, target_logits=None, progress: float = 0.0):
        """Returns (weighted loss or None if the weight is 0, raw loss or None)."""
        w = self.weight_at(progress)
        if hasattr(self.regularizer, "set_progress"):
            self.regularizer.set_progress(progress)
        if w == 0.0:
            return None, None
        from ..distributed import gather_inputs  # no-op in a single process
        fs, ft, source_logits, target_logits = gather_inputs(self.scope, self.regularizer, fs, ft,
                                                             source_logits, target_logits)
        raw = self.regularizer(fs, ft, source_logits, target_logits)
        return w * raw, raw

    def extra_repr(self) -> str:
        sched = self.schedule if isinstance(self.schedule, str) else getattr(self.schedule, "__name__", "callable")
        return f"name={self.name!r}, weight={self.weight}, schedule={sched!r}, warmup={self.warmup}, start={self.start}"


class Alignment(nn.Module):
    """A weighted sum of regularizers: ``sum_k lambda_k(p) * D_k``.

    ``terms`` is an iterable of :class:`Term` (a bare :class:`Regularizer` or
    name becomes ``Term(it)`` with weight 1). Term names must be unique (pass
    ``Term(..., name=...)`` to use one method twice).

    ``forward(fs, ft, ls=None, lt=None, progress=0.0)`` returns
    ``(total_loss, {name: raw_loss_float})``; a term whose weight is 0 at this
    progress (before ``start``) is not computed and is absent from the dict.
    ``total_loss`` is a 0-dim tensor (zero when no term is on).
    """

    def __init__(self, terms: Iterable[Term | Regularizer | str]) -> None:
        super().__init__()
        if isinstance(terms, (Term, Regularizer, str)):
            terms = [terms]
        built = [t if isinstance(t, Term) else Term(t) for t in terms]
        if not built:
            raise ValueError("Alignment needs at least one term")
        names = [t.name for t in built]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate term name(s) {dup}; give each Term a distinct name=")
        self.terms = nn.ModuleList(built)

    @property
    def needs_logits(self) -> bool:
        return any(getattr(t.regularizer, "needs_logits", False) for t in self.terms)

    @property
    def has_parameters(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def set_progress(self, p: float) -> None:
        for t in self.terms:
            t.regularizer.set_progress(p)

    def weights(self, progress: float) -> dict[str, float]:
        """{term name: effective weight at this progress}."""
        return {t.name: t.weight_at(progress) for t in self.terms}

    def forward(self, fs, ft, ls=None, lt=None, progress: float = 0.0):
        total = None
        values: dict[str, float] = {}
        for t in self.terms:
            weighted, raw = t(fs, ft, ls, lt, progress=progress)
            if weighted is None:
                continue
            values[t.name] = float(raw.detach())
            total = weighted if total is None else total + weighted
        if total is None:
            ref = fs if isinstance(fs, torch.Tensor) else None
            total = torch.zeros((), device=ref.device if ref is not None else None,
                                dtype=torch.float32)
        return total, values
