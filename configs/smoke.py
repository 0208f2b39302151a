"""Seconds-long smoke run on a tiny model directory (used by the tests).

    python -m lorarl_jax.main --config configs/smoke.py --config.model.path=/path/to/tiny_hf_dir

Expect: two GRPO steps on the synthetic arithmetic task, metrics.jsonl, curves.png, TensorBoard
events, checkpoints and a PEFT adapter under runs/smoke. A random model earns ~0 reward: this
checks the plumbing, not learning.
"""

from lorarl_jax.config import default_config


def get_config():
    c = default_config()
    c.lora.update(r=4, lora_alpha=8.0, target_modules=("q_proj", "v_proj"))
    c.rollout.update(num_generations=2, max_prompt_length=64, max_new_tokens=8)
    c.algo.update(use_kl_loss=True, kl_loss_coef=0.001)
    c.optim.update(lr=1e-3)
    c.data.update(
        batch_size=2,
        val_batch_size=4,
        max_val_samples=4,
        arith_n_train=64,
        arith_n_val=8,
        reward_timeout_s=30.0,
    )
    c.trainer.update(steps=2, output_dir="runs/smoke", ckpt_interval=1)
    return c
