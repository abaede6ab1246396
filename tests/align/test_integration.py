"""All regularizers together on a peft LoRA model, through FeatureTap, under bf16 autocast."""

import torch

from peftadapt import FeatureTap
from peftadapt.align import Alignment, Term, build

from ..conftest import make_tiny, token_batch


def test_alignment_on_lora_model_under_bf16_autocast_reaches_adapter_and_discriminators():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        make_tiny("bert", "seqcls"), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    )
    model.train()
    torch.manual_seed(0)
    align = Alignment(
        [
            Term("mmd", weight=1.0),
            Term("coral", weight=100.0, schedule="linear", warmup=0.5),
            Term(build("dann", in_features=32, hidden_size=16), weight=1.0),
            Term(build("cdan+e", in_features=32, num_classes=2, hidden_size=16), weight=1.0),
            Term(build("entropy", diversity=True), weight=0.1),
        ]
    )
    src = token_batch(seed=0, batch=4)
    tgt = token_batch(seed=1, batch=4, pad_last=0)
    tap = FeatureTap(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_s = model(**src)
        fs = tap.pooled()
        out_t = model(**tgt)
        ft = tap.pooled()
        total, values = align(fs, ft, out_s.logits, out_t.logits, progress=0.25)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert set(values) == {"mmd", "coral", "dann", "cdan+e", "entropy"}
    assert all(torch.isfinite(torch.tensor(v)) for v in values.values())
    total.backward()
    lora = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    disc = [p for n, p in align.named_parameters() if "discriminator" in n]
    assert disc and all(p.grad is not None for p in disc)
    tap.remove()
