"""Evaluations: functions of what a finished run saved (an encoder; BEiT's tokenizer) that
return its metrics, registered by name (`eval.registry`) like methods.

They never import a method; they take a `methods.vit.ViT` and data, and know nothing about
how the encoder was trained. Adding one is one file: a frozen config dataclass and a
`@register_evaluation("name", Config)` function, imported below.
"""
from eval.registry import EvalContext, EvalResult, get_evaluation, register_evaluation, registry

from eval import knn, linear, tokenizer  # noqa: E402,F401  (registers the frozen-feature protocols)
from eval import finetune, segmentation  # noqa: E402,F401  (trained protocols; mmseg loads on use)

__all__ = ["registry", "register_evaluation", "get_evaluation", "EvalContext", "EvalResult"]
