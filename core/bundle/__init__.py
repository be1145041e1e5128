"""The bundle: what a trained model is. A directory of model.safetensors + config.json + metrics.json.

- ``files``: the file contract without torch: names, per-file sha256, local or ``s3://`` locations,
  fetched once per node into a cache and checked (serve's driver and the batch readers use it alone);
- ``model``: the network a config describes, built through core.networks, written and loaded
  (single networks and ensembles).

The ``model`` names (``load_bundle``, ``save_bundle``, ...) are importable from this package: ``model``
is imported on first use of one, so importing ``core.bundle.files`` never loads torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.bundle.model import (
        BUNDLE_FORMAT,
        Bundle,
        build_from_config,
        ensemble_config,
        ensemble_of,
        ensemble_scale,
        load_bundle,
        make_bundle_config,
        member_config,
        save_bundle,
        save_ensemble_bundle,
    )

__all__ = ["BUNDLE_FORMAT", "Bundle", "build_from_config", "ensemble_config", "ensemble_of", "ensemble_scale",
           "load_bundle", "make_bundle_config", "member_config", "save_bundle", "save_ensemble_bundle"]


def __getattr__(name: str) -> Any:
    """The ``model`` names, imported when first asked for (PEP 562)."""
    if name in __all__:
        from core.bundle import model

        return getattr(model, name)
    raise AttributeError(f"module 'core.bundle' has no attribute {name!r}")
