"""SimPO (Meng et al. 2024): preference optimisation with no reference model.

The DPO stage with `dpo.loss=simpo` (rlhf_jax/rl/dpo.py): the reward of a response is its
length-normalised log-probability beta * log pi(y|x) / |y|, and each ranked pair's loss is
-log sigmoid(r_w - r_l - gamma) with a target margin gamma. No reference model is restored or
run in the step (half the forward passes of DPO's); the starting model is held only for the
held-out `eval/kl` (set `--config.dpo.kl_prompts=0` to drop it). Same data as DPO: the
comparisons experiments/rm.py reads, K-way rankings used whole.

Tiny model, CPU, after experiments/{pretrain,sft}.py (about a minute on 2 cores):
  python -m launch.run --config experiments/simpo.py --workdir runs/simpo_tiny \
      --config.init_from=runs/sft_tiny

GPT-2 124M on your comparisons:
  python -m launch.run --config experiments/simpo.py:size=small --workdir runs/simpo_small \
      --config.init_from=runs/sft_small --config.data.train=comparisons.jsonl

Read `metrics.jsonl`: `dpo/loss` and `dpo/margin` (mean r_w - r_l of SimPO's reward; the loss
pushes it past gamma), `eval/accuracy` the held-out accuracy of SimPO's reward and `eval/kl` the
KL to the starting model.

Args (after the colon): size, family, fsdp, tensor. The architecture comes from init_from.
"""

from experiments import dpo


def get_config(arg=None):
    c = dpo.get_config(arg)
    # The paper's settings (Mistral/Llama-3 Base): beta 2.0-2.5, gamma / beta about 0.5, and
    # learning rates of DPO's order (3e-7 to 1e-6), which DPO's config already has.
    c.dpo.update(loss="simpo", beta=2.0, simpo_gamma=1.0)
    return c
