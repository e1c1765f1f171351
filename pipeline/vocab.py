"""Class vocabularies and their CLIP text embeddings.

A vocabulary is a list of classes, each with a dataset category id and one or more names (the first
is the dataset's own name, the rest synonyms). Files use FC-CLIP's format, one class per line::

    72:tv,television,tv monitor

Every name is embedded with the CLIP text tower under a set of prompt templates (ViLD's 14 by
default): each prompt embedding is L2-normalised, the template embeddings of a name are averaged and
the mean re-normalised, giving one embedding per synonym. A region scores a class by the maximum
cosine similarity over that class's synonyms (FC-CLIP's rule, see :func:`class_scores`).

Text embeddings are cached on disk (safetensors plus a JSON sidecar) keyed by the CLIP model name,
its checkpoint sha256, the vocabulary's content and the templates, so each combination is encoded
once. See docs/vocabularies.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from samcp.pipeline.errors import SamcpError

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Vocabularies


@dataclass(frozen=True)
class Vocabulary:
    """An ordered list of classes, each with a dataset category id and one or more names.

    Attributes:
        ids: Dataset category id per class (COCO panoptic ids, ADE20K-150 indices, Cityscapes
            trainIds, ...). Unique; the class index used everywhere else is the position here.
        names: Names per class, the dataset's own name first, then synonyms. Never empty.
        name: Where the vocabulary came from (a builtin name or a file stem), for messages.
    """

    ids: tuple[int, ...]
    names: tuple[tuple[str, ...], ...]
    name: str = "custom"

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.names):
            raise ValueError(f"{len(self.ids)} ids but {len(self.names)} name lists")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError(f"vocabulary {self.name!r} has duplicate class ids")
        for cid, names in zip(self.ids, self.names):
            if not names or any(not n.strip() for n in names):
                raise ValueError(f"class {cid} of vocabulary {self.name!r} has an empty name")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The first (dataset) name of each class."""
        return tuple(n[0] for n in self.names)

    def flat(self) -> tuple[list[str], list[int]]:
        """All names of all classes in order, with the class index (position in ``ids``) of each."""
        names = [n for ns in self.names for n in ns]
        index = [k for k, ns in enumerate(self.names) for _ in ns]
        return names, index

    def to_text(self) -> str:
        """The vocabulary in FC-CLIP's file format; :func:`parse_vocabulary` reads it back."""
        return "".join(f"{cid}:{','.join(ns)}\n" for cid, ns in zip(self.ids, self.names))

    def content_hash(self) -> str:
        """sha256 of the ids and names (not ``name``): equal for vocabularies that embed equally."""
        return hashlib.sha256(self.to_text().encode("utf-8")).hexdigest()


_BUILTIN_PACKAGE = "samcp.pipeline"
_BUILTIN_DIR = "vocabularies"


def builtin_vocabularies() -> list[str]:
    """Names of the vocabularies shipped with samcp (``coco_panoptic``, ``ade20k_150``, ...)."""
    folder = resources.files(_BUILTIN_PACKAGE).joinpath(_BUILTIN_DIR)
    return sorted(p.name[: -len(".txt")] for p in folder.iterdir() if p.name.endswith(".txt"))


