"""The evaluate stage: BSSEval v4 (museval) of the trained separator on full tracks, SiSEC18 style.

Reads the prepare artifact (full tracks of `evaluate.split`) and the train artifact (the separator).
Every track is separated at full length with `components.inference.separation.separate_array` and scored with
museval against the true stems (`components.evaluation.scoring`), next to the MIX and IRM oracle baselines scored by
the same code on the same tracks (`components.evaluation.baselines`, cached per track in
`artifacts_dir/evaluate-baselines/` and reused when another model is evaluated). Aggregation is SiSEC18's
plus the MDX uSDR and q = (SDR - SDR_mix) / (SDR_irm - SDR_mix) (`components.evaluation.scoring`).

Writes (`components.evaluation.report`) `metrics.json`, museval's per-track JSON under
`museval/<method>/<split>/<track>.json` and `sdr_boxplot.png`.
"""
from __future__ import annotations

from components.training import trained
from components.base import ComponentSpec, StageContext
from components.data import records
from components.data.manifest import Manifest
from components.evaluation import baselines, report, runner
from components.inference.separation import compiled
from configs.errors import StageError

# --------------------------------------------------------------------------------------------
# The executor
# --------------------------------------------------------------------------------------------
def _evaluate_locally(context, prepare, manifest: Manifest, model, targets, key):
    """The default: separate in this process, museval in `evaluate.workers` processes."""
    config, settings = context.config, context.config.evaluate
    return runner.evaluate_tracks(
        records.read_tracks(prepare, settings.split), compiled(model.separator, model.nb_channels),
        targets=targets, sample_rate=config.data.sample_rate, settings=settings,
        output_dir=context.output_dir, baseline_cache=baselines.baseline_cache_path(context.side_cache(baselines.CACHE), key),
        cache_key=key, input_samples=model.input_samples, nb_tracks=manifest.nb_tracks(settings.split),
        logger=context.logger, log_scalar=context.log_scalar,
    )


def run(context: StageContext) -> dict:
    config = context.config
    settings = config.evaluate
    prepare = context.inputs["prepare"]
    manifest = Manifest.read(prepare)
    if settings.split not in manifest.splits:
        raise StageError(f"the evaluate split '{settings.split}' was not prepared (prepared: "
                         f"{', '.join(manifest.splits)}); set evaluate.split to one of them or add it to data.splits "
                         f"and rerun prepare")
    if manifest.nb_tracks(settings.split) == 0:
        having = [name for name in manifest.splits if manifest.nb_tracks(name)]
        raise StageError(f"the evaluate split '{settings.split}' of the prepare artifact has no tracks; choose a split "
                         f"that has some ({', '.join(having) or 'none'}), e.g. `with evaluate.split=train` "
                         f"(the MUSDB sample has only train)")
    records.verify_shards(prepare, (settings.split,))
    model = trained.load_trained(context.inputs["train"], config)
    if int(model.sample_rate) != int(config.data.sample_rate):
        raise StageError(f"the model works at {model.sample_rate} Hz but the data is at {config.data.sample_rate} Hz; "
                         f"retrain with the same data.sample_rate")
    targets = tuple(model.targets)
    key = baselines.baseline_key(prepare.fingerprint, split=settings.split, window_seconds=settings.window_seconds,
                                 sample_rate=config.data.sample_rate, targets=targets)

    if config.prepare.runner == "beam":  # one Beam element per track: separate and score on the workers
        from components.evaluation import beam_evaluate

        metrics = beam_evaluate.evaluate(context, targets=targets, key=key)
    else:
        metrics = _evaluate_locally(context, prepare, manifest, model, targets, key)
    figures = {
        "SDR": metrics["mean"]["SDR"],
        "uSDR": metrics["mean"]["uSDR"],
        "q": metrics["normalized"]["mean"],
        "mix_SDR": metrics["baselines"]["mix"]["mean"]["SDR"],
        "irm_SDR": metrics["baselines"]["irm"]["mean"]["SDR"],
        "tracks": len(metrics["tracks"]),
        "targets": {t: {"SDR": metrics["model"][t]["SDR"], "uSDR": metrics["model"][t]["uSDR"],
                        "q": metrics["normalized"][t]} for t in targets},
    }
    return report.json_safe({"figures": figures, "result": metrics["mean"]["SDR"], "metrics": "metrics.json",
                             "baseline_cache": metrics["baseline_cache"]["path"]})


SPEC = ComponentSpec(
    name="evaluate",
    inputs=("prepare", "train"),
    config_sections=("data", "model", "train", "evaluate"),
    executor=run,
    outputs=("metrics.json", "sdr_boxplot.png"),
    side_caches=(baselines.CACHE,),
)

