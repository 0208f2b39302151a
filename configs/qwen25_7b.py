"""Qwen2.5-7B-Instruct GSM8K GRPO + LoRA, mirroring the seed note (verl's LoRA recipe).

    python scripts/prepare_gsm8k.py --input /path/to/gsm8k/train.jsonl --out data/gsm8k
    python -m lorarl_jax.main --config configs/qwen25_7b.py \
        --config.model.path=/path/to/Qwen2.5-7B-Instruct

For accelerators (a GPU with ≥ 40 GB in bf16, or a TPU slice: set `trainer.mesh`, e.g. (1, 8, 1)
for FSDP over 8 chips). r=16, alpha=32, all seven projections, lr 1e-4, bf16 compute and
gradient checkpointing, reference = the base (zero adapter delta). Expect accuracy in the 70s
after a few hundred steps per the seed note; memory: base 15 GB bf16 + adapter/optimizer ~0.2 GB.
"""

from lorarl_jax.config import default_config
from lorarl_jax.model.lora import LINEAR_NAMES as ALL_LINEAR


def get_config():
    c = default_config()
    c.model.update(
        path="Qwen/Qwen2.5-7B-Instruct",
        dtype="bfloat16",
        param_dtype="bfloat16",
        gradient_checkpointing=True,
    )
    c.lora.update(r=16, lora_alpha=32.0, target_modules=ALL_LINEAR, lora_dropout=0.05)
    c.rollout.update(num_generations=8, temperature=1.0, max_prompt_length=512, max_new_tokens=512)
    c.algo.update(
        adv_estimator="grpo",
        use_kl_loss=True,
        kl_loss_type="low_var_kl",
        kl_loss_coef=0.001,
        ppo_mini_batch_size=16,
        micro_batch_size=8,
    )
    c.optim.update(lr=1e-4, warmup_steps=10, schedule="cosine", grad_clip=1.0)
    c.data.update(
        train_files="data/gsm8k/train.parquet",
        val_files="data/gsm8k/val.parquet",
        batch_size=64,
        val_batch_size=64,
        max_val_samples=500,
    )
    c.trainer.update(
        steps=300, output_dir="runs/qwen25_7b", eval_interval=25, ckpt_interval=25, mesh=(1, -1, 1)
    )
    return c
