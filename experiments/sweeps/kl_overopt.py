"""Reward over-optimisation (Gao et al., 2022) on the bundled task: sweep the KL coefficient.

PPO against the learned reward model, from one shared SFT model and RM (taken from a finished
pipeline run in runs/pipeline, the README's main job), with the KL coefficient beta swept from
almost none to strong. Per point the pipeline's evaluation measures, on held-out prompts, the
gold score (the simulated labeler's noiseless utility) and the RM (proxy) score, and PPO's eval
logs the KL from the SFT policy. The proxy keeps rising as KL grows; the gold score rises, then
falls once the policy exploits the RM's errors.

  python -m launch.run --config experiments/pipeline.py --workdir runs/pipeline   # once
  python -m launch.sweep run experiments/sweeps/kl_overopt.py --workdir runs/kl_overopt
  python -m launch.sweep collect runs/kl_overopt --x ppo:eval/kl_per_seq \\
      --y eval.models.ppo.gold_score,eval.models.ppo.rm_score
"""

from launch.sweep import grid

CONFIG = "experiments/pipeline.py"
FIXED = {
    "reuse": "runs/pipeline",
    "skip": "ppo_ptx,rsft,dpo,simpo,kto,grpo",  # PPO alone
    "evaluate.best_of_k": 0,
    "rounds": 1,
    # Long enough for small betas to drift far from the SFT policy.
    "stages.ppo.train.steps": 60,
    "stages.ppo.train.eval_every": 20,
}


def get_sweep():
    return grid({"stages.ppo.ppo.beta": [0.0, 0.01, 0.03, 0.1, 0.3]})
