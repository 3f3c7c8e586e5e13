"""The benchmark suite's prompts by dataset name: every dataset's templates fill in one class name, the class
names have the datasets' class counts and label orders, names are found as CLIP_benchmark finds them, unknown
names get one line naming the known ones, and the table is CLIP_benchmark's own (where it is installed)."""

import ast
import json
import pathlib

import pytest

from jclip.data import prompts

# The number of classes of each dataset with class names in the table; the other four
# (dsprites_*, smallnorb_*) use the dataset's own names, as CLIP_benchmark does.
CLASS_COUNTS = {
    "caltech101": 102, "cars": 196, "cifar10": 10, "cifar100": 100, "clevr_closest_object_distance": 6,
    "clevr_count_all": 8, "country211": 211, "diabetic_retinopathy": 5, "dmlab": 6, "dtd": 47, "eurosat": 10,
    "fer2013": 7, "fgvc_aircraft": 100, "flowers": 102, "food101": 101, "gtsrb": 43, "imagenet1k": 1000,
    "kitti_closest_vehicle_distance": 4, "mnist": 10, "pcam": 2, "pets": 37, "renderedsst2": 2, "resisc45": 45,
    "stl10": 10, "sun397": 397, "svhn": 10, "voc2007": 20, "voc2007_multilabel": 20,
}
WITHOUT_NAMES = ("dsprites_label_orientation", "dsprites_label_x_position", "smallnorb_label_azimuth",
                 "smallnorb_label_elevation")


def test_every_template_holds_one_class_name():
    assert len(prompts.benchmark_datasets()) == 32 and "dummy" not in prompts.benchmark_datasets()
    for name in prompts.benchmark_datasets():
        templates = prompts.dataset_templates(name)
        assert templates and all(t.count("{}") == 1 and "{" not in t.format("") for t in templates), name


@pytest.mark.parametrize("name", sorted(CLASS_COUNTS))
def test_class_names_count_the_classes(name):
    names = prompts.dataset_class_names(name)
    assert isinstance(names, tuple) and len(names) == CLASS_COUNTS[name]
    assert len(set(names)) == len(names) - 2 * (name == "imagenet1k")  # CLIP's two "missile"s and "sunglasses"
    assert sorted(prompts.dataset_class_names("vtab/" + name)) == sorted(names)  # the same names, in TFDS's order


def test_which_datasets_have_class_names():
    assert set(CLASS_COUNTS) | set(WITHOUT_NAMES) == set(prompts.benchmark_datasets())
    for name in WITHOUT_NAMES:
        with pytest.raises(ValueError, match=f"no class names for '{name}': it uses the dataset's own; use those "
                                             "or give a list .*cifar10"):
            prompts.dataset_class_names("vtab/" + name)


@pytest.mark.parametrize("name", ["cifar10", "caltech101", "food101", "smallnorb_label_azimuth", "imagenet1k"])
def test_names_are_found_as_clip_benchmark_finds_them(name):
    for spelled in ("vtab/" + name, "wds/vtab/" + name, "tfds/" + name, "wds/" + name):
        assert prompts.dataset_templates(spelled) == prompts.dataset_templates(name)
        assert prompts.templates(spelled) == prompts.dataset_templates(name)
    if name in CLASS_COUNTS:
        assert prompts.dataset_class_names("wds/" + name) == prompts.dataset_class_names(name)
        assert prompts.dataset_class_names("wds/vtab/" + name) == prompts.dataset_class_names("vtab/" + name)
        assert prompts.dataset_class_names("tfds/" + name) == prompts.dataset_class_names("vtab/" + name)


def test_label_orders_of_torchvision_and_tfds():
    # caltech101: torchvision's order (CLIP_benchmark's "caltech101") and TFDS's ("caltech101_vtab")
    assert prompts.dataset_class_names("caltech101")[:3] == ("background", "off-center face", "centered face")
    assert prompts.dataset_class_names("wds/vtab/caltech101")[:3] == ("accordion", "airplane", "anchor")
    # food101: torchvision sorts "cheese_plate" before "cheesecake", TFDS's label file does not
    assert prompts.dataset_class_names("food101")[16:18] == ("cheese plate", "cheesecake")
    assert prompts.dataset_class_names("vtab/food101")[16:18] == ("cheesecake", "cheese plate")
    # the other datasets read their labels in one order
    for name in set(CLASS_COUNTS) - {"caltech101", "food101"}:
        assert prompts.dataset_class_names("vtab/" + name) == prompts.dataset_class_names(name), name
    # sun397: the class list's order ("/j/jail/indoor" before "/j/jail_cell"), CLIP_benchmark's spelling
    sun397 = prompts.dataset_class_names("sun397")
    assert sun397.index("jail indoor") + 1 == sun397.index("jail cell")
    assert "apartment building outdoor" in sun397


def test_unknown_names_say_which_are_known():
    for function in (prompts.dataset_templates, prompts.dataset_class_names):
        for name in ("nonsense", "vtab/nonsense", "cifar10/vtab", "CIFAR10"):
            with pytest.raises(ValueError, match=f"unknown benchmark dataset '{name}'; CLIP_benchmark's are "
                                                 "caltech101, cars, cifar10, .*voc2007_multilabel"):
                function(name)


def test_templates_by_dataset_name():
    assert prompts.templates("cifar10") == prompts.templates("vtab/cifar100") == prompts.TEMPLATES["cifar"]
    assert prompts.templates("imagenet1k") == prompts.TEMPLATES["openai_imagenet"]
    assert prompts.templates("renderedsst2") == ("a {} review of a movie.",)
    assert prompts.templates("simple") == prompts.TEMPLATES["simple"]  # a template set before a dataset
    with pytest.raises(ValueError, match=r"unknown template set 'nonsense'; use one of \['cifar', 'name', "
                                         r"'openai_imagenet', 'photo', 'simple'\], a benchmark dataset's name "
                                         r"\(caltech101, .*voc2007_multilabel\) or a list of templates"):
        prompts.templates("nonsense")


def test_imagenet_class_names_are_clips():
    assert prompts.dataset_class_names("imagenet1k") == prompts.imagenet_class_names()


def test_table_is_clip_benchmarks():
    """Templates and class names equal those of the installed clip_benchmark package's JSON files (read, not
    imported: the package's modules need torch), "{c}" written "{}"; voc2007's are its voc2007.py's."""
    clip_benchmark = pytest.importorskip("clip_benchmark")
    folder = pathlib.Path(clip_benchmark.__file__).parent / "datasets"
    templates = json.loads((folder / "en_zeroshot_classification_templates.json").read_text(encoding="utf-8"))
    class_names = json.loads((folder / "en_classnames.json").read_text(encoding="utf-8"))

    assert set(prompts.benchmark_datasets()) == set(templates) - {"dummy"}
    for name in prompts.benchmark_datasets():
        assert prompts.dataset_templates(name) == tuple(t.replace("{c}", "{}") for t in templates[name]), name
    for name, names in class_names.items():
        ours = prompts.dataset_class_names("vtab/caltech101" if name == "caltech101_vtab" else name)
        assert ours == tuple(names), name
    voc2007 = next(ast.literal_eval(node.value) for node in ast.parse((folder / "voc2007.py").read_text()).body
                   if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "object_categories")
    assert prompts.dataset_class_names("voc2007") == prompts.dataset_class_names("voc2007_multilabel") == tuple(voc2007)
