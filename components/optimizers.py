"""Optimizers of the published recipes, as Keras optimizers, and the exponential moving average of the weights.

`make(...)` builds what `train.optimizer` names:

    adam    torch.optim.Adam: m̂ / (sqrt(v̂) + eps), weight_decay as an L2 term added to the gradient
    adam_tf TF1's AdamOptimizer / Keras's Adam: the same step with eps scaled by sqrt(1 - beta_2^t)
            (the "epsilon hat" of Kingma & Ba, Sec. 2), weight_decay as an L2 term
    adamw   torch.optim.AdamW: adam's step, then w <- w - lr * weight_decay * w (decoupled)
    sgd     torch.optim.SGD: b <- momentum * b + g; w <- w - lr * b (nesterov: w <- w - lr * (g + momentum * b)),
            weight_decay as an L2 term; unlike Keras's SGD, lr is not folded into the momentum buffer

EMA (`ema_momentum`): after every step a <- mu * a + (1 - mu) * w, the averages starting at the initial
weights, as kuielab/sdx23 `src/ema.py` (EMAHelper: register, then update after each optimizer step).
Keras's own `use_ema` differs: its first step copies w. `ema_window()` swaps the averages into the model
for validation and checkpoints; `fit` ends with the averages written into the model (finalize).
"""
from __future__ import annotations

from typing import Optional

import keras
from keras import ops

OPTIMIZERS = ("adam", "adam_tf", "adamw", "sgd")


def _with_l2(l2: float, gradient, variable, learning_rate):
    """(learning rate, gradient) in the variable's dtype, the gradient plus the L2 term `l2 * w` (PyTorch's
    `weight_decay` of Adam and SGD)."""
    lr = ops.cast(learning_rate, variable.dtype)
    gradient = ops.cast(gradient, variable.dtype)
    if l2:
        gradient = gradient + ops.cast(l2, variable.dtype) * variable
    return lr, gradient


class _ReferenceEma:
    """Mixin: the sdx23 EMA rule (averages start at the weights, no first-step special case)."""

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        if self.use_ema:
            for var, average in zip(variables, self._model_variables_moving_average):
                average.assign(var)

    def _update_model_variables_moving_average(self, trainable_variables):
        if not self.use_ema:
            return
        for var, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                momentum = ops.cast(self.ema_momentum, var.dtype)
                average.assign(momentum * average + (1.0 - momentum) * var)


