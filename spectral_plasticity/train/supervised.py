"""The continual supervised trainer: any task stream, any plasticity method, one pure run.

``make_train(config)`` returns a ``ChunkedTrainer``: ``init(key, hparams)`` builds one run
(model, optimizer and method state, its PRNG key) and ``run_chunk(state, hparams)`` trains on
``tasks_per_chunk`` consecutive tasks as one ``lax.scan``; each task is one pass over its
examples, a ``lax.scan`` of optimizer steps. The sweep runner ``vmap``s both over seeds and
hyperparameters and checkpoints between chunks. Both are module-level pure functions of a
static ``Setup`` (model, stream, method and settings, sizes) that ``make_setup`` builds and
checks once from the config (PureJaxRL style).

Per task (one row) it records the online training loss and accuracy, the held-out loss and
accuracy at the task's end, the weight norm, every feature metric of every hidden layer on the
held-out examples, and — for the first task of every chunk, so every ``tasks_per_chunk`` tasks
(``measure_hessian``) — the paper's measurement: the SLQ spectral density and epsilon-rank of
the **new task's** loss on its held-out (or, ``hessian.data="train"``, training) examples at
the new task's initialization (the parameters where the previous task ended; ``head_reset``
zeroes a head after that measurement) and at its end, with the largest Ritz value. With
``kfac.enabled`` the same measured tasks also get ``curvature.kfac_diagnostics`` at the new
task's initialization (``kfac_erank_a/<layer>_init``, ...): the Kronecker factors A and G of
every layer and their agreement with the exact layer GGN. Rows of unmeasured tasks hold NaN.

Hyperparameters in ``hparams`` (vmapped by the runner) override the config: ``learning_rate``
and the sweepable settings of the method (``method_registry.sweepable``). The method acts
through its ``methods.method.Method`` interface: its optimizer chain, its state, its hooks after
every optimizer step and at every task's start.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from spectral_plasticity import metrics, schema
from spectral_plasticity.curvature import (
    dataset_operator,
    kfac_diagnostics,
    spectral_density,
    spectrum_record,
)
from spectral_plasticity.methods import reset_head
from spectral_plasticity.methods.method import Method, StepInputs
from spectral_plasticity.models import MLP, ConvNet, ResNet18, unit_layers
from spectral_plasticity.tasks import TaskStream, make_stream
from spectral_plasticity.train import method_registry
from spectral_plasticity.train.sweep import ChunkedTrainer

PyTree = Any


class RunState(NamedTuple):
    """Everything one run carries between tasks (and into a checkpoint).

    ``model_state`` holds the model's non-trained variables (BatchNorm running statistics of
    ResNet-18), ``{}`` for models without any.
    """

    params: PyTree
    model_state: PyTree
    opt_state: PyTree
    method_state: PyTree
    erank_buffer: jax.Array | tuple[()]  # the last inputs seen, for feature-based methods
    key: jax.Array
    task: jax.Array


def default_config() -> ml_collections.ConfigDict:
    """Defaults of every field ``make_train`` reads (experiments override them)."""
    c = ml_collections.ConfigDict()
    c.trainer = "supervised"
    c.method = "bp"
    c.methods = ("bp",)
    c.seeds = 1
    c.sweep = ml_collections.ConfigDict()
    c.stream = ml_collections.ConfigDict({
        "name": "permuted_mnist", "num_tasks": 10, "train_size": 1000, "eval_size": 500,
        "data_dir": ""})
    c.model = ml_collections.ConfigDict({
        "kind": "mlp", "hidden_sizes": (100, 100, 100), "activation": "relu"})
    c.optimizer = ml_collections.ConfigDict({"name": "sgd", "learning_rate": 1e-2})
    c.batch_size = 1
    c.tasks_per_chunk = 5
    c.measure_hessian = True
    # data: the new task's Hessian on its "eval" (held-out) examples or on the first
    # ``examples`` of its "train" presentation order (the paper's epsilon-rank figures).
    c.hessian = ml_collections.ConfigDict({
        "num_iters": 50, "grid_size": 1000, "eps": 0.01, "chunk_size": 100, "examples": 500,
        "num_probes": 1, "data": "eval"})
    # head_reset: "stream" (the stream's protocol, e.g. Dohare et al.'s zeroed head on
    # continual ImageNet, after the start-of-task Hessian), "never", or "before_hessian".
    c.head_reset = "stream"
    # compare_layers: the layers whose KFAC spectrum is compared with their exact GGN block
    # (Lanczos); ("all",) for every layer, () for none.
    c.kfac = ml_collections.ConfigDict({"enabled": False, "mode": "ggn",
                                        "compare_layers": ("all",), "num_iters": 30})
    c.method_settings = ml_collections.ConfigDict(method_registry.DEFAULTS)
    # Settings of one method over method_settings, e.g. {"l2_er": {"l2": 1e-3}}.
    c.method_settings_by_method = ml_collections.ConfigDict()
    c.plots = ml_collections.ConfigDict({"performance": "eval_accuracy"})
    return c


def _stream(config: ml_collections.ConfigDict) -> TaskStream:
    """``make_stream`` of ``config.stream.name`` with every other field of ``config.stream``
    as its options (``train_size`` 0: all training examples)."""
    options = dict(config.stream)
    name, data_dir = options.pop("name"), options.pop("data_dir", "") or None
    if options.get("train_size") == 0:
        options["train_size"] = None
    try:
        return make_stream(name, data_dir=data_dir, **options)
    except TypeError as error:
        raise ValueError(f"bad option in config.stream for stream {name!r}: {error}") from error


MODEL_KINDS = ("mlp", "convnet", "resnet18")


def _model(config: ml_collections.ConfigDict, stream: TaskStream, layer_norm: bool
           ) -> nn.Module:
    m = config.model
    if m.kind == "mlp":
        return MLP(hidden_sizes=tuple(m.hidden_sizes), num_outputs=stream.num_outputs,
                   activation=m.activation, layer_norm=layer_norm)
    if m.kind == "convnet":
        return ConvNet(num_outputs=stream.num_outputs, activation=m.activation,
                       layer_norm=layer_norm, padding=m.get("padding", "VALID"),
                       kernel_init=m.get("kernel_init", "kaiming_uniform"))
    if m.kind == "resnet18":
        head = tuple(m.get("head_hidden_sizes", ()))
        if layer_norm and not head:
            raise ValueError("resnet18 is batch-normalized; LayerNorm methods need its fully "
                             "connected head (model.head_hidden_sizes), an mlp or a convnet")
        return ResNet18(num_outputs=stream.num_outputs,
                        stage_channels=tuple(m.get("stage_channels", (64, 128, 256, 512))),
                        head_hidden_sizes=head, head_layer_norm=layer_norm)
    raise ValueError(f"unknown model kind {m.kind!r}; choose one of {list(MODEL_KINDS)}")


def per_example_loss(kind: str, outputs: jax.Array, targets: jax.Array,
                     mask: jax.Array | None = None) -> jax.Array:
    """Cross-entropy over the valid logits, or squared error; shape ``(batch,)``."""
    if kind == "squared_error":
        return jnp.sum((outputs - targets) ** 2, axis=-1)
    if mask is not None:
        outputs = jnp.where(mask, outputs, -1e9)
    return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)


def accuracy(outputs: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-example correctness of the argmax over the valid logits; shape ``(batch,)``."""
    return jnp.argmax(jnp.where(mask, outputs, -jnp.inf), -1) == labels


