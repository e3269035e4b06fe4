"""A model's own plan recommendations: ``cfgswitch.json`` beside its weights, and ``plan="auto"``.

``cfgswitch analyze`` measures when a model stops needing its prompt and writes what it
recommends into ``cfgswitch.json`` in the model folder (or bundle); ``cfgswitch export``
carries the file into the bundle. ``generate(plan="auto")`` and ``--plan auto`` then use the
recommended switch plan, or :data:`FALLBACK_PLAN` when the model has none.

The file::

    {"schema_version": 1,
     "recommended_plan": "switch:0.2:cond",
     "recommended_adaptive_plan": "adaptive:0.9997:min=0.2:cond",
     "evidence": {...}}
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from .errors import InvalidArgumentError
from .plans import GuidancePlan

logger = logging.getLogger(__name__)

#: The file name, in a diffusers folder or a bundle.
CALIBRATION_FILE = "cfgswitch.json"
#: The plan string that asks for the model's recommendation.
AUTO_PLAN = "auto"
#: What ``auto`` runs on a model without a recommendation.
FALLBACK_PLAN = "switch:0.5"
SCHEMA_VERSION = 1


def read_calibration(folder: "str | Path | None") -> Optional[Dict[str, Any]]:
    """The ``cfgswitch.json`` of a model folder or bundle, or ``None`` when it has none (or it is unreadable)."""
    if folder is None:
        return None
    path = Path(folder) / CALIBRATION_FILE
    try:
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logger.warning("ignoring %s: %s", path, e)
        return None
    return data if isinstance(data, dict) else None


def write_calibration(folder: "str | Path", recommended_plan: str, recommended_adaptive_plan: Optional[str],
                      evidence: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``cfgswitch.json`` into ``folder`` (both plans are checked by :meth:`GuidancePlan.parse`)."""
    data: Dict[str, Any] = {"schema_version": SCHEMA_VERSION, "recommended_plan": str(GuidancePlan.parse(recommended_plan))}
    if recommended_adaptive_plan is not None:
        data["recommended_adaptive_plan"] = str(GuidancePlan.parse(recommended_adaptive_plan))
    data["evidence"] = evidence or {}
    path = Path(folder) / CALIBRATION_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return path


def auto_plan(folder: "str | Path | None") -> Tuple[GuidancePlan, str]:
    """``(plan, where it came from)`` for ``plan="auto"`` on the model at ``folder``."""
    data = read_calibration(folder)
    text = (data or {}).get("recommended_plan")
    if text:
        try:
            return GuidancePlan.parse(text), f"the model's recommendation ({CALIBRATION_FILE})"
        except InvalidArgumentError as e:
            logger.warning("ignoring recommended_plan of %s: %s", Path(str(folder)) / CALIBRATION_FILE, e)
    return GuidancePlan.parse(FALLBACK_PLAN), f"the default: the model has no {CALIBRATION_FILE} recommendation"


def resolve_plan(plan: Union[str, GuidancePlan], folder: "str | Path | None") -> GuidancePlan:
    """``plan`` parsed; ``"auto"`` becomes the model's recommendation (logged, and ``out.plan`` names it)."""
    if isinstance(plan, str) and plan.strip().lower() == AUTO_PLAN:
        chosen, why = auto_plan(folder)
        logger.info("plan auto: %s (%s)", chosen, why)
        return chosen
    return GuidancePlan.parse(plan)


__all__ = ["AUTO_PLAN", "CALIBRATION_FILE", "FALLBACK_PLAN", "auto_plan", "read_calibration", "resolve_plan",
           "write_calibration"]
