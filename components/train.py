"""The train stage: a registered model family fitted with Keras under a tf.distribute strategy.

Reads the prepare artifact (TFRecords + manifest); writes `model.weights.h5` (last epoch),
`best.weights.h5` (best by `train.checkpoint_metric`; with EMA, averaged weights), `history.json` and
TensorBoard logs. Work in progress
(BackupAndRestore state, per-epoch checkpoints) lives in the side cache `artifacts_dir/.train-work/<fingerprint>/`
(declared in SPEC) so a killed run resumes from its last completed epoch when started again with the same config.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Optional

from components.training import distribute
from components.training.trained import WEIGHT_FILES, build_model, load_weights_checked, save_weights
from configs.config import to_plain
from configs.errors import StageError
from components.base import ComponentSpec, StageContext
from components.data.manifest import Manifest
from models.base import count_parameters
from models.transforms import precision

log = logging.getLogger("pipeline.train")
# resume state (BackupAndRestore, per-epoch checkpoints) under `artifacts_dir/.train-work/<fingerprint>/`
WORK_CACHE = ".train-work"


# --------------------------------------------------------------------------------------------
# Devices and strategy
# --------------------------------------------------------------------------------------------
def configure_devices(replicas: int) -> None:
    """Split the CPU into `replicas` logical devices when there is no GPU (before TF initialises)."""
    import tensorflow as tf

    if replicas <= 1 or tf.config.list_physical_devices("GPU"):
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current and len(current) == replicas:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)])
    except RuntimeError:
        raise StageError(
            f"train.replicas={replicas} must be set before TensorFlow starts; run the train stage in a fresh "
            "process (`python pipeline/run.py --stage train ...`)") from None


def make_strategy(replicas: int):
    """MirroredStrategy over the GPUs (or `replicas` logical CPUs); the default strategy for one device."""
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        devices = [d.name for d in gpus][: replicas or None]
    elif replicas > 1:
        configure_devices(replicas)
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][:replicas]
        if len(devices) < replicas:
            raise StageError(f"train.replicas={replicas} but only {len(devices)} CPU devices exist; "
                             "run the train stage in a fresh process")
    else:
        return tf.distribute.get_strategy()
    if len(devices) == 1:
        return tf.distribute.OneDeviceStrategy(devices[0])
    return tf.distribute.MirroredStrategy(devices)


# --------------------------------------------------------------------------------------------
# Model building and loading
# --------------------------------------------------------------------------------------------
def make_optimizer(train_config, lr: Optional[float] = None, replicas: int = 1):
    """The optimizer `train.optimizer` names (components/optimizers.py), with its betas, epsilon, momentum,
    weight decay, EMA and optional global clipnorm; `lr_scaling=linear` multiplies the rate by the number of
    replicas, so a global batch n times larger takes n times larger steps."""
    from components.training import optimizers

    lr = lr or train_config.lr
    if train_config.lr_scaling == "linear":
        lr *= replicas
    return optimizers.make(train_config.optimizer, learning_rate=lr, weight_decay=train_config.weight_decay,
                           beta_1=train_config.beta_1, beta_2=train_config.beta_2, epsilon=train_config.epsilon,
                           momentum=train_config.momentum, nesterov=train_config.nesterov,
                           ema_momentum=train_config.ema_momentum, clip_norm=train_config.clip_norm)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def train_datasets(prepare, config, model, batch_size: int, seed: Optional[int]):
    """(train, valid or None, steps_per_epoch) for `fit`, targets mapped to the training domain."""
    import tensorflow as tf

    from components.data import records

    manifest = Manifest.read(prepare)
    nb_train = manifest.nb_tracks("train")
    if nb_train == 0:
        raise StageError(f"the prepare artifact {prepare.path} has no training tracks; prepare a data set "
                         "with a train split (data.root=...)")
    rate = config.data.sample_rate
    seq = model.input_samples(int(round(config.train.seq_seconds * rate)))
    segment = int(round(config.data.segment_seconds * rate))
    if seq > segment:
        raise StageError(f"train.seq_seconds={config.train.seq_seconds} needs {seq} samples but TFRecord segments "
                         f"hold {segment} (data.segment_seconds={config.data.segment_seconds}); lower "
                         "train.seq_seconds or raise data.segment_seconds")

    def to_training_domain(mixture, stems):
        return mixture, model.train_targets(stems)

    train = records.load_dataset(prepare, "train", seq_samples=seq, batch_size=batch_size, augment=True,
                                 data_config=config.data, seed=seed, repeat=True)
    train = train.map(to_training_domain, num_parallel_calls=config.train.workers).prefetch(tf.data.AUTOTUNE)
    valid = None
    if manifest.nb_tracks("valid"):
        valid = records.load_dataset(prepare, "valid", seq_samples=seq, batch_size=batch_size, augment=False,
                                     data_config=config.data, seed=seed, repeat=False)
        valid = valid.map(to_training_domain, num_parallel_calls=config.train.workers).cache()
        # a known number of batches (counting them fills the cache): with an unknown one Keras's evaluation runs
        # one more, empty step that adds a zero to every per-target loss tracker, so each val_<target>_loss
        # came out at half its value (one validation batch) while val_loss, their sum, was right
        valid = valid.apply(tf.data.experimental.assert_cardinality(int(valid.reduce(0, lambda count, _: count + 1))))
    steps = config.train.steps_per_epoch or max(1, config.train.samples_per_track * nb_train // batch_size)
    return train, valid, steps


def snapshot_tracks(prepare, config, whole: bool = False):
    """The first `snapshot_seconds` of `snapshot_tracks` validation (or training) tracks; whole=True: every
    validation track at full length (the validation SDR of `train.checkpoint_metric=val_sdr`)."""
    import numpy as np

    from components.data import records

    split = "valid" if Manifest.read(prepare).nb_tracks("valid") else "train"
    length = None if whole else int(round(config.train.snapshot_seconds * config.data.sample_rate))
    found = []
    for name, stems in records.read_tracks(prepare, split):
        stems = {t: s[:length] for t, s in stems.items()}
        mixture = np.sum(list(stems.values()), axis=0).astype("float32")
        found.append((mixture, stems))
        if not whole and len(found) >= config.train.snapshot_tracks:
            break
    return found


# --------------------------------------------------------------------------------------------
# The executor
# --------------------------------------------------------------------------------------------
def run(context: StageContext) -> dict:
    import keras
    import tensorflow as tf

    config = context.config
    tc = config.train
    prepare = context.inputs["prepare"]
    stats = Manifest.read(prepare).stats  # typed (models.base.Stats), or None without a training split
    if tc.deterministic:
        keras.utils.set_random_seed(tc.seed)
        tf.config.experimental.enable_op_determinism()
    else:
        keras.utils.set_random_seed(tc.seed)

    work = context.side_cache(WORK_CACHE) / context.fingerprint
    chief = True
    if tc.strategy == "multi_worker":  # only the chief writes the work dir and commits the artifact
        chief, work = distribute.setup_worker(context, work)
    if context.force and work.exists() and chief:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)

    strategy = distribute.multi_worker_strategy() if tc.strategy == "multi_worker" else make_strategy(tc.replicas)
    replicas = strategy.num_replicas_in_sync
    if tc.batch_size % replicas:
        raise StageError(f"train.batch_size={tc.batch_size} must be a multiple of the {replicas} replicas")
    init = None
    with strategy.scope():
        with precision(tc.precision):  # mixed: the networks compute in float16/bfloat16, variables stay float32
            model = build_model(config, stats)
        if tc.init_from:  # fine-tuning: the init's weights now; a resumed run's backup replaces them in `fit`
            from components.training import finetune

            init = finetune.apply_init(model, config, build_model)
            init["frozen_weights"] = len(finetune.freeze(model, config))
    from components.data.records import verify_shards

    verify_shards(prepare, ("train", "valid"))
    train_ds, valid_ds, steps = train_datasets(prepare, config, model, tc.batch_size,
                                               seed=tc.seed if tc.deterministic or tc.strategy == "multi_worker"
                                               else None)
    if tc.strategy == "multi_worker":  # one seeded stream; every worker keeps its slice of each global batch
        train_ds, valid_ds = distribute.shard_by_data(train_ds), valid_ds and distribute.shard_by_data(valid_ds)
    adapt = model.training.adapt
    if adapt is not None and init is None and not (work.parent / context.fingerprint / "backup").exists():
        adapt(mixture for mixture, _ in train_ds.take(max(1, min(steps, 8))))
    nb_params = count_parameters(model.train_model)
    context.logger.info("model %s: %s trainable parameters, %d replica(s), global batch %d, %d steps/epoch",
                        config.model.name, f"{nb_params:,}", replicas, tc.batch_size, steps)

    history, seconds, examples = _fit_phases(context, model, strategy, train_ds, valid_ds, steps, work)

    out = context.output_dir
    save_weights(model, out, best=work / "best.weights.h5")  # (the TensorBoard logs: kept in train/tensorboard)
    for name in WEIGHT_FILES:
        load_weights_checked(model, out / name)  # never commit weights that do not load
    (out / "history.json").write_text(json.dumps(history, indent=1))
    from components.training.callbacks import plot_curves

    plot_curves(out / "training_curves.png", history, _snapshots(work))
    if (work / "tensorboard").is_dir():
        shutil.copytree(work / "tensorboard", out / "tensorboard")
    shutil.rmtree(work, ignore_errors=True)

    monitor, mode = monitored(tc, valid_ds is not None)
    best_value = _best(history, monitor, mode)
    figures = {
        "parameters": nb_params,
        "replicas": replicas,
        "epochs": len(history),
        "final_loss": history[-1]["loss"] if history else None,
        "best_" + monitor: best_value,
        "seconds": round(seconds, 2),
        "examples_per_second": round(examples / seconds, 2) if seconds else None,
        "seconds_per_step": round(seconds / max(1, examples // tc.batch_size), 4),
    }
    return {
        "figures": figures,
        "stats": stats.to_dict() if stats is not None else {},
        "model": {"name": config.model.name, "family_config": to_plain(model.config)},
        "result": figures["best_" + monitor],
        **({"init": init} if init is not None else {}),
    }


def _snapshots(work: Path) -> list:
    path = work / "snapshots.json"
    return json.loads(path.read_text()) if path.is_file() else []


def monitored(train_config, has_valid: bool):
    """(metric, mode) that picks the best weights (and drives plateau decay and early stopping)."""
    if train_config.checkpoint_metric == "val_sdr":
        return "val_sdr", "max"
    return ("val_loss" if has_valid else "loss"), "min"


def _best(history, monitor: str, mode: str):
    values = [h[monitor] for h in history if monitor in h and math.isfinite(h[monitor])]
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def _recipe_callbacks(context, model, tc, monitor: str, mode: str, best_path: Path, previous_best,
                      baseline=None):
    """The callbacks of `train.*`: validation SDR, best checkpoint, early stopping (counting epochs without
    improving on `baseline` when given), lr schedule."""
    import keras

    callbacks = []
    if monitor == "val_sdr":
        from components.training.callbacks import ValidationSdr

        tracks = snapshot_tracks(context.inputs["prepare"], context.config, whole=True)
        callbacks.append(ValidationSdr(model, tracks, chunk_seconds=model.chunk_seconds or 10.0,
                                       overlap=0.25 if model.inference.overlap is None else model.inference.overlap))
    if tc.checkpoint_metric != "last":
        callbacks.append(keras.callbacks.ModelCheckpoint(
            str(best_path), monitor=monitor, mode=mode, save_best_only=True, save_weights_only=True,
            initial_value_threshold=previous_best))
    if tc.early_stopping:
        callbacks.append(keras.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=tc.patience,
                                                       baseline=baseline, min_delta=tc.early_stopping_min_delta))
    if tc.lr_schedule == "plateau" and tc.plateau_impl == "torch":
        from components.training.callbacks import TorchPlateauCallback

        callbacks.append(TorchPlateauCallback(
            monitor if tc.lr_monitor == "auto" else tc.lr_monitor, mode=mode if tc.lr_monitor == "auto" else "min",
            factor=tc.lr_decay_gamma, patience=tc.lr_decay_patience, threshold=tc.lr_threshold,
            threshold_mode=tc.lr_threshold_mode, cooldown=tc.lr_cooldown, min_lr=tc.lr_min))
    elif tc.lr_schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, mode=mode, patience=tc.lr_decay_patience, factor=tc.lr_decay_gamma, min_lr=tc.lr_min,
            min_delta=tc.lr_threshold, cooldown=tc.lr_cooldown))
    return callbacks


def with_graph_optimization(model, function, *args, **kwargs):
    """`function(*args, **kwargs)`, with Grappler's meta optimiser off while it runs when the model declares
    `graph_optimization=False`; the previous setting is restored after (evaluation and export graphs are
    optimised as usual). A plain call otherwise: `fit` run inside a `with` block (a context manager form of
    this) made the training iterator's teardown wait ~50 s at the end of every `--stage all` (3 of 3 runs)."""
    if model.training.graph_optimization:
        return function(*args, **kwargs)
    import tensorflow as tf

    previous = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        return function(*args, **kwargs)
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": previous})


