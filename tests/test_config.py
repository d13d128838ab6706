"""L2DConfig: options removed after l2d 0.1.0 load at their old defaults and are refused otherwise."""
import pytest

from l2d import L2DConfig, get_l2d_model
from l2d.config import REMOVED_OPTIONS
from l2d.recipe import RecipeError, recipe_from_dict
from tiny import tiny_base, tiny_config


def test_an_adapter_saved_with_removed_options_at_their_defaults_still_loads(tmp_path):
    config = tiny_config()
    saved = {**config.to_dict(), **REMOVED_OPTIONS}  # as l2d 0.1.0 wrote every field
    assert L2DConfig.from_dict(saved) == config


@pytest.mark.parametrize("key, value", [("kv_rank", 4), ("encoder_input", "denoised"), ("loss_weighting", "late"),
                                        ("latent_init", "pca"), ("context_layers", 2)])
def test_a_removed_option_in_use_is_refused_naming_the_last_version(key, value, tmp_path):
    model = get_l2d_model(tiny_base("llama"), tiny_config())
    model.save_pretrained(str(tmp_path))
    saved = {**model.config.to_dict(), key: value}
    with pytest.raises(ValueError, match=rf"{key}=.*removed after l2d 0\.1\.0"):
        L2DConfig.from_dict(saved)
    data = {"sources": ["some.jsonl"]}
    with pytest.raises(RecipeError, match=rf"{key}=.*removed after l2d 0\.1\.0"):
        recipe_from_dict({"l2d": {key: value}, "data": data})
    assert recipe_from_dict({"l2d": {key: REMOVED_OPTIONS[key]}, "data": data}).l2d == L2DConfig()
