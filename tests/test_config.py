"""Config dataclasses: validation, unknown keys, JSON/YAML round trip."""

from __future__ import annotations

import pytest

from lilt.config import ConfigError, ModelConfig, TextConfig, VisionConfig


def test_round_trip_through_json(tmp_path):
    config = ModelConfig(vision=VisionConfig(name="vit_tiny_patch16_224", pretrained=False, model_kwargs={"depth": 2}),
                         text=TextConfig(name="some/dir", pooling="mean", max_length=24), embed_dim=64,
                         logit_bias=-10.0)
    path = tmp_path / "model.json"
    config.to_json(path)
    assert ModelConfig.from_file(path) == config


def test_yaml_section(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  embed_dim: 128\n  text: {name: foo, pooling: cls}\n")
    config = ModelConfig.from_file(path, section="model")
    assert config.embed_dim == 128 and config.text.pooling == "cls" and config.vision == VisionConfig()


@pytest.mark.parametrize("data,message", [
    ({"embed_dims": 3}, "unknown key 'embed_dims'.*Did you mean 'embed_dim'"),
    ({"embed_dim": "big"}, "embed_dim: expected int, got 'big'"),
    ({"embed_dim": 0}, r"embed_dim=0 must be in \[1, 65536\]"),
    ({"text": {"pooling": "max"}}, r"text.pooling: 'max' is not one of \['auto', 'cls', 'mean'\]"),
    ({"init_temperature": 0.9}, "min_temperature <= init_temperature <= max_temperature"),
    ({"vision": {"name": ""}}, "VisionConfig.name is empty"),
    ({"text": {"max_length": 1}}, r"max_length=1 must be in \[2, 8192\]"),
])
def test_bad_values_name_the_value_and_the_fix(data, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(data)


def test_every_field_has_help():
    for cls in (ModelConfig, VisionConfig, TextConfig):
        assert all(text for text in cls.field_help().values()), cls
