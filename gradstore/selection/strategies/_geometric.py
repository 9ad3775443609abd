"""What the geometric strategies (``gio``, ``diversity``) share: the space they work in and the
values their options allow (pydantic only, like every strategy module)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import StrategyOptions

# The vectors a geometric strategy compares (see gradstore.selection.feature_space).
SpaceFeatures = Literal["gradients", "representations"]
# The submodular objectives of the diversity strategy (see gradstore.selection.submodular).
Objective = Literal["facility_location", "graph_cut"]


class SpaceOptions(StrategyOptions):
    """The feature space: gradients (checkpoint-weighted) or representations."""

    features: SpaceFeatures = Field(
        "gradients", description="gradients: the checkpoint-weighted gradient space (inner product = LESS's "
                                 "weighted cosine); representations: the RDS+ representation vectors")
    checkpoints: list[str] | None = Field(None, min_length=1,
                                          description="gradient checkpoints to use (default: all)")
    weights: dict[str, float] | None = Field(
        None, description="checkpoint weights (default: the manifest's), normalised to sum 1")

    def space(self, context):
        """The :class:`~gradstore.selection.feature_space.FeatureSpace` of these options."""
        from ..feature_space import feature_space

        return feature_space(context.engine, context.targets, self.features, self.checkpoints, self.weights)
