"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

Loss on response tokens only (the EOS that ends a response included); params from a pretraining
workdir (`init_from`), fresh optimizer. Every eval logs held-out loss and sampled completions.

Tiny model, CPU, after experiments/pretrain.py (about a minute on 2 cores):
  python -m launch.run --config experiments/sft.py --workdir runs/sft_tiny \
      --config.init_from=runs/pretrain_tiny

Your own demonstrations ({"prompt", "response"} JSONL), GPT-2 124M:
  python -m launch.run --config experiments/sft.py:size=small --workdir runs/sft_small \
      --config.init_from=runs/pretrain_small --config.data.train=demos.jsonl

Args (after the colon): size, family, fsdp, tensor, as in experiments/pretrain.py. With
init_from set, the architecture comes from that checkpoint.

Planned for TPU (`python -m launch.aot`, no TPU needed; the numbers are in BENCHMARKS.md):
  GPT-2 124M, v5e:2x2: train step 10.1 of 15.75 GiB per chip:
  python -m launch.aot --config experiments/sft.py:size=small,fsdp=4 --topology v5e:2x2 \
      --config.model.scan_layers=True
  GPT-2 350M, v5e:2x2, with remat (without it the train step needs 19.5 GiB): 4.5 GiB per chip:
  python -m launch.aot --config experiments/sft.py:size=medium,fsdp=4 --topology v5e:2x2 \
      --config.model.scan_layers=True --config.model.remat=full
  175B (GPT-3), v5p:4x4x4, train step 57.0 of 95.7 GiB per chip (a v5p:2x2x4 is refused):
  python -m launch.aot --config experiments/sft.py:size=175b,fsdp=16,tensor=4 \
      --topology v5p:4x4x4 --config.model.scan_layers=True --config.model.remat=full
"""

import os

from experiments import common

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    arg = common.parse_arg(arg, size="tiny", family="", fsdp=1, tensor=1)
    c = common.stage_config("sft", arg)
    c.data.train = os.path.join(HERE, "data", "tiny_demos.jsonl")
    if arg.size in common.CPU_SIZES:
        c.model.dtype = "float32"  # CPU
        c.train.update(
            epochs=1.0,
            steps=0,
            batch_size=16,
            seq_len=64,
            lr=1e-3,
            warmup_steps=10,
            weight_decay=0.0,
            log_every=10,
            eval_every=40,
            eval_batches=4,
            ckpt_every=40,
        )
        c.sft.max_new_tokens = 24
    else:
        # InstructGPT (Ouyang et al. 2022, appendix C.1): 16 epochs, cosine decay. Their
        # residual dropout 0.2 is not implemented (the model has no dropout).
        c.train.update(
            epochs=16.0,
            steps=0,
            batch_size=32,
            seq_len=1024,
            lr=1e-5,
            warmup_steps=0,
            min_lr_ratio=0.0,
            weight_decay=0.0,
            log_every=10,
            eval_every=200,
            ckpt_every=500,
        )
    return c
