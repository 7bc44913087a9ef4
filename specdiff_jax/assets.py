"""The embedded default models (assets/tiny/) and their drafter per decoding temperature.

`assets/tiny/MANIFEST.json` records every shipped model; a drafter calibrated for one decoding temperature carries
`serves_temperature` (0 = greedy verification). `drafter_for_temperature(t)` is the one lookup used by the
benchmark, `eval.generate` and `method="auto"`: the drafter whose `serves_temperature` is nearest to `t` (ties go
to the higher one), so a T=0 run gets the drafter calibrated on greedy completions and a T=1 run the one calibrated
on T=1 samples. `load_drafter` loads it and tags the model with that temperature, which the planner reads when
several candidate drafters of one kind are offered.
"""

from __future__ import annotations

import json
from pathlib import Path

from specdiff_jax.config import ConfigError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"
MANIFEST = "MANIFEST.json"
BY_TEMPERATURE = "by_temperature"  # bench.specdiff2_drafter value: the manifest's drafter for the run's temperature
TAG = "serves_temperature"


def read_manifest(assets_dir: str | Path = ASSETS_DIR) -> dict:
    path = Path(assets_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {str(assets_dir)!r}: build the embedded models (make assets) or "
                                "name a drafter explicitly")
    return json.loads(path.read_text())


def drafters_by_temperature(assets_dir: str | Path = ASSETS_DIR, manifest: dict | None = None) -> dict[float, Path]:
    """{serves_temperature: model directory} of the manifest's drafters that record the temperature they serve."""
    m = read_manifest(assets_dir) if manifest is None else manifest
    out = {}
    for name, rec in m.get("models", {}).items():
        if rec.get(TAG) is not None:
            out[float(rec[TAG])] = Path(assets_dir) / Path(rec.get("path") or name).name
    return out


def nearest_temperature(temperature: float, served) -> float:
    """The served temperature nearest to `temperature` (ties: the higher one)."""
    served = sorted(float(s) for s in served)
    if not served:
        raise ValueError("no served temperatures to choose from")
    return min(served, key=lambda s: (abs(s - float(temperature)), -s))


def drafter_for_temperature(temperature: float, assets_dir: str | Path = ASSETS_DIR) -> Path:
    """The directory of the manifest's drafter serving `temperature` (nearest recorded serves_temperature)."""
    table = _served(temperature, assets_dir)
    return table[nearest_temperature(temperature, table)]


def _served(temperature: float, assets_dir) -> dict[float, Path]:
    """The manifest's {serves_temperature: directory}, checked non-empty, for a valid `temperature`."""
    if temperature < 0:
        raise ConfigError(f"temperature {temperature!r} must be >= 0 (0 = greedy)")
    table = drafters_by_temperature(assets_dir)
    if not table:
        raise FileNotFoundError(f"{Path(assets_dir) / MANIFEST} records no drafter with {TAG}: rebuild the assets "
                                "(bash scripts/make_assets.sh) or name the drafter explicitly")
    return table


def load_drafter(temperature: float, assets_dir: str | Path = ASSETS_DIR, *, dtype: str | None = None):
    """Load the drafter serving `temperature`, tagged with the temperature it serves (`model.serves_temperature`)."""
    from specdiff_jax.hf_checkpoint import load_pretrained

    table = _served(temperature, assets_dir)
    served = nearest_temperature(temperature, table)
    return tag(load_pretrained(table[served], dtype=dtype), served)


def tag(model, temperature: float):
    """Record on `model` the decoding temperature it was calibrated for (read by `pick_for_temperature`)."""
    setattr(model, TAG, float(temperature))
    return model


def pick_for_temperature(models: list, temperature: float):
    """Of several drafters of one kind, the one tagged with the temperature nearest to `temperature`; untagged
    drafters only when none is tagged (then the first, as named)."""
    tagged = [m for m in models if getattr(m, TAG, None) is not None]
    if not tagged:
        return models[0]
    best = nearest_temperature(temperature, [getattr(m, TAG) for m in tagged])
    return next(m for m in tagged if getattr(m, TAG) == best)


def embedded_candidates(verifier, temperature: float, assets_dir: str | Path = ASSETS_DIR) -> list:
    """Drafters `method="auto"` may use when none is named: the embedded drafter serving `temperature` and the
    embedded AR drafter, only when `verifier` has the embedded verifier's architecture and vocabulary (else [])."""
    from specdiff_jax.config import ModelConfig
    from specdiff_jax.hf_checkpoint import load_pretrained

    d = Path(assets_dir)
    try:
        m = read_manifest(d)
        if ModelConfig.load(d / "verifier" / "model_config.json") != verifier.cfg:
            return []
        out = [load_drafter(temperature, d)]
    except (FileNotFoundError, KeyError, ValueError):
        return []
    if "drafter_ar" in m.get("models", {}) and (d / "drafter_ar").is_dir():
        out.append(load_pretrained(d / "drafter_ar"))
    return out
