"""Rejection-sampling fine-tuning ("best-of-K fine-tuning"), the baseline to PPO: each round
samples K responses per prompt from the current policy, keeps the one the RM scores highest, and
fine-tunes on the kept pairs with the SFT objective (rlhf_jax/stages/rsft.py).

Tiny models, CPU, after experiments/{pretrain,sft,rm}.py (a few minutes on 2 cores):
  python -m launch.run --config experiments/rsft.py --workdir runs/rsft_tiny \
      --config.init_from=runs/sft_tiny --config.rsft.reward_from=runs/rm_tiny

Keep only responses the RM scores at least 0.5: `--config.rsft.use_threshold=true
--config.rsft.threshold=0.5`. Best-of-K at inference, without training, is
`python -m rlhf_jax.tools.best_of_k`.

Outputs: `round_{r}/selected.jsonl` (each round's SFT data), `round_{r}/candidates.jsonl`,
`round_{r}/policy` (each round's model), `rounds.json` and `metrics.jsonl` (rsft/selected_score
vs rsft/candidate_score per round). The final policy is the last round's.

Args (after the colon): size, family, fsdp, tensor, as in experiments/sft.py. The architecture
comes from the init_from checkpoint.
"""

import os

import ml_collections as mlc

from experiments import common

HERE = os.path.dirname(os.path.abspath(__file__))


def rsft_config() -> mlc.ConfigDict:
    return mlc.ConfigDict(
        dict(
            reward_from="",  # RM workdir (its normalisation bias is applied)
            k=4,  # samples per prompt
            rounds=2,
            prompts_per_round=256,
            temperature=1.0,
            max_new_tokens=64,
            # A response cut at the length limit would be trained with an EOS appended; keep
            # only candidates that ended with EOS.
            finished_only=True,
            use_threshold=False,  # drop a prompt whose best score is below `threshold`
            threshold=0.0,
        )
    )


def get_config(arg=None):
    arg = common.parse_arg(arg, size="tiny", family="", fsdp=1, tensor=1)
    c = common.stage_config("rsft", arg)
    c.rsft = rsft_config()
    c.data.train = os.path.join(HERE, "data", "tiny_prompts.jsonl")  # prompts
    c.data.eval_fraction = 0.0  # every kept pair is trained on; set data.eval for held-out loss
    if arg.size in common.CPU_SIZES:
        c.model.dtype = "float32"  # CPU
        c.train.update(
            epochs=2.0,
            steps=0,
            batch_size=16,
            seq_len=64,
            lr=3e-4,
            warmup_steps=5,
            weight_decay=0.0,
            log_every=10,
            eval_every=0,
            ckpt_every=100,
        )
        c.rsft.update(prompts_per_round=128, max_new_tokens=24)
    else:
        # SFT-like fine-tuning of each round's selection; InstructGPT's SFT lr, fewer epochs
        # (the data are the policy's own samples, easy to overfit).
        c.train.update(
            epochs=2.0,
            steps=0,
            batch_size=32,
            seq_len=1024,
            lr=1e-5,
            warmup_steps=0,
            min_lr_ratio=0.0,
            weight_decay=0.0,
            log_every=10,
            eval_every=0,
            ckpt_every=500,
        )
        c.rsft.update(k=8, prompts_per_round=1024, max_new_tokens=256)
    return c
