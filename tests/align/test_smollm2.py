"""The causal-LM alignment pieces on the real SmolLM2-135M-Instruct (Llama, 30 blocks, ChatML):
layer by index on the LoRA-wrapped model, last / mean pooling and class logits of chat prompts left
and right padded equal to each prompt alone, target_lm equal to the unpadded next-token loss.

Skipped where the converted model folder is absent (CI): set SMOLLM2_DIR, or convert it once with
examples/convert_smollm2.py (no Hub download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import peftadapt
from peftadapt import FeatureTap
from peftadapt.align import DomainAdaptation, Term, class_logits, class_token_ids

REPO = Path(__file__).resolve().parents[2]
CANDIDATES = [os.environ.get("SMOLLM2_DIR", ""), "/work/models/smollm2-135m", str(REPO / "examples/data/smollm2-135m")]
MODEL_DIR = next((p for p in CANDIDATES if p and (Path(p) / "config.json").is_file()), None)
pytestmark = pytest.mark.skipif(MODEL_DIR is None, reason="SmolLM2-135M folder not found (SMOLLM2_DIR)")

REVIEWS = ["Great pan, heats evenly and cleans up in seconds.", "Broke after two days.", "It is fine I guess."]


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    model = peftadapt.wrap(base, "lora", r=8, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    with torch.no_grad():  # LoRA B starts at 0: move it so the adapter is in the path
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"Is this review positive or negative?\n\n{r}"}],
            tokenize=True,
            add_generation_prompt=True,
        )
        for r in REVIEWS
    ]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    return model.eval(), tok, prompts


def _pad(rows, side, pad):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


def test_layer_index_names_and_range(smol):
    model, _, _ = smol
    for index, block in ((-1, 29), (0, 0), (15, 15), (-30, 0)):
        with FeatureTap(model, layer=index) as tap:
            assert tap.layer_name == f"base_model.model.model.layers.{block}"
    with FeatureTap(model, layer="model.layers.29") as a, FeatureTap(model, layer=-1) as b:
        assert a.module is b.module
    with pytest.raises(ValueError, match=r"layer=30 is out of range.*30 blocks.*-30\.\.29"):
        FeatureTap(model, layer=30)


@pytest.mark.parametrize("layer", [None, -1, 15])
def test_pooling_and_class_logits_left_and_right_equal_each_prompt_alone(smol, layer):
    model, tok, prompts = smol
    ids = class_token_ids(tok, ["positive", "negative"])
    assert len(set(ids)) == 2
    for pooling in ("last", "mean"):
        with FeatureTap(model, layer=layer, pooling=pooling) as tap, torch.no_grad():
            alone, logits_alone = [], []
            for p in prompts:
                out = model(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long))
                alone.append(tap.pooled()[0])
                logits_alone.append(out.logits[0, -1, ids])
            want, want_logits = torch.stack(alone), torch.stack(logits_alone)
            for side in ("right", "left"):
                x, mask = _pad(prompts, side, tok.pad_token_id)
                out = model(input_ids=x, attention_mask=mask)
                got = tap.pooled()
                scale = want.abs().max()
                assert (got - want).abs().max() <= 1e-4 * scale, (pooling, side, float((got - want).abs().max()))
                g = class_logits(out.logits, ids, mask)
                assert torch.allclose(g, want_logits, atol=1e-3), (side, (g - want_logits).abs().max())


def test_target_lm_equals_the_unpadded_next_token_loss(smol):
    model, tok, prompts = smol
    with torch.no_grad():
        total, count = 0.0, 0
        for p in prompts:
            logits = model(input_ids=torch.tensor([p])).logits[0]
            total += float(F.cross_entropy(logits[:-1], torch.tensor(p[1:]), reduction="sum"))
            count += len(p) - 1
    want = total / count
    for side in ("right", "left"):
        x, mask = _pad(prompts, side, tok.pad_token_id)
        src = {"input_ids": x, "attention_mask": mask, "labels": x.masked_fill(mask == 0, -100)}
        with DomainAdaptation(model, [Term("target_lm")], layer=-1, pooling="last") as da, torch.no_grad():
            _, logs = da.loss(src, {"input_ids": x, "attention_mask": mask}, 0.0)
        assert float(logs["reg/target_lm"]) == pytest.approx(want, abs=1e-3), side
