"""The continual supervised trainer: chunking, vmapped seeds, every method, the new-task Hessian
(at the previous task's final parameters, on held-out or training examples, before or after a
head reset).

A tiny stream (2x2 "images", 3 classes, a fresh pixel permutation per task) stands in for
Permuted MNIST; its tasks depend on the task index only, so the tests can rebuild any task's
data. References: dense ``jax.hessian`` + ``numpy.linalg.eigh`` for the Hessian measurement,
separate unvmapped runs for the vmapped ones, a one-chunk run for the chunked one.
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from spectral_plasticity import schema
from spectral_plasticity.tasks import PermutedImages
from spectral_plasticity.tasks.idx import ImageDataset
from spectral_plasticity.train import method_registry, run_sweep, supervised

STEPS = 10  # examples (online steps) per task
HESSIAN_METRICS = ("density", "epsilon_rank", "top_eigenvalue", "curvature_dim", "ritz_")


class TinyStream(PermutedImages):
    """Permuted 2x2 images, 3 classes; a task's permutation and order depend on its index only."""

    def __init__(self, num_tasks=4, reset_head=False):
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 3, 80)
        images = (rng.integers(0, 256, (80, 2, 2)) // 2 + 40 * labels[:, None, None])
        data = ImageDataset(images[:60].astype(np.uint8), labels[:60].astype(np.uint8),
                            images[60:].astype(np.uint8), labels[60:].astype(np.uint8))
        super().__init__(data, name="tiny_permuted", num_tasks=num_tasks, train_size=STEPS,
                         eval_size=20, num_classes=3)
        self.reset_head = reset_head

    def begin_task(self, key, task):
        return super().begin_task(jax.random.key(123), task)


def tiny_config(method="bp", tasks_per_chunk=2, measure=False, **settings):
    c = supervised.default_config()
    c.method = method
    c.stream.num_tasks = 4
    c.model.hidden_sizes = (5,)
    c.batch_size = 1
    c.tasks_per_chunk = tasks_per_chunk
    c.measure_hessian = measure
    c.hessian.update(num_iters=40, grid_size=64, examples=20, chunk_size=10, eps=0.01)
    c.method_settings.update(settings)
    return c


@pytest.fixture
def tiny_stream(monkeypatch):
    stream = TinyStream()
    monkeypatch.setattr(supervised, "_stream", lambda config: stream)
    return stream


def _run(trainer, seeds, chunks, hparams=None):
    hp = {k: jnp.full((len(seeds),), v, jnp.float32) for k, v in (hparams or {}).items()}
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    state = jax.jit(jax.vmap(trainer.init))(keys, hp)
    run_chunk = jax.jit(jax.vmap(trainer.run_chunk))
    rows = []
    for _ in range(chunks):
        state, metrics = run_chunk(state, hp)
        rows.append(metrics)
    return state, {k: np.concatenate([np.asarray(r[k]) for r in rows], axis=1) for k in rows[0]}


def _leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                     strict=True))


def test_chunks_are_seamless_and_vmapped_seeds_equal_separate_runs(tiny_stream):
    trainer = supervised.make_train(tiny_config(tasks_per_chunk=2))
    state2, rows2 = _run(trainer, [0, 1], 2)
    state4, rows4 = _run(supervised.make_train(tiny_config(tasks_per_chunk=4)), [0, 1], 1)
    assert _leaves_equal(state2.params, state4.params)  # bit for bit
    for name in ("train_loss", "eval_accuracy", "weight_norm", "effective_rank/hidden_0"):
        assert rows2[name].shape == (2, 4)
        np.testing.assert_array_equal(rows2[name], rows4[name])
    assert not np.allclose(rows2["train_loss"][0], rows2["train_loss"][1])

    init, run_chunk = jax.jit(trainer.init), jax.jit(trainer.run_chunk)
    alone = init(jax.random.key(1), {})
    losses = []
    for _ in range(2):
        alone, metrics = run_chunk(alone, {})
        losses.append(metrics["train_loss"])
    jax.tree.map(lambda v, a: np.testing.assert_allclose(v[1], a, rtol=1e-5, atol=1e-6),
                 state2.params, alone.params)
    np.testing.assert_allclose(rows2["train_loss"][1], np.concatenate(losses), rtol=1e-5)


@pytest.fixture(scope="module")
def bp_reference():
    """BP's final params and rows on seeds 0, 1 (one chunk of 2 tasks)."""
    stream = TinyStream()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(supervised, "_stream", lambda config: stream)
        return _run(supervised.make_train(tiny_config()), [0, 1], 1)


