"""Compatibility module: the training API lives in the package :mod:`unipelt.training` (split by
concern); ``from unipelt.train import train, TrainConfig, param_groups, UnipeltCallback, ...``
keeps working."""
from __future__ import annotations

from unipelt.training import *  # noqa: F401,F403 - the public names, re-exported
from unipelt.training import __all__  # noqa: F401
from unipelt.training.inputs import batches as _batches  # noqa: F401 - used by older callers
from unipelt.training.inputs import pad_id as _pad_id  # noqa: F401
from unipelt.training.loop import _rate  # noqa: F401