def fit(model, *args, **kwargs):
    """`model.train_model.fit(...)` under the model's declared graph optimisation."""
    return with_graph_optimization(model, model.train_model.fit, *args, **kwargs)


def compile_model(model, strategy, tc, lr=None):
    with strategy.scope():
        model.train_model.compile(optimizer=make_optimizer(tc, lr=lr, replicas=strategy.num_replicas_in_sync),
                                  loss=model.loss, jit_compile=False)
        # create the optimizer slots now: building them while tracing the first step costs 10+ s
        model.train_model.optimizer.build(model.train_model.trainable_variables)
        build_loss_trackers(model.train_model)


def build_loss_trackers(keras_model) -> None:
    """Create the compiled loss's per-output `Mean` trackers now. Keras creates them while tracing the first
    step when no distribution strategy is set, and variables created during a trace make TensorFlow trace the
    whole step a second time (DTTNet's first step: two traces of ~25,000 ops), or, under a strategy, Keras
    runs the whole model symbolically first. The trackers only need the structure of the outputs."""
    from keras import ops, tree

    loss = getattr(keras_model, "_compile_loss", None)
    if loss is not None and not loss.built:
        zeros = tree.map_structure(lambda tensor: ops.zeros([1] * len(tensor.shape), tensor.dtype), keras_model.output)
        loss.build(zeros, zeros)


