"""dmlkd.models: backbones (registered in ``dmlkd.registry.BACKBONES``) and the embedding network."""

from dmlkd.models import backbones, bn_inception  # noqa: F401  (importing fills the BACKBONES registry)
from dmlkd.models.backbones import Backbone
from dmlkd.models.embedding import EmbeddingNet, build_model, create_model
from dmlkd.models.outputs import ModelOutput
from dmlkd.models.pretrained import convert_reference_state_dict
from dmlkd.models.spec import ModelConfig, ModelSpec, Preprocessing, parse_spec

__all__ = [
    "Backbone",
    "EmbeddingNet",
    "ModelConfig",
    "ModelOutput",
    "ModelSpec",
    "Preprocessing",
    "build_model",
    "convert_reference_state_dict",
    "create_model",
    "parse_spec",
]