class Setup(NamedTuple):
    """What ``make_train`` fixes once from a config: static, shared by every run of a sweep.

    Attributes:
      config: the configuration (``default_config``'s fields).
      stream: the task stream (``run_chunk`` may rebind its arrays).
      model: the network.
      method, settings: the plasticity method and its resolved settings.
      layer_pairs: the ``(layer, next layer)`` pairs of hidden units, for recycling methods.
      steps: optimizer steps per task.
      er_batch: inputs kept in the ring buffer of feature-based methods (0: none).
      hessian_data, hessian_examples: the examples the Hessian is measured on (``"eval"`` or
        ``"train"``) and how many.
      reset_head_at: when a task's start zeroes the head: ``"never"``, ``"before_hessian"`` or
        ``"after_hessian"``.
      kfac_compare: the layers whose KFAC spectrum is compared with their exact GGN (True: all).
    """

    config: ml_collections.ConfigDict
    stream: TaskStream
    model: nn.Module
    method: Method
    settings: dict[str, Any]
    layer_pairs: list[tuple[str, str]]
    steps: int
    er_batch: int
    hessian_data: str
    hessian_examples: int
    reset_head_at: str
    kfac_compare: bool | tuple[str, ...]


def _reset_head_at(config: ml_collections.ConfigDict, stream: TaskStream) -> str:
    """``config.head_reset`` resolved against the stream's protocol (``stream.reset_head``)."""
    head_reset = config.get("head_reset", "stream")
    if head_reset not in ("stream", "never", "before_hessian"):
        raise ValueError(f"head_reset must be 'stream', 'never' or 'before_hessian', got "
                         f"{head_reset!r}")
    if head_reset == "stream":
        return "after_hessian" if stream.reset_head else "never"
    return head_reset


