import math

import pytest
import torch

import peftadapt
from peftadapt import align
from peftadapt.align import CORAL, DANN, MMD, Alignment, Regularizer, Term, build, register, schedule_weight


def test_registry_names_and_errors():
    assert {"mmd", "coral", "dann", "cdan", "cdan+e", "entropy"} <= set(align.regularizer_names())
    with pytest.raises(ValueError, match=r"unknown regularizer 'kmm'; valid names: \[.*'coral'.*'mmd'"):
        build("kmm")
    assert isinstance(build("  CORAL "), CORAL)
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) \['width'\] for regularizer 'dann'; valid options: \[.*'in_features'"
    ):
        build("dann", width=3)
    assert build("mmd").needs_logits is False and build("entropy").needs_logits is True
    assert peftadapt.MMD is MMD and peftadapt.register_regularizer is register


def test_register_own_class_and_function():
    try:

        @register("test_mean_l2")
        class MeanL2(Regularizer):
            def forward(self, source_features, target_features, source_logits=None, target_logits=None):
                fs, ft = self.check_features(source_features, target_features)
                return (fs.mean(0) - ft.mean(0)).pow(2).sum()

        reg = build("test_mean_l2")
        assert reg.name == "test_mean_l2"
        assert reg(torch.zeros(3, 2), torch.ones(4, 2)).item() == pytest.approx(2.0)
        with pytest.raises(ValueError, match="width 2 but target features have width 3"):
            reg(torch.zeros(3, 2), torch.ones(4, 3))

        @register("test_first_dim", needs_logits=False)
        def first_dim(fs, ft, source_logits=None, target_logits=None):
            return (fs[:, 0].mean() - ft[:, 0].mean()).abs()

        f = build("test_first_dim")
        assert isinstance(f, Regularizer) and f.name == "test_first_dim"
        assert f(torch.zeros(2, 2), torch.full((2, 2), 3.0)).item() == 3.0
        with pytest.raises(ValueError, match="already registered"):
            register("test_first_dim", first_dim)
        with pytest.raises(TypeError, match="must subclass"):
            register("test_bad", torch.nn.Linear)
        # the custom term drops into Alignment like the built-in ones
        total, vals = Alignment([Term("test_mean_l2", weight=2.0)])(torch.zeros(3, 2), torch.ones(3, 2))
        assert total.item() == pytest.approx(4.0) and vals == {"test_mean_l2": pytest.approx(2.0)}
    finally:
        align.REGULARIZERS.pop("test_mean_l2", None)
        align.REGULARIZERS.pop("test_first_dim", None)


def test_schedules():
    assert schedule_weight("constant", 0.0) == 1.0
    assert schedule_weight("constant", 0.3, start=0.5) == 0.0
    assert schedule_weight("linear", 0.25, warmup=0.5) == pytest.approx(0.5)
    assert schedule_weight("linear", 0.9, warmup=0.5) == 1.0
    # linear without warmup ramps from start to the end of training
    assert schedule_weight("linear", 0.75, start=0.5) == pytest.approx(0.5)
    assert schedule_weight("linear", 0.6, warmup=0.2, start=0.5) == pytest.approx(0.5)
    for p in (0.0, 0.2, 0.7, 1.0):
        assert schedule_weight("dann", p) == pytest.approx(2 / (1 + math.exp(-10 * p)) - 1)
    assert schedule_weight("dann", 0.75, start=0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert schedule_weight(lambda p: p * p, 0.5) == 0.25
    with pytest.raises(ValueError, match=r"valid schedules: \['constant', 'linear', 'dann'\]"):
        schedule_weight("cosine", 0.5)
    with pytest.raises(ValueError, match=r"progress must be in \[0, 1\]"):
        schedule_weight("constant", -0.1)


def test_term_validation():
    t = Term("coral", weight=10.0, schedule="linear", warmup=0.2, start=0.3)
    assert t.weight_at(0.2) == 0.0 and t.weight_at(0.4) == pytest.approx(5.0) and t.weight_at(1.0) == 10.0
    with pytest.raises(ValueError, match="valid schedules"):
        Term("coral", schedule="step")
    with pytest.raises(ValueError, match="weight must be a number"):
        Term("coral", weight=-1)
    with pytest.raises(ValueError, match="warmup has no effect"):
        Term("coral", warmup=0.1)
    with pytest.raises(ValueError, match="start \\+ warmup"):
        Term("coral", schedule="linear", start=0.8, warmup=0.5)
    with pytest.raises(ValueError, match="unknown regularizer"):
        Term("corall")


def test_alignment_sums_weighted_terms_skips_off_terms_and_drives_progress():
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g) * 2 + 1
    dann = DANN(in_features=6, hidden_size=8, dropout=0.0)
    al = Alignment(
        [
            Term(MMD(), weight=0.5),
            Term(CORAL(), weight=100.0, schedule="linear", warmup=0.5),
            Term(dann, weight=1.0, start=0.5),
        ]
    )
    assert al.has_parameters and not al.needs_logits
    assert {id(p) for p in al.parameters()} == {id(p) for p in dann.parameters()}
    total, vals = al(fs, ft, progress=0.25)
    assert set(vals) == {"mmd", "coral"}  # dann is off before start=0.5
    want = 0.5 * MMD()(fs, ft) + 100.0 * 0.5 * CORAL()(fs, ft)
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    assert vals["coral"] == pytest.approx(CORAL()(fs, ft).item(), rel=1e-6)
    total, vals = al(fs, ft, progress=0.8)
    assert set(vals) == {"mmd", "coral", "dann"}
    assert dann.grl.progress == 0.8 and dann.grl.lambda_ == pytest.approx(2 / (1 + math.exp(-8)) - 1)
    assert al.weights(0.8) == {"mmd": 0.5, "coral": 100.0, "dann": 1.0}
    with pytest.raises(ValueError, match="duplicate term name"):
        Alignment([Term("mmd"), Term("mmd")])
    Alignment([Term("mmd"), Term(MMD(estimator="linear"), name="mmd_linear")])
    with pytest.raises(ValueError, match="needs source_logits"):
        Alignment([Term(build("cdan", in_features=6, num_classes=2))])(fs, ft)


def test_alignment_state_dict_roundtrip_and_all_off():
    torch.manual_seed(0)
    a = Alignment([Term(DANN(in_features=4, hidden_size=3), name="d")])
    torch.manual_seed(1)
    b = Alignment([Term(DANN(in_features=4, hidden_size=3), name="d")])
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    fs, ft = torch.randn(3, 4), torch.randn(3, 4)
    assert a(fs, ft)[0].item() == b(fs, ft)[0].item()
    total, vals = Alignment([Term("mmd", start=0.5)])(fs, ft, progress=0.1)
    assert total.item() == 0.0 and vals == {}