def _fit_phases(context, model, strategy, train_ds, valid_ds, steps, work: Path):
    """Fit, then (optionally) the fine-tuning phase with a lower lr and a larger batch."""
    import keras

    from components.training import optimizers
    from components.training.callbacks import SacredLogger, TimeBudget, ValidationSnapshot

    config = context.config
    tc = config.train
    monitor, mode = monitored(tc, valid_ds is not None)
    history_path = work / "history.json"
    sacred_logger = SacredLogger(context.log_scalar, history_path)
    previous_best = _best(sacred_logger.history, monitor, mode)

    compile_model(model, strategy, tc)
    # with EMA the averaged weights are validated, checkpointed and (after `fit`) left in the model
    enter, leave = optimizers.ema_window() if tc.ema_momentum is not None else (None, None)
    callbacks = [
        # the chief's backup (work of every worker: .train-work/<fingerprint>/backup); others only restore it
        distribute.backup_callback(str(work.parent / context.fingerprint / "backup"), chief=context.commit),
        *([enter] if enter else []),
        keras.callbacks.ModelCheckpoint(str(work / "last.weights.h5"), save_weights_only=True),
        *_recipe_callbacks(context, model, tc, monitor, mode, work / "best.weights.h5", previous_best),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.TensorBoard(str(work / "tensorboard"), update_freq="epoch"),
        sacred_logger,
        *([leave] if leave else []),
        *model.training.callbacks,
    ]
    if tc.max_seconds:
        callbacks.append(TimeBudget(tc.max_seconds))
    if tc.snapshot_every_steps:
        callbacks.append(ValidationSnapshot(model, snapshot_tracks(context.inputs["prepare"], config),
                                            tc.snapshot_every_steps, context.log_scalar,
                                            record=work / "snapshots.json", tensorboard=work / "tensorboard",
                                            sample_rate=config.data.sample_rate))
    if tc.strategy == "multi_worker":
        distribute.build_for_fit(model.train_model, train_ds, strategy)
    started = time.time()
    done_before = len(sacred_logger.history)
    fit(model, train_ds, epochs=tc.epochs, steps_per_epoch=steps, validation_data=valid_ds,
        callbacks=callbacks, verbose=2 if context.logger.isEnabledFor(logging.INFO) else 0)
    if model.train_model.stop_training and sacred_logger.history and any(
            not math.isfinite(v) for v in sacred_logger.history[-1].values()):
        raise StageError("training diverged (NaN/Inf loss); lower train.lr or set train.clip_norm")
    examples = (len(sacred_logger.history) - done_before) * steps * tc.batch_size
    if tc.finetune_epochs:
        examples += _finetune(context, model, strategy, valid_ds, work, sacred_logger, monitor, mode)
    return sacred_logger.history, time.time() - started, examples


