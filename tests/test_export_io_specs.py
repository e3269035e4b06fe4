"""The declarative tensor specs shared by the exporter and the runtimes."""

from __future__ import annotations

import pytest

from cfgswitch.io_specs import (
    GRAPH_NAMES, ModelSpec, Profile, graph_spec, graph_specs, profiles_for, resolve_shape, role_binding, shape_env,
)

SD = ModelSpec(latent_channels=4, vae_scale_factor=8, text_length=77, text_width=768)


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


# ------------------------------------------------------------------ SDXL's table from its family
@pytest.fixture(scope="module")
def tiny_sdxl_spec():
    from cfgswitch.families import get_family
    from cfgswitch.tiny_model import tiny_sdxl_components

    return get_family("sdxl").model_spec(tiny_sdxl_components(), "tiny-sdxl")


def test_sd_table_is_unchanged_and_sdxl_table_comes_from_its_family(tiny_sdxl_spec):
    from cfgswitch.io_specs import components, graph_names

    assert graph_names(SD) == GRAPH_NAMES and components(SD) == ("text_encoder", "cfg", "late", "vae_decoder")
    x = graph_specs(tiny_sdxl_spec)
    assert tuple(x) == ("text_encoder", "text_encoder_2", "unet", "unet_cfg", "vae_decoder")
    assert components(tiny_sdxl_spec) == ("text_encoder", "text_encoder_2", "cfg", "late", "vae_decoder")
    assert [(t.name, t.shape) for t in x["text_encoder"].outputs] == [("hidden_states", ("T", 77, 32))]
    assert [(t.name, t.shape) for t in x["text_encoder_2"].outputs] == [("hidden_states", ("T", 77, 32)),
                                                                       ("text_embeds", ("T", 32))]
    assert [(t.name, t.shape) for t in x["unet"].inputs[2:]] == [
        ("encoder_hidden_states", ("B", 77, 64)), ("text_embeds", ("B", 32)), ("time_ids", ("B", 6))]
    assert [(t.name, t.shape) for t in x["unet_cfg"].inputs[2:]] == [
        ("encoder_hidden_states", ("2B", 77, 64)), ("guidance_scale", ("B",)), ("text_embeds", ("2B", 32)),
        ("time_ids", ("2B", 6))]
    # SDXL's VAE asks for force_upcast: its graph stays float32 in an fp16 bundle
    assert x["vae_decoder"].inputs[0].resolved_dtype("float16") == "float32"
    assert graph_spec("vae_decoder", SD).inputs[0].resolved_dtype("float16") == "float16"


def test_sdxl_tensorrt_profiles_cover_the_added_inputs(tiny_sdxl_spec):
    from cfgswitch.io_specs import plan_specs

    (cfg,) = profiles_for("cfg", tiny_sdxl_spec, [1, 3], [(64, 64)], static=False)
    assert cfg.shapes["text_embeds"] == ((2, 32), (6, 32), (6, 32))
    assert cfg.shapes["time_ids"] == ((2, 6), (6, 6), (6, 6))
    assert cfg.shapes["encoder_hidden_states"] == ((2, 77, 64), (6, 77, 64), (6, 77, 64))
    late = profiles_for("late", tiny_sdxl_spec, [1, 3], [(64, 64)], static=True)
    assert [p.shapes["text_embeds"][0] for p in late] == [(1, 32), (3, 32)]
    assert [p.shapes["time_ids"][0] for p in late] == [(1, 6), (3, 6)]
    shared = profiles_for("cfg", tiny_sdxl_spec, [3], [(64, 64)], layout="shared")
    assert shared[0].shapes["time_ids"] == ((6, 6),) * 3 and shared[0].shapes["sample"] == ((6, 4, 32, 32),) * 3
    (te2,) = profiles_for("text_encoder_2", tiny_sdxl_spec, [1, 3], [(64, 64)])
    assert te2.shapes == {"input_ids": ((1, 77), (3, 77), (3, 77))}
    plans = {p.name: p for p in plan_specs(tiny_sdxl_spec, [1, 3], [(64, 64)])}
    assert list(plans) == ["text_encoder", "text_encoder_2", "unet_cfg", "unet", "vae_decoder"]
    assert set(plans["unet_cfg"].profiles[0].shapes) == {"sample", "timestep", "encoder_hidden_states",
                                                         "guidance_scale", "text_embeds", "time_ids"}
