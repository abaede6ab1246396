"""add_alignment on TRL's SFTTrainer with a chat LM: a user-only `messages` target is rendered with the
generation prompt (as peftadapt's own Trainer reads it), and target_lm + entropy on the answer tokens
(class_tokens) train and log."""

from __future__ import annotations

import math

import pytest

import peftadapt
from peftadapt import Term, add_alignment

from ..train.sft_helpers import chat_tokenizer, chats, tiny_llama
from .conftest import hf_options

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def test_sft_trainer_chat_target_gets_the_generation_prompt(tmp_path):
    from trl import SFTConfig, SFTTrainer

    tok = chat_tokenizer()
    rows = chats(8)
    # conversational prompt-completion: TRL puts the loss on the completion (the answer) only
    source = datasets.Dataset.from_list([{"prompt": r["messages"][:2], "completion": r["messages"][2:]} for r in rows])
    opts = hf_options(str(tmp_path), max_length=64, packing=False, bf16=False, max_steps=2, logging_steps=1)
    opts.pop("dataloader_num_workers", None)
    model = peftadapt.wrap(tiny_llama(len(tok)), "lora", r=4, dropout=0.0)
    trainer = SFTTrainer(model=model, args=SFTConfig(**opts), train_dataset=source, processing_class=tok)
    target = datasets.Dataset.from_list([{"messages": r["messages"][:2]} for r in rows])
    terms = [Term("target_lm", weight=0.5), Term("entropy", weight=0.1)]
    add_alignment(trainer, target=target, regularizers=terms, class_tokens=["positive", "negative"], pooling="last")
    examples = trainer.peftadapt_alignment.target.examples
    assert len(examples) == 8
    for ex in examples:
        assert tok.convert_ids_to_tokens(ex["input_ids"][-3:]) == ["<|im_start|>", "assistant", "\n"]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reg/target_lm" in h]
    assert len(logs) == 2
    for h in logs:
        assert math.isfinite(h["reg/target_lm"]) and 0 <= h["reg/entropy"] <= math.log(2) + 1e-6
