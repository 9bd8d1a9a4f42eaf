"""Named presets: dicts of overrides on top of the dataclass defaults in `configs/config.py`.

`python pipeline/run.py --stage all with unittest model.name=umx` applies `unittest`, then the keys.
A preset only states what differs from the defaults, so nothing is written twice.
"""

PRESETS = {
    # The embedded default pipeline: synthetic data, sized for 2 CPU cores in under 10 minutes.
    "default": {
        "data": {"format": "default", "sample_rate": 22050, "synth_tracks": [12, 2, 3], "synth_seconds": 20.0},
        "model": {"umx": {"hidden_size": 128, "nb_layers": 2, "n_fft": 2048, "hop_length": 512}},
        "train": {"epochs": 12, "batch_size": 16, "seq_seconds": 2.0, "samples_per_track": 32,
                  "lr_decay_patience": 4, "patience": 8, "workers": 2},
        "evaluate": {"chunk_seconds": 20.0, "workers": 2},
    },
    # Tiny: every test and the CI smoke run. Seconds per stage for every registered model.
    "unittest": {
        "data": {"format": "default", "sample_rate": 8000, "synth_tracks": [2, 1, 1], "synth_seconds": 4.0,
                 "segment_seconds": 2.0, "shard_megabytes": 0.1, "shuffle_buffer": 16},
        "model": {"umx": {"hidden_size": 16, "nb_layers": 1, "n_fft": 256, "hop_length": 64}},
        "train": {"epochs": 1, "batch_size": 4, "steps_per_epoch": 2, "seq_seconds": 1.0,
                  "samples_per_track": 2, "workers": 1, "snapshot_seconds": 2.0},
        "evaluate": {"chunk_seconds": 2.0, "workers": 1},
        "export": {"tflite_chunk_seconds": 1.0},
    },
}
