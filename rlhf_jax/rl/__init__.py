"""The pure RL math: LM and reward-model losses, PPO math (KL, GAE, clipping)."""
