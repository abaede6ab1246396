"""DomainAdaptation with several source domains: pooled and per-source terms equal their formulas."""

import copy

import pytest
import torch

from peftadapt.align import CDAN, MMD, DomainAdaptation, Term, source_domains

from ..conftest import token_batch
from .test_step import LAYER, _masked_mean, _model


def _domains():
    a = {**token_batch(seed=0, batch=4), "labels": torch.tensor([0, 1, 1, 0])}
    b = {**token_batch(seed=2, batch=3, length=7, pad_last=2), "labels": torch.tensor([1, 1, 0])}
    tgt = token_batch(seed=1, batch=5, pad_last=4)
    return {"books": a, "dvd": b}, tgt


def _by_hand(ref, domains, tgt):
    outs = {d: ref(**b, output_hidden_states=True) for d, b in domains.items()}
    fs = {d: _masked_mean(o.hidden_states[-1], domains[d]["attention_mask"]) for d, o in outs.items()}
    out_t = ref(**tgt, output_hidden_states=True)
    ft = _masked_mean(out_t.hidden_states[-1], tgt["attention_mask"])
    task = (outs["books"].loss + outs["dvd"].loss) / 2
    return outs, fs, out_t, ft, task


@pytest.mark.parametrize("sources", ["pooled", "per_source"])
def test_multi_source_loss_equals_the_formula(sources):
    model, (domains, tgt) = _model(), _domains()
    ref = copy.deepcopy(model)
    w = 0.3
    with DomainAdaptation(model, [Term(MMD(), weight=w)], layer=LAYER, sources=sources) as da:
        loss, logs = da.loss(domains, tgt, progress=0.5)
    outs, fs, _, ft, task = _by_hand(ref, domains, tgt)
    if sources == "pooled":
        reg = MMD()(torch.cat([fs["books"], fs["dvd"]]), ft)
    else:
        per = {d: MMD()(f, ft) for d, f in fs.items()}
        reg = (per["books"] + per["dvd"]) / 2
        for d in per:
            torch.testing.assert_close(logs[f"reg/mmd/{d}"], per[d].detach())
    torch.testing.assert_close(loss, task + w * reg)
    torch.testing.assert_close(logs["task_loss/dvd"], outs["dvd"].loss.detach())
    torch.testing.assert_close(logs["reg/mmd"], reg.detach())
    assert ("reg/mmd/books" in logs) == (sources == "per_source")


def test_per_source_logit_terms_get_each_domains_logits():
    model, (domains, tgt) = _model(), _domains()
    ref = copy.deepcopy(model)
    cdan = CDAN(in_features=32, num_classes=2).eval()  # no discriminator dropout: a function of its inputs
    with DomainAdaptation(model, [Term(cdan, weight=1.0)], layer=LAYER, sources="per_source") as da:
        _, logs = da.loss(domains, tgt, progress=0.5)
    outs, fs, out_t, ft, _ = _by_hand(ref, domains, tgt)
    for d in domains:
        want = cdan(fs[d], ft, outs[d].logits, out_t.logits)
        torch.testing.assert_close(logs[f"reg/cdan/{d}"], want.detach())


def test_one_domain_equals_one_batch_and_works_through_a_wrapper():
    model, (domains, tgt) = _model(), _domains()

    class Wrapper(torch.nn.Module):  # what Accelerate / DDP hand the step: a module around the tapped model
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            return self.inner(**kw)

    with DomainAdaptation(model, [Term(MMD(), weight=0.5)], layer=LAYER, sources="per_source") as da:
        one, _ = da.loss(domains["books"], tgt, progress=0.5)
        named, logs = da.loss({"books": domains["books"]}, tgt, progress=0.5, model=Wrapper(model))
    torch.testing.assert_close(one, named)
    assert "reg/mmd/books" in logs


def test_off_terms_skip_the_target_and_average_the_task():
    model, (domains, _) = _model(), _domains()
    ref = copy.deepcopy(model)
    with DomainAdaptation(model, [Term(MMD(), weight=0.5, start=0.5)], layer=LAYER) as da:
        loss, logs = da.loss(domains, None, progress=0.1)
    want = (ref(**domains["books"]).loss + ref(**domains["dvd"]).loss) / 2
    torch.testing.assert_close(loss, want)
    assert float(logs["reg_loss"]) == 0.0


def test_clear_errors():
    model, (domains, tgt) = _model(), _domains()
    with pytest.raises(ValueError, match="mixes domain batches"):
        source_domains({"books": domains["books"], "input_ids": domains["dvd"]["input_ids"]})
    with pytest.raises(ValueError, match="sources='both' is not a choice"):
        DomainAdaptation(model, "mmd", layer=LAYER, sources="both")  # type: ignore[arg-type]
    unlabeled = {k: v for k, v in domains["dvd"].items() if k != "labels"}
    with (
        DomainAdaptation(model, "mmd", layer=LAYER) as da,
        pytest.raises(ValueError, match="source domain 'dvd' returned no loss"),
    ):
        da.loss({"books": domains["books"], "dvd": unlabeled}, tgt, progress=0.5)
