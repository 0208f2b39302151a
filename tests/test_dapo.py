"""DAPO's data side: overlong shaping / filtering and dynamic sampling (rl/dapo.py, trainer)."""

import importlib.util
import json
import os

import numpy as np
import pytest

from lorarl_jax.rl import dapo
from lorarl_jax.rl.experience import minibatch_indices
from lorarl_jax.rl.rewards import merge_reward_metrics
from lorarl_jax.sampling.sampler import Rollout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- pure pieces, golden values


def test_overlong_penalty_golden():
    # L_max 16, L_buf 4: free up to 12 tokens, then −(L − 12)/4 · f down to −f at 16
    L = [0, 5, 12, 13, 14, 15, 16]
    np.testing.assert_allclose(
        dapo.overlong_penalty(L, 16, 4, 1.0), [0, 0, 0, -0.25, -0.5, -0.75, -1.0]
    )
    np.testing.assert_allclose(
        dapo.overlong_penalty(L, 16, 4, 0.5), [0, 0, 0, -0.125, -0.25, -0.375, -0.5]
    )
    np.testing.assert_array_equal(dapo.overlong_penalty(L, 16, 0, 1.0), np.zeros(7))


def test_truncated_rows_need_all_tokens_and_no_stop_token():
    stop = (2, 7)
    tokens = np.array([[5, 5, 5, 5], [5, 5, 5, 2], [5, 7, 0, 0], [5, 5, 5, 7], [5, 5, 5, 9]])
    lengths = np.array([4, 4, 2, 4, 4])
    np.testing.assert_array_equal(
        dapo.truncated_rows(tokens, lengths, stop), [True, False, False, False, True]
    )


def test_informative_groups():
    scores = [1.0, 1.0, 0.0, 1.0, 0.5, 0.5, -0.2, 0.3]
    np.testing.assert_array_equal(dapo.informative_groups(scores, 2), [False, True, False, True])
    np.testing.assert_array_equal(dapo.informative_groups(scores, 4), [True, True])
    np.testing.assert_array_equal(dapo.informative_groups([3.0, 3.0], 1), [True, True])


def _part(P, prompts, first_tok, keep, n=2, N=3):
    """A generation batch of len(prompts) groups: prompt lengths `prompts`, row r's tokens
    first_tok + r."""
    G = len(prompts)
    ids = np.full((G, P), -1, np.int32)  # the pipeline pads with pad_id (-1 here)
    mask = np.zeros((G, P), np.int32)
    for g, k in enumerate(prompts):
        ids[g, P - k :] = 100 + first_tok + g
        mask[g, P - k :] = 1
    R = G * n
    tok = (first_tok + np.arange(R))[:, None] * np.ones((1, N), np.int32)
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "raw_prompt": [f"p{first_tok + g}" for g in range(G)],
        "ground_truth": [str(first_tok + g) for g in range(G)],
    }
    rollout = Rollout(
        tokens=tok, mask=np.ones((R, N), np.int32), logp=-tok / 10.0, lengths=np.full(R, N)
    )
    scores = (first_tok + np.arange(R)).astype(np.float32)
    return dapo.GenBatch(batch, rollout, scores, np.asarray(keep, bool))


def test_assemble_takes_informative_groups_in_order_then_fillers():
    a = _part(4, [4, 2], first_tok=0, keep=[False, True])  # groups p0 (filtered), p1
    b = _part(8, [8, 5], first_tok=10, keep=[False, False])  # longer prompts: P 8
    batch, ro, scores, loss_rows, kept = dapo.assemble([a, b], groups=3, n=2, pad_id=-1)
    assert kept == 1
    assert batch["raw_prompt"] == ["p1", "p0", "p10"]  # kept first, then fillers in order
    assert batch["ground_truth"] == ["1", "0", "10"]
    np.testing.assert_array_equal(loss_rows, [1, 1, 0, 0, 0, 0])
    assert batch["input_ids"].shape == (3, 8)  # re-padded on the left to the longest P
    np.testing.assert_array_equal(batch["input_ids"][0], [-1] * 6 + [101] * 2)
    np.testing.assert_array_equal(batch["attention_mask"][0], [0] * 6 + [1] * 2)
    np.testing.assert_array_equal(batch["attention_mask"][2], [1] * 8)
    np.testing.assert_array_equal(ro.tokens[:, 0], [2, 3, 0, 1, 10, 11])  # rows follow groups
    np.testing.assert_allclose(ro.logp[:, 0], [-0.2, -0.3, 0, -0.1, -1.0, -1.1], atol=1e-6)
    np.testing.assert_array_equal(scores, [2, 3, 0, 1, 10, 11])
    # enough informative groups: only those, in generation order, no fillers
    c = _part(4, [3, 3], first_tok=20, keep=[True, True])
    batch, _, _, loss_rows, kept = dapo.assemble([a, c], groups=2, n=2, pad_id=-1)
    assert (kept, batch["raw_prompt"]) == (2, ["p1", "p20"])
    np.testing.assert_array_equal(loss_rows, np.ones(4))


