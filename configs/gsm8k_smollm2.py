"""GSM8K GRPO + LoRA on SmolLM2-135M-Instruct (verl's GSM8K recipe, scaled to a CPU).

    python scripts/prepare_gsm8k.py --input ../shared/data/gsm8k/train.jsonl --out data/gsm8k
    python -m lorarl_jax.main --config configs/gsm8k_smollm2.py

Expect: a 135M model starts near 1–3% GSM8K accuracy; on 2 CPU cores a step (4 prompts × 8
samples × 256 tokens) takes a few minutes, so treat this as a recipe to run on an accelerator
(`--config.model.dtype=bfloat16`): reward and strict-format accuracy rise first, correctness
slowly.
"""

from lorarl_jax.config import default_config
from lorarl_jax.model.lora import LINEAR_NAMES as ALL_LINEAR


def get_config():
    c = default_config()
    c.model.path = "smollm2"
    c.lora.update(r=16, lora_alpha=32.0, target_modules=ALL_LINEAR)
    c.rollout.update(num_generations=8, temperature=1.0, max_prompt_length=256, max_new_tokens=256)
    c.algo.update(
        adv_estimator="grpo",
        use_kl_loss=True,
        kl_loss_type="low_var_kl",
        kl_loss_coef=0.001,
        loss_agg_mode="token-mean",
    )
    c.optim.update(lr=1e-4, warmup_steps=5)
    c.data.update(
        train_files="data/gsm8k/train.parquet",
        val_files="data/gsm8k/val.parquet",
        batch_size=4,
        val_batch_size=16,
        max_val_samples=200,
        pad_multiple=32,
    )
    c.trainer.update(steps=200, output_dir="runs/gsm8k_smollm2", eval_interval=50, ckpt_interval=20)
    return c
