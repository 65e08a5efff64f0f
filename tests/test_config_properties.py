"""schema.check_config on generated overrides of configs/smoke.py: a value is either accepted, and then within its
field's documented range, or refused by one ConfigError naming the field (`--config.<path>`); never another
exception. One family of values per test: wrong types, non-finite floats, negatives, zeros, huge integers,
strings, and tuples of the wrong length."""

from __future__ import annotations

import copy
import math

import pytest
from hypothesis import event, given, settings, strategies as st

from configs import smoke
from retina_fn import errors, schema


def _leaves(node: dict, prefix: str = "") -> dict:
    found = {}
    for key, value in node.items():
        if isinstance(value, dict):
            found.update(_leaves(value, f"{prefix}{key}."))
        else:
            found[f"{prefix}{key}"] = value
    return found


BASE = smoke.get_config().to_dict()
DEFAULTS = _leaves(BASE)
PATHS = sorted(DEFAULTS)
TUPLES = sorted(p for p, v in DEFAULTS.items() if isinstance(v, (tuple, list)))
FAMILIES = {
    "wrong_type": st.one_of(st.none(), st.booleans(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                            st.lists(st.text(max_size=3), max_size=3), st.just(object())),
    "non_finite": st.sampled_from([math.nan, math.inf, -math.inf]),
    "negative": st.one_of(st.integers(max_value=-1), st.floats(max_value=-1e-9, allow_nan=False,
                                                                 allow_infinity=False)),
    "zero": st.sampled_from([0, 0.0, -0.0]),
    "huge_int": st.integers(min_value=2**31).map(lambda v: v * 2**33 if v % 2 else v),
    "string": st.text(max_size=12),
}


# A rule tying two fields whose message names the other field only (retina_fn/schema.py's stage-width rule).
ANY_LENGTH = ("data.box_buckets", "model.anchors.ratios", "model.anchors.strides", "optim.step_epochs")


def check(path: str, value) -> str:
    """Applies one override and checks the contract; returns 'accepted' or 'refused'."""
    cfg = copy.deepcopy(BASE)
    node = cfg
    *parents, leaf = path.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    try:
        schema.check_config(cfg)
    except errors.ConfigError as err:
        message = str(err)
        assert "\n" not in message
        # the field itself, or (a rule tying two fields) the other field, which names this one's value
        named = f"--config.{path}=" in message or (message.startswith("--config.") and f"{path}=" in message)
        assert named, (path, value, message)
        return "refused"
    assert schema._RULES[path](value) is None, (path, value)  # the documented rule holds
    return "accepted"


def _run(family: str, path: str, value) -> str:
    ended = check(path, value)
    event(f"{family}: {ended}")
    return ended


PROPERTY = settings(max_examples=200, deadline=None, derandomize=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_override_is_accepted_in_range_or_refused_naming_its_field(family):
    @PROPERTY
    @given(st.sampled_from(PATHS), FAMILIES[family])
    def prop(path, value):
        ended = _run(family, path, value)
        if family == "non_finite":
            assert ended == "refused"
        if family == "string" and ended == "accepted":  # only where the config takes text
            default = DEFAULTS[path]
            assert isinstance(default, str) or default is None or value == "auto", (path, value)
        if family == "huge_int" and ended == "accepted":
            assert type(DEFAULTS[path]) in (int, float) or DEFAULTS[path] is None, (path, value)

    prop()


@PROPERTY
@given(st.sampled_from(TUPLES), st.lists(st.integers(1, 2048), max_size=6))
def test_a_tuple_of_another_length_is_accepted_only_where_any_length_is(path, values):
    value = tuple(values)
    ended = _run("tuple_length", path, value)
    if ended == "accepted" and len(value) != len(DEFAULTS[path]):
        assert path in ANY_LENGTH, (path, value)


def test_the_smoke_config_itself_is_accepted():
    schema.check_config(copy.deepcopy(BASE))