SETTINGS = {  # strong enough to act within 2 tasks of 10 steps
    "l2": {"l2": 0.5}, "l2_init": {"l2_init": 1.0}, "er": {"erank_every": 5, "erank_batch": 5},
    "l2_er": {"erank_every": 5, "erank_batch": 5, "l2": 0.5},
    "l2_er_joint": {"erank": 1.0, "erank_batch": 5},
    "cbp": {"maturity_threshold": 1, "replacement_rate": 0.5},
    "cbp_l2": {"maturity_threshold": 1, "replacement_rate": 0.5, "l2": 0.5},
    "redo": {"redo_every": 5, "redo_tau": 1.0, "erank_batch": 5},
    "layernorm_l2": {"l2": 0.5}, "spectral_norm": {"spectral_norm": 0.5},
    "parseval": {"parseval": 0.5}, "shrink_perturb": {"shrink": 0.05, "noise_std": 0.05},
}


FAST_METHODS = ("l2", "cbp")


@pytest.mark.parametrize("method", [
    m if m in FAST_METHODS else pytest.param(m, marks=pytest.mark.slow)
    for m in method_registry.METHODS if m not in ("bp", "reset")])
def test_every_method_trains_under_jit_and_vmap_and_changes_the_run(tiny_stream, bp_reference,
                                                                    method):
    trainer = supervised.make_train(tiny_config(method, **SETTINGS.get(method, {})))
    keys = jax.vmap(jax.random.key)(jnp.asarray([0, 1], jnp.uint32))
    start = jax.jit(jax.vmap(trainer.init))(keys, {}).params
    state, rows = _run(trainer, [0, 1], 1)
    bp_state, bp_rows = bp_reference
    for name, value in rows.items():
        assert value.shape[:2] == (2, 2), name
        if not name.startswith(HESSIAN_METRICS):  # unmeasured: see the xfail test below
            assert np.all(np.isfinite(value)), name
    if method == "layernorm_l2":
        assert {"norm_0", "hidden_0", "head"} <= set(state.params)
        return
    assert not _leaves_equal(state.params, bp_state.params)
    if method in ("l2", "l2_er", "cbp_l2"):
        assert np.all(rows["weight_norm"] < bp_rows["weight_norm"])
    if method == "l2_init":
        distance = lambda p: np.linalg.norm(ravel_pytree(jax.tree.map(jnp.subtract, p,
                                                                       start))[0])
        assert distance(state.params) < distance(bp_state.params)


def test_reset_reinitializes_at_each_boundary(tiny_stream):
    # With learning rate 0 only the method's boundary action changes the parameters.
    trainer = supervised.make_train(tiny_config("reset", tasks_per_chunk=4))
    frozen = {"learning_rate": jnp.zeros((1,))}
    keys = jax.vmap(jax.random.key)(jnp.asarray([0], jnp.uint32))
    start = jax.jit(jax.vmap(trainer.init))(keys, frozen)
    _, rows = jax.jit(jax.vmap(trainer.run_chunk))(start, frozen)
    norms = np.asarray(rows["weight_norm"][0])
    assert len(np.unique(norms)) == 4  # a fresh draw at every task...
    initial = float(ravel_pytree(start.params)[0] @ ravel_pytree(start.params)[0]) ** 0.5
    np.testing.assert_allclose(norms, initial, rtol=0.5)  # ... of the initial scale
    assert initial not in norms


def test_head_reset_touches_only_the_head(monkeypatch):
    stream = TinyStream(reset_head=True)
    monkeypatch.setattr(supervised, "_stream", lambda config: stream)
    trainer = supervised.make_train(tiny_config("bp"))
    frozen = {"learning_rate": jnp.zeros((1,))}
    keys = jax.vmap(jax.random.key)(jnp.asarray([0], jnp.uint32))
    start = jax.jit(jax.vmap(trainer.init))(keys, frozen).params
    end, _ = jax.jit(jax.vmap(trainer.run_chunk))(
        jax.jit(jax.vmap(trainer.init))(keys, frozen), frozen)
    assert _leaves_equal(start["hidden_0"], end.params["hidden_0"])
    assert not np.array_equal(start["head"]["kernel"], end.params["head"]["kernel"])


def _dense_top_eigenvalue(trainer_config, params, x, y):
    model = supervised._model(trainer_config, TinyStream(), False)
    flat, unravel = ravel_pytree(params)

    def loss(v):
        out, _ = model.apply({"params": unravel(v)}, x)
        return jnp.mean(supervised.per_example_loss("cross_entropy", out, y))

    return float(np.linalg.eigvalsh(np.asarray(jax.hessian(loss)(flat), np.float64))[-1])


