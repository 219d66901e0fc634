"""Rule-based rewards for PPO tests (loaded through ppo.reward_fn = "ppo_rewards:...")."""


def count_apples(prompts, responses):
    """How many times the response says 'apples' (capped, so the optimum is not unbounded)."""
    return [min(r.count("apples"), 3) for r in responses]
