"""How much a rerun saves: read + tokenize a chat JSONL twice, each time in a new process,
through peftadapt's datasets path (`load_dataset_spec` + `encode_sft`), with a fresh cache.

    python examples/make_chat_data.py --out /tmp/chat --train 1600
    python benchmarks/sft_data_cache.py /tmp/chat/train.jsonl examples/data/smollm2-135m
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import sys, time
from transformers import AutoTokenizer
from peftadapt.train.data import load_dataset_spec
from peftadapt.train.sft import encode_sft
tok = AutoTokenizer.from_pretrained(sys.argv[2])
t = time.perf_counter()
enc = encode_sft(load_dataset_spec(sys.argv[1]), tok, max_length=int(sys.argv[3]))
print(len(enc), sum(map(len, enc.input_ids)), time.perf_counter() - t)
"""


def main(path: str, tokenizer: str, max_length: int = 256) -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, HF_DATASETS_CACHE=cache)
        for run in ("first run", "rerun"):
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", CHILD, path, tokenizer, str(max_length)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()
            rows, tokens, secs = int(out[0]), int(out[1]), float(out[2])
            print(
                f"{run}: {rows} rows, {tokens} tokens, load + tokenize {secs:.2f} s "
                f"(process {time.perf_counter() - t0:.1f} s)"
            )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:4]))