def _two_tasks(monkeypatch, reset_head=False, **changes):
    """Tasks 0 and 1, one per chunk, the Hessian measured: ``(stream, config, the params at
    task 0's end, the state and rows after task 1)``; ``changes``: config fields by their
    dotted names."""
    stream = TinyStream(reset_head=reset_head)
    monkeypatch.setattr(supervised, "_stream", lambda config: stream)
    config = tiny_config(tasks_per_chunk=1, measure=True)
    config.update_from_flattened_dict(changes)
    trainer = supervised.make_train(config)
    run_chunk = jax.jit(trainer.run_chunk)
    state, _ = run_chunk(jax.jit(trainer.init)(jax.random.key(0), {}), {})  # task 0
    previous = state.params
    state, rows = run_chunk(state, {})  # task 1, measured at its start and end
    return stream, config, previous, state, rows


def test_new_task_hessian_is_taken_on_the_new_task_at_the_previous_final_params(monkeypatch):
    stream, config, previous, state, rows = _two_tasks(monkeypatch)
    old_x, old_y = stream.eval_data(stream.begin_task(None, 0))
    new_x, new_y = stream.eval_data(stream.begin_task(None, 1))
    # The model has 4*5+5+5*3+3 = 43 parameters and Lanczos runs 40 steps with full
    # reorthogonalization: its largest Ritz value is the largest eigenvalue.
    expected = _dense_top_eigenvalue(config, previous, new_x, new_y)
    on_old_task = _dense_top_eigenvalue(config, previous, old_x, old_y)
    assert abs(expected - on_old_task) > 1e-3 * abs(expected)
    np.testing.assert_allclose(float(rows["top_eigenvalue_init"][0]), expected, rtol=1e-3)
    np.testing.assert_allclose(float(rows["top_eigenvalue_end"][0]),
                               _dense_top_eigenvalue(config, state.params, new_x, new_y),
                               rtol=1e-3)
    density, grid = rows["density_init"][0], rows["density_grid"][0]
    np.testing.assert_allclose(np.trapezoid(density, grid), 1.0, rtol=1e-3)
    assert 0.0 <= float(rows["epsilon_rank_init"][0]) <= 1.0


def test_the_start_of_task_hessian_sees_the_head_before_the_stream_zeroes_it(monkeypatch):
    stream, config, previous, _, rows = _two_tasks(monkeypatch, True)
    x, y = stream.eval_data(stream.begin_task(None, 1))  # hessian.examples: all 20
    # "stream": the head is zeroed after the measurement, so it measured the previous params.
    np.testing.assert_allclose(float(rows["top_eigenvalue_init"][0]),
                               _dense_top_eigenvalue(config, previous, x, y), rtol=1e-3)


@pytest.mark.slow
def test_head_reset_before_hessian_and_never(monkeypatch):
    stream, config, _, state, _ = _two_tasks(monkeypatch, True)
    x, y = stream.eval_data(stream.begin_task(None, 1))
    _, _, before_previous, _, before = _two_tasks(monkeypatch, True, head_reset="before_hessian")
    zeroed = {**before_previous, "head": jax.tree.map(jnp.zeros_like, before_previous["head"])}
    np.testing.assert_allclose(float(before["top_eigenvalue_init"][0]),
                               _dense_top_eigenvalue(config, zeroed, x, y), rtol=1e-3)
    never = _two_tasks(monkeypatch, True, head_reset="never")
    assert not np.allclose(never[3].params["head"]["kernel"], state.params["head"]["kernel"])


def test_the_hessian_on_the_new_tasks_training_examples(monkeypatch):
    stream, config, previous, _, rows = _two_tasks(monkeypatch, **{"hessian.data": "train"})
    x, y = stream.train_batch(stream.begin_task(None, 1), 0, STEPS)
    held_out = stream.eval_data(stream.begin_task(None, 1))
    expected = _dense_top_eigenvalue(config, previous, x, y)
    assert abs(expected - _dense_top_eigenvalue(config, previous, *held_out)) > 1e-3 * expected
    np.testing.assert_allclose(float(rows["top_eigenvalue_init"][0]), expected, rtol=1e-3)


def test_bad_input_gives_clear_errors(tiny_stream):
    with pytest.raises(ValueError, match=r"unknown methods \['sgd_plus'\]; choose from"):
        supervised.make_train(tiny_config("sgd_plus"))
    config = tiny_config()
    config.batch_size = STEPS + 1
    with pytest.raises(ValueError, match="batch_size 11 must lie in"):
        supervised.make_train(config)
    config = tiny_config(tasks_per_chunk=3)
    with pytest.raises(ValueError, match="tasks_per_chunk 3 must divide num_tasks 4"):
        supervised.make_train(config)
    config = tiny_config()
    config.hessian.data = "test"
    with pytest.raises(ValueError, match="hessian.data must be 'eval' or 'train'"):
        supervised.make_train(config)
    config = tiny_config()
    config.head_reset = "always"
    with pytest.raises(ValueError, match="head_reset must be 'stream', 'never' or"):
        supervised.make_train(config)


