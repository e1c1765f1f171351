"""Vocabularies, prompt templates, CLIP text embeddings and their disk cache (pipeline/vocab.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from samcp.pipeline.errors import SamcpError
from samcp.pipeline.synth import SYNTH_CLASSES, classes_txt, synth_categories
from samcp.pipeline.vocab import (
    VILD_TEMPLATES,
    ClassTextEmbeddings,
    TextEmbedder,
    Vocabulary,
    builtin_vocabularies,
    class_scores,
    parse_vocabulary,
    read_vocabulary,
    resolve_templates,
    text_embeddings,
    vocabulary_from_dataset,
)

TEST_CLIP = "samcp-test-convnext"

# --------------------------------------------------------------------------------------------
# Vocabulary files


@pytest.mark.parametrize(
    ("name", "count", "first_id", "last_id"),
    [
        ("coco_panoptic", 133, 1, 200),
        ("ade20k_150", 150, 0, 149),
        ("cityscapes", 19, 0, 18),
        ("ade20k_847", 847, 0, 846),
        ("pascal_context_59", 59, 0, 58),
        ("pascal_context_459", 459, 0, 458),
        ("pascal_voc_20", 20, 0, 19),
        ("coco_stuff_171", 171, 0, 170),
    ],
)
def test_builtin_vocabularies_parse_with_dataset_ids(name, count, first_id, last_id):
    vocab = read_vocabulary(name)
    assert len(vocab) == count
    assert len(set(vocab.ids)) == count
    assert list(vocab.ids) == sorted(vocab.ids)
    assert (vocab.ids[0], vocab.ids[-1]) == (first_id, last_id)
    # A synonym shared by two classes would give them identical scores for that name.
    names, _ = vocab.flat()
    assert len(names) == len(set(names))


def test_builtin_list_and_known_names():
    assert builtin_vocabularies() == [
        "ade20k_150",
        "ade20k_847",
        "cityscapes",
        "coco_panoptic",
        "coco_stuff_171",
        "pascal_context_459",
        "pascal_context_59",
        "pascal_voc_20",
    ]
    coco = read_vocabulary("coco_panoptic")
    by_id = dict(zip(coco.ids, coco.names))
    assert by_id[72][0] == "tv" and "television" in by_id[72]
    assert by_id[199][0] == "wall-other-merged" and "wall" in by_id[199]
    assert sum(1 for i in coco.ids if i <= 90) == 80  # 80 things, 53 stuff
    assert read_vocabulary("ade20k_150").class_names[7] == "bed"
    assert read_vocabulary("cityscapes").class_names[18] == "bicycle"


def test_flat_gives_parallel_class_index():
    vocab = parse_vocabulary("5:cat,kitten\n9:dog\n2:tv,television,telly\n")
    names, index = vocab.flat()
    assert names == ["cat", "kitten", "dog", "tv", "television", "telly"]
    assert index == [0, 0, 1, 2, 2, 2]
    assert vocab.ids == (5, 9, 2)
    assert parse_vocabulary(vocab.to_text()) == vocab


def test_parser_skips_blank_and_comment_lines_and_strips_spaces(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("\ufeff# my classes\n\n 3 : traffic light , traffic signal \n7:a:b\n")
    vocab = read_vocabulary(path)
    assert vocab.name == "mine"
    assert vocab.ids == (3, 7)
    assert vocab.names == (("traffic light", "traffic signal"), ("a:b",))


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("1:cat\ndog\n", 2, "expected 'id:name"),
        ("1:cat\n\nx:dog\n", 3, "not an integer"),
        ("1:cat\n2:dog\n1:cow\n", 3, "already used on line 1"),
        ("1:cat,\n", 1, "empty name"),
        ("1:cat\n2:\n", 2, "empty name"),
        ("1:cat,dog,cat\n", 1, "twice"),
    ],
)
def test_malformed_class_file_names_file_and_line(tmp_path, text, line, what):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(SamcpError) as err:
        read_vocabulary(path)
    msg = str(err.value)
    assert f"{path} line {line}:" in msg
    assert what in msg
    assert "\n" not in msg


def test_empty_and_missing_class_files(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# nothing\n\n")
    with pytest.raises(SamcpError, match="no classes"):
        read_vocabulary(path)
    with pytest.raises(SamcpError, match="unknown class file.*coco_panoptic"):
        read_vocabulary(tmp_path / "nope.txt")


def test_synth_classes_txt_parses(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text(classes_txt())
    vocab = read_vocabulary(path)
    assert vocab.ids == tuple(c.id for c in SYNTH_CLASSES)
    assert vocab.names == tuple((c.name, *c.synonyms) for c in SYNTH_CLASSES)


def test_vocabulary_from_dataset_categories():
    vocab = vocabulary_from_dataset(synth_categories(), name="synth")
    assert vocab.ids == tuple(c.id for c in SYNTH_CLASSES)
    assert vocab.names == tuple((c.name,) for c in SYNTH_CLASSES)
    with pytest.raises(SamcpError, match="appears twice"):
        vocabulary_from_dataset([{"id": 1, "name": "a"}, {"id": 1, "name": "b"}])
    with pytest.raises(SamcpError, match="no 'id' or 'name'"):
        vocabulary_from_dataset([{"id": 1}])


def test_templates_resolve():
    assert len(VILD_TEMPLATES) == 14 and len(set(VILD_TEMPLATES)) == 14
    assert all(t.count("{}") == 1 for t in VILD_TEMPLATES)
    assert resolve_templates("vild") == VILD_TEMPLATES
    assert resolve_templates("single") == ("a photo of a {}.",)
    assert resolve_templates(["{} here"]) == ("{} here",)
    with pytest.raises(SamcpError, match="exactly once"):
        resolve_templates(["no slot"])
    with pytest.raises(SamcpError, match="unknown template set"):
        resolve_templates("vilD")


# --------------------------------------------------------------------------------------------
# Text embeddings with a tiny random open_clip model


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    """A random samcp-test-convnext checkpoint in open_clip's format (pipeline/clip.py)."""
    from samcp.pipeline.clip import make_random_clip_checkpoint

    return make_random_clip_checkpoint(tmp_path_factory.mktemp("clip") / "clip.pt")