def _finetune(context, model, strategy, valid_ds, work, sacred_logger, monitor, mode) -> int:
    """Wave-U-Net's second phase. finetune_from=last: the last weights with the optimizer state carried over
    and only the learning rate changed (f90/Wave-U-Net Training.py restores every global variable, Adam's
    slots included); best: the best weights with a fresh optimizer (Stoller et al. 2018, Sec. 4.1)."""
    import keras

    from components.training import optimizers

    config = context.config
    tc = config.train
    batch = tc.finetune_batch_size or 2 * tc.batch_size
    lr = tc.finetune_lr or tc.lr / 10
    train_ds, _, steps = train_datasets(context.inputs["prepare"], config, model, batch,
                                        seed=tc.seed if tc.deterministic else None)
    best = work / "best.weights.h5"
    if tc.finetune_from == "best" or model.train_model.optimizer is None:
        if best.is_file():
            model.train_model.load_weights(str(best))
        compile_model(model, strategy, tc, lr=lr)
    else:
        model.train_model.optimizer.learning_rate.assign(lr * (strategy.num_replicas_in_sync
                                                               if tc.lr_scaling == "linear" else 1))
    if tc.strategy == "multi_worker":
        distribute.build_for_fit(model.train_model, train_ds, strategy)
    start = len(sacred_logger.history)
    previous_best = _best(sacred_logger.history, monitor, mode)
    # Training.optimise keeps best_loss across the rounds: a fine-tuning epoch counts as worse unless it beats it
    callbacks = _recipe_callbacks(context, model, tc, monitor, mode, best, previous_best, baseline=previous_best)
    callbacks = [c for c in callbacks if type(c).__name__ not in ("ReduceLROnPlateau", "TorchPlateauCallback")]  # the reference keeps lr fixed
    enter, leave = optimizers.ema_window() if tc.ema_momentum is not None else (None, None)
    fit(model,
        train_ds, initial_epoch=start, epochs=start + tc.finetune_epochs, steps_per_epoch=steps,
        validation_data=valid_ds, verbose=2,
        callbacks=[*([enter] if enter else []), *callbacks, keras.callbacks.TerminateOnNaN(), sacred_logger,
                   *([leave] if leave else []), *model.training.callbacks])
    return (len(sacred_logger.history) - start) * steps * batch


def setup(config) -> None:
    """The driver's hook before any stage runs: `train.replicas` logical CPU devices, which must exist before
    TensorFlow initialises."""
    if config.train.replicas > 1:
        configure_devices(config.train.replicas)


def init_payload(config):
    """The fine-tune's init weights (path, sha256) in the fingerprint: a changed init trains again."""
    from components.training import finetune

    return finetune.payload(config)


def check_init(config) -> None:
    from components.training import finetune

    finetune.check(config)


SPEC = ComponentSpec(name="train", inputs=("prepare",), config_sections=("data", "model", "train"), executor=run,
                     outputs=WEIGHT_FILES + ("history.json",), side_caches=(WORK_CACHE,), setup=setup,
                     input_payload=init_payload, check_inputs=check_init)
