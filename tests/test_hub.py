"""blip2.hub: a checkpoint directory's config.json is read in one place, with errors that name the file."""

from __future__ import annotations

import pytest

from blip2.checkpoint import CheckpointError
from blip2.config import Blip2Config, ConfigError
from blip2.hub import read_config, resolve_dir
from blip2.models.blip2 import Blip2ForConditionalGeneration


def test_read_config_returns_the_object(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "blip-2", "num_query_tokens": 4}')
    assert read_config(tmp_path) == {"model_type": "blip-2", "num_query_tokens": 4}
    assert resolve_dir(tmp_path) == str(tmp_path)


@pytest.mark.parametrize("text, message", [(None, "config.json: no such file"),
                                           ("{bad", "config.json: not valid JSON"),
                                           ("[1, 2]", "config.json: expected a JSON object, got list")])
def test_config_errors_name_the_file_in_each_callers_kind(tmp_path, text, message):
    if text is not None:
        (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_config(tmp_path)
    with pytest.raises(ConfigError, match=message):
        Blip2Config.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        Blip2ForConditionalGeneration.from_pretrained(tmp_path)
