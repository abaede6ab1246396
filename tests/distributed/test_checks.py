"""Single-process tests of scopes (peftadapt.align.scope), communication no-ops (peftadapt.core.comm)
and the trainer's pre-flight checks (peftadapt.train.preflight)."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from peftadapt.align import CDAN, CORAL, DANN, MMD, Entropy, Term
from peftadapt.align import scope as S
from peftadapt.core import comm as C
from peftadapt.train import TrainConfig
from peftadapt.train import preflight as D


def test_gather_is_the_identity_in_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    assert C.gather(x) is x
    fs, ft, ls, _lt = S.gather_inputs("global", MMD(), x, x, None, None)
    assert fs is x and ft is x and ls is None
    assert not C.is_distributed() and C.world_size() == 1 and C.rank() == 0


def test_default_scope_follows_the_math():
    assert S.default_scope(MMD()) == "global" and S.default_scope(CORAL()) == "global"
    assert S.default_scope(DANN(4)) == "local"
    assert S.default_scope(CDAN(4, 2)) == "local"
    assert S.default_scope(CDAN(4, 2, entropy=True)) == "global"  # per-domain weight normalisation
    assert S.default_scope(Entropy()) == "local"
    assert S.default_scope(Entropy(diversity=True)) == "global"  # entropy of the mean prediction

    class PerSample(MMD):
        batch_statistic = False

    assert S.default_scope(PerSample()) == "local"
    assert S.resolve_scope("global", DANN(4)) == "global" and S.resolve_scope("auto", DANN(4)) == "local"


def test_bad_scope_names_the_choices():
    with pytest.raises(
        ValueError, match=r"unknown alignment scope 'everywhere'; valid scopes: \['auto', 'local', 'global'\]"
    ):
        Term(MMD(), scope="everywhere")
    with pytest.raises(ValueError, match=r"training.align_scope: 'both' is not allowed; allowed values"):
        TrainConfig(align_scope="both")
    with pytest.raises(ValueError, match=r"training.global_batch_size: must be a positive integer"):
        TrainConfig(global_batch_size=0)


def test_per_process_batch():
    assert D.per_process_batch(16, 4) == 4
    with pytest.raises(
        ValueError,
        match=r"global_batch_size=10 cannot be split evenly over 4 processes; use a "
        r"multiple of 4 \(e.g. 8 or 12\)",
    ):
        D.per_process_batch(10, 4)
    assert D.batch_sizes(TrainConfig(per_device_train_batch_size=5), 3) == (5, 5)
    assert D.batch_sizes(TrainConfig(global_batch_size=12, per_device_target_batch_size=2), 3) == (4, 2)


def test_shard_sizes_counts_the_last_batch_of_an_epoch():
    assert D.shard_sizes(40, 4, 2) == (8, 4)
    assert D.shard_sizes(42, 4, 2) == (2, 1)  # 42 = 5 * 8 + 2: one example per process
    assert D.shard_sizes(41, 4, 2) == (1, 1)  # rank 1's slice is empty: it reuses one example
    assert D.shard_sizes(3, 8, 1) == (3, 3)  # fewer examples than one batch


def test_min_batch_check_per_scope():
    local, glob = Term(MMD(), scope="local"), Term(CORAL(), scope="global")
    ok = dict(world=2, batch_size=4, target_batch_size=4)
    D.check_min_batch([local, glob], source=(8, 4), target=(8, 4), **ok)
    # 42 source examples: the last step gives each process 1, the global batch 2
    with pytest.raises(
        ValueError,
        match=r"'mmd' \(MMD, scope 'local'\) needs at least 2 source samples per "
        r"process.*only 1.*Use scope='global'",
    ):
        D.check_min_batch([local], source=D.shard_sizes(42, 4, 2), target=(8, 4), **ok)
    D.check_min_batch([glob], source=D.shard_sizes(42, 4, 2), target=(8, 4), **ok)
    with pytest.raises(
        ValueError,
        match=r"'coral' \(CORAL, scope 'global'\) needs at least 2 target samples in "
        r"the global batch",
    ):
        D.check_min_batch([glob], source=(8, 4), target=D.shard_sizes(41, 4, 2), **ok)
    # DANN works on one sample; one process is always "local" (nothing to gather)
    D.check_min_batch([Term(DANN(4))], source=(1, 1), target=(1, 1), **ok)
    with pytest.raises(ValueError, match=r"needs at least 2 source samples per batch"):
        D.check_min_batch(
            [Term(MMD(), scope="global")], source=(1, 1), target=(4, 4), world=1, batch_size=4, target_batch_size=4
        )


def test_fingerprint_names_each_field():
    a = D.config_fingerprint(training=TrainConfig(learning_rate=0.1), task="classification")
    b = D.config_fingerprint(training=TrainConfig(learning_rate=0.2), task="classification")
    assert a.keys() == b.keys() and "training.learning_rate" in a and "task" in a
    assert [k for k in a if a[k] != b[k]] == ["training.learning_rate"]
    D.check_same_config(a)  # one process: nothing to compare, no collective


def test_launched_processes_that_accelerate_does_not_see_are_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"2 processes were launched .* but Accelerate runs 1.*--cpu"):
        D.check_launch(1)
    D.check_launch(2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    D.check_launch(1)


def test_trainer_checks_before_the_first_step(minilm_tokenizer, tmp_path):
    from peftadapt.train import Trainer

    from ..train.conftest import text_data, tiny_classifier

    def trainer(**kw):
        return Trainer(
            tiny_classifier(dropout=0.0),
            minilm_tokenizer,
            text_data(9, 0),
            target=text_data(12, 1, labeled=False),
            regularizers=[Term(MMD(), weight=0.5)],
            output_dir=str(tmp_path),
            disable_tqdm=True,
            plot=False,
            max_length=12,
            **{"max_steps": 3, **kw},
        )

    # 9 = 2 * 4 + 1: the third batch of an epoch holds one source example, too few for MMD
    with pytest.raises(
        ValueError,
        match=r"'mmd' \(MMD\) needs at least 2 source samples per batch, but with "
        r"source batch size 4 per process on 1 process\(es\) some step gives it only 1",
    ):
        trainer(per_device_train_batch_size=4).train()
    assert not list(tmp_path.glob("checkpoint-*"))
    tr = trainer(per_device_train_batch_size=3, align_scope="local", max_steps=1)  # 9 = 3 * 3
    tr.train()
    assert tr.alignment.terms[0].scope == "local"  # the run-wide scope fills in terms left on "auto"
    # a global batch size needs no processes to divide when there is one
    assert D.batch_sizes(tr.config, 1) == (3, 3)


def test_data_digest_sees_tokens_rows_and_labels():
    base = D.digest_rows([[1, 2, 3], [4]], [0, 1])
    assert base == D.digest_rows([[1, 2, 3], [4]], [0, 1])
    assert base != D.digest_rows([[1, 2], [3, 4]], [0, 1])  # same tokens, other row split
    assert base != D.digest_rows([[1, 2, 3], [5]], [0, 1])
    assert base != D.digest_rows([[1, 2, 3], [4]], [1, 1])
    assert base != D.digest_rows([[1, 2, 3], [4]])


def test_fsdp_and_deepspeed_runs_warn_that_they_are_untested():
    from types import SimpleNamespace as NS

    trainer = NS(
        config=TrainConfig(),
        alignment=None,
        task="classification",
        max_length=8,
        feature_layer=None,
        pooling="mean",
        model=torch.nn.Linear(2, 2),
    )
    src = NS(ids=[[1, 2]] * 4, labels=[0, 1, 0, 1], batch_size=2)
    for kind in ("FSDP", "DEEPSPEED"):
        acc = NS(num_processes=1, distributed_type=f"DistributedType.{kind}", is_main_process=True, device="cpu")
        with pytest.warns(UserWarning, match=rf"Trainer under {kind} has not been run on GPUs"):
            D.preflight(trainer, acc, src, None)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        D.preflight(
            trainer,
            NS(num_processes=1, distributed_type="DistributedType.NO", is_main_process=True, device="cpu"),
            src,
            None,
        )


def test_deepspeed_with_a_discriminator_fails_early_naming_the_term_and_the_alternatives():
    from types import SimpleNamespace as NS

    from peftadapt.align import Alignment

    align = Alignment([Term(MMD(), name="mmd"), Term(DANN(4), name="dann")])
    with pytest.raises(
        ValueError,
        match=r"alignment term\(s\) \['dann'\] have a trainable discriminator, which "
        r"DeepSpeed cannot train.*DDP or FSDP.*mmd, coral, entropy",
    ):
        D.check_backend("DistributedType.DEEPSPEED", align)
    # through the Trainer's pre-flight (what a DeepSpeed launch reaches before the first step)
    trainer = NS(
        config=TrainConfig(),
        alignment=align,
        task="classification",
        max_length=8,
        feature_layer=None,
        pooling="mean",
        model=torch.nn.Linear(2, 2),
    )
    src = NS(ids=[[1, 2]] * 4, labels=[0, 1, 0, 1], batch_size=2)
    acc = NS(num_processes=1, distributed_type="DistributedType.DEEPSPEED", is_main_process=True, device="cpu")
    with pytest.raises(ValueError, match=r"\['dann'\] have a trainable discriminator"):
        D.preflight(trainer, acc, src, src)
    # discriminator-free terms, or DDP / FSDP with a discriminator: no error
    D.check_backend("DistributedType.DEEPSPEED", Alignment([Term(MMD()), Term(Entropy())]))
    D.check_backend("DistributedType.FSDP", align)
    D.check_backend("DistributedType.MULTI_GPU", align)
    D.check_backend("DistributedType.DEEPSPEED", None)


def test_average_gradients_is_a_no_op_in_one_process():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    q = torch.nn.Parameter(torch.ones(2))
    C.average_gradients([p, q])
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and q.grad is None


@pytest.mark.parametrize("main", [True, False])
def test_cli_train_prints_its_summary_on_the_main_process_only(monkeypatch, capsys, main):
    """Under `accelerate launch` every process runs `peftadapt train`: one JSON summary, not N."""
    import json
    from types import SimpleNamespace as NS

    from peftadapt import cli

    class FakeTrainer:
        accelerator = NS(is_main_process=main)
        summary: ClassVar[dict] = {"step": 3, "final_metrics": {}}

        def train(self, resume=False):
            return {"eval/accuracy": 0.5}

    monkeypatch.setattr(cli, "load_run_config", lambda *a, **k: NS(training=NS(output_dir="out")))
    monkeypatch.setattr(cli, "build_trainer", lambda run: FakeTrainer())
    assert cli._train(NS(config="run.yaml", set=[], output_dir=None, resume=False)) == 0
    out = capsys.readouterr().out
    if main:
        assert json.loads(out) == {"output_dir": "out", "final_metrics": {"eval/accuracy": 0.5}, "step": 3}
    else:
        assert out == ""
