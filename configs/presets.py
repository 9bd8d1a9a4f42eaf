"""Named presets: dicts of overrides on top of the dataclass defaults in `configs/config.py`.

`python pipeline/run.py --stage all with unittest model.name=umx` applies `unittest`, then the keys.
A preset only states what differs from the defaults, so nothing is written twice.
"""


# -- training recipes: every key of each published recipe, with its source ---------------------------------------
# Keys: train.{optimizer, lr, beta_1, beta_2, epsilon, momentum, weight_decay, batch_size, epochs, steps_per_epoch,
# samples_per_track, seq_seconds, lr_schedule, lr_decay_patience, lr_decay_gamma, early_stopping, patience,
# ema_momentum, checkpoint_metric, clip_norm, finetune_*} and data.{mixing, quiet_threshold, silent_energy,
# gain_range, channel_swap, remix_probability, pitch_shifts, tempo_changes}. README "Recipes" lists them.
RECIPE_TRAIN_KEYS = ("optimizer", "lr", "beta_1", "beta_2", "epsilon", "weight_decay", "batch_size", "epochs",
                     "seq_seconds", "lr_schedule", "early_stopping", "ema_momentum", "checkpoint_metric", "clip_norm")
RECIPE_DATA_KEYS = ("mixing", "quiet_threshold", "silent_energy", "gain_range", "channel_swap", "remix_probability",
                    "pitch_shifts", "tempo_changes")
_NO_OFFLINE_AUGMENTATION = {"pitch_shifts": [], "tempo_changes": []}


def _open_unmix_recipe() -> dict:
    """sigsep/open-unmix-pytorch scripts/train.py (argparse defaults) and openunmix/data.py (MUSDBDataset)."""
    return {
        "train": {
            # torch.optim.Adam(lr=1e-3, weight_decay=1e-5): PyTorch's betas/eps, weight decay as an L2 term
            "optimizer": "adam", "lr": 1e-3, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-8, "weight_decay": 1e-5,
            "batch_size": 16, "epochs": 1000, "samples_per_track": 64, "steps_per_epoch": None, "seq_seconds": 6.0,
            # ReduceLROnPlateau(factor=0.3, patience=80, cooldown=10); utils.EarlyStopping(patience=140) on val loss
            "lr_schedule": "plateau", "lr_decay_patience": 80, "lr_decay_gamma": 0.3,
            "plateau_impl": "torch", "lr_monitor": "val_loss", "lr_threshold": 1e-4, "lr_threshold_mode": "rel",
            "lr_cooldown": 10,
            "early_stopping": True, "patience": 140,
            "ema_momentum": None, "checkpoint_metric": "val_loss", "clip_norm": None,  # best = lowest valid loss
        },
        # MUSDBDataset(random_track_mix=True): every source from a random track at a random offset;
        # source_augmentations gain U(0.25, 1.25) and channelswap (p 1/2)
        "data": {"mixing": "independent", "quiet_threshold": 0.0, "silent_energy": 0.0, "gain_range": [0.25, 1.25],
                 "channel_swap": True, "remix_probability": 0.0, **_NO_OFFLINE_AUGMENTATION},
    }


def _wave_u_net_recipe(sample_rate: int) -> dict:
    """f90/Wave-U-Net Config.py, Training.py, Datasets.py, Utils.py (Stoller et al. 2018, Sec. 4.1)."""
    return {
        "train": {
            # tf.train.AdamOptimizer(init_sup_sep_lr=1e-4): TF1's betas 0.9/0.999 and epsilon-hat 1e-8; no decay
            "optimizer": "adam_tf", "lr": 1e-4, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-8, "weight_decay": 0.0,
            # batch_size 16, epoch_it 2,000 steps, early stopping after worse_epochs = 20 epochs, no lr schedule
            "batch_size": 16, "steps_per_epoch": 2000, "epochs": 1000, "lr_schedule": "constant",
            "early_stopping": True, "patience": 20,
            # num_frames 16,384 output samples (147,443 input samples for M6's context)
            "seq_seconds": 16384 / sample_rate,
            "ema_momentum": None, "checkpoint_metric": "val_loss", "clip_norm": None,
            # Training.optimise: second round, batch x 2 and lr 1e-5, from the last checkpoint with every global
            # variable restored (Adam's slots too), until 20 worse epochs again
            "finetune_epochs": 1000, "finetune_lr": 1e-5, "finetune_batch_size": 32, "finetune_from": "last",
        },
        # snippets of one song (take_random_snippets), Utils.random_amplify: each source x U(0.7, 1.0); no swap
        "data": {"mixing": "segment", "quiet_threshold": 0.0, "silent_energy": 0.0, "gain_range": [0.7, 1.0],
                 "channel_swap": False, "remix_probability": 0.0, **_NO_OFFLINE_AUGMENTATION},
    }


