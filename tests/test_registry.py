"""Regions, task registration and lookup."""

from __future__ import annotations

import pytest

from lorkd_pl.registry import (
    DEFAULT_REGIONS,
    RegistryError,
    TaskSpec,
    get_region_index,
    get_task,
    list_regions,
    list_tasks,
    order_regions,
    register_region,
    register_task,
)


def spec(name: str = "liver_ct", region: str = "abdomen", kind: str = "seg3d", **kwargs) -> TaskSpec:
    return TaskSpec(
        name=name, region=region, kind=kind, classes=("background", "liver"), records=lambda s: [], **kwargs
    )


def test_default_regions_are_the_methods_eight_in_fixed_order() -> None:
    assert list_regions()[:8] == DEFAULT_REGIONS
    assert DEFAULT_REGIONS == (
        "abdomen",
        "brain",
        "head_neck",
        "lower_limb",
        "pelvis",
        "spine",
        "thorax",
        "upper_limb",
    )
    assert [get_region_index(r) for r in DEFAULT_REGIONS] == list(range(8))


def test_order_regions_follows_global_order() -> None:
    assert order_regions(["thorax", "brain", "thorax", "abdomen"]) == ("abdomen", "brain", "thorax")


def test_register_region_appends(clean_registry) -> None:
    index = register_region("cardiac")
    assert index == len(list_regions()) - 1 and register_region("cardiac") == index
    with pytest.raises(ValueError, match="lower-case"):
        register_region("Cardiac")


def test_register_get_list(clean_registry) -> None:
    register_task(spec())
    register_task(spec("lung_cls", "thorax", "cls2d"))
    assert get_task("liver_ct").region == "abdomen"
    assert get_task("liver_ct").metrics == ("dice",)
    assert get_task("lung_cls").metrics == ("accuracy", "auroc")
    names = [t.name for t in list_tasks()]
    assert names.index("liver_ct") < names.index("lung_cls")  # abdomen before thorax
    assert [t.name for t in list_tasks(region="thorax", kind="cls2d")] == ["demo_thorax_cls", "lung_cls"]


def test_decorator_forms(clean_registry) -> None:
    @register_task
    def first() -> TaskSpec:
        return spec("first")

    @register_task(override=True)
    def second() -> TaskSpec:
        return spec("first", region="pelvis")

    assert first.__name__ == "first" and get_task("first").region == "pelvis"


def test_duplicate_name_is_an_error_unless_override(clean_registry) -> None:
    register_task(spec(source="a.py"))
    with pytest.raises(RegistryError, match=r"'liver_ct' is registered already \(from a.py\).*override=True"):
        register_task(spec(source="b.py"))
    register_task(spec(region="pelvis"), override=True)
    assert get_task("liver_ct").region == "pelvis"


def test_unknown_names_list_close_matches() -> None:
    with pytest.raises(RegistryError, match=r"unknown task 'demo_brian_seg'; did you mean 'demo_brain_seg'"):
        get_task("demo_brian_seg")
    with pytest.raises(RegistryError, match=r"unknown region 'thoraks'; did you mean 'thorax'"):
        list_tasks(region="thoraks")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "seg2d"}, "kind 'seg2d'"),
        ({"region": "liver"}, "unknown region 'liver'"),
        ({"name": "bad name"}, "letters, digits"),
        ({"teacher_classes": {"tumour": 2}}, r"teacher_classes names \['tumour'\]"),
    ],
)
def test_invalid_specs(kwargs, match) -> None:
    with pytest.raises((ValueError, RegistryError), match=match):
        spec(**kwargs)


def test_default_registrations_yield_to_any_other(clean_registry) -> None:
    register_task(spec("fallback"), default=True)
    register_task(spec("fallback", "brain"), default=True)  # a default never replaces
    assert get_task("fallback").region == "abdomen"
    register_task(spec("fallback", "thorax"))  # a real registration replaces the default silently
    assert get_task("fallback").region == "thorax"
    with pytest.raises(RegistryError, match="registered already"):  # and is itself protected
        register_task(spec("fallback", "brain"))
    register_task(spec("fallback", "brain"), default=True)
    assert get_task("fallback").region == "thorax"
