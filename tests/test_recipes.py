"""Recipe fields under their names: an override with a renamed key is refused with the new
name, and recipes saved under the old names read back."""

import dataclasses

import pytest

from diffalign.errors import UserError
from diffalign.recipes import NAV1D_PRESETS, SIM_PRESETS, with_overrides
from diffalign.recipes.base import RENAMED_FIELDS, renamed_fields


@pytest.mark.parametrize(("old", "new"), sorted(RENAMED_FIELDS.items()))
def test_an_override_with_an_old_key_names_the_new_one(old, new):
    for overrides in (f"{old}=3", {old: "3"}):
        with pytest.raises(UserError) as info:
            with_overrides(NAV1D_PRESETS["default"], overrides)
        msg = str(info.value)
        assert "\n" not in msg and old in msg and f"{new}=3" in msg
    assert getattr(with_overrides(NAV1D_PRESETS["default"], f"{new}=3"), new) == 3


def test_a_recipe_saved_under_the_old_names_reads_back():
    for recipe in (NAV1D_PRESETS["quick"], SIM_PRESETS["default"]):
        saved = dataclasses.asdict(recipe)
        saved["max_iters"] = saved.pop("max_updates")
        saved["sft_rounds"] = saved.pop("sft_updates")
        assert type(recipe)(**renamed_fields(saved)) == recipe
    assert renamed_fields({"passes": 2}) == {"passes": 2}


def test_no_field_keeps_an_old_name():
    names = {f.name for f in dataclasses.fields(NAV1D_PRESETS["default"])}
    assert not names & set(RENAMED_FIELDS)
    assert set(RENAMED_FIELDS.values()) <= names


def test_simulator_planners_train_longer_with_the_action_weighted():
    """On simulators a Diffuser trains 3× the steps, weights its executed action 10× and sees
    the present state; Diffusion Policy and every Nav1D model keep their settings."""
    sim = SIM_PRESETS["default"]
    d = sim.foundation_config("diffuser", "ddim", 0, "cpu")
    assert (d.steps, d.action_weight, d.state_cond) == (9000, 10.0, True)
    dd = sim.foundation_config("dd", "ddim", 0, "cpu")
    assert (dd.steps, dd.action_weight) == (9000, 1.0)
    p = sim.foundation_config("dp", "ddim", 0, "cpu")
    assert (p.steps, p.action_weight, p.state_cond) == (3000, 1.0, False)
    assert SIM_PRESETS["quick"].foundation_config("diffuser", "ddim", 0, "cpu").steps == 100
    nav = NAV1D_PRESETS["default"].foundation_config("diffuser", "ddpm", 0, "cpu")
    assert (nav.steps, nav.action_weight) == (NAV1D_PRESETS["default"].foundation_steps, 1.0)
