"""Seconds-long smoke run on a tiny random model (used by the tests).

    python -m lorarl_jax.main --config configs/smoke.py --config.model.path=/path/to/tiny_hf_dir

Expect: two GRPO steps on the synthetic arithmetic task, a metrics.jsonl, curves.png and a PEFT
adapter under runs/smoke. Rewards stay near zero (the model is random); it checks the plumbing.
"""

from ml_collections import ConfigDict


def get_config():
    c = ConfigDict()
    c.model = dict(path="", dtype="float32", param_dtype="float32", quantization="none",
                   gradient_checkpointing=False)
    c.lora = dict(r=4, lora_alpha=8.0, target_modules=("q_proj", "v_proj"), lora_dropout=0.0,
                  use_rslora=False, init_adapter_path="")
    c.rollout = dict(num_generations=2, temperature=1.0, top_p=1.0, top_k=0,
                     max_prompt_length=64, max_new_tokens=8, overlong_prompt="filter",
                     merge="auto")
    c.algo = dict(adv_estimator="grpo", use_kl_loss=True, kl_loss_coef=0.001,
                  loss_agg_mode="token-mean", ppo_epochs=1, ppo_mini_batch_size=0,
                  micro_batch_size=0, reference="base", entropy_coeff=0.0)
    c.critic = dict(lr=1e-5, cliprange_value=0.5)
    c.optim = dict(lr=1e-3, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=1.0)
    c.data = dict(train_files="", val_files="", batch_size=2, val_batch_size=4,
                  max_val_samples=4, pad_multiple=32, arith_n_train=64, arith_n_val=8,
                  arith_ops="+-", reward_fns=("builtin",), reward_timeout_s=30.0)
    c.trainer = dict(steps=2, seed=0, output_dir="runs/smoke", log_interval=1, eval_interval=0,
                     eval_before=True, ckpt_interval=1, max_to_keep=2, resume=False,
                     async_checkpoint=True, export_adapter=True, tensorboard=True,
                     mesh=(-1, 1, 1))
    return c
