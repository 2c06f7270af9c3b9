"""vLLM's side of ``bench.peers.vs_vllm``: runs in vLLM's own virtual environment, never in the project's,
as a script (``python bench/peers/vllm_worker.py MODEL DTYPE PROMPT MAX_IMAGES``), importing nothing of ours.

Loads one checkpoint in vLLM's pooling runner (last-token pooling, no activation, every cache off)
and answers commands, one JSON object per line on stdin -> one per line on stdout:

    {"images": ["/path/a.png", ...], "per_request": 1, "round": 3}
    -> {"seconds": 1.23, "vectors": [[...], ...]}   one raw (not normalised) vector per request

Every image of every command gets a fresh multi-modal uuid, so vLLM's encoder cache can never
serve an image twice (a uuid seen before is trusted to mean the same image).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid

# Loopback only, and both cores for the model (vLLM reserves one by default).
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
os.environ.setdefault("VLLM_LOOPBACK_IP", "127.0.0.1")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def main() -> None:
    from PIL import Image
    from transformers import AutoProcessor
    from vllm import LLM
    from vllm.config import PoolerConfig

    model, dtype, prompt, max_images = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    processor = AutoProcessor.from_pretrained(model)
    llm = LLM(
        model=model,
        runner="pooling",
        convert="embed",
        dtype=dtype,
        pooler_config=PoolerConfig(task="embed", seq_pooling_type="LAST", use_activation=False),
        enable_prefix_caching=False,
        mm_processor_cache_gb=0,
        limit_mm_per_prompt={"image": max_images, "video": 0},
        # On the CPU this is the share of host memory reserved for the KV cache: a pooling model
        # on short prompts needs little, and the machine runs our server beside it.
        gpu_memory_utilization=float(os.environ.get("VLLM_BENCH_MEMORY_SHARE", "0.15")),
    )

    def chat_text(count: int) -> str:
        content = [{"type": "image"} for _ in range(count)] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": content}]
        return str(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        per, paths, tag = command["per_request"], command["images"], command["round"]
        started = time.perf_counter()  # decoding is timed: our server decodes inside its timing too
        pictures = [Image.open(path).convert("RGB") for path in paths]
        requests = [
            {
                "prompt": chat_text(per),
                "multi_modal_data": {"image": pictures[i : i + per] if per > 1 else pictures[i]},
                # Fresh for every image of every command: a reused uuid is served from the cache.
                "multi_modal_uuids": {"image": [f"r{tag}-{uuid.uuid4().hex}" for _ in range(per)]},
            }
            for i in range(0, len(pictures), per)
        ]
        outputs = llm.embed(requests, use_tqdm=False)
        seconds = time.perf_counter() - started
        vectors = [list(map(float, output.outputs.embedding)) for output in outputs]
        print(json.dumps({"seconds": seconds, "vectors": vectors}), flush=True)


if __name__ == "__main__":
    main()