def parse_vocabulary(text: str, source: str = "<string>", name: str = "custom") -> Vocabulary:
    """Parses FC-CLIP class-file text: one ``id:name,synonym,...`` line per class.

    Blank lines and lines starting with ``#`` are skipped. Names are stripped of surrounding
    whitespace and may contain spaces, hyphens and further colons (only the first colon splits).

    Args:
        text: The file's content.
        source: Shown in error messages (usually the file path).
        name: The resulting vocabulary's ``name``.

    Raises:
        SamcpError: On a malformed line, a non-integer or duplicate id, an empty name, a name
            repeated within a class, or a file without classes; the message names the line.
    """
    ids: list[int] = []
    names: list[tuple[str, ...]] = []
    first_line: dict[int, int] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source} line {lineno}"
        head, sep, rest = line.partition(":")
        if not sep:
            raise SamcpError(
                f"{where}: expected 'id:name,synonym,...' but found {_clip(line)!r}; "
                "write the category id, a colon, then comma-separated names"
            )
        try:
            cid = int(head.strip())
        except ValueError:
            raise SamcpError(
                f"{where}: class id {head.strip()!r} is not an integer; "
                "start the line with the dataset's integer category id"
            ) from None
        if cid in first_line:
            raise SamcpError(
                f"{where}: class id {cid} already used on line {first_line[cid]}; "
                "give every class its own id"
            )
        class_names = tuple(n.strip() for n in rest.split(","))
        if any(not n for n in class_names):
            raise SamcpError(
                f"{where}: class {cid} has an empty name ({_clip(line)!r}); "
                "remove the stray comma or write the missing name"
            )
        repeated = sorted({n for n in class_names if class_names.count(n) > 1})
        if repeated:
            raise SamcpError(
                f"{where}: class {cid} lists {repeated[0]!r} twice; list each name once"
            )
        first_line[cid] = lineno
        ids.append(cid)
        names.append(class_names)
    if not ids:
        raise SamcpError(f"{source}: no classes found; write one 'id:name,synonym,...' per line")
    return Vocabulary(ids=tuple(ids), names=tuple(names), name=name)


def read_vocabulary(source: str | os.PathLike[str] | Vocabulary) -> Vocabulary:
    """Reads a class file, or a builtin vocabulary by name.

    Args:
        source: A path to an FC-CLIP class file, the name of a builtin vocabulary (see
            :func:`builtin_vocabularies`), or a :class:`Vocabulary` (returned as is). An existing
            file wins over a builtin of the same name.

    Raises:
        SamcpError: If the file does not exist and no builtin has that name, or it is malformed.
    """
    if isinstance(source, Vocabulary):
        return source
    path = Path(source)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise SamcpError(f"cannot read class file {path}: {e}; pass a UTF-8 text file") from e
        return parse_vocabulary(text, source=str(path), name=path.stem)
    builtins = builtin_vocabularies()
    if str(source) in builtins:
        resource = resources.files(_BUILTIN_PACKAGE).joinpath(_BUILTIN_DIR, f"{source}.txt")
        return parse_vocabulary(
            resource.read_text(encoding="utf-8"), source=f"builtin:{source}", name=str(source)
        )
    raise SamcpError(
        f"unknown class file {str(source)!r}: no such file and no builtin vocabulary of that name; "
        f"pass a path to an 'id:name,synonym,...' file or one of {', '.join(builtins)}"
    )


def vocabulary_from_dataset(categories: Sequence[dict], name: str = "dataset") -> Vocabulary:
    """Builds a vocabulary from a COCO(-panoptic) JSON ``categories`` list (one name per class).

    Raises:
        SamcpError: If a category lacks ``id`` or ``name``, or ids repeat.
    """
    ids: list[int] = []
    names: list[tuple[str, ...]] = []
    for k, cat in enumerate(categories):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise SamcpError(
                f"category #{k} of {name!r} has no 'id' or 'name'; "
                "each category needs both, as in COCO's JSON"
            )
        cname = str(cat["name"]).strip()
        if not cname:
            raise SamcpError(f"category {cat['id']} of {name!r} has an empty name; name it")
        if int(cat["id"]) in ids:
            raise SamcpError(
                f"category id {cat['id']} appears twice in {name!r}; ids must be unique"
            )
        ids.append(int(cat["id"]))
        names.append((cname,))
    if not ids:
        raise SamcpError(f"{name!r} has no categories; the dataset JSON needs a 'categories' list")
    return Vocabulary(ids=tuple(ids), names=tuple(names), name=name)


