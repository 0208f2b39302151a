"""PPO with a full-parameter critic (GAE) + LoRA actor on SmolLM2-135M-Instruct, arithmetic task.

    python -m lorarl_jax.main --config configs/ppo_smollm2.py

The critic is a copy of the base with a scalar value head, trained in full (the seed note advises
against a LoRA critic). Two PPO epochs over two mini-batches per step make the update off-policy,
so π_old log-probs are computed before the first update, as in verl. Expect: value loss falls,
reward rises more slowly than GRPO on this task; ~2× GRPO's step time plus the critic's memory.
"""

from lorarl_jax.config import default_config
from lorarl_jax.model.lora import LINEAR_NAMES as ALL_LINEAR


def get_config():
    c = default_config()
    c.model.path = "smollm2"
    c.lora.update(r=16, lora_alpha=32.0, target_modules=ALL_LINEAR)
    c.rollout.update(num_generations=4, max_prompt_length=96, max_new_tokens=48)
    c.algo.update(
        adv_estimator="gae",
        gamma=1.0,
        lam=0.95,
        use_kl_loss=False,
        use_kl_in_reward=True,
        kl_ctrl="adaptive",
        kl_coef=0.01,
        target_kl=0.1,
        ppo_epochs=2,
        ppo_mini_batch_size=2,
    )
    c.critic.update(lr=1e-5, cliprange_value=0.5)
    c.optim.update(lr=2e-4, warmup_steps=2)
    c.data.update(
        batch_size=4,
        val_batch_size=40,
        max_val_samples=200,
        pad_multiple=16,
        arith_ops="+-",
        arith_max_operand=20,
        reward_fns=("builtin", "format"),
        reward_weights=(1.0, 0.2),
    )
    c.trainer.update(steps=30, output_dir="runs/ppo_smollm2", ckpt_interval=10)
    return c
