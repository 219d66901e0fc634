"""LM pretraining: next-token cross-entropy on a text corpus.

Tiny model on the bundled corpus, CPU (about 2 minutes on 2 cores; loss falls from ~6.2 to ~1.2):
  python -m launch.run --config experiments/pretrain.py --workdir runs/pretrain_tiny

GPT-2 124M on your own corpus, one GPU:
  python -m launch.run --config experiments/pretrain.py:size=small \
      --config.data.train='corpus/*.jsonl' --config.tokenizer.path=tok.model \
      --workdir runs/pretrain_small

Args (after the colon): size (tiny|small|medium|large|xl|1.3b|6b|175b), family (gpt2|llama),
fsdp and tensor (mesh axis sizes; data parallelism fills the remaining devices). Every other
architecture field is a `config.model` key (ARCH_FIELDS in rlhf_jax/models/config.py), e.g.
Gemma-2-style alternating windows with Qwen3's q/k norms on the tiny llama:
  python -m launch.run --config experiments/pretrain.py:family=llama --workdir runs/pretrain_lg \
      --config.model.sliding_window=64 --config.model.window_pattern=LG --config.model.qk_norm=True

Planned for TPU (`python -m launch.aot`, no TPU needed; the numbers are in BENCHMARKS.md):
  GPT-2 124M, v5e:2x2: train step 4.0, eval step 0.9 of 15.75 GiB per chip (the eval runs in
  the train step's 40 microbatches):
  python -m launch.aot --config experiments/pretrain.py:size=small,fsdp=4 --topology v5e:2x2 \
      --config.model.scan_layers=True
"""

import os

from experiments import common

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    arg = common.parse_arg(arg, size="tiny", family="", fsdp=1, tensor=1)
    c = common.stage_config("pretrain", arg)
    c.data.train = os.path.join(HERE, "data", "tiny_corpus.jsonl")
    if arg.size in common.CPU_SIZES:
        c.model.dtype = "float32"  # CPU: bf16 matmuls are emulated and slower
        c.train.update(
            steps=300,
            batch_size=16,
            seq_len=128,
            lr=3e-3,
            warmup_steps=30,
            log_every=10,
            eval_every=100,
            eval_batches=4,
            ckpt_every=100,
        )
    else:
        # GPT-2 small recipe (nanoGPT): 0.5M tokens per step via accumulation, lr 6e-4.
        c.tokenizer.vocab_size = 32000
        c.train.update(
            steps=20000,
            batch_size=480,
            seq_len=1024,
            grad_accum=40,
            lr=6e-4,
            warmup_steps=700,
            log_every=10,
            eval_every=500,
            ckpt_every=1000,
        )
    return c
