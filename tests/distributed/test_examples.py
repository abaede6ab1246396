"""The Accelerate config examples parse with Accelerate's own loader and say what their names say."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "accelerate"


@pytest.mark.parametrize(
    "name, kind, extra",
    [
        ("ddp.yaml", "MULTI_GPU", {"num_machines": 1}),
        ("multi_node.yaml", "MULTI_GPU", {"num_machines": 2, "main_process_port": 29500}),
        ("fsdp_lora.yaml", "FSDP", {"fsdp_version": 2}),
        (
            "fsdp_qlora.yaml",
            "FSDP",
            {"fsdp_version": 1, "fsdp_use_orig_params": False, "fsdp_cpu_ram_efficient_loading": True},
        ),
        ("deepspeed_zero3.yaml", "DEEPSPEED", {"zero_stage": 3}),
    ],
)
def test_accelerate_configs_load(name, kind, extra):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(EXAMPLES / name))
    assert str(cfg.distributed_type).endswith(kind)
    flat = {**cfg.to_dict(), **(cfg.fsdp_config or {}), **(cfg.deepspeed_config or {})}
    for k, v in extra.items():
        assert flat[k] == v, k
