"""Checkpointer: exact round trip of the trainable state, cadence, retention, placement, kills."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from lorarl_jax.checkpoint import Checkpointer, restore_or_none


def make_state(step: int, *, critic: bool = True) -> dict:
    """A trainer-like state: adapter + chained adamw state after two updates (count/mu/nu != 0)."""
    k1, k2, k3 = jax.random.split(jax.random.key(step), 3)
    lora = {
        "layers_0": {
            "q_proj": {"a_DxR": jax.random.normal(k1, (8, 2)), "b_RxD": jnp.zeros((2, 8))}
        },
        "layers_1": {"v_proj": {"a_DxR": jax.random.normal(k2, (8, 2)), "b_RxD": jnp.ones((2, 4))}},
    }
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))
    opt_state = tx.init(lora)
    for scale in (0.1, 0.2):
        grads = jax.tree.map(lambda x, s=scale: jnp.full_like(x, s), lora)
        updates, opt_state = tx.update(grads, opt_state, lora)
        lora = optax.apply_updates(lora, updates)
    state = {
        "lora": lora,
        "opt_state": opt_state,
        "step": step,
        "rng": jax.random.fold_in(k3, 7),
        "data_state": {"next_index": 12 + step, "epoch": 0},
        "kl_ctl": {"kl_coef": 0.05 * step, "target": 6.0},
    }
    if critic:
        critic_params = {"value_head": {"w_Dx1": jax.random.normal(k3, (8, 1)), "b": jnp.zeros(1)}}
        state["critic"] = critic_params
        state["critic_opt_state"] = optax.adam(1e-3).init(critic_params)
    return state


def abstract_of(state: dict) -> dict:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def assert_state_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    assert got["step"] == want["step"]
    for k in ("data_state", "kl_ctl"):
        assert got.get(k) == want.get(k), k
    assert jax.dtypes.issubdtype(got["rng"].dtype, jax.dtypes.prng_key)
    assert jax.random.key_impl(got["rng"]) == jax.random.key_impl(want["rng"])
    np.testing.assert_array_equal(jax.random.key_data(got["rng"]), jax.random.key_data(want["rng"]))
    for k in ("lora", "opt_state", "critic", "critic_opt_state"):
        if k in want:
            assert jax.tree.structure(got[k]) == jax.tree.structure(want[k]), k  # NamedTuples kept
            for g, w in zip(jax.tree.leaves(got[k]), jax.tree.leaves(want[k]), strict=True):
                assert g.dtype == w.dtype and g.shape == w.shape
                np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_exact(tmp_path, async_save):
    state = make_state(4)
    adam = state["opt_state"][1][0]
    assert int(adam.count) == 2 and float(jnp.abs(adam.nu["layers_0"]["q_proj"]["a_DxR"]).sum()) > 0
    with Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=3, async_save=async_save) as ck:
        assert ck.save(4, state)
        ck.wait()
        assert ck.latest_step() == 4
        restored = ck.restore(abstract_state=abstract_of(state))
    assert_state_equal(restored, state)
    items = {p.name for p in (tmp_path / "4").iterdir() if p.is_dir()}
    assert items == {"lora", "opt_state", "critic", "critic_opt_state", "rng", "meta"} | {
        "data_state",
        "kl_ctl",
    }


def test_optional_items_absent(tmp_path):
    state = make_state(1, critic=False)
    del state["data_state"], state["kl_ctl"]
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=None) as ck:
        ck.save(1, state)
        ck.wait()
        assert_state_equal(ck.restore(abstract_state=abstract_of(state)), state)


def test_save_interval_and_force(tmp_path):
    with Checkpointer(tmp_path, save_interval_steps=3, max_to_keep=None) as ck:
        saved = {s: ck.save(s, make_state(s)) for s in (1, 2, 3, 4, 5, 6)}
        assert saved == {1: False, 2: False, 3: True, 4: False, 5: False, 6: True}
        assert ck.save(7, make_state(7), force=True)
        ck.wait()
        assert ck.all_steps() == [3, 6, 7]


def test_max_to_keep_and_restore_latest(tmp_path):
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=2) as ck:
        for s in range(1, 6):
            assert ck.save(s, make_state(s))
        ck.wait()
        assert ck.all_steps() == [4, 5] and ck.latest_step() == 5
        abstract = abstract_of(make_state(0))
        assert_state_equal(ck.restore(abstract_state=abstract), make_state(5))
        assert_state_equal(ck.restore(4, abstract_state=abstract), make_state(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "5"]


def test_restore_onto_sharding_and_dtype(tmp_path):
    """Placement and dtype come from the target; a typed abstract key (eval_shape) works too."""
    state = make_state(2)
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1) as ck:
        ck.save(2, state)
        ck.wait()
        device = jax.devices()[-1]
        single = jax.sharding.SingleDeviceSharding(device)
        mesh = jax.sharding.Mesh(np.array([device]), ("fsdp",))
        named = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
        abstract = abstract_of(state)
        abstract["lora"] = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=named), state["lora"]
        )
        abstract["opt_state"] = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=single), state["opt_state"]
        )
        abstract["rng"] = jax.eval_shape(lambda: jax.random.key(0))
        restored = ck.restore(abstract_state=abstract)
    for leaf, want in zip(
        jax.tree.leaves(restored["lora"]), jax.tree.leaves(state["lora"]), strict=True
    ):
        assert leaf.dtype == jnp.bfloat16 and leaf.sharding == named
        np.testing.assert_array_equal(leaf, want.astype(jnp.bfloat16))
    assert all(x.sharding == single for x in jax.tree.leaves(restored["opt_state"]))
    np.testing.assert_array_equal(
        jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"])
    )


def test_restore_or_none(tmp_path):
    abstract = abstract_of(make_state(0))
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=2) as ck:
        assert ck.latest_step() is None
        assert restore_or_none(ck, abstract, resume=False) is None
        assert restore_or_none(ck, abstract, resume="auto") is None
        with pytest.raises(
            FileNotFoundError,
            match="resume=True but .* no finalised checkpoint.*set trainer.resume=False to start",
        ):
            restore_or_none(ck, abstract, resume=True)
        ck.save(3, make_state(3))
        ck.wait()
        assert restore_or_none(ck, abstract, resume=False) is None
        assert restore_or_none(ck, abstract, resume="auto")["step"] == 3
        assert_state_equal(restore_or_none(ck, abstract, resume=True), make_state(3))


def test_save_rejects_bad_state(tmp_path):
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1) as ck:
        state = make_state(1)
        with pytest.raises(ValueError, match="differs"):
            ck.save(2, state)
        with pytest.raises(KeyError, match="unknown \\['base'\\]"):
            ck.save(1, state | {"base": state["lora"]})  # frozen weights never go in a checkpoint
        with pytest.raises(TypeError, match="typed key"):
            ck.save(1, state | {"rng": jax.random.PRNGKey(0)})


def _files(path) -> list:
    return sorted(p for p in path.rglob("*") if p.is_file())


def corrupt(step_dir, how: str) -> None:
    """Damages a finalised step in place, the ways a full disk or a partial copy would."""
    if how == "truncate_lora":
        files = _files(step_dir / "lora")
        for f in files:
            f.write_bytes(b"")
    elif how == "truncate_lora_data":  # metadata intact: the array reads fail (tensorstore)
        files = [f for f in _files(step_dir / "lora") if f.parent.name == "d"]
        for f in files:
            f.write_bytes(f.read_bytes()[:10])
    elif how == "delete_lora":
        files = _files(step_dir / "lora")
        for f in files:
            f.unlink()
    else:  # garbage_meta
        files = _files(step_dir / "meta")
        for f in files:
            f.write_bytes(b"\x00garbage{not json")
    assert files


@pytest.mark.parametrize(
    "how", ["truncate_lora", "truncate_lora_data", "delete_lora", "garbage_meta"]
)
def test_corrupt_latest_falls_back_and_is_kept(tmp_path, capsys, how):
    abstract = abstract_of(make_state(0))
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=None) as ck:
        for s in (1, 2, 3):
            assert ck.save(s, make_state(s))
        ck.wait()
    corrupt(tmp_path / "3", how)

    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=None) as ck:
        assert ck.latest_step() == 3  # still finalised: only a restore can tell
        assert_state_equal(restore_or_none(ck, abstract, resume=True), make_state(2))
        err = capsys.readouterr().err
        assert f"checkpoint {tmp_path / '3'} failed to restore" in err, err
        assert "moved it aside to 3.corrupt and resumed from step 2" in err, err
        assert (tmp_path / "3.corrupt").is_dir() and not (tmp_path / "3").exists()
        assert ck.latest_step() == 2 and ck.all_steps() == [1, 2]  # orbax reloaded its list
        # the resumed run redoes step 3 and saves it under the same number
        new3 = make_state(3) | {"kl_ctl": {"kl_coef": 1.5, "target": 3.0}}
        assert ck.save(3, new3)
        ck.wait()
        assert ck.all_steps() == [1, 2, 3]
        assert_state_equal(restore_or_none(ck, abstract, resume=True), new3)

    # reopening runs orbax's tmp-dir cleanup: the .corrupt dir is neither deleted nor a step
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=None) as ck:
        assert ck.all_steps() == [1, 2, 3]
        assert_state_equal(ck.restore(abstract_state=abstract), new3)
        corrupt(tmp_path / "3", how)  # broken again: the next free name is taken
        assert_state_equal(restore_or_none(ck, abstract, resume="auto"), make_state(2))
        assert "moved it aside to 3.corrupt-1" in capsys.readouterr().err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["1", "2", "3.corrupt", "3.corrupt-1"]
    assert _files(tmp_path / "3.corrupt")  # moved, not deleted


def test_all_steps_corrupt_raises(tmp_path, capsys):
    abstract = abstract_of(make_state(0))
    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=None) as ck:
        for s in (1, 2):
            ck.save(s, make_state(s))
        ck.wait()
        corrupt(tmp_path / "1", "garbage_meta")
        corrupt(tmp_path / "2", "truncate_lora")
        with pytest.raises(ValueError, match=r"no checkpoint in .* restores") as info:
            restore_or_none(ck, abstract, resume=True)
        msg = str(info.value)
        assert str(tmp_path) in msg and "step 2 (" in msg and "step 1 (" in msg
        assert "nothing was renamed or deleted" in msg
        # a config that no longer matches fails every step alike: nothing is moved aside
        assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
        assert capsys.readouterr().err == ""
        assert ck.latest_step() == 2


# Saves step 1 and waits, then starts an async save of ~200 MB at step 2 and reports it;
# the test SIGKILLs it right then, before orbax can finalise (rename) step 2.
KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    import jax, jax.numpy as jnp
    sys.path.insert(0, sys.argv[2])
    from test_checkpoint import make_state
    from lorarl_jax.checkpoint import Checkpointer

    ck = Checkpointer(sys.argv[1], save_interval_steps=1, max_to_keep=5)
    ck.save(1, make_state(1))
    ck.wait()
    big = make_state(2)
    big["lora"]["big_N"] = jnp.ones((50_000_000,), jnp.float32).block_until_ready()
    assert ck.save(2, big)
    print("SAVING", flush=True)
    time.sleep(120)
    """
)


def test_kill_mid_save_keeps_previous(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-c", KILLED_WRITER, str(tmp_path), os.path.dirname(__file__)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert line.strip() == "SAVING", "writer subprocess failed before the big save"
    assert proc.returncode == -signal.SIGKILL
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "1" in names and "2" not in names
    assert any(n.startswith("2.orbax-checkpoint-tmp") for n in names), names  # killed mid-write

    with Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=5) as ck:
        assert ck.latest_step() == 1 and ck.all_steps() == [1]
        abstract = abstract_of(make_state(0))
        assert_state_equal(restore_or_none(ck, abstract, resume=True), make_state(1))
        assert ck.save(2, make_state(2))  # the resumed run re-saves step 2 over the debris
        ck.wait()
        assert ck.all_steps() == [1, 2]
        assert_state_equal(ck.restore(abstract_state=abstract), make_state(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # tmp dir cleaned up
