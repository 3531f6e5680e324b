"""One converter from plain data to the typed configs (cologen/typed_config.py)."""

import pytest

from cologen.model.config import PRWConfig, RouterConfig
from cologen.model.presets import Preset, TinyPreset
from cologen.training.config import OptimConfig
from cologen.typed_config import coerce


def test_nested_dicts_tuples_and_instances():
    prw = coerce(PRWConfig, {"rank": 8, "router": {"temperature": 2.0, "weighting": "straight_through"}})
    assert prw.rank == 8 and isinstance(prw.router, RouterConfig) and prw.router.temperature == 2.0
    assert coerce(OptimConfig, {"betas": [0.8, 0.9]}).betas == (0.8, 0.9)  # YAML/JSON lists become the tuple
    same = PRWConfig()
    assert coerce(PRWConfig, same) is same and coerce(PRWConfig, None) is None
    with pytest.raises(TypeError, match="expected PRWConfig or a dict"):
        coerce(PRWConfig, 3)


def test_class_path_form_rebuilds_a_subclass():
    preset = TinyPreset()
    rebuilt = coerce(Preset, preset.to_hparams())
    assert type(rebuilt) is TinyPreset and rebuilt.to_dict() == preset.to_dict()
    with pytest.raises(TypeError, match="is not a Preset"):
        coerce(Preset, {"class_path": "cologen.model.config.PRWConfig", "init_args": {}})


@pytest.mark.parametrize("build, message", [
    (lambda: coerce(PRWConfig, {"blocks": "triple"}), "prw.blocks must be one of 'both', 'double', 'single'"),
    (lambda: RouterConfig(weighting="soft"), "prw.router.weighting must be one of 'prob', 'straight_through'"),
    (lambda: OptimConfig(schedule="linear"), "optim.schedule must be one of 'constant', 'cosine'"),
    (lambda: OptimConfig(router_schedule="linear"), "optim.router_schedule must be one of None, 'constant', 'cosine'"),
    (lambda: OptimConfig(router_schedule="cosine"), "optim.total_steps must be > 0 for the cosine schedule"),
])
def test_choices_are_checked_one_way_for_python_and_checkpoint_configs(build, message):
    with pytest.raises(ValueError, match=message):
        build()