def test_unknown_stream_names_the_valid_ones():
    config = tiny_config()
    config.stream.name = "permuted_cifar"
    with pytest.raises(ValueError, match="unknown stream 'permuted_cifar'; choose one of"):
        supervised.make_train(config)


def test_regression_stream_reports_squared_error():
    config = tiny_config(tasks_per_chunk=2)
    config.stream = ml_collections.ConfigDict({
        "name": "slowly_changing_regression", "num_tasks": 2, "flip_after": 20,
        "eval_size": 20, "data_dir": ""})
    trainer = supervised.make_train(config)
    state, rows = _run(trainer, [0], 1)
    assert "eval_accuracy" not in rows and "train_accuracy" not in rows
    # The held-out loss of the last task is the squared error of the final network on it.
    stream = supervised._stream(config)
    x, y = stream.eval_data(stream.begin_task(jax.random.fold_in(state.key[0], 0), 1))
    model = supervised._model(config, stream, False)
    params = jax.tree.map(lambda a: a[0], state.params)
    out, _ = model.apply({"params": params}, x)
    np.testing.assert_allclose(rows["eval_loss"][0, 1], np.mean(np.sum((out - y) ** 2, -1)),
                               rtol=1e-5)


@pytest.mark.parametrize(("method", "swept", "why"), [
    ("l2", "l2_strenght", ""), ("l2", "erank_every", ""),  # a setting l2 does not read
    ("l2_er", "erank_batch", "fix array shapes"), ("bp", "l2", "")])
def test_swept_names_the_method_does_not_read_are_refused(tiny_stream, method, swept, why):
    config = tiny_config(method)
    config.sweep = ml_collections.ConfigDict({swept: [1e-3, 1e-2]})
    with pytest.raises(ValueError, match=rf"cannot sweep \['{swept}'\] with method "
                                         rf"'{method}'.*{why}.*it sweeps \['learning_rate'"):
        supervised.make_train(config)
    trainer = supervised.make_train(tiny_config(method))
    with pytest.raises(ValueError, match=rf"cannot sweep \['{swept}'\]"):
        trainer.init(jax.random.key(0), {swept: jnp.float32(1.0)})


HOOK_SWEEPS = {  # a method, its settings, and two values of one of its hook settings
    # (erank_every is a hook setting too, but with the ER window erank_batch = erank_every x
    # batch_size enforced, its sweep is exercised by "redo"'s redo_every)
    "l2_er": ({"erank_batch": 5, "erank_every": 5}, "erank_learning_rate", (0.3, 0.1)),
    "cbp": ({"maturity_threshold": 1}, "replacement_rate", (0.5, 0.2)),
    "redo": ({"redo_tau": 1.0, "erank_batch": 5}, "redo_every", (3, 4)),
}


# L2-ER's in the default suite; CBP's and ReDo's (the same path, another hook) in make test-slow.
@pytest.mark.parametrize("method", [m if m == "l2_er" else pytest.param(m, marks=pytest.mark.slow)
                                    for m in HOOK_SWEEPS])
def test_a_swept_hook_setting_takes_effect(tiny_stream, method):
    settings, name, (a, b) = HOOK_SWEEPS[method]
    trainer = supervised.make_train(tiny_config(method, **settings))
    _, rows = _run(trainer, [0], 1)  # the config's value (the default)
    hp = {name: jnp.asarray([a, b, a], jnp.float32)}
    keys = jax.vmap(jax.random.key)(jnp.zeros((3,), jnp.uint32))
    _, swept = jax.jit(jax.vmap(trainer.run_chunk))(
        jax.jit(jax.vmap(trainer.init))(keys, hp), hp)
    loss = np.asarray(swept["eval_loss"])
    np.testing.assert_array_equal(loss[0], loss[2])  # same value, same seed: same rows
    assert not np.array_equal(loss[0], loss[1])  # another value: another run
    assert not np.array_equal(loss[0], np.asarray(rows["eval_loss"][0]))  # not the config's
    # The swept value acts as the same value set in the config.
    _, fixed = _run(supervised.make_train(tiny_config(method, **settings, **{name: a})), [0], 1)
    np.testing.assert_allclose(loss[0], np.asarray(fixed["eval_loss"][0]), rtol=1e-5)


