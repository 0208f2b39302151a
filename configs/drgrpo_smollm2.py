"""Dr.GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training") on the demo task.

    python -m lorarl_jax.main --config configs/drgrpo_smollm2.py

Both halves of the recipe: advantages without the group-std division (`adv_estimator=drgrpo`)
and a loss without the 1/|o_i| length normalisation, divided instead by a constant:
`loss_agg_mode=seq-mean-token-sum-norm`, loss = Σ_i Σ_t L_it / (B · C) with
C = `algo.loss_scale_factor` (default `rollout.max_new_tokens`; TRL's `loss_type="dr_grpo"`).
C is fixed, so trimming responses (`rollout.response_bucket`) or splitting the mini-batch into
micro-batches does not change the effective learning rate.

Everything else as configs/demo.py (SmolLM2-135M-Instruct, arithmetic, 40 steps, ~25 min on
2 CPU cores). Expect the held-out accuracy to rise as in the README's demo table.
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
        adv_estimator="drgrpo", loss_agg_mode="seq-mean-token-sum-norm", loss_scale_factor=0.0
    )
    c.trainer.output_dir = "runs/drgrpo"
    return c
