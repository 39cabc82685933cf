"""Evaluations: functions of an exported encoder that return a dict of metrics.

They never import a method; they take a `methods.vit.ViT` (or the path of an
`encoder.safetensors`) and data, and know nothing about how the encoder was trained.
"""
