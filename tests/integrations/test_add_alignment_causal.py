"""add_alignment on a causal chat LM (transformers' Trainer): target_lm logs the model's own next-token
loss on the target batch, and entropy reads class logits off the answer tokens (class_tokens), with
the trainer's own collator padding left or right."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import peftadapt
from peftadapt import Term, add_alignment
from peftadapt.align import Entropy, class_token_ids
from peftadapt.integrations import target_indices
from peftadapt.train.sft import SFTEncoder

from ..train.sft_helpers import chat_tokenizer, chats, tiny_llama
from .conftest import hf_args


def _data(tok):
    cols = {"messages": "messages"}
    source = [SFTEncoder(tok, "messages", columns=cols, max_length=64)(r) for r in chats(8)]
    prompts = SFTEncoder(tok, "messages", columns=cols, max_length=64, prompts=True)
    target = [prompts({"messages": r["messages"][:2]})["input_ids"] for r in chats(6)]
    target[1] = target[1][:9] + target[1][-3:]  # a shorter prompt, so padding matters
    return source, target


@pytest.mark.parametrize("side", ["right", "left"])
def test_hf_trainer_target_lm_and_entropy_on_answer_tokens(tmp_path, side):
    import datasets
    import transformers as tf

    tok = chat_tokenizer()
    tok.padding_side = side
    source, target = _data(tok)
    model = peftadapt.wrap(tiny_llama(len(tok)), "lora", r=4, dropout=0.0)
    start = copy.deepcopy(model)
    args = hf_args(str(tmp_path), max_steps=2, logging_steps=1, save_steps=10, per_device_train_batch_size=4)
    trainer = tf.Trainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(
            [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in source]
        ),
        data_collator=tf.DataCollatorForSeq2Seq(tok, padding=True),
        processing_class=tok,
    )
    terms = [Term("target_lm", weight=0.5), Term("entropy", weight=0.2), Term("mmd", weight=0.1)]
    add_alignment(
        trainer,
        target=datasets.Dataset.from_dict({"input_ids": target}),
        regularizers=terms,
        class_tokens=["positive", "negative"],
        layer=-1,
        pooling="last",
        target_batch_size=3,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "reg/target_lm" in h]
    assert len(logs) == 2 and all("reg/entropy" in h and "reg/mmd" in h for h in logs)

    # step 1 ran on the initial weights: its logged values are the hand computation on its target rows
    rows = [target[i] for i in target_indices(len(target), 3, 0, seed=args.seed)]
    ids = class_token_ids(tok, ["positive", "negative"])
    with torch.no_grad():
        ce, n, class_rows = 0.0, 0, []
        for r in rows:
            logits = start(input_ids=torch.tensor([r])).logits[0]
            ce += float(F.cross_entropy(logits[:-1], torch.tensor(r[1:]), reduction="sum"))
            n += len(r) - 1
            class_rows.append(logits[-1, ids])
        entropy = float(Entropy()(target_logits=torch.stack(class_rows)))
    assert logs[0]["reg/target_lm"] == pytest.approx(ce / n, abs=1e-4)
    assert logs[0]["reg/entropy"] == pytest.approx(entropy, abs=1e-4)
