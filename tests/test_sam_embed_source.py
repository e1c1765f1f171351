"""sam_embed next to proposals that are not SAM's: SAM runs only its encoder, for the embedding.

The embedding comes from the function the SAM proposal path uses (``sam_encoder.embed_image``), so it
equals, array for array, what ``--proposals sam --store-sam-embeddings`` stores for the same image and
checkpoint. The SAM is the tiny random ``vit_tiny`` written by ``write_random_sam_checkpoint``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from samcp.cli.main import main as samcp_main
from samcp.pipeline import precompute as pre
from samcp.pipeline.cache import CacheReader
from samcp.pipeline.datasets import load_image_rgb, open_image_source
from samcp.pipeline.errors import SamcpError
from samcp.pipeline.foundation import (
    build_sam_arch,
    file_sha256,
    load_sam,
    write_random_sam_checkpoint,
)
from samcp.pipeline.proposals import ProposalConfig, ProposalSource
from samcp.pipeline.proposals.sam import SamEverythingGenerator, SamEverythingParams
from samcp.pipeline.proposals.slic import SlicGenerator, SlicParams
from samcp.pipeline.synth import make_synthetic_dataset

# A few prompts only: the SAM path is run here for its embedding, not its masks.
FEW_PROMPTS = SamEverythingParams(
    points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "synth"
    make_synthetic_dataset(root, seed=0, num_train=0, num_val=3, height=96, width=128)
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_random_sam_checkpoint(tmp_path_factory.mktemp("sam") / "tiny.pth", seed=0)


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory) -> Path:
    return write_random_sam_checkpoint(tmp_path_factory.mktemp("sam") / "tiny.pth", seed=1)


def _cfg(dataset, out, ckpt=None, source="slic", **kw) -> pre.PrecomputeConfig:
    props = ProposalConfig(
        source=source,
        sam_model="vit_tiny",
        sam_checkpoint=None if ckpt is None else str(ckpt),
        external_path=kw.pop("external_path", None),
    )
    kw.setdefault("num_workers", 0)
    kw.setdefault("shard_size", 2)
    kw.setdefault("store_sam_embeddings", True)
    return pre.PrecomputeConfig(
        source=str(dataset), out=str(out), proposals=props, progress=False, **kw
    )


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- write_random_sam_checkpoint ---------------------------------------------------------------


def test_random_checkpoint_is_deterministic_and_loads_through_load_sam(tmp_path, tiny_ckpt):
    rng_before = torch.get_rng_state()
    again = write_random_sam_checkpoint(tmp_path / "sub" / "tiny.pth", seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    assert _sha(again) == _sha(tiny_ckpt)  # same seed, same bytes (so resume checks pass)
    assert sorted(p.name for p in again.parent.iterdir()) == ["tiny.pth"]  # no temporary left
    other = write_random_sam_checkpoint(tmp_path / "other.pth", seed=1)
    assert _sha(other) != _sha(tiny_ckpt)

    model = load_sam("vit_tiny", again)
    enc = model.image_encoder
    assert enc.img_size == 1024 and len(enc.blocks) == 2
    sd = torch.load(again)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())
    # The hypernetworks' last layer is a seed-0 random init scaled by 30 (the real decoder width).
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(0)
        plain = build_sam_arch("vit_tiny").state_dict()
    for i in range(4):
        key = f"mask_decoder.output_hypernetworks_mlps.{i}.layers.2.weight"
        torch.testing.assert_close(sd[key], plain[key] * 30.0)
    assert torch.equal(sd["mask_decoder.iou_token.weight"], plain["mask_decoder.iou_token.weight"])

    # Its embedding has the shape of a real SAM's.
    src = ProposalSource(ProposalConfig("slic", sam_model="vit_tiny", sam_checkpoint=str(again)))
    emb = src.sam_embedding(np.zeros((96, 128, 3), np.uint8))
    assert emb.shape == (256, 64, 64) and emb.dtype == np.float16

    # Loaded as another model: the error names the one it holds.
    with pytest.raises(
        SamcpError, match="does not fit --sam-model vit_b .*pass --sam-model vit_tiny"
    ):
        load_sam("vit_b", again)
    with pytest.raises(SamcpError, match="no tiny version"):
        write_random_sam_checkpoint(tmp_path / "x.pth", model="vit_q")


# --- slic / external proposals with sam_embed --------------------------------------------------


def test_slic_cache_stores_the_embedding_the_sam_path_computes(
    dataset, tiny_ckpt, tmp_path, monkeypatch
):
    from segment_anything import SamPredictor

    from samcp.pipeline.proposals import sam as sam_proposals
    from samcp.pipeline.proposals import sam_encoder

    encodes, decodes = [], []
    real_encode, real_decode = sam_encoder.encode_image, sam_proposals.decode_points
    monkeypatch.setattr(
        sam_encoder, "encode_image", lambda *a, **k: encodes.append(1) or real_encode(*a, **k)
    )
    monkeypatch.setattr(
        sam_proposals, "decode_points", lambda *a, **k: decodes.append(1) or real_decode(*a, **k)
    )
    summary = pre.run_precompute(_cfg(dataset, tmp_path / "c", tiny_ckpt))
    assert summary.num_images == 3 and summary.num_failed_images == 0
    assert len(encodes) == 3 and not decodes  # one encoder pass per image, no mask decoding
    monkeypatch.undo()

    reader = CacheReader(tmp_path / "c")
    assert reader.attrs["proposals"]["source"] == "slic"
    assert reader.attrs["sam"] == {
        "model": "vit_tiny",
        "checkpoint_sha256": file_sha256(tiny_ckpt),
        "params": None,
    }
    assert reader.attrs["sam_embed"] is True

    model = load_sam("vit_tiny", tiny_ckpt)
    sam_path = SamEverythingGenerator(model, FEW_PROMPTS)
    predictor = SamPredictor(model)
    slic = SlicGenerator(SlicParams())
    recs = {r.image_id: r for r in open_image_source(dataset, "val2017")}
    rows = list(reader.iter_images())
    assert len(rows) == 3
    for row in rows:
        image = load_image_rgb(recs[row.image_id].file_name)
        got = row.image_arrays["sam_embed"]
        assert got.shape == (256, 64, 64) and got.dtype == np.float16
        # Exactly what --proposals sam --store-sam-embeddings stores (ProposalSource's SAM branch).
        _, features = sam_path.generate(image, return_embedding=True)
        np.testing.assert_array_equal(got, sam_encoder.sam_embed_array(features))
        if row is rows[0]:
            # And segment_anything's own SamPredictor.set_image, up to the fast encoder's rounding.
            predictor.set_image(image)
            want = predictor.features[0].numpy()
            np.testing.assert_allclose(
                got.astype(np.float32), want, rtol=2e-3, atol=2e-3 * np.abs(want).max()
            )
        # The proposals are SLIC's, untouched by the SAM pass.
        assert row.proposals.rles == slic.generate(image).rles


def test_external_proposals_get_the_same_embedding(dataset, tiny_ckpt, tmp_path):
    """External proposals need no pixels of their own; with sam_embed the images are read."""
    recs = open_image_source(dataset, "val2017")
    results = []
    for r in recs:
        m = np.zeros((r.height, r.width), np.uint8, order="F")
        m[10:40, 20:60] = 1
        rle = mask_utils.encode(m)
        rle["counts"] = rle["counts"].decode()
        results.append({"image_id": r.image_id, "segmentation": rle, "score": 0.9})
    res = tmp_path / "results.json"
    res.write_text(json.dumps(results))
    pre.run_precompute(_cfg(dataset, tmp_path / "ext", tiny_ckpt, "external", external_path=res))
    pre.run_precompute(_cfg(dataset, tmp_path / "slic", tiny_ckpt))
    ext = {r.image_id: r for r in CacheReader(tmp_path / "ext").iter_images()}
    slic = {r.image_id: r for r in CacheReader(tmp_path / "slic").iter_images()}
    assert sorted(ext) == sorted(slic) and len(ext) == 3
    for image_id, row in ext.items():
        assert len(row.proposals) == 1
        np.testing.assert_array_equal(
            row.image_arrays["sam_embed"], slic[image_id].image_arrays["sam_embed"]
        )
    assert CacheReader(tmp_path / "ext").attrs["sam"]["checkpoint_sha256"] == file_sha256(tiny_ckpt)


# --- the command line: runs, resume checks, errors ---------------------------------------------


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        samcp_main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _slic_args(dataset, out, *extra) -> list[str]:
    return [
        "precompute",
        str(dataset),
        "--out",
        str(out),
        "--proposals",
        "slic",
        "--shard-size",
        "2",
        "--num-workers",
        "0",
        "--no-progress",
        *extra,
    ]


def test_cli_resume_with_another_checkpoint_is_refused(
    dataset, tiny_ckpt, other_ckpt, tmp_path, capsys
):
    out = tmp_path / "c"
    embed = ["--store-sam-embeddings", "--sam-model", "vit_tiny"]
    code, stdout, err = _cli(
        _slic_args(dataset, out, *embed, "--sam-checkpoint", str(tiny_ckpt)), capsys
    )
    assert code == 0, err
    assert "warning" not in err  # --sam-model is read: it names the embedding's SAM
    assert "images: 3 processed now" in stdout
    assert CacheReader(out).attrs["sam"]["checkpoint_sha256"] == file_sha256(tiny_ckpt)
    before = {s: CacheReader(out).root["shards"][s]["sam_embed"][...] for s in ("00000", "00001")}

    code, _, err = _cli(
        _slic_args(dataset, out, *embed, "--sam-checkpoint", str(other_ckpt)), capsys
    )
    assert code == 2 and "different sam" in err and "--overwrite" in err, err
    assert len(err.strip().splitlines()) == 1
    # Without the embedding it is another cache too.
    code, _, err = _cli(_slic_args(dataset, out), capsys)
    assert code == 2 and "different sam" in err, err
    # The same checkpoint resumes: nothing to redo.
    code, stdout, err = _cli(
        _slic_args(dataset, out, *embed, "--sam-checkpoint", str(tiny_ckpt)), capsys
    )
    assert code == 0 and "2 already complete" in stdout, err
    for sid, arr in before.items():
        np.testing.assert_array_equal(CacheReader(out).root["shards"][sid]["sam_embed"][...], arr)


def test_missing_checkpoint_is_a_one_line_error(dataset, tmp_path, capsys):
    out = tmp_path / "c"
    code, _, err = _cli(_slic_args(dataset, out, "--store-sam-embeddings"), capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1
    assert "--store-sam-embeddings needs SAM proposals or SAM weights" in err
    assert "add --sam-checkpoint PATH" in err
    code, _, err = _cli(
        _slic_args(
            dataset, out, "--store-sam-embeddings", "--sam-checkpoint", str(tmp_path / "no.pth")
        ),
        capsys,
    )
    assert code == 2 and "SAM checkpoint not found" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    # A checkpoint without --store-sam-embeddings is still read by nothing: refused.
    code, _, err = _cli(_slic_args(dataset, out, "--sam-checkpoint", "x.pth"), capsys)
    assert code == 2 and "add --store-sam-embeddings" in err
    # The Python API says the same.
    with pytest.raises(SamcpError, match="--sam-checkpoint PATH"):
        pre.run_precompute(_cfg(dataset, out))
    with pytest.raises(SamcpError, match="--sam-checkpoint PATH"):
        ProposalSource(ProposalConfig("slic"), sam_embeddings=True)
    assert not out.exists()