def _clip(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


# --------------------------------------------------------------------------------------------
# Prompt templates

# ViLD's 14 prompt templates (Gu et al. 2022, "Open-vocabulary Object Detection via Vision and
# Language Knowledge Distillation"), as used by FC-CLIP and SAM-CP for CLIP text classifiers.
VILD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

# CLIP's single default prompt, for quick experiments and ablations.
SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"vild": VILD_TEMPLATES, "single": SINGLE_TEMPLATE}


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """Returns a template tuple from a set name (``"vild"``, ``"single"``) or a list of templates.

    Raises:
        SamcpError: On an unknown set name, an empty list, or a template without exactly one ``{}``.
    """
    if isinstance(templates, str):
        if templates not in TEMPLATE_SETS:
            raise SamcpError(
                f"unknown template set {templates!r}; use one of {', '.join(TEMPLATE_SETS)} "
                "or pass a list of templates containing '{}'"
            )
        return TEMPLATE_SETS[templates]
    out = tuple(templates)
    if not out:
        raise SamcpError(
            "no prompt templates given; pass at least one template such as 'a photo of a {}.'"
        )
    for t in out:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise SamcpError(
                f"prompt template {t!r} must contain '{{}}' exactly once (where the class name goes)"
            )
    return out


def templates_hash(templates: Sequence[str]) -> str:
    """sha256 of the ordered template list."""
    return hashlib.sha256(json.dumps(list(templates)).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Text embeddings and scoring


@dataclass(frozen=True)
class ClassTextEmbeddings:
    """CLIP text embeddings of a vocabulary, one row per name (synonym).

    Attributes:
        embeddings: (S, D) float32, L2-normalised, one row per synonym in ``Vocabulary.flat()`` order.
        class_index: (S,) int64, the class (0..K-1) of each row.
        class_ids: (K,) dataset category ids, the vocabulary's ``ids``.
        names: (S,) the synonym of each row.
    """

    embeddings: torch.Tensor
    class_index: torch.Tensor
    class_ids: tuple[int, ...]
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        s = self.embeddings.shape[0]
        if self.embeddings.ndim != 2 or self.class_index.shape != (s,):
            raise ValueError(
                f"embeddings {tuple(self.embeddings.shape)} and class_index "
                f"{tuple(self.class_index.shape)} must be (S, D) and (S,)"
            )
        if self.names and len(self.names) != s:
            raise ValueError(f"{len(self.names)} names for {s} embeddings")
        k = len(self.class_ids)
        present = torch.unique(self.class_index).tolist()
        if present != list(range(k)):
            raise ValueError(f"class_index must cover every class 0..{k - 1} and nothing else")

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def to(self, device: torch.device | str) -> ClassTextEmbeddings:
        """A copy with the tensors on ``device``."""
        return ClassTextEmbeddings(
            self.embeddings.to(device), self.class_index.to(device), self.class_ids, self.names
        )


def class_scores(image_embeds: torch.Tensor, text: ClassTextEmbeddings) -> torch.Tensor:
    """Cosine similarity of each region to each class, with samcp's one synonym rule: a class is
    the normalised mean of its synonyms' embeddings (:func:`samcp.models.openvocab.class_embeddings`),
    the same embedding the heads train and predict with.

    Args:
        image_embeds: (M, D) region embeddings in CLIP space (normalised here; any float dtype).
        text: The vocabulary's text embeddings (D must match).

    Returns:
        (M, K) float32 cosine similarities in [-1, 1], K = ``text.num_classes``.
    """
    from samcp.models.openvocab import class_embeddings

    if image_embeds.ndim != 2 or image_embeds.shape[1] != text.dim:
        raise ValueError(
            f"image_embeds has shape {tuple(image_embeds.shape)}, expected (M, {text.dim})"
        )
    emb = class_embeddings(
        text.embeddings.to(device=image_embeds.device, dtype=torch.float32),
        text.class_index.to(image_embeds.device),
        text.num_classes,
    )
    return F.normalize(image_embeds.float(), dim=-1) @ emb.T


class TextEmbedder:
    """Encodes names with a CLIP text tower under prompt templates (template-averaged embeddings).

    Args:
        model: An open_clip model (anything with ``encode_text(tokens) -> (N, D)``).
        tokenizer: The model's open_clip tokenizer (``tokenizer(list[str]) -> (N, L)`` tokens).
        templates: Prompt templates with one ``{}`` each, or a set name ("vild", "single").
        device: Where the tokens are sent; the model must already be there.
        batch_size: Prompts per ``encode_text`` call. Higher may be faster but uses more memory.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        templates: str | Sequence[str] = VILD_TEMPLATES,
        device: torch.device | str = "cpu",
        batch_size: int = 256,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.templates = resolve_templates(templates)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def embed_names(self, names: Sequence[str]) -> torch.Tensor:
        """(S, D) float32 embeddings: per name, the re-normalised mean of normalised prompt embeddings."""
        prompts = [t.format(n) for n in names for t in self.templates]
        if not prompts:
            raise ValueError("no names to embed")
        was_training = self.model.training
        self.model.eval()  # dropout off: embeddings must be deterministic to be cacheable
        try:
            chunks = []
            for i in range(0, len(prompts), self.batch_size):
                tokens = self.tokenizer(prompts[i : i + self.batch_size]).to(self.device)
                chunks.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        finally:
            self.model.train(was_training)
        per_prompt = torch.cat(chunks).reshape(len(names), len(self.templates), -1)
        return F.normalize(per_prompt.mean(dim=1), dim=-1)

    def __call__(self, vocab: Vocabulary) -> ClassTextEmbeddings:
        """Embeds every name of every class of ``vocab``."""
        names, index = vocab.flat()
        return ClassTextEmbeddings(
            embeddings=self.embed_names(names).cpu(),
            class_index=torch.tensor(index, dtype=torch.int64),
            class_ids=vocab.ids,
            names=tuple(names),
        )


# --------------------------------------------------------------------------------------------
# Disk cache

_CACHE_FORMAT = 1


def samcp_cache_dir() -> Path:
    """samcp's cache folder for derived artefacts: ``$SAMCP_CACHE_DIR``, else ``~/.cache/samcp``."""
    root = os.environ.get("SAMCP_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "samcp"


def default_text_cache_dir() -> Path:
    """``$SAMCP_CACHE_DIR/text`` if set, else ``~/.cache/samcp/text``."""
    return samcp_cache_dir() / "text"


def text_cache_key(
    model_name: str, checkpoint_sha256: str, vocab: Vocabulary, templates: Sequence[str]
) -> dict[str, object]:
    """The fields that determine a vocabulary's text embeddings (stored in the JSON sidecar)."""
    return {
        "format": _CACHE_FORMAT,
        "model": model_name,
        "checkpoint_sha256": checkpoint_sha256,
        "vocabulary_sha256": vocab.content_hash(),
        "templates_sha256": templates_hash(templates),
    }


def _key_digest(key: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:32]


def text_embeddings(
    vocab: Vocabulary,
    model_name: str,
    checkpoint_sha256: str,
    model: torch.nn.Module | None,
    tokenizer: Callable[[list[str]], torch.Tensor] | None,
    templates: str | Sequence[str] = VILD_TEMPLATES,
    cache_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
) -> ClassTextEmbeddings:
    """The vocabulary's CLIP text embeddings, from the disk cache or computed and cached.

    Entries are keyed by (model name, checkpoint sha256, vocabulary content, templates); changing
    any of them computes and stores a new entry. A corrupt or mismatching entry is recomputed.

    Args:
        vocab: The classes to embed.
        model_name: open_clip model name of ``model`` (part of the cache key).
        checkpoint_sha256: sha256 of the CLIP checkpoint file (part of the cache key).
        model: The loaded CLIP model, or None when the entry is known to be cached (e.g. in training,
            where loading CLIP only for text would be wasteful).
        tokenizer: The model's open_clip tokenizer (None together with ``model``).
        templates: Prompt templates or a template set name; ViLD's 14 by default.
        cache_dir: Cache folder; default :func:`default_text_cache_dir`.
        device: Where the encoding runs and where the result is returned.

    Raises:
        SamcpError: If the entry is not cached and no model was given.
    """
    templates = resolve_templates(templates)
    folder = Path(cache_dir) if cache_dir is not None else default_text_cache_dir()
    key = text_cache_key(model_name, checkpoint_sha256, vocab, templates)
    stem = folder / _key_digest(key)
    cached = _load_entry(stem, key, vocab)
    if cached is not None:
        return cached.to(device)
    if model is None or tokenizer is None:
        raise SamcpError(
            f"text embeddings of vocabulary {vocab.name!r} for CLIP {model_name} are not cached in "
            f"{folder}; pass the CLIP checkpoint so they can be computed"
        )
    text = TextEmbedder(model, tokenizer, templates, device=device)(vocab)
    _save_entry(stem, key, vocab, templates, text)
    return text.to(device)


def _load_entry(
    stem: Path, key: dict[str, object], vocab: Vocabulary
) -> ClassTextEmbeddings | None:
    from safetensors.torch import load_file

    sidecar, tensors = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not sidecar.is_file() or not tensors.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None
        data = load_file(str(tensors))
        names, index = vocab.flat()
        if data["class_index"].tolist() != index or meta.get("names") != names:
            return None
        return ClassTextEmbeddings(
            embeddings=data["embeddings"].float(),
            class_index=data["class_index"].long(),
            class_ids=vocab.ids,
            names=tuple(names),
        )
    except Exception as e:  # a damaged entry is only a cache miss
        logger.warning("ignoring damaged text-embedding cache entry %s (%s)", stem, e)
        return None


def _save_entry(
    stem: Path,
    key: dict[str, object],
    vocab: Vocabulary,
    templates: Sequence[str],
    text: ClassTextEmbeddings,
) -> None:
    from safetensors.torch import save_file

    meta = {
        "key": key,
        "vocabulary": vocab.name,
        "names": list(text.names),
        "class_ids": list(text.class_ids),
        "templates": list(templates),
        "dim": text.dim,
    }
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
        # The sidecar is written last: a reader needs both files and a matching key, so a crash
        # between the two renames leaves a miss, never a wrong hit.
        _atomic_write(
            stem.with_suffix(".safetensors"),
            lambda p: save_file(
                {
                    "embeddings": text.embeddings.float().contiguous().cpu(),
                    "class_index": text.class_index.cpu(),
                },
                str(p),
            ),
        )
        _atomic_write(
            stem.with_suffix(".json"),
            lambda p: p.write_text(json.dumps(meta, indent=1), encoding="utf-8"),
        )
    except OSError as e:
        # The cache only saves time; an unwritable cache folder must not stop the run.
        logger.warning(
            "could not write text-embedding cache %s (%s); set SAMCP_CACHE_DIR to a writable folder",
            stem.parent,
            e,
        )


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def class_text_embeddings(
    vocab,
    cache_attrs: dict,
    clip_checkpoint: str | None,
    templates: str,
    device: torch.device,
) -> torch.Tensor:
    """(K, D) one embedding per class of ``vocab`` with the cache's CLIP: its synonyms'
    template-averaged embeddings combined by the one rule of
    :func:`samcp.models.openvocab.class_embeddings` (training and prediction alike).

    Args:
        vocab: the classes.
        cache_attrs: the cache's root attributes (its CLIP model and checkpoint hash).
        clip_checkpoint: the CLIP weights, needed when the text cache has no entry yet.
        templates: prompt template set.
        device: where to compute.
    """
    from samcp.models.openvocab import class_embeddings

    clip = cache_attrs["clip"]
    model = tokenizer = None
    if clip_checkpoint:
        import open_clip

        from samcp.pipeline.clip import load_clip
        from samcp.pipeline.foundation import file_sha256

        if file_sha256(clip_checkpoint) != clip["checkpoint_sha256"]:
            raise SamcpError(
                f"--clip-checkpoint {clip_checkpoint} is not the CLIP the cache was made with; "
                "pass the same checkpoint as for precompute"
            )
        model, _ = load_clip(clip["model"], clip_checkpoint, device)
        tokenizer = open_clip.get_tokenizer(clip["model"])
    try:
        te = text_embeddings(
            vocab,
            clip["model"],
            clip["checkpoint_sha256"],
            model,
            tokenizer,
            templates=templates,
            device=device,
        )
    except SamcpError as exc:
        raise SamcpError(f"{exc} (pass --clip-checkpoint)") from None
    return class_embeddings(te.embeddings.float(), te.class_index, len(vocab.ids))
