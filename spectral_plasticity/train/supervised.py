"""The continual supervised trainer: any task stream, any plasticity method, one pure run.

``make_train(config)`` returns a ``ChunkedTrainer``: ``init(key, hparams)`` builds one run
(model, optimizer and method state, its PRNG key) and ``run_chunk(state, hparams)`` trains on
``tasks_per_chunk`` consecutive tasks as one ``lax.scan``; each task is one pass over its
examples, a ``lax.scan`` of optimizer steps. The sweep runner ``vmap``s both over seeds and
hyperparameters and checkpoints between chunks.

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

from collections.abc import Mapping
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
from spectral_plasticity.methods.method import StepInputs
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
        "num_probes": 2, "data": "eval"})
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


def make_train(config: ml_collections.ConfigDict) -> ChunkedTrainer:
    """The chunked trainer of ``config`` (see ``default_config`` for the fields)."""
    config = ml_collections.ConfigDict(config)
    method, settings = method_registry.for_config(config, "supervised")
    stream = _stream(config)
    steps = stream.check_batch_size(config.batch_size)
    if config.tasks_per_chunk < 1 or stream.num_tasks % config.tasks_per_chunk:
        raise ValueError(f"tasks_per_chunk {config.tasks_per_chunk} must divide num_tasks "
                         f"{stream.num_tasks}")
    model = _model(config, stream, method.layer_norm)
    pairs = unit_layers(model) if method.recycles else []
    loss_kind = stream.loss
    classification = loss_kind == "cross_entropy"
    hess = config.hessian
    hessian_data = hess.get("data", "eval")
    if hessian_data not in ("eval", "train"):
        raise ValueError(f"hessian.data must be 'eval' or 'train', got {hessian_data!r}")
    eval_examples = min(hess.examples, stream.eval_size if hessian_data == "eval"
                        else stream.train_size)
    head_reset = config.get("head_reset", "stream")
    if head_reset not in ("stream", "never", "before_hessian"):
        raise ValueError(f"head_reset must be 'stream', 'never' or 'before_hessian', got "
                         f"{head_reset!r}")
    reset_head_at = ("never" if head_reset == "stream" and not stream.reset_head
                     else "after_hessian" if head_reset == "stream" else head_reset)
    window = int(settings.get("erank_every", 0)) * config.batch_size
    if "erank_every" in method.settings and int(settings["erank_batch"]) != window:
        raise ValueError(f"erank_batch {settings['erank_batch']} must be erank_every x "
                         f"batch_size = {window}: the ER step sees the inputs of the batches "
                         "since the last one")
    er_batch = int(settings["erank_batch"]) if method.feature_batch else 0
    dummy = jnp.zeros((1, *stream.input_shape), jnp.float32)

    train_kwargs = {"train": True} if isinstance(model, ResNet18) else {}

    def init_variables(key):
        variables = model.init(key, dummy)
        return variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def init_params(key):
        return init_variables(key)[0]

    def predict(params, model_state, x):
        """Outputs and features in evaluation mode (BatchNorm running statistics)."""
        return model.apply({"params": params, **model_state}, x)

    def train_apply(params, model_state, x):
        """Outputs, features and the updated model state in training mode."""
        if not model_state:
            return model.apply({"params": params}, x), model_state
        return model.apply({"params": params, **model_state}, x, mutable=list(model_state),
                           **train_kwargs)

    def optimizer(hparams):
        return method_registry.optimizer(method, settings, dict(config.optimizer), hparams)

    def init(key, hparams):
        method_registry.check_sweep(method, list(hparams))
        key, init_key = jax.random.split(key)
        params, model_state = init_variables(init_key)
        return RunState(params=params, model_state=model_state,
                        opt_state=optimizer(hparams).init(params),
                        method_state=method.init_state(params, pairs),
                        erank_buffer=(jnp.zeros((er_batch, *stream.input_shape), jnp.float32)
                                      if er_batch else ()),
                        key=key, task=jnp.zeros((), jnp.int32))

    def curvature(params, model_state, x, y, mask, key):
        loss_fn = lambda out, t: per_example_loss(loss_kind, out, t, mask)
        apply = lambda p, inputs: predict(p, model_state, inputs)
        op = dataset_operator(apply, loss_fn, params, (x, y), chunk_size=hess.chunk_size)
        density = spectral_density(op, key=key, num_iters=min(hess.num_iters, op.dim),
                                   num_probes=hess.num_probes, grid_size=hess.grid_size)
        return spectrum_record(density, hess.eps)

    def nan_curvature(*args):
        """NaN in the shapes ``curvature(*args)`` records (rows of unmeasured tasks)."""
        return jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype),
                            jax.eval_shape(curvature, *args))

    layers = tuple(config.kfac.compare_layers)
    kfac_compare = True if layers == ("all",) else layers

    def kfac_metrics(params, model_state, x, y, mask, key):
        loss_fn = lambda out, t: per_example_loss(loss_kind, out, t, mask)
        apply = lambda p, inputs: predict(p, model_state, inputs)
        return kfac_diagnostics(apply, params, x, y, loss_fn=loss_fn, key=key,
                                mode=config.kfac.mode, compare=kfac_compare,
                                num_iters=config.kfac.num_iters, chunk_size=hess.chunk_size)

    def run_task(stream: TaskStream, state: RunState, hparams, measure: bool):
        tx = optimizer(hparams)
        values = method.values(settings, hparams)
        stream_key = jax.random.fold_in(state.key, 0)
        task_key = jax.random.fold_in(jax.random.fold_in(state.key, 1), state.task)
        task_state = stream.begin_task(stream_key, state.task)
        mask = stream.output_mask(task_state)
        eval_x, eval_y = stream.eval_data(task_state)
        hess_x, hess_y = stream.hessian_data(task_state, hessian_data, eval_examples)
        params, model_state, opt_state = state.params, state.model_state, state.opt_state
        k_reset, k_steps, k_init, k_end = jax.random.split(task_key, 4)
        params, opt_state = method.at_task_start(params, opt_state,
                                                 lambda: init_variables(k_reset)[0], tx)
        if method.reinitializes:  # the model's statistics restart with its parameters
            model_state = init_variables(k_reset)[1]
        zero_head = lambda p, o: reset_head(p, o, jax.tree.map(jnp.zeros_like, p))
        if reset_head_at == "before_hessian":  # zeroed, as Dohare et al.'s continual ImageNet
            params, opt_state = zero_head(params, opt_state)
        at_init = (curvature if measure else nan_curvature)(params, model_state, hess_x, hess_y,
                                                            mask, k_init)
        if config.kfac.enabled:
            if measure:  # one measurement loop after the other (see below)
                at_init, params = jax.lax.optimization_barrier((at_init, params))
            k_kfac = jax.random.fold_in(k_init, 1)
            kfac_args = (params, model_state, hess_x, hess_y, mask, k_kfac)
            kfac_row = (kfac_metrics(*kfac_args) if measure else jax.tree.map(
                lambda s: jnp.full(s.shape, jnp.nan, s.dtype),
                jax.eval_shape(kfac_metrics, *kfac_args)))
            at_init = {**at_init, "kfac": kfac_row}
        if measure:
            # The measurement must finish before training starts (and, below, before the next
            # task): left independent, XLA's CPU runtime runs its loops concurrently with each
            # other and with the training loop, and that combination intermittently never
            # finished (all threads asleep; see spectral_plasticity/runtime.py).
            at_init, params, opt_state = jax.lax.optimization_barrier(
                (at_init, params, opt_state))
        if reset_head_at == "after_hessian":
            params, opt_state = zero_head(params, opt_state)

        def step(carry, i):
            params, model_state, opt_state, method_state, buffer = carry
            step_key = jax.random.fold_in(k_steps, i)
            x, y = stream.train_batch(task_state, i, config.batch_size)

            def loss_fn(p):
                (out, feats), new_model_state = train_apply(p, model_state, x)
                loss = jnp.mean(per_example_loss(loss_kind, out, y, mask))
                return loss, (out, feats, new_model_state)

            (loss, (out, feats, model_state)), grads = jax.value_and_grad(
                loss_fn, has_aux=True)(params)
            if er_batch:  # a ring of the last er_batch inputs (their users ignore row order)
                rows = (state.task * steps + i) * x.shape[0] + jnp.arange(x.shape[0])
                buffer = buffer.at[rows[-er_batch:] % er_batch].set(x[-er_batch:])
            features_fn = lambda p: predict(p, model_state, buffer)[1]
            updates, opt_state = tx.update(grads, opt_state, params, features_fn=features_fn,
                                           key=step_key)
            params = optax.apply_updates(params, updates)
            params, opt_state, method_state, _ = method.after_update(
                values, params, opt_state, method_state,
                StepInputs(step=i, features=feats, features_fn=features_fn,
                           scoring_features=features_fn,
                           fresh_params=lambda: init_params(step_key), layer_pairs=pairs))
            outputs = {"loss": loss}
            if classification:
                outputs["correct"] = jnp.mean(accuracy(out, y, mask))
            return (params, model_state, opt_state, method_state, buffer), outputs

        carry = (params, model_state, opt_state, state.method_state, state.erank_buffer)
        (params, model_state, opt_state, method_state, buffer), online = jax.lax.scan(
            step, carry, jnp.arange(steps))
        eval_out, eval_features = predict(params, model_state, eval_x)
        row = {
            "train_loss": jnp.mean(online["loss"]),
            "eval_loss": jnp.mean(per_example_loss(loss_kind, eval_out, eval_y, mask)),
            "weight_norm": metrics.weight_norm(params),
            **metrics.feature_metrics(eval_features),
        }
        if classification:
            row["train_accuracy"] = jnp.mean(online["correct"])
            row["eval_accuracy"] = jnp.mean(accuracy(eval_out, eval_y, mask))
        at_end = (curvature if measure else nan_curvature)(params, model_state, hess_x, hess_y,
                                                           mask, k_end)
        if measure:
            at_end, params, opt_state = jax.lax.optimization_barrier((at_end, params, opt_state))
        kfac_row = at_init.pop("kfac", {})
        row |= {schema.at_init(k): v for k, v in at_init.items()}
        row |= {schema.at_end(k): v for k, v in at_end.items()}
        row["density_grid"] = row.pop(schema.at_init("density_grid"))
        row |= {schema.at_init(k): v for k, v in kfac_row.items()}
        new_state = RunState(params, model_state, opt_state, method_state, buffer, state.key,
                             state.task + 1)
        return new_state, row

    def run_chunk(state: RunState, hparams: Mapping[str, jax.Array],
                  data: Mapping[str, jax.Array] | None = None):
        """``tasks_per_chunk`` tasks; ``data``: the stream's arrays (``stream.arrays()``) as a
        jit argument, or None to read them from the stream (embedded as constants)."""
        bound = stream if data is None else stream.with_arrays(dict(data))
        task = lambda s, measure: run_task(bound, s, hparams, measure)
        if config.measure_hessian:
            state, first = task(state, True)
            state, rest = jax.lax.scan(lambda s, _: task(s, False), state, None,
                                       length=config.tasks_per_chunk - 1)
            rows = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)
        else:
            state, rows = jax.lax.scan(lambda s, _: task(s, False), state, None,
                                       length=config.tasks_per_chunk)
        return state, rows

    return ChunkedTrainer(init=init, run_chunk=run_chunk,
                          num_chunks=stream.num_tasks // config.tasks_per_chunk,
                          rows_per_chunk=config.tasks_per_chunk, row_name="task",
                          work_per_row=1, work_unit="tasks",
                          divergence_keys=("train_loss", "eval_loss", "weight_norm"),
                          data=stream.arrays())
