"""DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale") on
the demo task.

    python -m lorarl_jax.main --config configs/dapo_smollm2.py

The recipe's four parts on top of GRPO:
- clip-higher: ε_low 0.2, ε_high 0.28 (`algo.clip_ratio_low/high`);
- token-level loss: `algo.loss_agg_mode=token-mean`, no KL term (`use_kl_loss=False`);
- dynamic sampling (`algo.filter_groups`): groups whose 8 rewards are all equal carry no
  advantage and are dropped; fresh prompt batches are drawn until the step has
  `data.batch_size` informative groups or `algo.max_num_gen_batches` batches were generated
  (metrics `data/groups_kept`, `data/gen_batches`);
- overlong reward shaping: `rollout.max_new_tokens` 64 (the demo's 48 + a 16-token buffer);
  over the last `algo.overlong_buffer_len` = 16 tokens the reward falls linearly to
  −`algo.overlong_penalty_factor` (`reward/overlong_penalty`), so the demo's hard limit becomes
  a soft one (a buffer of 16 inside the demo's 48 tokens penalises its typical ~33-token
  answers and the policy learns to stop before the answer);
  `--config.algo.overlong_filter=True` also masks truncated responses out of the loss.

Everything else as configs/demo.py (SmolLM2-135M-Instruct, arithmetic, 40 steps × 4 prompts × 8
samples, 200 held-out problems evaluated greedily before, at step 20 and after).

Measured (this command, 2 cores of an AMD EPYC, fp32; 200 held-out problems, greedy):
strict accuracy 3.0 % → 52.5 % (step 20) → 58.0 % ± 3.5 (step 40), last-number accuracy
30.5 % → 53.0 % → 58.0 %; training reward (mean of steps 1–5 → 36–40) 0.11 → 1.10; 1.55
generation batches per step (no step short of informative groups), 13.2 s/step median. The
same session's configs/demo.py (GRPO): 2.0 % → 56.0 % → 49.0 %, 9.2 s/step (README table).
"""

import importlib.util
import os


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
    spec = importlib.util.spec_from_file_location("demo_config", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    c = demo.get_config()
    c.algo.update(
        adv_estimator="grpo",
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        loss_agg_mode="token-mean",
        use_kl_loss=False,
        use_kl_in_reward=False,
        filter_groups=True,
        max_num_gen_batches=3,
        overlong_buffer_len=16,
        overlong_penalty_factor=1.0,
    )
    c.rollout.max_new_tokens = 64
    c.trainer.output_dir = "runs/dapo"
    return c