@pytest.fixture(scope="module")
def tiny_clip(clip_checkpoint):
    """The tiny CLIP loaded through the real path, and the real open_clip tokenizer (offline)."""
    import open_clip

    from samcp.pipeline.clip import load_clip

    model, _ = load_clip(TEST_CLIP, clip_checkpoint)
    return model, open_clip.get_tokenizer(TEST_CLIP)


class CountingModel(torch.nn.Module):
    """Wraps a CLIP model and counts ``encode_text`` calls and prompts."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0
        self.prompts = 0

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.prompts += tokens.shape[0]
        return self.model.encode_text(tokens)


def test_template_average_matches_manual_computation(tiny_clip):
    model, tokenizer = tiny_clip
    templates = VILD_TEMPLATES[:3]
    got = TextEmbedder(model, tokenizer, templates, batch_size=2).embed_names(
        ["cat", "traffic light"]
    )

    with torch.no_grad():
        for row, name in zip(got, ["cat", "traffic light"]):
            per_template = [
                F.normalize(model.encode_text(tokenizer([t.format(name)]))[0], dim=0)
                for t in templates
            ]
            expected = torch.stack(per_template).mean(0)
            expected = expected / expected.norm()
            torch.testing.assert_close(row, expected, atol=1e-5, rtol=1e-5)
    assert got.shape == (2, 32)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(2))
    # Averaging over several templates differs from the first template alone.
    single = TextEmbedder(model, tokenizer, templates[:1]).embed_names(["cat"])
    assert not torch.allclose(single[0], got[0], atol=1e-3)


def test_embedder_restores_training_mode(tiny_clip):
    model, tokenizer = tiny_clip
    model.train()
    try:
        TextEmbedder(model, tokenizer, "single").embed_names(["cat"])
        assert model.training
    finally:
        model.eval()


def test_class_scores_use_the_mean_of_the_synonyms():
    # Class 0 (id 10) has two synonyms along e0 and e1; class 1 (id 20) one along e2.
    e = torch.eye(3)
    text = ClassTextEmbeddings(
        embeddings=torch.stack([e[0], e[1], e[2]]),
        class_index=torch.tensor([0, 0, 1]),
        class_ids=(10, 20),
    )
    image = torch.tensor(
        [
            [0.0, 3.0, 4.0],  # class 0 = (e0 + e1)/sqrt(2): 3/5/sqrt(2); class 1: 0.8
            [2.0, 0.0, 0.0],  # class 0: 1/sqrt(2); class 1: 0
            [-1.0, -1.0, 0.0],  # class 0: -1; class 1: 0
        ]
    )
    scores = class_scores(image.half(), text)
    r = 0.5**0.5
    expected = torch.tensor([[0.6 * r, 0.8], [r, 0.0], [-1.0, 0.0]])
    torch.testing.assert_close(scores, expected, atol=2e-3, rtol=0)
    assert class_scores(torch.zeros(0, 3), text).shape == (0, 2)
    with pytest.raises(ValueError):
        class_scores(torch.zeros(2, 4), text)


def test_class_scores_with_real_embeddings_equal_the_shared_class_rule(tiny_clip):
    from samcp.models.openvocab import class_embeddings

    model, tokenizer = tiny_clip
    vocab = parse_vocabulary("1:cat,kitten\n2:dog\n3:car,automobile,vehicle\n")
    text = TextEmbedder(model, tokenizer, "single")(vocab)
    image = torch.randn(5, 32)
    scores = class_scores(image, text)
    mean = torch.stack(
        [
            F.normalize(text.embeddings[idx].mean(0), dim=0)
            for idx in ([0, 1], [2], [3, 4, 5])
        ]
    )
    torch.testing.assert_close(scores, F.normalize(image, dim=1) @ mean.T)
    torch.testing.assert_close(mean, class_embeddings(text.embeddings, text.class_index, 3))


def test_class_text_embeddings_rejects_classes_without_synonyms():
    with pytest.raises(ValueError, match="cover every class"):
        ClassTextEmbeddings(torch.eye(2), torch.tensor([0, 0]), class_ids=(1, 2))


# --------------------------------------------------------------------------------------------
# Disk cache


def test_cache_reuse_and_invalidation(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    counting = CountingModel(model)
    vocab = parse_vocabulary("1:cat,kitten\n2:dog\n")
    templates = VILD_TEMPLATES[:2]

    def compute(v=vocab, sha="a" * 64, tpl=templates, name="tiny"):
        before = counting.calls
        out = text_embeddings(v, name, sha, counting, tokenizer, tpl, cache_dir=tmp_path)
        return out, counting.calls > before

    first, computed = compute()
    assert computed and counting.prompts == 3 * 2
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    sidecar = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert sidecar["names"] == ["cat", "kitten", "dog"] and sidecar["templates"] == list(templates)

    again, computed = compute()
    assert not computed
    torch.testing.assert_close(again.embeddings, first.embeddings)
    assert again.class_index.tolist() == [0, 0, 1] and again.class_ids == (1, 2)

    # The model is not needed when the entry is cached.
    cached = text_embeddings(vocab, "tiny", "a" * 64, None, None, templates, cache_dir=tmp_path)
    torch.testing.assert_close(cached.embeddings, first.embeddings)

    # Any change to the key computes a new entry.
    assert compute(v=parse_vocabulary("1:cat,kitten\n2:puppy\n"))[1]
    assert compute(v=parse_vocabulary("1:cat,kitten\n3:dog\n"))[1]  # ids are part of the key
    assert compute(tpl=VILD_TEMPLATES[:3])[1]
    assert compute(sha="b" * 64)[1]
    assert compute(name="tiny-2")[1]
    assert len(list(tmp_path.glob("*.safetensors"))) == 6
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind
    # ... and each of those is reused in turn.
    assert not compute(sha="b" * 64)[1]


def test_cache_miss_without_model_is_a_clear_error(tmp_path):
    vocab = parse_vocabulary("1:cat\n")
    with pytest.raises(SamcpError, match="not cached"):
        text_embeddings(vocab, "tiny", "a" * 64, None, None, cache_dir=tmp_path)


def test_damaged_cache_entry_is_recomputed(tiny_clip, tmp_path):
    model, tokenizer = tiny_clip
    counting = CountingModel(model)
    vocab = parse_vocabulary("1:cat\n")
    first = text_embeddings(
        vocab, "tiny", "a" * 64, counting, tokenizer, "single", cache_dir=tmp_path
    )
    next(tmp_path.glob("*.safetensors")).write_bytes(b"not a safetensors file")
    again = text_embeddings(
        vocab, "tiny", "a" * 64, counting, tokenizer, "single", cache_dir=tmp_path
    )
    assert counting.calls == 2
    torch.testing.assert_close(again.embeddings, first.embeddings)
    third = text_embeddings(
        vocab, "tiny", "a" * 64, counting, tokenizer, "single", cache_dir=tmp_path
    )
    assert counting.calls == 2  # the rewritten entry is valid again
    torch.testing.assert_close(third.embeddings, first.embeddings)


def test_default_cache_dir_follows_samcp_cache_dir(tiny_clip, tmp_path, monkeypatch):
    model, tokenizer = tiny_clip
    monkeypatch.setenv("SAMCP_CACHE_DIR", str(tmp_path))
    text_embeddings(parse_vocabulary("1:cat\n"), "tiny", "a" * 64, model, tokenizer, "single")
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 1


def test_vocabulary_rejects_inconsistent_construction():
    with pytest.raises(ValueError):
        Vocabulary(ids=(1, 1), names=(("a",), ("b",)))
    with pytest.raises(ValueError):
        Vocabulary(ids=(1,), names=((),))


def test_builtin_vocabulary_end_to_end_keyed_by_checkpoint_sha(
    tiny_clip, clip_checkpoint, tmp_path
):
    from samcp.pipeline.foundation import file_sha256

    model, tokenizer = tiny_clip
    vocab = read_vocabulary("cityscapes")
    sha = file_sha256(clip_checkpoint)
    text = text_embeddings(vocab, TEST_CLIP, sha, model, tokenizer, cache_dir=tmp_path)
    names, index = vocab.flat()
    assert text.embeddings.shape == (len(names), 32) and text.class_index.tolist() == index
    assert text.class_ids == tuple(range(19))
    direct = TextEmbedder(model, tokenizer)(vocab)
    torch.testing.assert_close(text.embeddings, direct.embeddings)
    scores = class_scores(text.embeddings[:3], text)
    assert scores.shape == (3, len(vocab)) and bool((scores.abs() <= 1 + 1e-5).all())
