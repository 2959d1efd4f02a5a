"""Configs: presets, TOML + --set overrides, strict keys with suggestions, derived values."""

import pytest

from scratchlm.config import PRESETS, ModelConfig, RunConfig, default_d_ff, load_run_config
from scratchlm.errors import UserError


def test_precedence_preset_then_file_then_set(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[model]\nn_layer = 3\n[train]\nlr = 0.01\nschedule = "wsd"\n')
    cfg = load_run_config("tiny", f, ["train.lr=3e-4", "model.arch=llama", "train.compile=true"])
    assert cfg.model.n_layer == 3  # file over preset
    assert cfg.model.d_model == PRESETS["tiny"]["model"]["d_model"]  # preset over default
    assert cfg.train.lr == 3e-4 and cfg.train.schedule == "wsd" and cfg.train.compile is True
    assert cfg.model.arch == "llama"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.learning_rate=1", "unknown key train.learning_rate"),
        ("train.lrr=1", "did you mean train.lr"),
        ("modle.n_layer=2", "did you mean model"),
        ("model.n_layer=2.5", "must be an integer"),
        ("train.compile=yes", "true or false"),
        ("train.schedule=cosin", "did you mean cosine"),
        ("model.d_model=130", "divisible"),
        ("model.norm_eps=-1", "norm_eps must be > 0"),
        ("model.rope_theta=0", "rope_theta must be > 0"),
        ("lr=3", "section.key=value"),
    ],
)
def test_bad_overrides_are_one_line_user_errors(override, needle):
    with pytest.raises(UserError) as e:
        load_run_config(None, None, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_preset_and_bad_toml(tmp_path):
    with pytest.raises(UserError, match="did you mean small"):
        load_run_config("smal")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_run_config(None, bad)
    with pytest.raises(UserError, match="not found"):
        load_run_config(None, tmp_path / "missing.toml")


def test_round_trip_and_derived_values():
    cfg = load_run_config("llama-125m")
    assert cfg.model.d_ff == default_d_ff("llama", 768) and cfg.model.d_ff % 64 == 0
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert ModelConfig(arch="gpt2", d_model=64, n_head=4).d_ff == 256
    assert ModelConfig(n_head=4).n_kv_head == 4


def test_every_preset_builds():
    for name in PRESETS:
        load_run_config(name)
