"""The config loader: composition, dotted overrides, and rejection of bad keys and values by their path."""

import pytest

from atlas_train.config import ConfigError, load_config, parse_override, read_yaml
from atlas_train.model.config import ModelConfig


def test_override_parses_yaml_values():
    assert parse_override("train.lr=3.0e-4") == {"train": {"lr": 3e-4}}
    assert parse_override("model.tie_embeddings=false") == {"model": {"tie_embeddings": False}}
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_override("model.d_model")


def test_files_compose_and_overrides_win(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  d_model: 64\n  n_heads: 2\n")
    (tmp_path / "run.yaml").write_text("defaults: [base.yaml]\nmodel:\n  n_layers: 3\n")
    cfg = load_config([tmp_path / "run.yaml"], ["model.n_heads=4", "model.mixer=titans"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads) == (64, 3, 4)
    resolved = cfg.model.resolved()
    assert resolved.feature_map == "identity" and resolved.window == 1 and resolved.ns_steps == 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_layrs=3", r"model\.n_layrs: unknown key"),
        ("modle.d_model=3", r"modle: unknown key"),
        ("model.d_model=big", r"model\.d_model: expected an integer"),
        ("model.update=sometimes", r"model\.update: 'sometimes' is not one of"),
        ("model.mixer=mamba", r"model: mixer 'mamba' is not one of"),
        ("model.d_model=102", r"not divisible by n_heads"),
        ("model.tie_embeddings=1", r"model\.tie_embeddings: expected true/false"),
    ],
)
def test_bad_keys_and_values_name_their_path(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        read_yaml(tmp_path / "bad.yaml")


def test_numbers_promote_to_float_fields():
    cfg = load_config([], ["model.eta_max=2", "model.rope_theta=5e5"])  # YAML 1.1 reads 5e5 as a string
    assert cfg.model.eta_max == 2.0 and cfg.model.rope_theta == 5e5
    assert ModelConfig().ffn_hidden == 512  # 8/3·128 = 341 → next multiple of 256
