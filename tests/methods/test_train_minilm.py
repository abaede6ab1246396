"""Each peft-backed method trains the real pretrained MiniLM: the loss falls and
only the parameters that should change, change."""

from __future__ import annotations

import pytest
import torch

import peftadapt

TEXTS = [
    "a wonderful, moving book that I could not put down",
    "great blender, sturdy and easy to clean",
    "the best purchase I made this year, highly recommended",
    "excellent sound and the battery lasts for days",
    "a dull, badly written story; I gave up halfway",
    "broke after two uses and the seller never answered",
    "terrible quality, the lid cracked in a week",
    "boring and far too long, a waste of money",
]
LABELS = [1, 1, 1, 1, 0, 0, 0, 0]


@pytest.fixture(scope="module")
def batch(minilm_tokenizer):
    enc = minilm_tokenizer(TEXTS, padding=True, return_tensors="pt")
    return dict(enc, labels=torch.tensor(LABELS))


@pytest.mark.parametrize(
    "method,options",
    [
        ("lora", {"r": 4}),
        ("dora", {"r": 4}),
        ("rslora", {"r": 4, "target_modules": "all-linear"}),
        ("prefix", {"num_virtual_tokens": 4}),
    ],
)
def test_method_trains_minilm_and_touches_only_its_parameters(minilm_classifier, batch, method, options):
    torch.manual_seed(0)
    model = peftadapt.wrap(minilm_classifier(), method, **options)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = model(**batch).loss.item()
    assert final < losses[0] - 0.05, (losses, final)
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        if n in trainable:
            assert changed, f"trainable {n} did not change"
        else:
            assert not changed, f"frozen {n} changed"
    # what trains: the method's own parameters plus the classifier head
    own = {"lora": "lora_", "dora": "lora_", "rslora": "lora_", "prefix": "prompt_encoder"}[method]
    assert all(own in n or "classifier" in n for n in trainable)
    assert any("classifier" in n for n in trainable)