class ReferenceAdam(_ReferenceEma, keras.optimizers.Adam):
    """Adam with PyTorch's (`torch_eps=True`) or TF1's placement of epsilon and an optional L2 term."""

    def __init__(self, *, l2: float = 0.0, torch_eps: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.l2 = float(l2)
        self.torch_eps = bool(torch_eps)

    def update_step(self, gradient, variable, learning_rate):
        lr, gradient = _with_l2(self.l2, gradient, variable, learning_rate)
        if not self.torch_eps:
            return super().update_step(gradient, variable, learning_rate)
        step = ops.cast(self.iterations + 1, variable.dtype)
        beta_1 = ops.cast(self.beta_1, variable.dtype)
        beta_2 = ops.cast(self.beta_2, variable.dtype)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        self.assign(m, beta_1 * m + (1.0 - beta_1) * gradient)
        self.assign(v, beta_2 * v + (1.0 - beta_2) * ops.square(gradient))
        m_hat = m / (1.0 - ops.power(beta_1, step))
        v_hat = v / (1.0 - ops.power(beta_2, step))
        self.assign_sub(variable, lr * m_hat / (ops.sqrt(v_hat) + ops.cast(self.epsilon, variable.dtype)))

    def _fused(self, variables) -> bool:
        """Whether `_backend_update_step` updates the variables stacked by shape: outside distribution
        strategies (whose variables update per replica), with PyTorch's epsilon, float32 variables only."""
        import tensorflow as tf

        return (self.torch_eps and not tf.distribute.has_strategy() and not self.gradient_accumulation_steps
                and all(variable.dtype == "float32" for variable in variables))

    def _apply_weight_decay(self, variables):
        if not self._fused(variables):
            super()._apply_weight_decay(variables)  # else folded into the stacked update

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """`update_step` (after Keras's decoupled decay) on the variables stacked by shape: one update per
        shape instead of one per variable.

        Every operation is element-wise, so the result is bitwise the per-variable one; the traced graph
        holds ~6 operations per variable plus ~20 per shape instead of ~45 per variable (DTTNet has about
        200 variables of about 40 shapes per target)."""
        import tensorflow as tf

        def tf_variable(v):
            return v.value if isinstance(v, keras.Variable) else v

        variables = [tf_variable(v) for v in trainable_variables]
        if not self._fused(trainable_variables) or any(isinstance(g, tf.IndexedSlices) for g in grads):
            if self.weight_decay is not None and self._fused(trainable_variables):
                super()._apply_weight_decay(trainable_variables)
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        indices = [self._get_variable_index(v) for v in trainable_variables]
        momentums = [tf_variable(self._momentums[i]) for i in indices]
        velocities = [tf_variable(self._velocities[i]) for i in indices]
        decayed = [self.weight_decay is not None and self._use_weight_decay(v) for v in variables]
        groups = {}
        for position, variable in enumerate(variables):
            groups.setdefault((tuple(variable.shape), decayed[position]), []).append(position)

        lr = tf.cast(learning_rate, tf.float32)
        step = tf.cast(self.iterations + 1, tf.float32)
        beta_1, beta_2 = tf.cast(self.beta_1, tf.float32), tf.cast(self.beta_2, tf.float32)
        keep_1, keep_2 = 1.0 - beta_1, 1.0 - beta_2
        correction_1, correction_2 = 1.0 - tf.pow(beta_1, step), 1.0 - tf.pow(beta_2, step)
        epsilon = tf.cast(self.epsilon, tf.float32)
        for (_, decay), positions in groups.items():
            weights = tf.stack([variables[p] for p in positions])
            gradient = tf.stack([tf.cast(grads[p], tf.float32) for p in positions])
            if decay:  # TFOptimizer._apply_weight_decay: w <- w - w * wd * lr
                weights = weights - weights * tf.cast(self.weight_decay, tf.float32) * lr
            if self.l2:
                gradient = gradient + tf.cast(self.l2, tf.float32) * weights
            m = beta_1 * tf.stack([momentums[p] for p in positions]) + keep_1 * gradient
            v = beta_2 * tf.stack([velocities[p] for p in positions]) + keep_2 * tf.square(gradient)
            weights = weights - lr * (m / correction_1) / (tf.sqrt(v / correction_2) + epsilon)
            for targets, values in ((momentums, m), (velocities, v), (variables, weights)):
                for position, value in zip(positions, tf.unstack(values, num=len(positions))):
                    self.assign(targets[position], value)

    def get_config(self):
        return {**super().get_config(), "l2": self.l2, "torch_eps": self.torch_eps}


class TorchSGD(_ReferenceEma, keras.optimizers.SGD):
    """SGD with momentum as torch.optim.SGD (dampening 0), optional nesterov and L2 term."""

    def __init__(self, *, l2: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.l2 = float(l2)

    def update_step(self, gradient, variable, learning_rate):
        lr, gradient = _with_l2(self.l2, gradient, variable, learning_rate)
        if not self.momentum:
            self.assign_sub(variable, lr * gradient)
            return
        momentum = ops.cast(self.momentum, variable.dtype)
        buffer = self.momentums[self._get_variable_index(variable)]
        self.assign(buffer, momentum * buffer + gradient)
        direction = gradient + momentum * buffer if self.nesterov else buffer
        self.assign_sub(variable, lr * direction)

    def get_config(self):
        return {**super().get_config(), "l2": self.l2}


def make(name: str, *, learning_rate: float, weight_decay: float = 0.0, beta_1: float = 0.9, beta_2: float = 0.999,
         epsilon: float = 1e-8, momentum: float = 0.9, nesterov: bool = False, ema_momentum: Optional[float] = None,
         clip_norm: Optional[float] = None):
    """A Keras optimizer for `train.optimizer` (see the module docstring for the update rules)."""
    common = dict(learning_rate=learning_rate)
    if clip_norm:
        common["global_clipnorm"] = clip_norm
    if ema_momentum is not None:
        common.update(use_ema=True, ema_momentum=float(ema_momentum))
    if name in ("adam", "adam_tf"):
        return ReferenceAdam(l2=weight_decay, torch_eps=name == "adam", beta_1=beta_1, beta_2=beta_2,
                             epsilon=epsilon, **common)
    if name == "adamw":
        # Keras's decoupled decay is torch.optim.AdamW's: w <- w - lr * weight_decay * w before the step
        return ReferenceAdam(torch_eps=True, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                             weight_decay=weight_decay or None, **common)
    if name == "sgd":
        return TorchSGD(l2=weight_decay, momentum=momentum, nesterov=nesterov, **common)
    raise ValueError(f"unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZERS)}")


def swap_average(model) -> None:
    """Exchange the model's trainable weights with the optimizer's moving averages (twice = no change)."""
    import tensorflow as tf

    optimizer = model.optimizer
    for var, average in zip(model.trainable_variables, optimizer._model_variables_moving_average):
        raw = tf.identity(var)
        var.assign(average)
        average.assign(raw)


class EmaEnter(keras.callbacks.Callback):
    """From here to `EmaLeave` at an epoch's end, and during validation, the model holds the averages."""

    def on_test_begin(self, logs=None):
        swap_average(self.model)

    def on_test_end(self, logs=None):
        swap_average(self.model)

    def on_epoch_end(self, epoch, logs=None):
        swap_average(self.model)


class EmaLeave(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        swap_average(self.model)


def ema_window():
    """(enter, leave) Keras callbacks: between them, and during validation, the model holds the averages.

    Put `enter` before the callbacks that must see the averaged weights at the end of an epoch (checkpoints,
    the validation SDR) and `leave` after them; the backup callback stays outside the window.
    """
    return EmaEnter(), EmaLeave()