def test_a_sweep_with_unmeasured_tasks_is_not_marked_diverged(tiny_stream, tmp_path):
    config = tiny_config(tasks_per_chunk=2, measure=True)
    table = run_sweep(supervised.make_train(config), seeds=[0], hparams=[{}],
                      run_dir=tmp_path, config={"test": 1})
    assert len(table) == 4 and not table["diverged"].any()


def test_stream_data_are_a_jit_argument_not_a_constant(tiny_stream):
    trainer = supervised.make_train(tiny_config(tasks_per_chunk=2))
    assert set(trainer.data) == set(tiny_stream.arrays()) and trainer.data
    key = jax.random.key(0)
    state = trainer.init(key, {})
    closed = jax.jit(trainer.run_chunk)
    passed = jax.jit(trainer.run_chunk)
    _, rows_closed = closed(state, {})
    _, rows_passed = passed(state, {}, trainer.data)
    for name in rows_closed:  # equal up to XLA's constant folding of the closed-over data
        np.testing.assert_allclose(rows_closed[name], rows_passed[name], rtol=1e-5,
                                   err_msg=name)
    # Other data through the same argument: the rows follow the data, not the stream's own.
    other = {k: (v[::-1] if k.endswith("x") else v) for k, v in trainer.data.items()}
    _, rows_other = passed(state, {}, other)
    assert not np.array_equal(rows_other["train_loss"], rows_passed["train_loss"])
    # The images are not embedded in the program when passed (they are when closed over).
    images = tiny_stream.arrays()["_train_x"]
    pattern = " ".join(str(int(v)) for v in np.asarray(images).reshape(-1)[:6])
    assert pattern not in passed.lower(state, {}, trainer.data).as_text()


@pytest.mark.slow  # values: tests/curvature; the chunk with KFAC traced: tests/test_preflight.py
def test_kfac_diagnostics_are_recorded_at_new_task_initialization(tiny_stream):
    from spectral_plasticity.curvature import kfac_diagnostics

    config = tiny_config(tasks_per_chunk=2, measure=True)
    config.kfac.update(enabled=True, compare_layers=())
    trainer = supervised.make_train(config)
    state0 = trainer.init(jax.random.key(0), {})
    _, rows = jax.jit(trainer.run_chunk)(state0, {})
    model = supervised._model(config, tiny_stream, False)
    x, y = tiny_stream.eval_data(tiny_stream.begin_task(None, 0))
    mask = tiny_stream.output_mask(None)
    direct = kfac_diagnostics(lambda p, i: model.apply({"params": p}, i), state0.params, x, y,
                              loss_fn=lambda o, t: supervised.per_example_loss(
                                  "cross_entropy", o, t, mask),
                              key=jax.random.key(1), compare=False)
    for name in ("kfac_erank_a/hidden_0", "kfac_erank_g/head", "kfac_eps_rank/hidden_0"):
        np.testing.assert_allclose(rows[f"{name}_init"][0], direct[name], rtol=1e-4)
        assert np.isnan(rows[f"{name}_init"][1])  # task 1 is not measured
    for name in rows:  # every column is in the result schema, with its direction
        schema.metric(name)


@pytest.mark.parametrize("method", ["l2_er", pytest.param("l2_er_joint", marks=pytest.mark.slow),
                                    pytest.param("redo", marks=pytest.mark.slow)])
def test_every_lapack_call_of_a_vmapped_chunk_sees_one_matrix(tiny_stream, method):
    """The XLA CPU stall (docs/RELIABILITY.md): a LAPACK call over a batch of matrices blocks
    a pool thread on the pool itself. The whole chunk of a method that takes SVDs (ER ascent,
    joint L2-ER, ReDo's scoring), with the Hessian and KFAC measured and seeds vmapped, must
    give every LAPACK call a single matrix (result rank <= 2)."""
    config = tiny_config(method, measure=True, erank_every=5, erank_batch=5, erank=1.0,
                         redo_every=5)
    config.kfac.update(enabled=True, compare_layers=())
    trainer = supervised.make_train(config)
    keys = jax.vmap(jax.random.key)(jnp.arange(3, dtype=jnp.uint32))
    state = jax.vmap(trainer.init)(keys, {})
    hlo = jax.jit(jax.vmap(trainer.run_chunk)).lower(state, {}).compile().as_text()
    calls = [line for line in hlo.splitlines() if 'custom_call_target="lapack' in line]
    assert calls
    for line in calls:
        result = re.search(r"= \(?[a-z]\d+\[([\d,]*)\]", line)
        assert result and result.group(1).count(",") <= 1, line
