"""Named presets: dicts of overrides on top of the dataclass defaults in `configs/config.py`.

`python pipeline/run.py --stage all with unittest model.name=umx` applies `unittest`, then the keys.
A preset only states what differs from the defaults, so nothing is written twice.
"""


def _wave_u_net_train(sample_rate: int) -> dict:
    """Wave-U-Net's training (Stoller et al. 2018, Sec. 4.1): MSE, Adam lr 1e-4 (betas 0.9, 0.999), batch 16,
    epochs of 2,000 steps, early stopping after 20 epochs without improvement, then fine-tuning from the
    best weights with lr 1e-5 and batch 32 until early stopping again. No weight decay, no lr schedule.
    `seq_seconds` is the model's output length: 16,384 samples, i.e. 147,443 input samples."""
    return {"lr": 1e-4, "weight_decay": 0.0, "batch_size": 16, "steps_per_epoch": 2000, "patience": 20,
            "lr_decay_patience": 1_000_000, "seq_seconds": 16384 / sample_rate,
            "finetune_epochs": 1000, "finetune_lr": 1e-5, "finetune_batch_size": 32}


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
    # The dataclass defaults unchanged: every family at its published size, open-unmix's training recipe.
    "paper": {},
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
        # 1 s chunks: 44 frames of unrolled BLSTM keep the TFLite conversion to about a minute
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
                 "gain_range": [0.7, 1.0], "channel_swap": False},
        "model": {"name": "wave_u_net"},
        "train": _wave_u_net_train(22050),
    },
    # The reference code's M5-HighSR (`full_44KHz`): M5 (M4 + learned upsampling), vocals/accompaniment at 44.1 kHz.
    "wave_u_net_44k": {
        "data": {"sample_rate": 44100, "targets": ["accompaniment", "vocals"], "gain_range": [0.7, 1.0],
                 "channel_swap": False},
        "model": {"name": "wave_u_net", "wave_u_net": {"upsampling": "learned"}},
        "train": _wave_u_net_train(44100),
    },
    # M-U-Net (Kadandale et al. 2020) at its code's 10,880 Hz setting, 6 s excerpts (the default segments and
    # train.seq_seconds) = one 256-frame patch; its baselines, dedicated U-Nets and C-U-Net, at the same setting
    "m_unet_paper": {
        # mono, as the authors' code (INPUT_CHANNELS = 1: the U-Net sees the mono mixture)
        "data": {"sample_rate": 10880, "nb_channels": 1},
        # M-U-Net: the authors' network (models/m_unet.py defaults: 7 levels 32 ... 2048, 256 log bins x 256 frames)
        "model": {"name": "m_unet", "m_unet": {"n_fft": 1022, "hop_length": 256, "patch_frames": 256},
                  "unet": dict(_M_UNET_PAPER), "c_unet": dict(_M_UNET_PAPER)},
    },
    # Spleeter-like 44.1 kHz U-Nets: one 512-frame patch (523,264 samples) per excerpt, 12 s segments hold one
    "unet_44k": {
        "data": {"sample_rate": 44100, "segment_seconds": 12.0},
        "model": {"name": "unet", "unet": dict(_SPLEETER_4STEMS), "c_unet": dict(_SPLEETER),
                  "m_unet": {"n_fft": 4096, "hop_length": 1024, "patch_frames": 512, "log_bins": 512}},
        "train": {"seq_seconds": 11.9},
    },
    # C-U-Net (Meseguer-Brocal & Peeters 2019), the authors' input (cunet/preprocess/config.py, train/config.py):
    # mono 8,192 Hz, n_fft 1024, hop 256, 512 bins x 128 frames, magnitude min-max normalised per track;
    # complex FiLM with the dense control (16, 256, 1024): models/c_unet.py defaults
    "c_unet_paper": {
        "data": {"sample_rate": 8192, "nb_channels": 1},
        "model": {"name": "c_unet", "c_unet": {"n_fft": 1024, "hop_length": 256, "max_bin": 512, "patch_frames": 128,
                                               "input_norm": "minmax", "film": "complex"}},
    },
    # TFC-TDF-UNet v3, SDX23 leaderboard A (kuielab/sdx23 ckpts/modelA/config.yaml): Adam lr 1e-4, batch 6,
    # excerpts of 256 frames (261,120 samples), the coarse quantile loss q = 0.4 (label noise). Leaderboard B
    # (bleeding): `model.tfc_tdf_v3.loss=quantile_element` (q 0.93). Inference: 1024-frame chunks, hop chunk / 8.
    "tfc_tdf_v3_sdx23": {
        "model": {"name": "tfc_tdf_v3", "tfc_tdf_v3": {"loss": "quantile_coarse"}},
        "train": {"lr": 1e-4, "weight_decay": 0.0, "batch_size": 6, "seq_seconds": 1024 * 255 / 44100},
        "evaluate": {"chunk_seconds": 1024 * 1023 / 44100, "overlap": 0.875},
    },
    # TFC-TDF-UNet v3, MUSDB18 configuration: 128 channels growing by 128, hop 2048; 256-frame excerpts.
    "tfc_tdf_v3_musdb18": {
        "data": {"segment_seconds": 12.0},
        "model": {"name": "tfc_tdf_v3",
                  "tfc_tdf_v3": {"num_channels": 128, "growth": 128, "hop_length": 2048, "inference_dim_t": 256}},
        "train": {"lr": 1e-4, "weight_decay": 0.0, "batch_size": 6, "seq_seconds": 2048 * 255 / 44100},
        "evaluate": {"chunk_seconds": 2048 * 255 / 44100, "overlap": 0.875},
    },
    # DTTNet (Chen et al. 2024), one network per target: AdamW lr 2e-4 (PyTorch's default weight decay 0.01;
    # the train stage's Adam applies weight_decay decoupled, as AdamW), L1 on waveforms, batch 8, excerpts of
    # 256 frames (261,120 samples); inference chunks of 512 frames, hop chunk / 4.
    "dttnet_paper": {
        "model": {"name": "dttnet"},
        "train": {"lr": 2e-4, "weight_decay": 0.01, "batch_size": 8, "seq_seconds": 1024 * 255 / 44100},
        "evaluate": {"chunk_seconds": 1024 * 511 / 44100, "overlap": 0.75},
    },
}
