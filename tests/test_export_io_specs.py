"""The declarative tensor specs shared by the exporter and the runtimes."""

from __future__ import annotations

import pytest

from cfgswitch.io_specs import (
    GRAPH_NAMES, ModelDims, Profile, graph_spec, graph_specs, profiles_for, resolve_shape, role_binding, shape_env,
)

SD = ModelDims(latent_channels=4, vae_scale_factor=8, text_length=77, text_width=768)


def test_every_graph_has_its_tensors():
    specs = graph_specs(SD)
    assert tuple(specs) == GRAPH_NAMES
    assert specs["unet_cfg"].input_names == ["sample", "timestep", "encoder_hidden_states", "guidance_scale"]
    assert specs["unet"].input_names == ["sample", "timestep", "encoder_hidden_states"]
    assert specs["text_encoder"].output_names == ["last_hidden_state"]
    assert specs["vae_decoder"].output_names == ["image"] and specs["unet_cfg"].file == "unet_cfg.onnx"


def test_dynamic_axes_of_the_guided_graph():
    axes = graph_spec("unet_cfg", SD).dynamic_axes()
    assert axes == {"sample": {0: "B", 2: "h", 3: "w"}, "timestep": {0: "B"}, "encoder_hidden_states": {0: "2B"},
                    "guidance_scale": {0: "B"}, "noise_pred": {0: "B", 2: "h", 3: "w"}}


def test_dtypes_follow_the_export_dtype_except_timestep_weights_and_ids():
    unet_cfg = {t.name: t.resolved_dtype("float16") for t in graph_spec("unet_cfg", SD).inputs}
    assert unet_cfg == {"sample": "float16", "timestep": "float32", "encoder_hidden_states": "float16",
                        "guidance_scale": "float32"}
    assert graph_spec("text_encoder", SD).inputs[0].resolved_dtype("float16") == "int64"


def test_resolve_shape():
    env = shape_env(3, 512, 768, 8)
    assert resolve_shape(("2B", 77, 768), env) == (6, 77, 768)
    assert resolve_shape(("B", 3, "H", "W"), env) == (3, 3, 512, 768)
    assert resolve_shape(("B", 4, "h", "w"), env) == (3, 4, 64, 96)
    with pytest.raises(KeyError, match="dimension 'Q'"):
        resolve_shape(("Q",), env)


def test_role_bindings():
    assert role_binding("cfg").graph == "unet_cfg" and role_binding("cfg").row_factor == 1
    shared = role_binding("cfg", "shared")
    assert (shared.graph, shared.row_factor, shared.combine_outside) == ("unet", 2, True)
    assert role_binding("late", "shared").graph == "unet"
    with pytest.raises(KeyError, match="component"):
        role_binding("decoder")
    with pytest.raises(KeyError, match="layout"):
        role_binding("cfg", "triple")


def test_profile_json_round_trip_and_cover():
    (p,) = profiles_for("late", SD, [1, 4], [(512, 512)], static=False)
    q = Profile.from_json(p.to_json())
    assert q == p
    assert p.covers(3, 512, 512) and not p.covers(5, 512, 512) and not p.covers(2, 576, 512)
    with pytest.raises(ValueError, match="must not be empty"):
        profiles_for("late", SD, [], [(512, 512)])
