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
        index = self._get_variable_index(variable)
        self._apply_adam(self._adam_scalars(variable.dtype, lr), variable, self._momentums[index],
                         self._velocities[index], gradient)

    def _adam_scalars(self, dtype, learning_rate) -> dict:
        """The step's scalar inputs of `ResourceApplyAdam` with PyTorch's epsilon.

        torch.optim.Adam's w <- w - lr m̂ / (sqrt(v̂) + eps), m̂ = m / (1 - β1^t), v̂ = v / (1 - β2^t), is
        TensorFlow's ApplyAdam step w <- w - lr sqrt(1 - β2^t) / (1 - β1^t) m / (sqrt(v) + ε) with
        ε = eps sqrt(1 - β2^t) (multiply the fraction by sqrt(1 - β2^t) / sqrt(1 - β2^t))."""
        step = ops.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = ops.cast(self.beta_1, dtype), ops.cast(self.beta_2, dtype)
        beta_2_power = ops.power(beta_2, step)
        return {"beta1_power": ops.power(beta_1, step), "beta2_power": beta_2_power,
                "lr": ops.cast(learning_rate, dtype), "beta1": beta_1, "beta2": beta_2,
                "epsilon": ops.cast(self.epsilon, dtype) * ops.sqrt(1.0 - beta_2_power)}

    @staticmethod
    def _apply_adam(scalars: dict, variable, momentum, velocity, gradient):
        """One `ResourceApplyAdam` (TensorFlow's fused kernel): m, v and w updated by one op instead of ~10
        (two reads, the arithmetic, three writes): DTTNet's training graph has 800 variables."""
        import tensorflow as tf

        def handle(v):
            return (v.value if isinstance(v, keras.Variable) else v).handle

        tf.raw_ops.ResourceApplyAdam(var=handle(variable), m=handle(momentum), v=handle(velocity),
                                     grad=gradient, **scalars)

    def _fused(self, variables) -> bool:
        """Whether `_backend_update_step` updates the variables in one pass, its step scalars shared: outside
        distribution strategies (whose variables update per replica), with PyTorch's epsilon, float32
        variables only."""
        import tensorflow as tf

        return (self.torch_eps and not tf.distribute.has_strategy() and not self.gradient_accumulation_steps
                and all(variable.dtype == "float32" for variable in variables))

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """`update_step` (after Keras's decoupled decay, which `apply` runs first) for every variable, its step
        scalars computed once: one `ResourceApplyAdam` per variable (the per-variable path under strategies
        runs the same kernel, so both give the same bits). The traced graph holds ~1 operation per variable
        (2 with the decay or the L2 term) instead of ~6 for the stacked-by-shape form this replaces, ~45 for
        Keras's own."""
        import tensorflow as tf

        if not self._fused(trainable_variables) or any(isinstance(g, tf.IndexedSlices) for g in grads):
            return super()._backend_update_step(grads, trainable_variables, learning_rate)
        scalars = self._adam_scalars(tf.float32, learning_rate)
        for gradient, variable in zip(grads, trainable_variables):
            index = self._get_variable_index(variable)
            gradient = tf.cast(gradient, tf.float32)
            if self.l2:
                gradient = gradient + tf.cast(self.l2, tf.float32) * variable
            self._apply_adam(scalars, variable, self._momentums[index], self._velocities[index], gradient)

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

    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)  # under a LossScaleOptimizer (float16)
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