def test_loss_minibatches():
    rng = lambda: np.random.default_rng([7, 3])  # noqa: E731
    for G, per in ((8, 2), (8, 8), (4, 1)):  # every group live: minibatch_indices exactly
        got = dapo.loss_minibatches(np.ones(G, bool), per, rng(), shuffle=G > per)
        want = minibatch_indices(G, per, rng(), shuffle=G > per)
        assert [x.tolist() for x in got] == [x.tolist() for x in want]
    live = np.array([1, 0, 1, 1, 0, 0, 1, 1], bool)  # 5 live groups, mini-batches of 2
    mbs = dapo.loss_minibatches(live, 2, rng(), shuffle=True)
    assert len(mbs) == 3 and all(len(m) == 2 for m in mbs)
    flat = np.concatenate(mbs)
    assert sorted(flat[:5].tolist()) == [0, 2, 3, 6, 7]  # every live group once
    assert not live[flat[5]]  # the last mini-batch completed with a dead group
    assert all(live[m].any() for m in mbs)
    assert dapo.loss_minibatches(np.zeros(4, bool), 2, rng(), shuffle=True) == []


def test_merge_reward_metrics():
    m1 = {"reward/mean": 0.5, "reward/f/mean": 0.5, "reward/f/failed": 1.0, "reward/errors": 1.0}
    m1.update({"reward/std": 0.5, "reward/hung_threads": 0.0, "reward/accuracy_strict": 0.25})
    m2 = dict(m1, **{"reward/f/mean": 0.0, "reward/f/failed": 2.0, "reward/hung_threads": 1.0})
    m2["reward/accuracy_strict"] = 0.75
    got = merge_reward_metrics([m1, m2], [np.array([0.0, 1.0]), np.array([0.0, 0.0])])
    assert got == {
        "reward/mean": 0.25,  # over the 4 scores
        "reward/std": pytest.approx(np.std([0, 1, 0, 0])),
        "reward/f/mean": 0.25,
        "reward/f/failed": 3.0,
        "reward/errors": 2.0,
        "reward/hung_threads": 1.0,
        "reward/accuracy_strict": 0.5,
    }
    assert merge_reward_metrics([m1], [np.zeros(2)]) == m1


# ---------------------------------------------------------------- config

BAD = [
    (dict(filter_groups=True, adv_estimator="reinforce_plus_plus"), "algo.filter_groups"),
    (dict(overlong_buffer_len=8), "algo.overlong_buffer_len=8 must be below"),
    (dict(max_num_gen_batches=-1), "algo.max_num_gen_batches"),
    (dict(overlong_penalty_factor=float("nan")), "algo.overlong_penalty_factor"),
]


@pytest.mark.parametrize("algo, message", BAD, ids=[m for _, m in BAD])
def test_bad_dapo_keys_are_one_line_errors(algo, message):
    from lorarl_jax.config import default_config, from_config_dict

    c = default_config()
    c.rollout.max_new_tokens = 8
    c.algo.update(algo)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as e:
        from_config_dict(c)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- through the trainer

# informative only for prompts whose answer is odd: the groups of even answers score 0 whatever
# is sampled, so dynamic sampling must drop them and draw more prompts
ODD_REWARD = """
def odd_length(prompts, completions, ground_truth, **columns):
    return [0.0 if int(g) % 2 == 0 else len(c) / 100.0 for c, g in zip(completions, ground_truth)]
"""


