"""Training across machines: `train.strategy=multi_worker` (tf.distribute.MultiWorkerMirroredStrategy).

Every host runs the same command, `python pipeline/run.py --stage train with ... train.strategy=multi_worker`,
with its own `TF_CONFIG`:

    {"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}

Worker 0 (or a task of type `chief`) is the chief: it alone writes checkpoints, the BackupAndRestore state,
TensorBoard logs, the history and the train artifact. The others train in lockstep (gradients all-reduced
every step), write nothing into `artifacts_dir`, and restore from the chief's BackupAndRestore state when
the job restarts, so `artifacts_dir` must be storage every worker sees (NFS, a shared volume, ...).
Each worker reads the same seeded stream of global batches and keeps its own slice of every batch
(tf.data auto-sharding by DATA): together the workers train on exactly the batches one process would.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Tuple

from configs.errors import StageError

log = logging.getLogger("pipeline.train")
_STRATEGY = None


def cluster_from_env() -> Tuple[dict, str, int]:
    """(cluster spec, task type, task index) from TF_CONFIG; a one-line StageError when it is unusable."""
    raw = os.environ.get("TF_CONFIG")
    fix = ("set TF_CONFIG on every host, e.g. TF_CONFIG='{\"cluster\": {\"worker\": [\"host0:12345\", "
           "\"host1:12345\"]}, \"task\": {\"type\": \"worker\", \"index\": 0}}' (see README)")
    if not raw:
        raise StageError(f"train.strategy=multi_worker needs the TF_CONFIG environment variable; {fix}")
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        task_type, index = str(task["type"]), int(task["index"])
    except (ValueError, KeyError, TypeError) as error:
        raise StageError(f"TF_CONFIG is not a cluster description ({type(error).__name__}: {error}); {fix}") from None
    if task_type not in cluster or not 0 <= index < len(cluster[task_type]):
        raise StageError(f"TF_CONFIG task {task_type}:{index} is not in its cluster {json.dumps(cluster)}; {fix}")
    unknown = sorted(set(cluster) - {"chief", "worker"})
    if unknown:
        raise StageError(f"TF_CONFIG has '{unknown[0]}' tasks; MultiWorkerMirroredStrategy takes chief and worker "
                         f"tasks only")
    return cluster, task_type, index


def is_chief_task(cluster: dict, task_type: str, index: int) -> bool:
    """The chief: the `chief` task, or worker 0 when the cluster has no chief (TensorFlow's own rule)."""
    return task_type == "chief" or (task_type == "worker" and index == 0 and "chief" not in cluster)


def multi_worker_strategy():
    """The process's MultiWorkerMirroredStrategy (created once: it must exist before TensorFlow runs any op)."""
    global _STRATEGY
    if _STRATEGY is None:
        cluster_from_env()  # a clear error before TensorFlow's own
        import tensorflow as tf

        try:
            _STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()
        except (RuntimeError, ValueError) as error:
            raise StageError(f"cannot start MultiWorkerMirroredStrategy ({' '.join(str(error).split())[:200]}); "
                             f"run the train stage in a fresh process with TF_CONFIG set") from None
    return _STRATEGY


def setup_worker(context, work):
    """Checks, the strategy (before any TensorFlow op), and where this worker writes: (is chief, work dir).

    A non-chief worker trains into a private `<work>-<task>` folder it deletes at the end, and does not
    commit the stage (`context.commit = False`): the chief's artifact is the job's artifact.
    """
    from pathlib import Path

    if context.config.train.max_seconds:
        raise StageError("train.max_seconds stops each process on its own clock, which would leave the other "
                         "workers waiting; with train.strategy=multi_worker bound the run with train.epochs")
    cluster, task_type, index = cluster_from_env()
    multi_worker_strategy()
    chief = is_chief_task(cluster, task_type, index)
    context.commit = chief
    work = Path(work)
    if chief:
        return True, work
    return False, work.with_name(f"{work.name}-{task_type}-{index}")


def shard_by_data(dataset):
    """Each worker keeps its slice of every global batch of one shared (seeded) stream."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def backup_callback(backup_dir: str, chief: bool):
    """The resume state of a training run (`.train-work/<fingerprint>/backup`): the chief writes it, atomically;
    every worker restores from the chief's state (Keras 3's BackupAndRestore is not multi-worker aware: two
    writers would race on one file)."""
    return atomic_backup_class()(backup_dir, writer=chief)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_backup_class():
    """`keras.callbacks.BackupAndRestore` whose state survives a kill at any moment.

    Keras writes `latest.weights.h5` in place, so a kill while it writes leaves a torn file that every rerun
    fails to load. Here a backup is written beside (`incoming.*`), flushed to disk, and renamed into place
    after the previous pair has been renamed to `previous.*`; `training_metadata.json` records the epoch and the
    sha256 of its weights file. On restore, the newest metadata whose weights file is present with that
    checksum wins, so a torn or missing latest pair falls back to the previous good one.
    """
    import keras

    from components.artifacts import file_digest

    class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
        def __init__(self, backup_dir: str, writer: bool = True):
            super().__init__(backup_dir, delete_checkpoint=writer)
            self.writer = writer
            self._incoming_weights = os.path.join(backup_dir, "incoming.weights.h5")
            self._incoming_metadata = os.path.join(backup_dir, "incoming_metadata.json")
            # Keras loads only `*.weights.h5` names, so the previous pair is not Keras' `*.bkp`
            self._prev_weights_path = os.path.join(backup_dir, "previous.weights.h5")
            self._prev_training_metadata_path = os.path.join(backup_dir, "previous_metadata.json")

        def _save_model(self):
            if not self.writer:
                return
            os.makedirs(self.backup_dir, exist_ok=True)
            self.model.save_weights(filepath=self._incoming_weights, overwrite=True)
            _fsync(self._incoming_weights)
            metadata = {"epoch": self._current_epoch, "batch": self._last_batch_seen,
                        "weights_sha256": file_digest(self._incoming_weights)}
            with open(self._incoming_metadata, "w") as handle:
                handle.write(json.dumps(metadata))
                handle.flush()
                os.fsync(handle.fileno())
            if os.path.exists(self._weights_path) and os.path.exists(self._training_metadata_path):
                os.replace(self._weights_path, self._prev_weights_path)
                os.replace(self._training_metadata_path, self._prev_training_metadata_path)
            os.replace(self._incoming_weights, self._weights_path)
            os.replace(self._incoming_metadata, self._training_metadata_path)
            _fsync(self.backup_dir)

        def good_state(self):
            """(weights path, epoch) of the newest complete backup, or None when there is none."""
            states = []
            for path in (self._training_metadata_path, self._prev_training_metadata_path):
                try:
                    with open(path) as handle:
                        metadata = json.loads(handle.read())
                    states.append((int(metadata["epoch"]), metadata.get("weights_sha256")))
                except (OSError, ValueError, KeyError, TypeError):
                    continue
            for epoch, digest in sorted(states, key=lambda state: -state[0]):
                for weights in (self._weights_path, self._prev_weights_path):
                    if os.path.isfile(weights) and (digest is None or file_digest(weights) == digest):
                        return weights, epoch
            return None

        def on_train_begin(self, logs=None):
            if not self.model.built:
                raise ValueError("BackupAndRestore needs a built model")
            state = self.good_state()
            if state is None:
                if any(os.path.exists(p) for p in (self._weights_path, self._prev_weights_path)):
                    log.warning("train: no complete backup in %s (torn files from a kill); training starts "
                                "from epoch 1", self.backup_dir)
                return
            weights, epoch = state
            if self.model.optimizer is not None and not self.model.optimizer.built:
                self.model.optimizer.build(self.model.trainable_variables)
            self.model.load_weights(weights)
            self.model._initial_epoch = epoch
            if weights != self._weights_path:
                log.warning("train: the latest backup in %s was incomplete; resumed from the previous one "
                            "(epoch %d)", self.backup_dir, epoch)

        def on_train_end(self, logs=None):
            if self.writer:
                super().on_train_end(logs)

    return AtomicBackupAndRestore


def build_for_fit(keras_model, dataset, strategy) -> None:
    """Build the compiled model's metrics and loss from the dataset's element spec before `fit`.

    Keras 3 (3.10-3.12) builds them in `fit` from a first batch that it all-reduces with
    `strategy.reduce(MEAN, batch)`, which MultiWorkerMirroredStrategy rejects for a nested batch
    ("Attempt to convert a value (PerReplica...)") and which also consumes a batch; the build only needs
    shapes, so it is done here and fit's own is skipped for this model.
    """
    with strategy.scope():
        keras_model._symbolic_build(data_batch=dataset.element_spec)
    keras_model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    _patch_keras_metric_reduction()


_PATCHED = False


def _patch_keras_metric_reduction() -> None:
    """Keras 3 (3.15) reduces each logged metric of a multi-worker step with `strategy.reduce(MEAN, v, axis=0)`,
    which fails on scalars ("Invalid reduction dimension 0 for input with 0 dimensions"). The mean over
    every replica of every worker (axis=None) is what single-host MirroredStrategy reports, and it keeps
    EarlyStopping and ReduceLROnPlateau deciding alike on every worker. Predictions (`concat`) keep Keras's
    own path."""
    global _PATCHED
    if _PATCHED:
        return
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer
    from keras.src import tree

    keras_reduce = trainer.reduce_per_replica

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and trainer._collective_all_reduce_multi_worker(strategy):
            return tree.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None) if isinstance(v, tf.distribute.DistributedValues)
                else v, values)
        return keras_reduce(values, strategy, reduction)

    trainer.reduce_per_replica = reduce_per_replica
    _PATCHED = True