def _er_batch(config: ml_collections.ConfigDict, method: Method, settings: Mapping[str, Any]
              ) -> int:
    """Rows of the input buffer of a feature-based method (0: the method reads none)."""
    window = int(settings["erank_every"]) * config.batch_size
    if method.erank_ascent and int(settings["erank_batch"]) != window:
        raise ValueError(f"erank_batch {settings['erank_batch']} must be erank_every x "
                         f"batch_size = {window}: the ER step sees the inputs of the batches "
                         "since the last one")
    return int(settings["erank_batch"]) if method.feature_batch else 0


def make_setup(config: ml_collections.ConfigDict) -> Setup:
    """The checked ``Setup`` of ``config`` (a bad field is a ``ValueError`` naming it)."""
    config = ml_collections.ConfigDict(config)
    method, settings = method_registry.for_config(config, "supervised")
    stream = _stream(config)
    steps = stream.check_batch_size(config.batch_size)
    if config.tasks_per_chunk < 1 or stream.num_tasks % config.tasks_per_chunk:
        raise ValueError(f"tasks_per_chunk {config.tasks_per_chunk} must divide num_tasks "
                         f"{stream.num_tasks}")
    model = _model(config, stream, method.layer_norm)
    hess = config.hessian
    hessian_data = hess.get("data", "eval")
    if hessian_data not in ("eval", "train"):
        raise ValueError(f"hessian.data must be 'eval' or 'train', got {hessian_data!r}")
    layers = tuple(config.kfac.compare_layers)
    return Setup(
        config=config, stream=stream, model=model, method=method, settings=settings,
        layer_pairs=unit_layers(model) if method.recycles else [], steps=steps,
        er_batch=_er_batch(config, method, settings), hessian_data=hessian_data,
        hessian_examples=min(hess.examples, stream.eval_size if hessian_data == "eval"
                             else stream.train_size),
        reset_head_at=_reset_head_at(config, stream),
        kfac_compare=True if layers == ("all",) else layers)


# ------------------------------------------------------------------------------------------
# The model, the optimizer and a run's state


def _init_variables(setup: Setup, key: jax.Array) -> tuple[PyTree, PyTree]:
    """Fresh ``(params, model_state)``."""
    variables = setup.model.init(key, jnp.zeros((1, *setup.stream.input_shape), jnp.float32))
    return variables["params"], {k: v for k, v in variables.items() if k != "params"}