def _m_unet_recipe() -> dict:
    """vskadandale/multichannel-unet-bss settings.py and train/*.py (Kadandale et al. 2020)."""
    return {
        "train": {
            # OPTIMIZER 'SGD', LR 0.01, MOMENTUM 0.9, WEIGHT_DECAY 0 (torch.optim.SGD, no nesterov)
            "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": False, "beta_1": 0.9, "beta_2": 0.999,
            "epsilon": 1e-8, "weight_decay": 0.0,
            # BATCH_SIZE 16, EPOCHS 60000 (a cap: EarlyStopping(EARLY_STOPPING_PATIENCE = 60) ends training)
            "batch_size": 16, "epochs": 60000, "early_stopping": True, "patience": 60,
            # ReduceLROnPlateau(optimizer, patience=7, threshold=3e-4): PyTorch's factor 0.1
            "lr_schedule": "plateau", "lr_decay_patience": 7, "lr_decay_gamma": 0.1,
            # scheduler.step(self.loss) after the training epoch: torch's plateau on the training loss, rel 3e-4
            "plateau_impl": "torch", "lr_monitor": "loss", "lr_threshold": 3e-4, "lr_threshold_mode": "rel",
            "lr_cooldown": 0,
            "seq_seconds": 6.0,  # DURATION 6 s chunks, one 256-frame patch
            "ema_momentum": None, "checkpoint_metric": "val_loss", "clip_norm": None,  # bestcheckpoint.pth
        },
        # fixed 6 s chunks of one track (dataset/preprocessing.py), no gain or swap; filter_musdb_split.py drops
        # training chunks in which a source's energy sum |x|^2 rounds to 0 (< 0.5)
        "data": {"mixing": "segment", "quiet_threshold": 0.0, "silent_energy": 0.5, "gain_range": [1.0, 1.0],
                 "channel_swap": False, "remix_probability": 0.0, "segment_seconds": 6.0, **_NO_OFFLINE_AUGMENTATION},
    }


def _spleeter_recipe() -> dict:
    """deezer/spleeter configs/musdb_config.json and spleeter/model/__init__.py (_build_optimizer)."""
    return {
        "train": {
            # tf.compat.v1.train.AdamOptimizer(learning_rate 1e-4): TF1 defaults (epsilon-hat 1e-8)
            "optimizer": "adam_tf", "lr": 1e-4, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-8, "weight_decay": 0.0,
            # batch_size 4, train_max_steps 200,000 at a constant rate, no early stopping; the estimator keeps the
            # last checkpoint
            "batch_size": 4, "epochs": 200, "steps_per_epoch": 1000, "lr_schedule": "constant",
            "early_stopping": False, "seq_seconds": 11.9,  # T = 512 frames
            "ema_momentum": None, "checkpoint_metric": "last", "clip_norm": None,
        },
        # the sources of one song (random_data_augmentation=False in get_training_dataset): no gain, swap or remix
        "data": {"mixing": "segment", "quiet_threshold": 0.0, "silent_energy": 0.0, "gain_range": [1.0, 1.0],
                 "channel_swap": False, "remix_probability": 0.0, **_NO_OFFLINE_AUGMENTATION},
    }


