"""The fast eval-mode forward, reached through one object: ``fold(model) -> FoldedNet``.

``FoldedNet`` (``npmnv3/engine``) is a snapshot of the model's eval function: batch norm folded
into the convolutions, every inverted residual fused band by band, channels-last inside, all
threads in Numba. The model keeps one (``model.folded()``) and forgets it at its one
invalidation point, ``model.changed()`` (called by ``eval()``, ``load_state_dict()``...); call
``model.eval()`` again after editing parameters in place.

``fold`` reads only ``model.features`` / ``model.head`` (the module tree of ``modules.py``),
``model.params``, ``model.buffers``, ``model.bn_eps``, ``model.dtype`` and ``model.spec``.
"""

from __future__ import annotations

from ..engine.net import FoldedNet


def fold(model) -> FoldedNet:
    """The fast eval-mode function of ``model`` (a snapshot; see ``FoldedNet``)."""
    return FoldedNet(model)


__all__ = ["FoldedNet", "fold"]