def _predict(setup: Setup, params: PyTree, model_state: PyTree, x: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Outputs and features in evaluation mode (BatchNorm running statistics)."""
    return setup.model.apply({"params": params, **model_state}, x)


def _train_apply(setup: Setup, params: PyTree, model_state: PyTree, x: jax.Array):
    """Outputs, features and the updated model state in training mode."""
    if not model_state:
        return setup.model.apply({"params": params}, x), model_state
    train_kwargs = {"train": True} if isinstance(setup.model, ResNet18) else {}
    return setup.model.apply({"params": params, **model_state}, x, mutable=list(model_state),
                             **train_kwargs)


def _optimizer(setup: Setup, hparams: Mapping[str, jax.Array]
               ) -> optax.GradientTransformationExtraArgs:
    return method_registry.optimizer(setup.method, setup.settings, dict(setup.config.optimizer),
                                     hparams)


def init(setup: Setup, key: jax.Array, hparams: Mapping[str, jax.Array]) -> RunState:
    """One run's state before its first task."""
    method_registry.check_sweep(setup.method, list(hparams))
    key, init_key = jax.random.split(key)
    params, model_state = _init_variables(setup, init_key)
    er_batch = setup.er_batch
    return RunState(params=params, model_state=model_state,
                    opt_state=_optimizer(setup, hparams).init(params),
                    method_state=setup.method.init_state(params, setup.layer_pairs),
                    erank_buffer=(jnp.zeros((er_batch, *setup.stream.input_shape), jnp.float32)
                                  if er_batch else ()),
                    key=key, task=jnp.zeros((), jnp.int32))


# ------------------------------------------------------------------------------------------
# The measurements


class Probe(NamedTuple):
    """The examples a task's curvature is measured on, and the task's valid outputs."""

    x: jax.Array
    y: jax.Array
    mask: jax.Array


def _measured_model(setup: Setup, model_state: PyTree, probe: Probe):
    """``(apply(params, x), per-example loss(outputs, targets))`` of the measurements."""
    loss_fn = lambda out, t: per_example_loss(setup.stream.loss, out, t, probe.mask)
    apply = lambda p, inputs: _predict(setup, p, model_state, inputs)
    return apply, loss_fn


def _curvature(setup: Setup, params: PyTree, model_state: PyTree, probe: Probe, key: jax.Array
               ) -> dict[str, jax.Array]:
    """The SLQ spectral density of the Hessian of the loss on ``probe`` and its record."""
    hess = setup.config.hessian
    apply, loss_fn = _measured_model(setup, model_state, probe)
    op = dataset_operator(apply, loss_fn, params, (probe.x, probe.y), chunk_size=hess.chunk_size)
    density = spectral_density(op, key=key, num_iters=min(hess.num_iters, op.dim),
                               num_probes=hess.num_probes, grid_size=hess.grid_size)
    return spectrum_record(density, hess.eps)


def _kfac(setup: Setup, params: PyTree, model_state: PyTree, probe: Probe, key: jax.Array
          ) -> dict[str, jax.Array]:
    """``kfac_diagnostics`` of the loss on ``probe``."""
    apply, loss_fn = _measured_model(setup, model_state, probe)
    kfac = setup.config.kfac
    return kfac_diagnostics(apply, params, probe.x, probe.y, loss_fn=loss_fn, key=key,
                            mode=kfac.mode, compare=setup.kfac_compare,
                            num_iters=kfac.num_iters, chunk_size=setup.config.hessian.chunk_size)


def _measure(fn: Callable[..., dict[str, jax.Array]], measure: bool, *args: Any
             ) -> dict[str, jax.Array]:
    """``fn(*args)``, or NaN in its shapes (the rows of unmeasured tasks)."""
    if measure:
        return fn(*args)
    return jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), jax.eval_shape(fn, *args))


def _measure_at_init(setup: Setup, params: PyTree, model_state: PyTree, opt_state: PyTree,
                     probe: Probe, key: jax.Array, measure: bool):
    """The curvature (and KFAC, under ``"kfac"``) at the new task's initialization.

    Returns ``(record, params, opt_state)``: with ``measure`` the parameters come out of an
    ``optimization_barrier`` with the record, so the measurement finishes before training
    starts. Left independent, XLA's CPU runtime runs the measurement's loops concurrently
    with each other and with the training loop, and that combination intermittently never
    finished (all threads asleep; see ``spectral_plasticity/runtime.py``).
    """
    at_init = _measure(functools.partial(_curvature, setup), measure, params, model_state,
                       probe, key)
    if setup.config.kfac.enabled:
        if measure:  # one measurement loop after the other
            at_init, params = jax.lax.optimization_barrier((at_init, params))
        kfac_row = _measure(functools.partial(_kfac, setup), measure, params, model_state,
                            probe, jax.random.fold_in(key, 1))
        at_init = {**at_init, "kfac": kfac_row}
    if measure:
        at_init, params, opt_state = jax.lax.optimization_barrier((at_init, params, opt_state))
    return at_init, params, opt_state


