"""Reward model (InstructGPT step 2): SFT backbone + scalar head, trained on ranked comparisons.

Default objective (`rm.batching=per_prompt`): all C(K,2) ranked pairs of a prompt are ONE batch
element, each response scored once (Ouyang et al. 2022, eq. 1). `rm.batching=per_pair` is the
independent-pairs ablation. After training, a bias makes the SFT demonstrations score 0 on average.

Tiny model, CPU, after experiments/sft.py (a couple of minutes on 2 cores):
  python -m launch.run --config experiments/rm.py --workdir runs/rm_tiny \
      --config.init_from=runs/sft_tiny

Your own comparisons (K-way {"prompt", "responses", "ranking"} or {"prompt", "chosen",
"rejected"} JSONL), GPT-2 124M:
  python -m launch.run --config experiments/rm.py:size=small --workdir runs/rm_small \
      --config.init_from=runs/sft_small --config.data.train=comparisons.jsonl

Args (after the colon): size, family, fsdp, tensor, batching (per_prompt|per_pair).

Planned for TPU (`python -m launch.aot`, no TPU needed; the numbers are in BENCHMARKS.md):
  GPT-2 124M, v5e:2x2, the recipe's 16 microbatches: train step 8.2 of 15.75 GiB per chip:
  python -m launch.aot --config experiments/rm.py:size=small,fsdp=4 --topology v5e:2x2 \
      --config.model.scan_layers=True
"""

import os

from experiments import common

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    arg = common.parse_arg(arg, size="tiny", family="", fsdp=1, tensor=1, batching="per_prompt")
    c = common.stage_config("rm", arg)
    c.rm.batching = arg.batching
    c.data.train = os.path.join(HERE, "data", "tiny_comparisons.jsonl")
    c.data.eval_fraction = 0.1
    if arg.size in common.CPU_SIZES:
        c.model.dtype = "float32"  # CPU
        c.train.update(
            steps=150,
            batch_size=16,
            seq_len=64,
            lr=1e-3,
            warmup_steps=10,
            weight_decay=0.0,
            log_every=10,
            eval_every=50,
            eval_batches=0,
            ckpt_every=50,
        )
        c.rm.k_max = 4
    else:
        # InstructGPT 6B RM: one epoch over the comparisons, lr 9e-6, cosine decay, batch of
        # 64 prompts (up to 2304 pairs) per step, in 16 microbatches of 4 prompts x K = 9
        # responses (in one pass GPT-2 124M needs 96.9 GiB per v5e chip: BENCHMARKS.md). With
        # more than 4 data-parallel chips, set train.grad_accum to 64 / their number or less.
        c.train.update(
            steps=2000,
            batch_size=64,
            seq_len=1024,
            grad_accum=16,
            lr=9e-6,
            warmup_steps=0,
            min_lr_ratio=0.1,
            weight_decay=0.0,
            log_every=10,
            eval_every=200,
            eval_batches=0,
            ckpt_every=500,
        )
    return c
