"""Training-only changes to the network that inference.json declares: they add no weights, so the
served network (inference.json's plain DenseNet121) loads what training saves, key for key."""

from collections import OrderedDict

import torch


def classifier_dropout(network: torch.nn.Module, p: float) -> torch.nn.Module:
    """``network`` with ``nn.Dropout(p)`` on the pooled features, just before its classifier (0: unchanged).

    MONAI's own ``DenseNet(dropout_prob=...)`` is something else: channel dropout after each of the 58
    dense layers. This is the classic one, on the 1024 features the linear layer reads; in eval mode
    (validation, serving) it passes them through.
    """
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"config key 'dropout_prob' must be in [0, 1), got {p}")
    if not float(p):
        return network
    head = getattr(network, "class_layers", None)
    if not isinstance(head, torch.nn.Sequential) or "out" not in head._modules:
        raise ValueError(
            "config key 'dropout_prob' needs a MONAI DenseNet (class_layers ending in 'out'), "
            f"got {type(network).__name__}"
        )
    layers = [(name, layer) for name, layer in head.named_children() if name != "out"]
    network.class_layers = torch.nn.Sequential(
        OrderedDict([*layers, ("dropout", torch.nn.Dropout(float(p))), ("out", head.out)])
    )
    return network