def _cfg(tiny_model_dir, out, reward_file, **algo):
    spec = importlib.util.spec_from_file_location("smoke", os.path.join(REPO, "configs/smoke.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    c.model.path = tiny_model_dir
    c.rollout.update(num_generations=4)
    c.data.update(max_val_samples=0, reward_fns=(f"{reward_file}:odd_length",))
    c.trainer.update(output_dir=str(out), ckpt_interval=0, eval_before=False, steps=3)
    c.algo.update(algo)
    return c


def _lines(out):
    return [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if "actor/lr" in x]


@pytest.fixture
def odd_reward(tmp_path):
    p = tmp_path / "odd_reward.py"
    p.write_text(ODD_REWARD)
    return str(p)


def test_dynamic_sampling_trains_on_informative_groups_only(tiny_model_dir, tmp_path, odd_reward):
    from lorarl_jax.config import from_config_dict
    from lorarl_jax.rl.setup import build
    from lorarl_jax.rl.trainer import collect, train

    c = _cfg(tiny_model_dir, tmp_path / "r", odd_reward, filter_groups=True, max_num_gen_batches=6)
    run = build(from_config_dict(c))
    seen = []
    for step in (1, 2, 3):
        batch, _, scores, loss_rows, m = collect(run, run.state, next(run.data_iter), step)
        assert [int(g) % 2 for g in batch["ground_truth"]] == [1, 1]  # only informative groups
        assert loss_rows is None or loss_rows.all()
        assert (np.ptp(scores.reshape(2, 4), axis=1) > 0).all()
        assert m["data/groups_kept"] == 2 and m["data/gen_samples"] == m["data/gen_batches"] * 8
        seen.append(m["data/gen_batches"])
    assert sum(seen) > 3, seen  # some step needed a second batch of prompts
    run.logger.close()

    train(from_config_dict(_cfg(tiny_model_dir, tmp_path / "t", odd_reward, **c.algo)))
    lines = _lines(tmp_path / "t")
    assert [x["data/groups_kept"] for x in lines] == [2.0, 2.0, 2.0]
    assert [x["data/gen_batches"] for x in lines] == seen
    assert all(x["actor/updates"] == 1 and x["actor/grad_norm"] > 0 for x in lines)


def test_dynamic_sampling_with_nothing_informative_makes_no_update(
    tiny_model_dir, tmp_path, odd_reward, capsys
):
    """Every group scores 0 (format reward on a random model; the overlong penalty differs
    across lengths, but the task reward decides): after max_num_gen_batches the step has no
    informative group, makes no optimizer update (the adapter stays at its
    initial value), says so, and the data iterator is exactly max_num_gen_batches further."""
    import jax

    from lorarl_jax.config import from_config_dict
    from lorarl_jax.rl.setup import build
    from lorarl_jax.rl.trainer import rollout_step, update

    c = _cfg(tiny_model_dir, tmp_path / "r", odd_reward, filter_groups=True, max_num_gen_batches=3)
    c.data.reward_fns = ("format",)
    c.algo.overlong_buffer_len = 7  # lengths differ: the penalty alone must not keep a group
    run = build(from_config_dict(c))
    probe = build(from_config_dict(_cfg(tiny_model_dir, tmp_path / "p", odd_reward)))
    lora0 = jax.device_get(run.state.lora)
    state, tb, m = rollout_step(run, run.state, next(run.data_iter), 1)
    state, um = update(run, state, tb, 1)
    assert (m["data/groups_kept"], m["data/gen_batches"], um["actor/updates"]) == (0, 3, 0)
    assert "0 of 2 groups have differing rewards after 3 generation batches" in (
        capsys.readouterr().err
    )
    for x, y in zip(jax.tree.leaves(lora0), jax.tree.leaves(state.lora), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))
    for _ in range(3):
        next(probe.data_iter)
    assert run.data_iter.get_state() == probe.data_iter.get_state()
    run.logger.close()
    probe.logger.close()


def test_dynamic_sampling_resume_is_identical(tiny_model_dir, tmp_path, odd_reward):
    """4 steps straight vs 2 steps, then resumed to 4: the same adapter and metrics (the data
    position after several generation batches per step is checkpointed exactly)."""
    from safetensors.numpy import load_file

    from lorarl_jax.config import from_config_dict
    from lorarl_jax.rl.trainer import train

    algo = dict(filter_groups=True, max_num_gen_batches=6)
    a = _cfg(tiny_model_dir, tmp_path / "a", odd_reward, **algo)
    a.trainer.update(steps=4)
    train(from_config_dict(a))
    b = _cfg(tiny_model_dir, tmp_path / "b", odd_reward, **algo)
    b.trainer.update(steps=2, ckpt_interval=1, async_checkpoint=False)
    train(from_config_dict(b))
    b.trainer.update(steps=4, resume=True)
    train(from_config_dict(b))
    skip = ("time/", "perf/")
    la, lb = (
        [{k: v for k, v in x.items() if not k.startswith(skip)} for x in _lines(tmp_path / d)]
        for d in ("a", "b")
    )
    assert sum(x["data/gen_batches"] for x in la) > 4  # several generation batches per step
    assert la == lb
    wa = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k])


def test_overlong_penalty_and_filter_through_the_trainer(tiny_model_dir, tmp_path, odd_reward):
    """L_buf = max_new_tokens − 1 puts every length in the buffer: the logged mean penalty is
    −(mean length − 1)/L_buf · f; the filter masks the truncated rows out of the loss."""
    from lorarl_jax.config import from_config_dict
    from lorarl_jax.rl.trainer import train

    c = _cfg(
        tiny_model_dir,
        tmp_path / "r",
        odd_reward,
        overlong_buffer_len=7,
        overlong_penalty_factor=0.5,
        overlong_filter=True,
    )
    train(from_config_dict(c))
    for x in _lines(tmp_path / "r"):
        want = -(x["response/length_mean"] - 1) / 7 * 0.5
        assert x["reward/overlong_penalty"] == pytest.approx(want, abs=1e-6)
        clipped = x["response/clipped_frac"] * 8  # rows that used all 8 tokens
        assert 0 < x["data/overlong_masked"] <= clipped
        # no update when the filter leaves no row in the loss (a random model rarely stops)
        assert x["actor/updates"] == float(x["data/overlong_masked"] < 8)
