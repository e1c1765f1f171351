"""The builtin benchmark vocabularies (pipeline/vocabularies/*.txt): size, ids, names, known facts."""

from __future__ import annotations

from importlib import resources

import pytest

from samcp.pipeline.vocab import builtin_vocabularies, read_vocabulary

# name: (number of classes, semantic benchmark with contiguous ids 0..K-1)
BENCHMARKS = {
    "ade20k_150": (150, True),
    "ade20k_847": (847, True),
    "pascal_context_59": (59, True),
    "pascal_context_459": (459, True),
    "pascal_voc_20": (20, True),
    "coco_stuff_171": (171, True),
    "cityscapes": (19, True),
    "coco_panoptic": (133, False),
}

NEW_FILES = [
    "ade20k_847",
    "pascal_context_59",
    "pascal_context_459",
    "pascal_voc_20",
    "coco_stuff_171",
]


def test_every_builtin_is_a_known_benchmark():
    assert builtin_vocabularies() == sorted(BENCHMARKS)


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_class_count_and_ids(name):
    count, semantic = BENCHMARKS[name]
    vocab = read_vocabulary(name)
    assert len(vocab) == count
    assert len(set(vocab.ids)) == count
    if semantic:
        assert vocab.ids == tuple(range(count))
    else:  # COCO panoptic category ids: 80 things (<= 90), then 53 stuff
        assert list(vocab.ids) == sorted(vocab.ids)
        assert (vocab.ids[0], vocab.ids[-1]) == (1, 200)
        assert sum(1 for i in vocab.ids if i <= 90) == 80


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_no_name_shared_by_two_classes_or_repeated_in_one(name):
    vocab = read_vocabulary(name)
    owner: dict[str, int] = {}
    for k, names in enumerate(vocab.names):
        assert all(n and n == n.strip() and "," not in n for n in names), (name, k, names)
        keys = [n.strip().lower() for n in names]
        assert len(keys) == len(set(keys)), f"{name}: class {k} lists a name twice: {names}"
        for key in keys:
            assert key not in owner, f"{name}: {key!r} is a name of classes {owner[key]} and {k}"
            owner[key] = k


@pytest.mark.parametrize("name", NEW_FILES)
def test_benchmark_files_start_with_source_and_id_comments(name):
    text = resources.files("samcp.pipeline").joinpath("vocabularies", f"{name}.txt").read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    header_text = " ".join(header)
    assert header and "Ids:" in header_text and "ignore label" in header_text
    assert "cvlab-kaist/CAT-Seg" in header_text and "bytedance/fc-clip" in header_text


@pytest.mark.parametrize(
    ("name", "index", "first_name"),
    [
        ("ade20k_150", 0, "wall"),
        ("ade20k_150", 12, "person"),
        ("ade20k_150", 149, "flag"),
        ("ade20k_847", 0, "wall"),
        ("ade20k_847", 1, "building"),
        ("ade20k_847", 11, "person"),
        ("ade20k_847", 188, "pot"),
        ("ade20k_847", 846, "adding machine"),
        ("pascal_context_59", 0, "aeroplane"),
        ("pascal_context_59", 36, "person"),
        ("pascal_context_59", 49, "diningtable"),
        ("pascal_context_59", 58, "wood"),
        ("pascal_context_459", 0, "accordion"),
        ("pascal_context_459", 1, "aeroplane"),
        ("pascal_context_459", 283, "person"),
        ("pascal_context_459", 458, "wool"),
        ("pascal_voc_20", 0, "aeroplane"),
        ("pascal_voc_20", 14, "person"),
        ("pascal_voc_20", 19, "tvmonitor"),
        ("coco_stuff_171", 0, "person"),
        ("coco_stuff_171", 79, "toothbrush"),
        # The first stuff class: COCO id 92, value 91 in COCO-Stuff's stuffthingmaps.
        ("coco_stuff_171", 80, "banner"),
        ("coco_stuff_171", 170, "wood"),
        ("cityscapes", 0, "road"),
        ("cityscapes", 18, "bicycle"),
    ],
)
def test_known_first_names(name, index, first_name):
    assert read_vocabulary(name).class_names[index] == first_name


def test_ade847_synonyms_keep_official_alternatives():
    ade = read_vocabulary("ade20k_847")
    assert {"edifice", "buildings"} <= set(ade.names[1])
    # 'pot' is the whole official name of class 188, so 'pot, flowerpot' (130) keeps 'flowerpot'.
    assert ade.names[130][0] == "flowerpot" and "pot" not in ade.names[130]


def test_pascal_context_59_is_the_sorted_subset_of_pascal_context_459():
    pc459 = list(read_vocabulary("pascal_context_459").class_names)
    pc59 = read_vocabulary("pascal_context_59").class_names
    # PC-59 labels are the 59 PC-459 labels in increasing order; 'diningtable' is PC-459 'table'.
    index = [pc459.index("table" if n == "diningtable" else n) for n in pc59]
    assert index == sorted(index) and len(set(index)) == 59


def test_voc_classes_are_pascal_context_59_classes():
    assert set(read_vocabulary("pascal_voc_20").class_names) <= set(
        read_vocabulary("pascal_context_59").class_names
    )


def test_coco_stuff_things_are_the_coco_panoptic_things_in_order():
    panoptic = read_vocabulary("coco_panoptic")
    things = [n for i, n in zip(panoptic.ids, panoptic.class_names) if i <= 90]
    assert list(read_vocabulary("coco_stuff_171").class_names[:80]) == things