def _c_unet_recipe() -> dict:
    """gabolsgabs/cunet cunet/train/config.py, models/cunet_model.py (compile), others/utilities.py (callbacks)."""
    return {
        "train": {
            # Adam(lr=config.LR 1e-3, beta_1=0.5): tf.keras's epsilon-hat 1e-7 and beta_2 0.999
            "optimizer": "adam_tf", "lr": 1e-3, "beta_1": 0.5, "beta_2": 0.999, "epsilon": 1e-7, "weight_decay": 0.0,
            # BATCH_SIZE 64, N_BATCH 2048 steps per epoch, N_EPOCH 1000
            "batch_size": 64, "steps_per_epoch": 2048, "epochs": 1000,
            # ReduceLROnPlateau(factor=0.5, min_lr=1e-5, patience=REDUCE_PLATEAU_PATIENCE 15);
            # EarlyStopping(patience=EARLY_STOPPING_PATIENCE 30) and ModelCheckpoint on val_loss
            "lr_schedule": "plateau", "lr_decay_patience": 15, "lr_decay_gamma": 0.5, "lr_min": 1e-5,
            "early_stopping": True, "patience": 30,
            # EARLY_STOPPING_MIN_DELTA 1e-5 for both callbacks; Keras' default cooldown 0
            "plateau_impl": "keras", "lr_threshold": 1e-5, "lr_cooldown": 0, "early_stopping_min_delta": 1e-5,
            "seq_seconds": 127 * 256 / 8192,  # INPUT_SHAPE 128 frames, HOP 256 at FR 8,192 Hz (preprocess/config.py)
            "ema_momentum": None, "checkpoint_metric": "val_loss", "clip_norm": None,
        },
        # data_loader.get_data_aug: in 25 % of the examples the other sources come from random points of other
        # tracks (approximated by remixing each source with probability 0.25); no gain or swap
        "data": {"mixing": "segment", "quiet_threshold": 0.0, "silent_energy": 0.0, "gain_range": [1.0, 1.0],
                 "channel_swap": False, "remix_probability": 0.25, **_NO_OFFLINE_AUGMENTATION},
    }


def _sdx23_recipe(num_steps: int) -> dict:
    """kuielab/sdx23 my_submission/src/train.py, ema.py, dataset.py, utils.py and ckpts/model{A,B}/config.yaml
    (commit 79fbf48)."""
    return {
        "train": {
            # Adam(lr=1e-4): torch's betas/eps; grad_clip null; EMAHelper(mu=ema_momentum 0.999) saved at the end
            "optimizer": "adam", "lr": 1e-4, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-8, "weight_decay": 0.0,
            "batch_size": 6, "epochs": num_steps // 1000, "steps_per_epoch": 1000, "lr_schedule": "constant",
            "early_stopping": False, "ema_momentum": 0.999, "checkpoint_metric": "last", "clip_norm": None,
            "seq_seconds": 1024 * 255 / 44100,  # audio.chunk_size 261,120 = hop 1024 x (dim_t 256 - 1)
            # train.py: torch.cuda.amp.autocast() around the forward pass and GradScaler on the loss
            "precision": "mixed_float16",
        },
        # MSSDataset.load_source: every source from random.choice(tracks) at a random offset, redrawn while
        # mean |x| < audio.min_mean_abs 0.01; no gain, swap or remix. 12 s segments leave room for the offsets;
        # 512 segments per target's shuffle buffer (about 4 GB at 44.1 kHz int16)
        "data": {"mixing": "independent", "quiet_threshold": 0.01, "silent_energy": 0.0, "gain_range": [1.0, 1.0],
                 "channel_swap": False, "remix_probability": 0.0, "segment_seconds": 12.0, "shuffle_buffer": 512,
                 **_NO_OFFLINE_AUGMENTATION},
    }


def _dttnet_recipe() -> dict:
    """junyuchen-cjy/DTTNet-Pytorch configs/experiment/vocals_dis.yaml, configs/callbacks/default.yaml,
    configs/datamodule/musdb18_hq.yaml, configs/datamodule/musdb_dev14.yaml (the 86-track training split), src/dp_tdf/abstract.py, src/datamodules/datasets/musdb.py (commit 432d77a)."""
    return {
        "train": {
            # torch.optim.AdamW(lr=2e-4): weight_decay 0.01, betas 0.9/0.999, eps 1e-8 (PyTorch defaults)
            "optimizer": "adamw", "lr": 2e-4, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-8, "weight_decay": 0.01,
            # batch_size 8; no scheduler (configure_optimizers returns the optimizer), no early stopping (commented
            # out), max_epochs 1,000,000: our cap is 1,000 epochs
            "batch_size": 8, "epochs": 1000, "lr_schedule": "constant", "early_stopping": False,
            # epoch_size = sum of the raw training tracks' lengths / chunk: MUSDB18-HQ's 86 training tracks (about
            # 5.6 h) in 261,120-sample chunks is about 3,400 chunks = 420 batches of 8
            "steps_per_epoch": 420,
            "seq_seconds": 1024 * 255 / 44100,  # hop_length 1024 x (dim_t 256 - 1)
            # ModelCheckpoint(monitor "val/usdr", mode max): mean over validation tracks of the whole-track SDR
            "ema_momentum": None, "checkpoint_metric": "val_sdr", "clip_norm": None,
            # configs/experiment/multigpu_default.yaml (vocals_dis.yaml's defaults): trainer precision 16, native amp
            "precision": "mixed_float16",
        },
        # MusdbTrainDataset.__getitem__: every source from random.choice(metadata) (the original and the 24
        # pitch/tempo-shifted copies) at a random offset; no gain, swap or quiet-chunk test. aug_params [2, 20]:
        # pitch -2..2 semitones x tempo -20..20 % in steps of 10 written offline (src/utils/data_augmentation.py)
        "data": {"mixing": "independent", "quiet_threshold": 0.0, "silent_energy": 0.0, "gain_range": [1.0, 1.0],
                 "channel_swap": False, "remix_probability": 0.0, "segment_seconds": 12.0, "shuffle_buffer": 512,
                 "pitch_shifts": [-2, -1, 0, 1, 2], "tempo_changes": [-20, -10, 0, 10, 20]},
    }


