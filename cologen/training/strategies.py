"""DDP for a curriculum whose trainable parameters change at step boundaries."""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy


class CurriculumDDPStrategy(DDPStrategy):
    """DDP that registers every expert and router parameter with its reducer, whatever is trainable when it wraps.

    torch's DDP only synchronizes parameters that require grad at construction; a curriculum unfreezes a new expert
    at each step boundary, later. So all adapter parameters are made trainable while DDP wraps the model, and
    `find_unused_parameters` (on by default here) copes with the frozen veterans and with experts that top-1 routing
    leaves unused in a batch.
    """

    strategy_name = "cologen_ddp"

    def __init__(self, find_unused_parameters: bool = True, **kwargs):
        super().__init__(find_unused_parameters=find_unused_parameters, **kwargs)

    def _setup_model(self, model):
        cologen = getattr(model, "model", None)
        params = (cologen.expert_parameters() + cologen.router_parameters()) if cologen is not None else []
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        try:
            return super()._setup_model(model)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
