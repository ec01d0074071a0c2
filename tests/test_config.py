"""QuantizeConfig validation, per-module specs and presets."""

from __future__ import annotations

import json

import pytest
import torch

from gsq.config import PRESETS, QuantizeConfig, cpu_preset, gpu_preset, paper_preset
from gsq.quant.types import QuantSpec


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="awq"), "method"),
    (dict(init="random"), "init"),
    (dict(scope="attn-only"), "scope"),
    (dict(bits=5), "bits"),
    (dict(bits="8"), "bits"),
    (dict(group_size=0), "group size"),
    (dict(bits_overrides=(("*.q_proj", 7),)), "bits"),
    (dict(nsamples=0), "nsamples"),
    (dict(val_samples=0), "nsamples"),
    (dict(seqlen=1), "seqlen"),
    (dict(max_blocks=0), "max_blocks"),
])
def test_invalid_configs_fail_on_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizeConfig(**kwargs)


def test_bits_are_parsed():
    assert QuantizeConfig(bits="3").bits == 3
    assert QuantizeConfig(bits="ternary").bits == "ternary"


def test_spec_for_skip_and_overrides():
    cfg = QuantizeConfig(bits=2, group_size=64, skip=("model.layers.1.mlp.down_proj",),
                         bits_overrides=(("*.self_attn.*", "4"), ("*.q_proj", "ternary")))
    assert cfg.spec_for("model.layers.1.mlp.down_proj") is None
    assert cfg.spec_for("model.layers.0.mlp.down_proj") == QuantSpec(2, 64)
    assert cfg.spec_for("model.layers.0.self_attn.v_proj") == QuantSpec(4, 64)
    assert cfg.spec_for("model.layers.0.self_attn.q_proj") == QuantSpec("ternary", 64)  # last wins


@pytest.mark.parametrize("preset", [cpu_preset, gpu_preset, paper_preset])
def test_presets_validate_and_serialise(preset):
    cfg = preset(bits=3)
    assert cfg.bits == 3
    text = json.dumps(cfg.to_dict())
    assert json.loads(text)["init_cfg"]["logits_dtype"] == "float32"
    assert cfg.train.batch_size % cfg.train.micro_batch_size == 0


def test_paper_preset_matches_the_paper():
    cfg = paper_preset()
    budget = (cfg.nsamples, cfg.seqlen, cfg.train.batch_size, cfg.train.epochs)
    assert budget == (4096, 4096, 64, 20)
    assert cfg.nsamples // cfg.train.batch_size * cfg.train.epochs == 1280
    assert cfg.qk_steps == 2000 and cfg.group_size == 128 and cfg.percdamp == 0.1
    assert cfg.train.logit_lr == 1e-4 and cfg.train.scale_lr == 5e-5
    assert cfg.init_cfg.init_std == 0.01 and cfg.init_cfg.logits_dtype == torch.float32
    assert set(PRESETS) == {"cpu", "gpu", "paper"}


def test_replace_revalidates():
    with pytest.raises(ValueError):
        cpu_preset().replace(method="nope")


def test_negative_qk_steps_rejected():
    with pytest.raises(ValueError, match="qk_steps"):
        QuantizeConfig(qk_steps=-5)


def test_act_order_survives_serialisation():
    cfg = cpu_preset(method="gptq", act_order=True)
    saved = json.loads(json.dumps(cfg.to_dict()))  # as written into gsq_config.json / report
    assert saved["act_order"] is True and saved["static_groups"] is False
    assert QuantizeConfig().to_dict()["act_order"] is False
    scalars = {k: v for k, v in saved.items() if not isinstance(v, dict | list)}
    assert QuantizeConfig(**scalars).act_order is True


@pytest.mark.parametrize("preset", [cpu_preset, gpu_preset, paper_preset])
def test_e2e_stage_is_on_for_gsq_and_off_for_the_baselines(preset):
    gsq = preset()
    assert gsq.e2e.epochs >= 1 and (gsq.e2e.windows or gsq.nsamples) // gsq.e2e.batch_size >= 16
    assert (gsq.e2e.windows or gsq.nsamples) <= gsq.nsamples
    assert preset(method="gptq").e2e.epochs == preset(method="rtn").e2e.epochs == 0
    assert preset(method="gptq", e2e=gsq.e2e).e2e == gsq.e2e  # asked for explicitly
    assert json.loads(json.dumps(gsq.to_dict()))["e2e"]["epochs"] == gsq.e2e.epochs


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": -1}, "epochs"), ({"lr": 0.0}, "lr"), ({"batch_size": 0}, "batch"),
    ({"windows": 0}, "windows"),
    ({"loss": "mse"}, "loss"),
])
def test_invalid_e2e_configs(kwargs, match):
    from gsq.config import E2EConfig

    with pytest.raises(ValueError, match=match):
        E2EConfig(**kwargs)