# spectrogram U-Nets (models/unet.py, m_unet.py, c_unet.py): STFT, bins fed to the network, frames per patch
_TINY_UNET = {"n_fft": 256, "hop_length": 64, "max_bin": 64, "patch_frames": 64, "first_filters": 4}
# M-U-Net: 3 levels (4, 8, 16 channels) on 64 log bins x 64 frames
_TINY_M_UNET = {"n_fft": 256, "hop_length": 64, "patch_frames": 64, "log_bins": 64, "first_filters": 4, "nb_levels": 3}
# M-U-Net code (github.com/vskadandale/multichannel-unet-bss, settings.py): TARGET_SAMPLING_RATE 10880,
# NFFT 1022, HOP_LENGTH 256, 6 s excerpts -> STFT_WIDTH 256 frames: 512 bins x 256 frames
_M_UNET_PAPER = {"n_fft": 1022, "hop_length": 256, "max_bin": 512, "patch_frames": 256}
# Spleeter (spleeter/resources/4stems.json): STFT 4096 / 1024, F = 1024 bins, T = 512 frames (11.9 s), ELU
# activations (conv_activation, deconv_activation) of its 4- and 5-stem models
_SPLEETER = {"n_fft": 4096, "hop_length": 1024, "max_bin": 1024, "patch_frames": 512}
_SPLEETER_4STEMS = {**_SPLEETER, "network": "spleeter", "conv_activation": "elu", "deconv_activation": "elu",
                    "framing": "spleeter", "separation": "ratio", "separation_exponent": 2.0}


