"""Prediction: whole-image and sliding-window inference with test-time augmentation (``windows``), the exported
graph (``deploy``) and the prediction files (``writers``).

    from segtrain.inference import InferenceOptions, predict_probs
    probs = predict_probs(model, image, InferenceOptions(mode="slide", tile=(512, 512)))   # (K, H, W) float32
"""

from segtrain.inference.windows import (InferenceOptions, as_logits, check_tile, gaussian_importance, infer_batch,
                                        labels_of, predict_probs, probabilities_fn, scored_logits, sliding_window,
                                        window_starts)

__all__ = ["InferenceOptions", "as_logits", "check_tile", "gaussian_importance", "infer_batch", "labels_of",
           "predict_probs", "probabilities_fn", "scored_logits", "sliding_window", "window_starts"]
