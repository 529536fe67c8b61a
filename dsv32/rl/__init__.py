"""Reinforcement learning: GRPO with DeepSeek-V3.2's stabilisers (spec §2), rollouts from our engine."""

from dsv32.rl.objective import grpo_loss, group_advantages, kl_unbiased, off_policy_mask, token_logprobs
from dsv32.rl.rollout import Trajectory, pack, replay_logprobs, rollout
from dsv32.rl.trainer import RLConfig, RLTrainer, run

__all__ = ["RLConfig", "RLTrainer", "Trajectory", "grpo_loss", "group_advantages", "kl_unbiased",
           "off_policy_mask", "pack", "replay_logprobs", "rollout", "run", "token_logprobs"]
