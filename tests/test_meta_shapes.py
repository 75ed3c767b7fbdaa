"""Our models built from the published BLIP-2 configs have the reference's state-dict keys and shapes.

The configs in tests/data are the Hub's blip2-opt-2.7b and blip2-flan-t5-xl config.json files, written
down here since nothing can be downloaded in the tests, and the architectures of blip2-opt-6.7b (the 2.7b file
with OPT-6.7b's widths: hidden 4096, ffn 16384; layers, heads and vocabulary as OPT-2.7b's) and blip2-flan-t5-xxl
(the xl file with Flan-T5-XXL's: d_model 4096, d_ff 10240, 64 heads). Both sides are built on the meta device.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from blip2 import Blip2Config, Blip2ForConditionalGeneration


@pytest.mark.parametrize("name, head_shape, billions", [("blip2-opt-2.7b", (50304, 2560), 3.74),
                                                         ("blip2-opt-6.7b", (50304, 4096), 7.75),
                                                         ("blip2-flan-t5-xl", (32128, 2048), 3.94),
                                                         ("blip2-flan-t5-xxl", (32128, 4096), 12.23)])
def test_meta_shapes_equal_reference_for_real_config(name, head_shape, billions):
    from transformers import Blip2Config as HFConfig
    from transformers import Blip2ForConditionalGeneration as HF

    with open(os.path.join(os.path.dirname(__file__), "data", f"{name}-config.json")) as f:
        raw = json.load(f)
    with torch.device("meta"):
        ref = HF(HFConfig.from_dict(raw))
        ours = Blip2ForConditionalGeneration(Blip2Config.from_dict(raw))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert our_shapes["language_model.lm_head.weight"] == head_shape
    # the models' sizes, a tied matrix counted once (not against transformers' count: it ties Flan-T5's head to
    # `shared` when built from the config, and unties it at load, so its count here is one table short)
    assert round(ours.num_parameters() / 1e9, 2) == billions
    assert ours.config.vision_config.layer_norm_eps == 1e-5  # read from the file, not defaulted
    if name.startswith("blip2-flan"):
        # the file names exact gelu next to gated-gelu: the explicit activation wins; lm_head is untied
        assert ours.config.text_config.dense_act_fn == "gelu"
        assert ours.language_model.lm_head.weight is not ours.language_model.shared.weight