# ------------------------------------------------------------------------------------------
# One task


class TaskInputs(NamedTuple):
    """What every optimizer step of one task reads."""

    tx: optax.GradientTransformationExtraArgs
    values: dict[str, Any]
    stream: TaskStream
    task_state: Any
    mask: jax.Array
    key: jax.Array
    task: jax.Array


def _start_task(setup: Setup, state: RunState, tx: optax.GradientTransformation,
                key: jax.Array) -> tuple[PyTree, PyTree, PyTree]:
    """``(params, model_state, opt_state)`` after the method's task-start hook and, when
    asked before the Hessian, the zeroed head (Dohare et al.'s continual ImageNet)."""
    params, opt_state = setup.method.at_task_start(
        state.params, state.opt_state, lambda: _init_variables(setup, key)[0], tx)
    model_state = state.model_state
    if setup.method.reinitializes:  # the model's statistics restart with its parameters
        model_state = _init_variables(setup, key)[1]
    if setup.reset_head_at == "before_hessian":
        params, opt_state = _zero_head(params, opt_state)
    return params, model_state, opt_state


def _zero_head(params: PyTree, opt_state: PyTree) -> tuple[PyTree, PyTree]:
    return reset_head(params, opt_state, jax.tree.map(jnp.zeros_like, params))


