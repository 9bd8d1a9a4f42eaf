"""Data: audio reading, data sets, TFRecords, the manifest, synthetic data, pitch/tempo, per-track prepare work."""
