"""Importing this module registers every built-in backbone in ``dmlkd.registry.BACKBONES``."""

from dmlkd.models import backbones, bn_inception  # noqa: F401
