"""Pictures: training curves, detections, feature maps, pyramid bins (matplotlib, Agg)."""