PRESETS = {
    # Every family at its published size (the dataclass defaults) with open-unmix's training recipe.
    "paper": _open_unmix_recipe(),
    # The embedded default pipeline: synthetic data, sized for 2 CPU cores in under 10 minutes.
    "default": {
        # 20 s tracks cut into 5 s segments without padding
        "data": {"format": "default", "sample_rate": 22050, "synth_tracks": [12, 2, 3], "synth_seconds": 20.0,
                 "segment_seconds": 5.0, "shard_megabytes": 16.0},
        # every family sized for 2 CPU cores at 22.05 kHz (`pipeline/compare.py` trains each on the same budget)
        "model": {"umx": {"hidden_size": 128, "nb_layers": 2, "n_fft": 2048, "hop_length": 512},
                  "wave_u_net": {"num_layers": 8, "num_initial_filters": 16},
                  "unet": {"n_fft": 1024, "hop_length": 256, "max_bin": 512, "patch_frames": 128, "first_filters": 8},
                  # the authors' M-U-Net, 6 levels of 8 ... 256 channels on 128 log bins x 128 frames
                  "m_unet": {"n_fft": 1022, "hop_length": 256, "patch_frames": 128, "log_bins": 128,
                             "first_filters": 8, "nb_levels": 6},
                  "c_unet": {"n_fft": 1024, "hop_length": 256, "max_bin": 512, "patch_frames": 128,
                             "first_filters": 8, "film": "simple", "control_units": [16, 64, 256]},
                  "tfc_tdf_v3": {"n_fft": 2048, "hop_length": 512, "dim_f": 1024, "dim_t": 64, "inference_dim_t": 64,
                                 "num_scales": 3, "num_blocks_per_scale": 1, "num_channels": 16, "growth": 16},
                  "dttnet": {"n_fft": 2048, "hop_length": 512, "dim_f": 512, "bass_dim_f": 256, "dim_t": 64,
                             "inference_dim_t": 64, "growth": 16, "tfc_layers": 2, "num_dual_path_layers": 2}},
        "train": {"epochs": 10, "batch_size": 16, "seq_seconds": 2.0, "samples_per_track": 32,
                  "lr_decay_patience": 4, "patience": 8, "workers": 2},
        "evaluate": {"chunk_seconds": 20.0, "workers": 2},
        # 1 s chunks: 1 s of latency on a phone (the fused TFLite LSTMs convert in seconds at any chunk length)
        "export": {"tflite_chunk_seconds": 1.0},
    },
    # Tiny: every test and the CI smoke run. Seconds per stage for every registered model.
    "unittest": {
        "data": {"format": "default", "sample_rate": 8000, "synth_tracks": [2, 1, 1], "synth_seconds": 4.0,
                 "segment_seconds": 2.0, "shard_megabytes": 0.1, "shuffle_buffer": 16},
        "model": {"umx": {"hidden_size": 16, "nb_layers": 1, "n_fft": 256, "hop_length": 64},
                  # 37 samples of context each side: 8,077 input samples -> 8,003 output samples
                  "wave_u_net": {"num_layers": 3, "num_initial_filters": 4, "filter_size": 5, "merge_filter_size": 3},
                  # 64 bins x 64-frame patches, the least six stride-2 layers take; 1 s -> 4,032 samples
                  "unet": dict(_TINY_UNET), "m_unet": dict(_TINY_M_UNET),
                  "c_unet": {**_TINY_UNET, "control_units": [8, 16, 32]},
                  # 128 bins, 2 scales, 8 channels: 1 s -> 124 frames (7,872 samples); 36,848 parameters
                  "tfc_tdf_v3": {"n_fft": 256, "hop_length": 64, "dim_f": 128, "dim_t": 32, "inference_dim_t": 32,
                                 "num_subbands": 2, "num_scales": 2, "num_blocks_per_scale": 1, "num_channels": 8,
                                 "growth": 8, "bottleneck_factor": 4},
                  "dttnet": {"n_fft": 256, "hop_length": 64, "dim_f": 64, "bass_dim_f": 32, "bottleneck_factor": 4,
                             "bass_bottleneck_factor": 2, "dim_t": 32, "inference_dim_t": 32, "tfc_layers": 1,
                             "growth": 8, "num_dual_path_layers": 1}},
        "train": {"epochs": 1, "batch_size": 4, "steps_per_epoch": 2, "seq_seconds": 1.0,
                  "samples_per_track": 2, "workers": 1, "snapshot_seconds": 2.0},
        "evaluate": {"chunk_seconds": 2.0, "workers": 1},
        "export": {"tflite_chunk_seconds": 0.5},
    },
    # Wave-U-Net's multi-instrument model M6 (the family's defaults: stereo, input context, difference
    # output) at 22,050 Hz, sources in the paper's order so vocals is the difference output; augmentation:
    # source gains uniform in [0.7, 1.0]. Segments hold a 6.7 s input excerpt with room to move.
    "wave_u_net_paper": {
        "data": {"sample_rate": 22050, "targets": ["bass", "drums", "other", "vocals"], "segment_seconds": 10.0,
                 **_wave_u_net_recipe(22050)["data"]},
        "model": {"name": "wave_u_net"},
        "train": _wave_u_net_recipe(22050)["train"],
    },
    # The reference code's M5-HighSR (`full_44KHz`): M5 (M4 + learned upsampling), vocals/accompaniment at 44.1 kHz.
    "wave_u_net_44k": {
        "data": {"sample_rate": 44100, "targets": ["accompaniment", "vocals"], **_wave_u_net_recipe(44100)["data"]},
        "model": {"name": "wave_u_net", "wave_u_net": {"upsampling": "learned"}},
        "train": _wave_u_net_recipe(44100)["train"],
    },
    # M-U-Net (Kadandale et al. 2020) at its code's 10,880 Hz setting, 6 s excerpts (the default segments and
    # train.seq_seconds) = one 256-frame patch; its baselines, dedicated U-Nets and C-U-Net, at the same setting
    "m_unet_paper": {
        # mono, as the authors' code (INPUT_CHANNELS = 1: the U-Net sees the mono mixture)
        "data": {"sample_rate": 10880, "nb_channels": 1, **_m_unet_recipe()["data"]},
        # M-U-Net: the authors' network (models/m_unet.py defaults: 7 levels 32 ... 2048, 256 log bins x 256 frames)
        "model": {"name": "m_unet", "m_unet": {"n_fft": 1022, "hop_length": 256, "patch_frames": 256},
                  "unet": dict(_M_UNET_PAPER), "c_unet": dict(_M_UNET_PAPER)},
        "train": _m_unet_recipe()["train"],
    },
    # Spleeter-like 44.1 kHz U-Nets: one 512-frame patch (523,264 samples) per excerpt, 12 s segments hold one;
    # Spleeter's training (configs/musdb_config.json)
    "unet_44k": {
        "data": {"sample_rate": 44100, "segment_seconds": 12.0, **_spleeter_recipe()["data"]},
        "model": {"name": "unet", "unet": dict(_SPLEETER_4STEMS), "c_unet": dict(_SPLEETER),
                  "m_unet": {"n_fft": 4096, "hop_length": 1024, "patch_frames": 512, "log_bins": 512}},
        "train": _spleeter_recipe()["train"],
    },
    # C-U-Net (Meseguer-Brocal & Peeters 2019), the authors' input (cunet/preprocess/config.py, train/config.py):
    # mono 8,192 Hz, n_fft 1024, hop 256, 512 bins x 128 frames, magnitude min-max normalised per track;
    # complex FiLM with the dense control (16, 256, 1024): models/c_unet.py defaults; and its training recipe
    "c_unet_paper": {
        "data": {"sample_rate": 8192, "nb_channels": 1, **_c_unet_recipe()["data"]},
        "model": {"name": "c_unet", "c_unet": {"n_fft": 1024, "hop_length": 256, "max_bin": 512, "patch_frames": 128,
                                               "input_norm": "minmax", "film": "complex"}},
        "train": _c_unet_recipe()["train"],
    },
    # TFC-TDF-UNet v3, SDX23 leaderboard A (kuielab/sdx23 ckpts/modelA/config.yaml): the coarse quantile loss
    # q = 0.4 (label noise) on waveforms, 100,000 steps with EMA 0.999. Leaderboard B (bleeding):
    # `model.tfc_tdf_v3.loss=quantile_element` (q 0.93), 150,000 steps. Inference: 1024-frame chunks, hop chunk / 8.
    "tfc_tdf_v3_sdx23": {
        "data": _sdx23_recipe(100_000)["data"],
        "model": {"name": "tfc_tdf_v3", "tfc_tdf_v3": {"loss": "quantile_coarse", "loss_domain": "waveform"}},
        "train": _sdx23_recipe(100_000)["train"],
        "evaluate": {"chunk_seconds": 1024 * 1023 / 44100, "overlap": 0.875},
    },
    # TFC-TDF-UNet v3, MUSDB18 configuration (the report's Sec. 4): 128 channels growing by 128, hop 2048; 256-frame
    # excerpts. The authors publish no MUSDB18 training config: sdx23's train.py recipe with the MSE loss on
    # waveforms (our choice of steps: leaderboard A's 100,000).
    "tfc_tdf_v3_musdb18": {
        "data": _sdx23_recipe(100_000)["data"],
        "model": {"name": "tfc_tdf_v3",
                  "tfc_tdf_v3": {"num_channels": 128, "growth": 128, "hop_length": 2048, "inference_dim_t": 256,
                                 "loss": "mse", "loss_domain": "waveform"}},
        "train": {**_sdx23_recipe(100_000)["train"], "seq_seconds": 2048 * 255 / 44100},
        "evaluate": {"chunk_seconds": 2048 * 255 / 44100, "overlap": 0.875},
    },
    # DTTNet (Chen et al. 2024), one network per target: L1 on waveforms, AdamW, constant lr, best by validation
    # uSDR, the reference's random mixing over pitch/tempo-shifted copies; inference chunks of 512 frames, hop / 4.
    "dttnet_paper": {
        "data": _dttnet_recipe()["data"],
        "model": {"name": "dttnet"},
        "train": _dttnet_recipe()["train"],
        "evaluate": {"chunk_seconds": 1024 * 511 / 44100, "overlap": 0.75},
    },
}

# the presets that carry a published training recipe (tests/test_recipes.py checks that each sets every key)
RECIPE_PRESETS = ("paper", "wave_u_net_paper", "wave_u_net_44k", "m_unet_paper", "unet_44k", "c_unet_paper",
                  "tfc_tdf_v3_sdx23", "tfc_tdf_v3_musdb18", "dttnet_paper")
