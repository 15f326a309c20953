"""Scene sampling and rendering: deterministic for a seed, faithful to the ground truth, held-out kept apart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llava_lit.world.config import WorldConfig
from llava_lit.world.scenes import BLANK_RGB, SLOTS, blank_image, generate_scene_sets, render_scene

CFG = WorldConfig.ci(n_train_scenes=300, n_val_scenes=30, n_eval_scenes=80)


@pytest.fixture(scope="module")
def scene_sets():
    return generate_scene_sets(CFG)


def test_same_seed_same_scenes_and_pixels(scene_sets):
    again = generate_scene_sets(CFG)
    assert again == scene_sets
    for scene in scene_sets["train"][:20]:
        assert np.array_equal(np.asarray(render_scene(scene, CFG)), np.asarray(render_scene(scene, CFG)))


def test_other_seed_other_scenes(scene_sets):
    other = generate_scene_sets(WorldConfig.ci(seed=1, n_train_scenes=300, n_val_scenes=30, n_eval_scenes=80))
    assert [s.signature() for s in other["train"][:50]] != [s.signature() for s in scene_sets["train"][:50]]


def test_pixels_match_ground_truth(scene_sets):
    for scene in scene_sets["train"][:100]:
        img = np.asarray(render_scene(scene, CFG)).astype(int)
        assert img.shape == (CFG.image_size, CFG.image_size, 3)
        for obj in scene.objects:
            x, y = int(obj.cx * CFG.image_size), int(obj.cy * CFG.image_size)
            assert np.abs(img[y, x] - CFG.palette[obj.color]).max() <= 2, (scene.scene_id, obj)
        # A corner is background: no slot reaches it.
        assert np.abs(img[1, 1] - scene.background_rgb).max() <= 2


def test_scene_invariants(scene_sets):
    for scene in scene_sets["train"]:
        assert 1 <= len(scene.objects) <= CFG.max_objects
        assert len({o.color for o in scene.objects}) == len(scene.objects)
        assert len({o.position for o in scene.objects}) == len(scene.objects)
        for o in scene.objects:
            sx, sy = SLOTS[o.position]
            assert (
                abs(o.cx - sx) <= CFG.position_jitter + 1e-6 and abs(o.cy - sy) <= CFG.position_jitter + 1e-6
            )
    counts = {len(s.objects) for s in scene_sets["train"]}
    assert counts == set(range(1, CFG.max_objects + 1))
    assert len({s.background for s in scene_sets["train"]}) == len(CFG.backgrounds)


def test_held_out_scenes_never_in_training(scene_sets):
    held_out = {s.signature() for s in scene_sets["eval"]}
    assert len(held_out) > 0
    assert not held_out & {s.signature() for s in scene_sets["train"]}
    assert not held_out & {s.signature() for s in scene_sets["val"]}


def test_shapes_are_visible_but_not_huge():
    for frac in CFG.shape_sizes.values():
        assert 0.10 <= frac <= 0.15
    assert CFG.num_image_tokens == 49


def test_every_object_centre_stays_inside_one_patch():
    # The odd 7 x 7 grid puts each slot centre, jitter included, inside a patch rather than on a patch corner,
    # so the patch token under an object sees most of it (what the region-phrase loss and LLaVA read).
    grid = CFG.patch_grid
    for sx, sy in SLOTS.values():
        for c in (sx, sy):
            assert int((c - CFG.position_jitter) * grid) == int((c + CFG.position_jitter) * grid), (sx, sy)


def test_blank_image_is_uniform():
    img = np.asarray(blank_image(CFG))
    assert img.shape == (CFG.image_size, CFG.image_size, 3)
    assert (img == np.array(BLANK_RGB)).all()


@pytest.mark.parametrize(
    "override, message",
    [
        ({"patch_size": 10}, "multiple of patch_size"),
        ({"shapes": ["circle", "hexagon"]}, "no renderer"),
        ({"backgrounds": {"red": [200, 0, 0]}}, "both as object and background"),
        ({"shape_sizes": {"huge": 0.5}}, "outside"),
    ],
)
def test_bad_config_is_rejected(override, message):
    with pytest.raises(ValueError, match=message):
        generate_scene_sets(WorldConfig.ci(**override))


def test_presets_and_fingerprint():
    assert WorldConfig.preset("ci", seed=3) == WorldConfig.ci(seed=3)
    assert WorldConfig.preset() == WorldConfig()
    assert WorldConfig().fingerprint() == WorldConfig().fingerprint()
    assert WorldConfig(seed=1).fingerprint() != WorldConfig().fingerprint()
    with pytest.raises(ValueError, match="unknown world preset"):
        WorldConfig.preset("huge")


def _compose_build(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    import llava_lit.world.__main__  # noqa: F401  (stores the BuildArgs schema)

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("world_build", overrides=overrides)


def test_cli_rejects_an_unknown_preset(tmp_path):
    from llava_lit.world.__main__ import build

    args = _compose_build([f"out_dir={tmp_path / 'w'}", "preset=huge"])
    with pytest.raises(SystemExit, match="unknown world preset"):
        build(args, set())


def test_cli_world_fields_are_typed_and_only_the_given_ones_override_the_preset():
    from hydra.errors import ConfigCompositionException

    from llava_lit.world.__main__ import given_world_fields

    overrides = ["preset=ci", "world.seed=3", "world.n_train_scenes=7"]
    args = _compose_build(overrides)
    assert args.world.seed == 3 and args.world.n_train_scenes == 7
    assert given_world_fields(overrides) == {"seed", "n_train_scenes"}
    with pytest.raises(ConfigCompositionException):
        _compose_build(["world.seed=three"])
    with pytest.raises(ConfigCompositionException):
        _compose_build(["world.no_such_field=1"])
