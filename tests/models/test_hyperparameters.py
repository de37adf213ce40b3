"""A method's hyperparameters: the builder's keyword arguments and its config's fields agree.

``build_<method>_from_config`` passes the same-named config fields to the builder
(:func:`kerasnuc.config.builder_kwargs`) and ``to_dict`` writes every field
(:func:`kerasnuc.config.config_to_dict`), so these two lists are the only places a
hyperparameter is written; this test keeps them in step.
"""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from kerasnuc.models.conic import ConicModelConfig, build_conic
from kerasnuc.models.unet_sharp import UnetSharpModelConfig, build_unet_sharp
from kerasnuc.models.weak import WeakModelConfig, build_weak

# Config fields that are not architecture (training schedule, bookkeeping).
NOT_BUILDER_ARGUMENTS = {
    "conic": set(),
    "unet_sharp": {"stain_normalization", "freeze_encoder_epochs", "freeze_encoder_batchnorm"},
    "weak": {"num_classes"},
}
CASES = {
    "conic": (build_conic, ConicModelConfig),
    "unet_sharp": (build_unet_sharp, UnetSharpModelConfig),
    "weak": (build_weak, WeakModelConfig),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_builder_arguments_are_the_config_fields_with_the_same_defaults(name):
    builder, config_class = CASES[name]
    parameters = inspect.signature(builder).parameters
    fields = {f.name for f in dataclasses.fields(config_class)}
    assert set(parameters) == fields - NOT_BUILDER_ARGUMENTS[name]
    config = config_class()
    for arg, parameter in parameters.items():
        default = parameter.default
        value = getattr(config, arg)
        if isinstance(value, tuple) and default is not None:
            default = tuple(default)
        assert value == default, arg


@pytest.mark.parametrize("name", sorted(CASES))
def test_to_dict_is_json_and_round_trips(name):
    _, config_class = CASES[name]
    config = config_class()
    data = config.to_dict()
    assert set(data) == {f.name for f in dataclasses.fields(config_class)}
    assert json.loads(json.dumps(data)) == data  # lists, not tuples
    assert config_class.from_dict(data) == config
