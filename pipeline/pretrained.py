"""A released model by name, ready to separate: fetched (components/inference/catalogue.py), then imported and
exported once into the cache, in this process, from the checkpoint alone (no data set, no prepare stage).

    artifacts_dir = pretrained.converted("umxhq")   # <cache>/umxhq/converted/<key>/ with train/ and export/

The conversion (pipeline.experiment.convert_release) runs the pipeline's own `--stage import with
import.name=<name>` and `--stage export` into a staging folder beside the cache entry, renamed into place only
when both finished; a lock in the cache makes two processes convert once.
"""
from __future__ import annotations

from pathlib import Path

from components.inference import catalogue


def converted(name: str, quiet: bool = False) -> Path:
    """The artifacts directory of the converted release `name` (converting it on first use)."""
    from pipeline.experiment import convert_release

    return convert_release(name, quiet)


def list_models() -> str:
    """The catalogue as a table: name, family, targets, rate, authors' SDR, license, cached."""
    rows = [("name", "family", "targets", "rate", "SDR", "license", "cached")]
    for row in catalogue.table():
        rows.append((row["name"], row["family"], row["targets"], str(row["rate"] or ""),
                     "" if row["sdr"] is None else f"{row['sdr']:.2f}", row["license"],
                     "yes" if row["cached"] else ("manual" if row["manual"] else "no")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
