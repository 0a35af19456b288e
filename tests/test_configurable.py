import pytest
import torch
from torch import nn

from vistok.common.configurable import Configurable, instantiate


class Inner(Configurable, nn.Module):
    def __init__(self, width: int = 4, scales: tuple = (1, 2)):
        super().__init__()
        self.lin = nn.Linear(width, width)


class Outer(Configurable, nn.Module):
    def __init__(self, inner: Inner, gain: float = 1.0, **extra):
        super().__init__()
        self.inner, self.gain, self.extra = inner, gain, extra


class Derived(Inner):
    def __init__(self, depth: int = 2):
        super().__init__(width=depth * 2)


def test_config_round_trip_rebuilds_equal_structure(monkeypatch):
    monkeypatch.setattr("vistok.common.configurable.ALLOWED_PREFIX", "test_configurable.")
    obj = Outer(Inner(width=3, scales=[5]), gain=2.0, flag=True)
    cfg = obj.config
    assert cfg == {
        "class_path": "test_configurable.Outer",
        "init_args": {
            "inner": {
                "class_path": "test_configurable.Inner",
                "init_args": {"width": 3, "scales": [5]},
            },
            "gain": 2.0,
            "flag": True,
        },
    }
    rebuilt = instantiate(cfg)
    assert rebuilt.config == cfg
    assert rebuilt.inner.lin.weight.shape == (3, 3)


def test_most_derived_arguments_are_recorded():
    assert Derived(depth=5).config["init_args"] == {"depth": 5}


def test_untrusted_class_paths_are_refused():
    with pytest.raises(ValueError, match="may only name classes under"):
        instantiate({"class_path": "os.system", "init_args": {"command": "true"}})


def test_non_json_arguments_are_named():
    with pytest.raises(TypeError, match="Inner.width"):
        _ = Inner(width=torch.tensor(3)).config
