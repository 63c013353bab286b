"""After training: calibration (reliability, ECE, temperature), the per-class decision bias, the per-image report
and its hard cases."""