def _train_step(setup: Setup, inputs: TaskInputs, carry: tuple, i: jax.Array
                ) -> tuple[tuple, dict[str, jax.Array]]:
    """Optimizer step ``i`` of a task, then the method's hooks; ``carry`` is ``(params,
    model_state, opt_state, method_state, input buffer)``."""
    params, model_state, opt_state, method_state, buffer = carry
    step_key = jax.random.fold_in(inputs.key, i)
    x, y = inputs.stream.train_batch(inputs.task_state, i, setup.config.batch_size)
    classification = setup.stream.loss == "cross_entropy"

    def loss_fn(p):
        (out, feats), new_model_state = _train_apply(setup, p, model_state, x)
        loss = jnp.mean(per_example_loss(setup.stream.loss, out, y, inputs.mask))
        return loss, (out, feats, new_model_state)

    (loss, (out, feats, model_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    er_batch = setup.er_batch
    if er_batch:  # a ring of the last er_batch inputs (their users ignore row order)
        rows = (inputs.task * setup.steps + i) * x.shape[0] + jnp.arange(x.shape[0])
        buffer = buffer.at[rows[-er_batch:] % er_batch].set(x[-er_batch:])
    features_fn = lambda p: _predict(setup, p, model_state, buffer)[1]
    updates, opt_state = inputs.tx.update(grads, opt_state, params, features_fn=features_fn,
                                          key=step_key)
    params = optax.apply_updates(params, updates)
    params, opt_state, method_state, _ = setup.method.after_update(
        inputs.values, params, opt_state, method_state,
        StepInputs(step=i, features=feats, features_fn=features_fn,
                   scoring_features=features_fn,
                   fresh_params=lambda: _init_variables(setup, step_key)[0],
                   layer_pairs=setup.layer_pairs))
    outputs = {"loss": loss}
    if classification:
        outputs["correct"] = jnp.mean(accuracy(out, y, inputs.mask))
    return (params, model_state, opt_state, method_state, buffer), outputs


def _evaluate(setup: Setup, params: PyTree, model_state: PyTree, online: dict[str, jax.Array],
              eval_x: jax.Array, eval_y: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """The task's row without its curvature: online and held-out loss (and accuracy), the
    weight norm and the feature metrics on the held-out examples."""
    eval_out, eval_features = _predict(setup, params, model_state, eval_x)
    row = {
        "train_loss": jnp.mean(online["loss"]),
        "eval_loss": jnp.mean(per_example_loss(setup.stream.loss, eval_out, eval_y, mask)),
        "weight_norm": metrics.weight_norm(params),
        **metrics.feature_metrics(eval_features),
    }
    if setup.stream.loss == "cross_entropy":
        row["train_accuracy"] = jnp.mean(online["correct"])
        row["eval_accuracy"] = jnp.mean(accuracy(eval_out, eval_y, mask))
    return row


def run_task(setup: Setup, stream: TaskStream, state: RunState,
             hparams: Mapping[str, jax.Array], measure: bool
             ) -> tuple[RunState, dict[str, jax.Array]]:
    """One task: its start (hooks, head reset, curvature at its initialization), one pass of
    optimizer steps over its examples, its row (with the curvature at its end)."""
    tx = _optimizer(setup, hparams)
    values = setup.method.values(setup.settings, hparams)
    stream_key = jax.random.fold_in(state.key, 0)
    task_key = jax.random.fold_in(jax.random.fold_in(state.key, 1), state.task)
    task_state = stream.begin_task(stream_key, state.task)
    mask = stream.output_mask(task_state)
    eval_x, eval_y = stream.eval_data(task_state)
    probe = Probe(*stream.hessian_data(task_state, setup.hessian_data, setup.hessian_examples),
                  mask)
    k_reset, k_steps, k_init, k_end = jax.random.split(task_key, 4)
    params, model_state, opt_state = _start_task(setup, state, tx, k_reset)
    at_init, params, opt_state = _measure_at_init(setup, params, model_state, opt_state, probe,
                                                  k_init, measure)
    if setup.reset_head_at == "after_hessian":
        params, opt_state = _zero_head(params, opt_state)
    inputs = TaskInputs(tx, values, stream, task_state, mask, k_steps, state.task)
    carry = (params, model_state, opt_state, state.method_state, state.erank_buffer)
    (params, model_state, opt_state, method_state, buffer), online = jax.lax.scan(
        functools.partial(_train_step, setup, inputs), carry, jnp.arange(setup.steps))
    row = _evaluate(setup, params, model_state, online, eval_x, eval_y, mask)
    at_end = _measure(functools.partial(_curvature, setup), measure, params, model_state, probe,
                      k_end)
    if measure:  # before the next task (see _measure_at_init)
        at_end, params, opt_state = jax.lax.optimization_barrier((at_end, params, opt_state))
    kfac_row = at_init.pop("kfac", {})
    row |= schema.start_end_columns(at_init, at_end)
    row |= {schema.at_init(k): v for k, v in kfac_row.items()}
    new_state = RunState(params, model_state, opt_state, method_state, buffer, state.key,
                         state.task + 1)
    return new_state, row


def run_chunk(setup: Setup, state: RunState, hparams: Mapping[str, jax.Array],
              data: Mapping[str, jax.Array] | None = None
              ) -> tuple[RunState, dict[str, jax.Array]]:
    """``tasks_per_chunk`` tasks, the first measured (``measure_hessian``); ``data``: the
    stream's arrays (``stream.arrays()``) as a jit argument, or None to read them from the
    stream (embedded as constants)."""
    bound = setup.stream if data is None else setup.stream.with_arrays(dict(data))
    task = lambda s, measure: run_task(setup, bound, s, hparams, measure)
    tasks_per_chunk = setup.config.tasks_per_chunk
    if setup.config.measure_hessian:
        state, first = task(state, True)
        state, rest = jax.lax.scan(lambda s, _: task(s, False), state, None,
                                   length=tasks_per_chunk - 1)
        rows = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)
    else:
        state, rows = jax.lax.scan(lambda s, _: task(s, False), state, None,
                                   length=tasks_per_chunk)
    return state, rows


def make_train(config: ml_collections.ConfigDict) -> ChunkedTrainer:
    """The chunked trainer of ``config`` (see ``default_config`` for the fields)."""
    setup = make_setup(config)
    tasks_per_chunk = setup.config.tasks_per_chunk
    return ChunkedTrainer(init=functools.partial(init, setup),
                          run_chunk=functools.partial(run_chunk, setup),
                          num_chunks=setup.stream.num_tasks // tasks_per_chunk,
                          rows_per_chunk=tasks_per_chunk, row_name="task",
                          work_per_row=1, work_unit="tasks",
                          divergence_keys=("train_loss", "eval_loss", "weight_norm"),
                          data=setup.stream.arrays())
