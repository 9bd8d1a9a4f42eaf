"""torch.optim.lr_scheduler.ReduceLROnPlateau's semantics, against closed-form sequences (no torch needed)."""
import pytest

from components.training.callbacks import TorchEarlyStopping, TorchPlateau


def _rates(losses, lr=1.0, **kwargs):
    plateau, rates = TorchPlateau(**kwargs), []
    for value in losses:
        lr = plateau.step(value, lr)
        rates.append(lr)
    return rates


def test_reduces_after_patience_plus_one_bad_epochs():
    # best 1.0 at epoch 1; epochs 2, 3, 4 are bad: patience 2 means the third bad epoch reduces (torch: > patience)
    assert _rates([1.0, 1.0, 1.0, 1.0, 1.0], patience=2, factor=0.5) == [1.0, 1.0, 1.0, 0.5, 0.5]


def test_relative_threshold_needs_a_relative_improvement():
    # rel 3e-4 (M-U-Net): 100 -> 99.98 is a 2e-4 improvement, not better; 99.96 is 4e-4, better
    rates = _rates([100.0, 99.98, 99.98], patience=1, threshold=3e-4, factor=0.1)
    assert rates == pytest.approx([1.0, 1.0, 0.1])
    assert _rates([100.0, 99.96, 99.92], patience=1, threshold=3e-4) == [1.0, 1.0, 1.0]
    # abs 3e-4 on the same values: 0.02 better, so never reduced
    assert _rates([100.0, 99.98, 99.96], patience=0, threshold=3e-4, threshold_mode="abs") == [1.0, 1.0, 1.0]


def test_cooldown_holds_off_and_min_lr_floors():
    # patience 0: every bad epoch reduces, except during the 2 cooldown epochs after a reduction
    rates = _rates([1.0] * 7, patience=0, factor=0.5, cooldown=2, min_lr=0.2)
    assert rates == [1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    # min_lr 0.2: 0.25 -> 0.2 would be next; eps: no change once at the floor
    assert _rates([1.0] * 12, patience=0, factor=0.5, cooldown=2, min_lr=0.2)[-1] == 0.2


def test_max_mode_and_early_stopping():
    assert _rates([1.0, 2.0, 2.0, 2.0], mode="max", patience=1, factor=0.1) == pytest.approx([1.0, 1.0, 1.0, 0.1])
    stopper = TorchEarlyStopping(patience=2, threshold=1e-5, threshold_mode="rel")
    assert [stopper.stop(v) for v in [1.0, 0.999995, 0.5, 0.5, 0.5]] == [False, False, False, False, True]


def test_callback_steps_the_optimizer_on_the_training_loss():
    import keras

    from components.training.callbacks import TorchPlateauCallback

    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse")
    callback = TorchPlateauCallback("loss", patience=1, factor=0.1, threshold=3e-4, threshold_mode="rel")
    callback.set_model(model)
    for epoch, loss in enumerate([100.0, 99.98, 99.98]):  # no relative improvement of 3e-4 after the first
        callback.on_epoch_end(epoch, {"loss": loss, "val_loss": 0.0})
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.001)


def test_torch_plateau_keys_resolve_and_are_checked():
    from configs.errors import ConfigError
    from pipeline.experiment import resolve

    config = resolve({}, ["m_unet_paper"]).train
    assert (config.plateau_impl, config.lr_monitor, config.lr_threshold, config.lr_threshold_mode,
            config.lr_cooldown) == ("torch", "loss", 3e-4, "rel", 0)
    with pytest.raises(ConfigError, match="lr_threshold_mode"):
        resolve({"train": {"lr_threshold_mode": "relative"}}, ["unittest"])
