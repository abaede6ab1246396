"""Issue 18, property: ANY run file given to ``load_run_config`` gives a valid config or one clear
error (a ValueError / TypeError whose message is one line), never another exception.

The run files are random nested mappings: sections and keys drawn from the schema
(``peftadapt config --schema``), the methods' and regularizers' own option names, and junk;
values of random types (None, bools, ints, floats with nan / inf, numeric and other strings,
lists, mappings), nested a few levels. ``--set`` overrides are drawn the same way.
"""

from __future__ import annotations

import dataclasses

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from peftadapt.align.registry import REGULARIZERS, init_params  # noqa: E402
from peftadapt.methods.base import METHODS, method_names  # noqa: E402
from peftadapt.train.schema import SECTIONS, RunConfig, load_run_config, schema  # noqa: E402

SCHEMA = schema()
KEYS = sorted(
    {r["key"].removeprefix("<spec>.") for rows in SCHEMA.values() for r in rows}
    | {f.name for cls in METHODS.values() for f in dataclasses.fields(cls)}
    | {p for cls, *_ in REGULARIZERS.values() for p in init_params(cls)}
)
NAMES = method_names() + sorted(REGULARIZERS) + ["classification", "causal_lm", "csv", "jsonl", "mean", "linear"]
JUNK = ["", "lr", "lerning_rate", "0", "__class__", "model.path", "x" * 40, "ü", " learning_rate"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["1e-3", "5", "-1", "nan", "inf", "abc", "", "true", "null", "/no/such/path", "a.csv"]),
    st.sampled_from(NAMES),
    st.text(max_size=8),
)
keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(SECTIONS), st.sampled_from(JUNK), st.integers(-2, 3))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)
sections = st.dictionaries(st.sampled_from(KEYS + JUNK), values, max_size=5)
# a section is usually a mapping of schema keys; sometimes any value at all
section_values = st.one_of(sections, sections, values)
run_files = st.dictionaries(st.sampled_from(SECTIONS + JUNK[:3]), section_values, max_size=6)
# near-valid files: the required sections there, one random change deeper down
near_valid = st.builds(
    lambda model, data, rest: {"model": model, "data": data, **rest},
    st.fixed_dictionaries(
        {"path": st.one_of(st.just("/m"), scalars)},
        optional=dict.fromkeys(("task", "num_labels", "quantize", "dtype", "quant_storage"), values),
    ),
    st.fixed_dictionaries(
        {"source": st.one_of(st.just("s.csv"), sections, values)},
        optional=dict.fromkeys(("target", "eval", "labels", "max_length", "balance"), values),
    ),
    st.dictionaries(st.sampled_from(["method", "regularizers", "features", "training"]), section_values, max_size=3),
)
overrides = st.lists(
    st.builds(
        lambda path, value: f"{path}={value}",
        st.sampled_from([f"{s}.{k}" for s in SECTIONS for k in KEYS[:40]] + ["training", "x.y.z", "regularizers.0.w"]),
        st.sampled_from(["1", "1e-3", "abc", "[1, 2]", "{a: 1}", "null", ":", "'", "[", "true"]),
    ),
    max_size=2,
)


def _check(raw, sets=()) -> None:
    try:
        run = load_run_config(raw, sets)
    except (ValueError, TypeError) as e:
        message = str(e)
        assert message.strip(), f"{type(e).__name__} with no message for {raw!r}"
        assert "\n" not in message, f"a multi-line message for {raw!r}:\n{message}"
        return
    assert isinstance(run, RunConfig)
    assert load_run_config(run.to_dict()).to_dict() == run.to_dict()  # a valid config loads back equal


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(run_files)
def test_random_run_files_load_or_fail_in_one_line(raw):
    _check(raw)


@FAST
@given(near_valid, overrides)
def test_near_valid_run_files_and_overrides_load_or_fail_in_one_line(raw, sets):
    _check(raw, sets)


def test_the_strategies_reach_valid_configs_too():
    """Not all errors: the property would hold vacuously if no drawn file were valid."""
    valid = {"model": {"path": "/m"}, "data": {"source": {"path": "s.csv", "label": "y"}}}
    _check(valid)
    assert load_run_config(valid).model.path == "/m"
