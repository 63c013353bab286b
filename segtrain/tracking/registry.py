"""A checkpoint in the MLflow model registry, as a pyfunc model that runs ``segtrain.inference.predictor.Predictor``.

    python -m segtrain.export checkpoint=.../best.pt register=road-defects [tracking.uri=http://host:5000]
    model = mlflow.pyfunc.load_model("models:/road-defects/1")
    mask = model.predict(image)          # (H, W, 3) uint8 -> (H, W) class indices, as segtrain.predict writes them

The registered model holds the checkpoint (its calibration, thresholds and normalisation come with it), the
verified export file the command wrote, and the run's model card; its metadata names the classes. Loading it
needs segtrain installed (its pip requirement), as the checkpoint is run by segtrain's own Predictor.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

import segtrain
from segtrain.tracking.mlflow_run import require_mlflow, resolve_uri

log = logging.getLogger(__name__)

try:  # the base class of a pyfunc model; the mlflow extra may be missing, which register_checkpoint reports
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - only without the extra
    PythonModel = object


class SegtrainModel(PythonModel):
    """MLflow pyfunc: images in, masks out, through the checkpoint's ``Predictor`` (on the CPU, or CUDA when there)."""

    def load_context(self, context) -> None:
        from segtrain.inference.predictor import Predictor  # noqa: PLC0415  (at load time, in the serving process)

        self.predictor = Predictor.from_checkpoint(context.artifacts["checkpoint"], [], device="auto")

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
        """One (H, W, C) uint8 image or a list / (N, H, W, C) stack of them -> (N, H, W) int64 labels, or for a
        multi-label model (N, C, H, W) uint8 channel masks; a single image gives its mask without the N axis."""
        single = isinstance(model_input, np.ndarray) and model_input.ndim == 3
        images = [model_input] if single else list(model_input)
        masks = [self.predictor.labels(self.predictor(np.asarray(image, dtype=np.uint8))).cpu().numpy()
                 for image in images]
        masks = [m.astype(np.uint8) if m.dtype == bool else m for m in masks]
        return masks[0] if single else np.stack(masks)


def register_checkpoint(checkpoint: Path, name: str, tracking_uri: str | None, metadata: dict[str, Any],
                        files: dict[str, Path]) -> str:
    """Log ``checkpoint`` (and ``files``: the export, the model card) as a pyfunc model in a run of the
    ``segtrain-registry`` experiment and register it under ``name``; returns the new version's ``models:/`` URI."""
    require_mlflow()
    import mlflow  # noqa: PLC0415

    uri, artifact_root = resolve_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name("segtrain-registry") is None:
        mlflow.create_experiment("segtrain-registry", artifact_location=artifact_root)
    mlflow.set_experiment("segtrain-registry")
    artifacts = {"checkpoint": str(checkpoint), **{key: str(path) for key, path in files.items() if path.is_file()}}
    with mlflow.start_run(run_name=f"register {name}") as run:
        info = mlflow.pyfunc.log_model(
            name="model", python_model=SegtrainModel(), artifacts=artifacts, registered_model_name=name,
            pip_requirements=[f"segtrain=={segtrain.__version__}"], metadata=metadata)
        mlflow.set_tags({"segtrain.checkpoint": str(checkpoint), "segtrain.version": segtrain.__version__})
    version = info.registered_model_version
    log.info("registered %s version %s (run %s) at %s", name, version, run.info.run_id, uri)
    return f"models:/{name}/{version}"
