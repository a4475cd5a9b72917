"""The program store: what its keys tell apart, and a stored program computing what jit does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shardlm.engine import programs

step = jax.jit(lambda scale, x, y: (x * scale + y, {"sum": x.sum()}), static_argnums=0)


def test_keys_tell_apart_everything_a_program_depends_on():
    x, y = jnp.ones((4, 8)), jnp.zeros((4, 8))
    key = programs.program_key("f", 2.0, (x, y))
    assert key == programs.program_key("f", 2.0, (jnp.zeros((4, 8)), jnp.ones((4, 8))))  # values do not matter
    others = [programs.program_key("g", 2.0, (x, y)),  # another step
              programs.program_key("f", 3.0, (x, y)),  # another static argument
              programs.program_key("f", 2.0, (x.astype(jnp.bfloat16), y)),  # dtype
              programs.program_key("f", 2.0, (jnp.ones((4, 16)), y)),  # shape
              programs.program_key("f", 2.0, ((x,), y)),  # tree
              programs.program_key("f", 2.0, (np.ones((4, 8), np.float32), y))]  # host array, not a device one
    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    sharded = jax.device_put(jnp.ones((8, 8)), jax.NamedSharding(mesh, jax.P("x")))
    replicated = jax.device_put(jnp.ones((8, 8)), jax.NamedSharding(mesh, jax.P()))
    others += [programs.program_key("f", 2.0, (sharded, y)), programs.program_key("f", 2.0, (replicated, y))]
    assert len({key, *others}) == len(others) + 1


def test_a_stored_program_computes_what_jit_does_and_a_torn_one_is_compiled_again(tmp_path):
    events = []
    jax.monitoring.register_event_duration_secs_listener(lambda event, secs, **kw: events.append(event))
    store = programs.ProgramStore(str(tmp_path))
    x, y = jnp.arange(32.0).reshape(4, 8), jnp.ones((4, 8))
    first = store.compiled("f", step, 2.0, x, y)
    [entry] = (tmp_path / "shardlm-programs").iterdir()
    again = programs.ProgramStore(str(tmp_path)).compiled("f", step, 2.0, x, y)
    assert events.count(programs.LOAD_EVENT) == 1
    for program in (first, again):
        jax.tree.map(np.testing.assert_array_equal, program(x, y), step(2.0, x, y))
    entry.write_bytes(entry.read_bytes()[:50])
    with pytest.warns(programs.ProgramStoreWarning, match="not loaded"):
        torn = programs.ProgramStore(str(tmp_path)).compiled("f", step, 2.0, x, y)
    jax.tree.map(np.testing.assert_array_equal, torn(x, y), step(2.0, x, y))
    assert events.count(programs.LOAD_EVENT) == 1
    programs.ProgramStore(str(tmp_path)).compiled("f", step, 2.0, x, y)  # stored whole again
    assert events.count(programs.LOAD_EVENT) == 2


def test_set_directory_turns_the_store_on_and_off(tmp_path):
    was = programs._directory
    try:
        programs.set_directory(str(tmp_path))
        assert str(programs.store().folder) == str(tmp_path / "shardlm-programs")
        programs.set_directory(None)
        assert programs.store() is None
    finally:
        programs.set_directory(was)
