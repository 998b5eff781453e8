"""LLaVA's instruction data: loading with every problem reported, and the SFT dataset.

The file format is official LLaVA's (``llava_v1_5_mix665k.json``): a JSON list,
or JSON Lines with one sample per line, of

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus in the image is white and red."}, ...]}

``image`` is optional (text-only samples, e.g. ShareGPT). Official LLaVA reads it
unchecked and fails, or silently trains at loss 0, hours into a run; here the
whole file is checked before the model loads, and every problem found is listed
in one error. Two depths (the config's ``data.check``):

- ``fast`` (the default): every sample's structure, ids, placeholders and special-token
  strings; every image file found, non-empty, its header parsed and a JPEG's or PNG's end
  present (:func:`~llava_sgg.data.image.quick_check`); every sample whose answers could be
  truncated away found by tokenizing the text before its first answer. Samples are
  tokenized when a batch draws them, as officially, and the modality grouping uses
  official LLaVA's word counts. Left to that batch: a JPEG damaged inside its scans
  and a label mask that does not decode back to its answer, each an error naming the sample.
- ``full``: every sample tokenized and its label mask checked, every image decoded. The
  slow parts are kept in a cache (:mod:`llava_sgg.data.cache`) that the other ranks and
  later runs read instead of doing them again.

A bad sample stops the run by default (``bad_samples="error"``, every problem
listed). With ``bad_samples="skip"`` (the config's ``data.bad_samples: skip``) it
is left out instead, and listed with its reason: the official mix665k references
OCR-VQA images many users cannot download.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

try:
    import orjson
except ImportError:  # a declared dependency; json, slower, reads the same files without it
    orjson = None

from . import cache
from .conversation import get_template
from .errors import DataError
from .image import IMAGE_ASPECT_RATIOS, changed_since, check_images, load_image, process_image
from .tokenization import (ConversationLengths, EncodedConversation, check_tokenizer, conversation_lengths,
                           encode_conversation, move_image_to_front, reachability_problems,
                           tokenization_fingerprint)

__all__ = ["BAD_SAMPLES", "CHECKS", "LlavaSFTDataset", "Sample", "SkippedSample", "load_llava_json"]

logger = logging.getLogger(__name__)

ROLES = ("human", "gpt")
BAD_SAMPLES = ("error", "skip")
CHECKS = ("fast", "full")
TRUNCATED_LISTED = 5  # samples the truncation warning names (a warning, not an error: enough to find them)
# What the image cache's entries vouch for; a new check method must change it (old entries then go unused).
IMAGE_CHECK = "decode_check: draft JPEG, full other formats"
SKIP_HINT = ("set data.bad_samples=skip to train on the rest (each sample left out is then listed with its "
             "reason in skipped_samples.jsonl in train.output_dir)")


@dataclass(frozen=True)
class Sample:
    """One validated sample: (human, gpt) turns as in the file, and where it came from."""

    id: str | int
    turns: tuple[tuple[str, str], ...]
    image: str | None
    where: str  # "train.jsonl:58" (file and line) or "train.json[57]" (file and 0-based list index)

    @property
    def name(self) -> str:
        """How errors name the sample: file, line or index, and id."""
        return f"{self.where} (id {self.id!r})"


@dataclass(frozen=True)
class SkippedSample:
    """A sample left out under ``bad_samples="skip"``, and why: one line of ``skipped_samples.jsonl``.

    ``reason`` is one of ``invalid_json`` (a JSON Lines line that does not parse),
    ``invalid_sample`` (fields or turns malformed), ``duplicate_id`` (the later
    occurrences; the first is kept), ``missing_image``, ``empty_image`` (0 bytes),
    ``unreadable_image`` (not an image, or does not decode) and ``tokenization``
    (fails the tokenization checks, e.g. every answer truncated away); ``detail``
    is the problem as ``bad_samples="error"`` would report it.
    """

    id: str | int | None
    where: str
    image: str | None  # as written in the data file, relative to the image folder
    reason: str
    detail: str


def _valid_id(sample_id) -> bool:
    return isinstance(sample_id, (str, int)) and not isinstance(sample_id, bool) and sample_id != ""


def _record_name(record, where: str) -> str:
    """How errors name a record: its place, and its id when it has a valid one."""
    sample_id = record.get("id") if isinstance(record, dict) else None
    return f"{where} (id {sample_id!r})" if _valid_id(sample_id) else where


def _skipped(record, where: str, reason: str, messages: list[str]) -> SkippedSample:
    fields = record if isinstance(record, dict) else {}
    sample_id = fields.get("id") if _valid_id(fields.get("id")) else None
    image = fields.get("image") if isinstance(fields.get("image"), str) else None
    prefix = _record_name(record, where) + ": "
    return SkippedSample(sample_id, where, image, reason, "; ".join(m.removeprefix(prefix) for m in messages))


def _parse_json(data: bytes):
    """``json.loads(data.decode("utf-8"))``, through orjson when it parses the text (much faster on a
    file of LLaVA's size); what orjson refuses and json takes (NaN, integers over 64 bits, lone
    surrogates) or neither takes goes to json, whose errors give the line and column."""
    if orjson is not None:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data.decode("utf-8"))


def _read_records(path: Path) -> tuple[list[tuple[str, object]], list[str]]:
    """(where, record) for every sample in a JSON list or a JSON Lines file, and (where, problem) per bad line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the data file ({e.strerror or e})") from e

    if path.suffix.lower() == ".jsonl":
        records, problems = [], []
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", _parse_json(line)))
            except UnicodeDecodeError as e:
                problems.append((f"{path}:{lineno}", f"not UTF-8 (byte {e.start + 1} of the line)"))
            except json.JSONDecodeError as e:
                problems.append((f"{path}:{lineno}", f"invalid JSON at column {e.colno}: {e.msg}"))
        return records, problems

    try:
        data = _parse_json(raw)
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8") from e
    except json.JSONDecodeError as e:
        hint = " (one sample per line is JSON Lines: name the file .jsonl)" if e.msg == "Extra data" else ""
        raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}{hint}") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: the top level must be a list of samples, got a JSON {type(data).__name__}")
    return [(f"{path}[{i}]", record) for i, record in enumerate(data)], []


def _parse_sample(record, where: str, image_token: str) -> tuple[Sample | None, list[str]]:
    """A :class:`Sample` from one record, or None and every problem found in it."""
    if not isinstance(record, dict):
        return None, [f"{where}: a sample must be a JSON object, got {type(record).__name__}"]
    problems = []
    sample_id = record.get("id")
    id_ok = _valid_id(sample_id)

    def problem(message):
        problems.append(f"{_record_name(record, where)}: {message}")

    if "id" not in record:
        problem("missing 'id'")
    elif not id_ok:
        problem(f"'id' must be a non-empty string or an integer, got {sample_id!r}")

    image = record.get("image")
    if "image" in record and not (isinstance(image, str) and image.strip()):
        problem(f"'image' must be a path relative to the image folder (leave the key out for a text-only "
                f"sample), got {image!r}")

    turns = record.get("conversations")
    if "conversations" not in record:
        problem("missing 'conversations'")
        return None, problems
    if not isinstance(turns, list) or not turns:
        problem(f"'conversations' must be a non-empty list of turns, got {turns!r:.80}")
        return None, problems

    values = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            problem(f"turn {j + 1} must be an object with 'from' and 'value', got {turn!r:.80}")
            return None, problems
        role, value, expected = turn["from"], turn["value"], ROLES[j % 2]
        if role not in ROLES:
            problem(f"turn {j + 1}: 'from' must be 'human' or 'gpt', got {role!r}")
            return None, problems
        if role != expected:
            problem(f"turn {j + 1} is from {role!r} where {expected!r} was expected: turns must alternate "
                    "human, gpt, human, gpt, ... starting with human")
            return None, problems
        if not isinstance(value, str):
            problem(f"turn {j + 1} ({role}): 'value' must be a string, got {type(value).__name__}")
        elif not value or value.isspace():  # (not value.strip(), without copying a long turn)
            # Official get_prompt() drops the separator after an empty message, gluing turns together.
            problem(f"turn {j + 1} ({role}) is empty")
        values.append(value if isinstance(value, str) else "")
    if len(values) % 2:
        problem(f"the last turn (turn {len(values)}) is from 'human'; a conversation must end with a 'gpt' answer")

    placeholders = sum(v.count(image_token) for v in values)
    if "image" in record and placeholders != 1:
        problem(f"has an image but {placeholders} {image_token!r} placeholders; exactly one is needed")
    if "image" not in record and placeholders:
        problem(f"has {placeholders} {image_token!r} placeholder(s) but no 'image'")
    for j in range(1, len(values), 2):
        if image_token in values[j]:
            problem(f"turn {j + 1} (gpt) contains {image_token!r}; the placeholder belongs in a human turn")

    if problems:
        return None, problems
    pairs = tuple((values[j], values[j + 1]) for j in range(0, len(values), 2))
    return Sample(sample_id, pairs, image, where), []


def load_llava_json(path: str | os.PathLike, *, image_token: str = "<image>") -> list[Sample]:
    """Every sample of a LLaVA JSON list (or ``.jsonl`` file), validated.

    Checks that turns alternate human/gpt starting with human and ending with
    gpt, that no turn is empty, that ids are present and unique, and that a
    sample with an ``image`` has exactly one ``image_token`` placeholder (in a
    human turn) and one without has none. Every problem in the file is
    collected and raised as one :class:`DataError` (count, then the first 20,
    each naming file, line or index, and id); nothing is dropped silently.
    """
    path = Path(path)
    samples, _, problems, n_records = _load_samples(path, image_token)
    if problems:
        raise DataError.from_problems(f"{path} ({n_records} samples)", problems)
    return samples


@contextlib.contextmanager
def _gc_paused():
    """The cyclic garbage collector paused: reading a big file makes millions of small objects, and each
    full collection meanwhile walks all those made so far, again and again as the file is read
    (docs/benchmarks/data-prep-cpu2.json). Nothing made here is cyclic garbage."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@_gc_paused()
def _load_samples(path: Path, image_token: str) -> tuple[list[Sample], list[SkippedSample], list[str], int]:
    """(valid samples, the bad ones as SkippedSample, every problem as an error line, number of records).

    Whole-file problems (unreadable, not UTF-8, not a JSON list, no samples) raise.
    """
    records, line_problems = _read_records(path)
    skipped = [SkippedSample(None, where, None, "invalid_json", message) for where, message in line_problems]
    problems = [f"{where}: {message}" for where, message in line_problems]
    samples, seen = [], {}
    for where, record in records:
        sample, found = _parse_sample(record, where, image_token)
        if sample is None:
            problems += found
            skipped.append(_skipped(record, where, "invalid_sample", found))
            continue
        first = seen.setdefault(str(sample.id), sample)
        if first is not sample:
            problems.append(f"{sample.name}: duplicate id; first used at {first.where}")
            skipped.append(SkippedSample(sample.id, where, sample.image, "duplicate_id",
                                         f"duplicate id; first used at {first.where}"))
            continue
        samples.append(sample)
    if not records and not line_problems:
        raise DataError(f"{path}: no samples")
    return samples, skipped, problems, len(records) + len(line_problems)


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cpus_per_process() -> int:
    """This process's share of the CPUs it may run on (every rank of a node checks the same images)."""
    return max(1, _usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _quiet() -> bool:
    """No progress bars but on each node's first rank (the others wait for it, then read the cache)."""
    return int(os.environ.get("LOCAL_RANK", "0")) != 0


def _content_key(sample: Sample) -> bytes:
    """16 bytes that identify what a sample's tokenization depends on besides the settings: its turns,
    and whether it has an image (the placeholder then moves to the front)."""
    h = hashlib.blake2b(b"image" if sample.image is not None else b"text", digest_size=16)
    for turn in sample.turns:
        for value in turn:
            data = value.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.digest()


def _read_tokenized(path: Path) -> dict[bytes, tuple[int, int, str | None]]:
    stored = cache.load(path)
    if stored is None or not {"keys", "lengths", "full_lengths", "problems"} <= stored[0].keys():
        return {}
    arrays = stored[0]
    blob, problems = arrays["keys"].tobytes(), cache.text_of(arrays["problems"])
    return {blob[16 * j:16 * j + 16]: entry for j, entry in
            enumerate(zip(arrays["lengths"].tolist(), arrays["full_lengths"].tolist(), problems))}


def _write_tokenized(path: Path, entries: dict[bytes, tuple[int, int, str | None]], data_path) -> None:
    values = list(entries.values())
    cache.save(path, {"keys": np.frombuffer(b"".join(entries), np.uint8),
                      "lengths": np.array([v[0] for v in values], np.int32),
                      "full_lengths": np.array([v[1] for v in values], np.int32),
                      "problems": cache.text_array([v[2] for v in values])},
               {"data_path": str(data_path), "samples": str(len(values))})


def _read_verified(path: Path) -> dict[str, tuple[int, int]]:
    stored = cache.load(path)
    if stored is None or not {"paths", "size", "mtime_ns"} <= stored[0].keys():
        return {}
    arrays = stored[0]
    return dict(zip(cache.text_of(arrays["paths"]), zip(arrays["size"].tolist(), arrays["mtime_ns"].tolist())))


def _write_verified(path: Path, verified: dict[str, tuple[int, int]], folder: str) -> None:
    cache.save(path, {"paths": cache.text_array(list(verified)),
                      "size": np.array([size for size, _ in verified.values()], np.int64),
                      "mtime_ns": np.array([mtime for _, mtime in verified.values()], np.int64)},
               {"image_folder": folder, "check": IMAGE_CHECK, "pillow": PIL.__version__})


class LlavaSFTDataset(Dataset):
    """LLaVA-v1.5 supervised fine-tuning samples: token ids, labels and the image.

    At construction the file is loaded and validated (:func:`load_llava_json`) and its
    samples and images checked to the depth ``check`` names (``"fast"`` or ``"full"``,
    see the module's docstring), so a bad sample stops the run before training rather
    than during it, with every problem of the file in one :class:`DataError`: malformed
    samples, missing, empty and unreadable images, samples that fail tokenization.
    ``lengths`` are tokens after a full check, official LLaVA's word counts (plus
    ``num_image_tokens`` for an image) after a fast one.

    After a full check the tokenized lengths (keyed by each sample's content, the tokenizer
    and the settings) and the images that decoded (keyed by path, size and modification
    time) are kept under ``cache_dir`` (default :func:`llava_sgg.data.cache.default_cache_dir`;
    ``False``: no cache), so that the other ranks of a node, which wait for the first,
    and later runs read them instead of redoing them. The cache vouches only for the
    checks: items are always encoded from the file's text when they are read.

    ``bad_samples="skip"`` leaves bad samples out instead of raising: each sample
    left out is in :attr:`skipped` and, when ``skipped_samples_file`` is given,
    written there as JSON Lines (:class:`SkippedSample`), and the counts by reason are
    logged. More than ``max_bad_fraction`` of the file bad is still an error.
    Whole-file problems (not a JSON list, not UTF-8, no samples) always raise.

    An item is ``{"input_ids", "labels", "pixel_values" (only with an image), "id"}``.
    ``num_image_tokens`` comes from the model config (576 for LLaVA-1.5's CLIP
    ViT-L/14 at 336 px); ``image_aspect_ratio`` is ``"pad"`` (LLaVA-1.5),
    ``"crop"`` or ``"resize"`` (see :mod:`llava_sgg.data.image`).
    """

    def __init__(self, data_path: str | os.PathLike, image_folder: str | os.PathLike | None, tokenizer,
                 image_processor=None, *, num_image_tokens: int, model_max_length: int,
                 image_token: str = "<image>", image_aspect_ratio: str = "pad", template: str = "vicuna_v1",
                 check: str = "fast", bad_samples: str = "error", max_bad_fraction: float = 0.01,
                 skipped_samples_file: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | bool | None = None):
        if bad_samples not in BAD_SAMPLES:
            raise ValueError(f"unknown bad_samples {bad_samples!r}; choose one of: {', '.join(BAD_SAMPLES)}")
        if check not in CHECKS:
            raise ValueError(f"unknown check {check!r}; choose one of: {', '.join(CHECKS)}")
        if isinstance(max_bad_fraction, bool) or not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be a number in [0, 1], got {max_bad_fraction!r}")
        if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(f"unknown image_aspect_ratio {image_aspect_ratio!r}; "
                             f"choose one of: {', '.join(IMAGE_ASPECT_RATIOS)}")
        if not isinstance(num_image_tokens, int) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be a positive integer, got {num_image_tokens!r}")
        if not isinstance(model_max_length, int) or model_max_length < 1:
            raise ValueError(f"model_max_length must be a positive integer, got {model_max_length!r}")
        self.template = get_template(template)
        self.image_token_id = check_tokenizer(tokenizer, image_token)
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.num_image_tokens, self.model_max_length = num_image_tokens, model_max_length
        self.image_token, self.image_aspect_ratio = image_token, image_aspect_ratio
        self.bad_samples = bad_samples
        self.cache_dir = None if cache_dir is False else cache.default_cache_dir() if cache_dir in (None, True) \
            else Path(cache_dir)

        # self.skipped: the samples left out under bad_samples="skip", each stage adding its own.
        self.samples, self.skipped, problems, n_records = _load_samples(Path(data_path), image_token)
        n_images = sum(s.image is not None for s in self.samples)
        if n_images and (self.image_folder is None or image_processor is None):
            raise ValueError(f"{data_path}: {n_images} samples have images; pass image_folder and image_processor")
        with _gc_paused():
            if check == "full":
                tokenized = self._tokenize_all(data_path)
                keep = self._keep_trainable(data_path, n_records, problems, tokenized.problems,
                                            self._check_images(data_path))
                self._lengths = self._token_lengths(data_path, tokenized, keep)
            else:
                token_problems = self._check_reachable(data_path)
                self._keep_trainable(data_path, n_records, problems, token_problems,
                                     self._check_images(data_path, decode=False))
                # Official LLaVA's modality_lengths: words of every turn (the image adds a constant).
                self._lengths = [sum(len(v.split()) for turn in s.turns for v in turn)
                                 + (num_image_tokens if s.image else 0) for s in self.samples]
        if bad_samples == "skip":
            self._report_skipped(data_path, n_records, max_bad_fraction, skipped_samples_file)

    def _image_path(self, sample: Sample) -> Path:
        return self.image_folder / sample.image

    def _check_images(self, data_path, decode: bool = True) -> dict[int, tuple[str, str]]:
        """``{sample index: (reason, message)}`` for the samples whose image cannot be trained on.

        Each image file is checked once (samples share images), in threads. Decoded (``decode``),
        images the cache has seen decode, unchanged since, are not decoded again; the quick check
        costs about what finding an image in the cache does, and is not cached.
        """
        with_image = [(i, str(self._image_path(s))) for i, s in enumerate(self.samples) if s.image is not None]
        paths = list(dict.fromkeys(path for _, path in with_image))
        if not paths:
            return {}
        if not decode:
            with tqdm(total=len(paths), desc=f"Checking the images of {Path(data_path).name}", unit=" images",
                      disable=_quiet()) as bar:
                found, _ = check_images(paths, workers=_cpus_per_process(), progress=bar.update, decode=False)
            return {i: found[path] for i, path in with_image if path in found}
        if self.cache_dir is None:
            found, _ = self._decode_images(data_path, paths, _cpus_per_process())
            return {i: found[path] for i, path in with_image if path in found}
        folder = os.path.realpath(self.image_folder)
        key = cache.digest([folder, IMAGE_CHECK, PIL.__version__])[:20]
        path = self.cache_dir / "images" / f"{Path(folder).name}-{key}.safetensors"
        verified = _read_verified(path)  # image path -> (size, mtime_ns) when it decoded
        pending, found = changed_since(paths, verified, workers=_usable_cpus()), {}
        if pending:
            # One rank of a node decodes, with every CPU; the others wait here, then find what it wrote.
            with cache.locked(path):
                verified = _read_verified(path)
                pending = changed_since(pending, verified, workers=_usable_cpus())
                found, good = self._decode_images(data_path, pending, _usable_cpus(),
                                                  checked=len(paths) - len(pending))
                if good or found.keys() & verified.keys():
                    verified.update(good)
                    for bad in found:
                        verified.pop(bad, None)
                    _write_verified(path, verified, folder)
        return {i: found[path] for i, path in with_image if path in found}

    def _decode_images(self, data_path, paths, workers, checked: int = 0) -> tuple[dict, dict]:
        desc = f"Decoding images of {Path(data_path).name}" + (f" ({checked} decoded before)" if checked else "")
        with tqdm(total=len(paths), desc=desc, unit=" images", disable=_quiet()) as bar:
            return check_images(paths, workers=workers, progress=bar.update)

    def _encode(self, sample: Sample) -> EncodedConversation:
        turns = move_image_to_front(sample.turns, self.image_token) if sample.image else sample.turns
        try:
            return encode_conversation(turns, self.tokenizer, model_max_length=self.model_max_length,
                                       num_image_tokens=self.num_image_tokens, image_token=self.image_token,
                                       template=self.template)
        except DataError as e:
            raise DataError(f"{sample.name}: {e}") from e

    def _tokenize_all(self, data_path) -> ConversationLengths:
        """Every sample's tokenized length or problem (:func:`conversation_lengths`), through the cache."""
        settings = {"model_max_length": self.model_max_length, "num_image_tokens": self.num_image_tokens,
                    "image_token": self.image_token, "template": self.template}
        if self.cache_dir is None or not self.samples:
            return self._tokenize(data_path, self.samples, settings)
        key = cache.digest([os.path.realpath(data_path), tokenization_fingerprint(self.tokenizer, **settings)])
        path = self.cache_dir / "tokenized" / f"{Path(data_path).stem}-{key[:20]}.safetensors"
        keys = [_content_key(s) for s in self.samples]
        known = _read_tokenized(path)  # content key -> (length, full length, problem or None)
        if all(k in known for k in keys):
            logger.info("%s: the tokenized lengths of its %d samples are read from %s", data_path, len(keys), path)
        else:
            # One rank of a node tokenizes, with every CPU; the others wait here, then find what it wrote.
            with cache.locked(path):
                known = _read_tokenized(path)
                todo, seen = [], set()
                for i, k in enumerate(keys):
                    if k not in known and k not in seen:
                        seen.add(k)
                        todo.append(i)
                if todo:
                    cached = sum(k in known for k in keys)
                    found = self._tokenize(data_path, [self.samples[i] for i in todo], settings, cached=cached)
                    for j, i in enumerate(todo):
                        known[keys[i]] = (int(found.lengths[j]), int(found.full_lengths[j]), found.problems.get(j))
                    _write_tokenized(path, {k: known[k] for k in keys}, data_path)  # (samples gone are dropped)
        entries = [known[k] for k in keys]
        return ConversationLengths(np.array([e[0] for e in entries], np.int32),
                                   np.array([e[1] for e in entries], np.int32),
                                   {i: e[2] for i, e in enumerate(entries) if e[2] is not None})

    def _check_reachable(self, data_path) -> dict[int, str]:
        """``{sample index: problem}`` for the samples whose text holds a special token's string or whose
        answers are all truncated away (:func:`reachability_problems`)."""
        turns = [move_image_to_front(s.turns, self.image_token) if s.image else s.turns for s in self.samples]
        with tqdm(total=len(turns), desc=f"Checking the answers of {Path(data_path).name} fit", unit=" samples",
                  disable=_quiet()) as bar:
            return reachability_problems(turns, self.tokenizer, model_max_length=self.model_max_length,
                                         num_image_tokens=self.num_image_tokens, image_token=self.image_token,
                                         template=self.template, progress=bar.update)

    def _tokenize(self, data_path, samples: list[Sample], settings, cached: int = 0) -> ConversationLengths:
        turns = [move_image_to_front(s.turns, self.image_token) if s.image else s.turns for s in samples]
        desc = f"Tokenizing {Path(data_path).name}" + (f" ({cached} samples cached)" if cached else "")
        with tqdm(total=len(turns), desc=desc, unit=" samples", disable=_quiet()) as bar:
            return conversation_lengths(turns, self.tokenizer, progress=bar.update, **settings)

    def _keep_trainable(self, data_path, n_records: int, problems: list[str], token_problems: dict[int, str],
                        bad_images: dict[int, tuple[str, str]]) -> list[int]:
        """Raise every problem of the file at once (error mode), or leave the bad samples out (skip mode);
        returns the indices (into the samples before) of the samples kept."""
        image_lines, token_lines, image_skips, token_skips, keep = [], [], [], [], []
        for i, sample in enumerate(self.samples):
            if i in bad_images:
                reason, message = bad_images[i]
                image_lines.append(f"{sample.name}: {message}")
                image_skips.append(SkippedSample(sample.id, sample.where, sample.image, reason, message))
            if i in token_problems:
                message = token_problems[i]
                token_lines.append(f"{sample.name}: {message}")
                if i not in bad_images:  # a sample is left out for its first problem found
                    token_skips.append(SkippedSample(sample.id, sample.where, sample.image, "tokenization", message))
            if i not in bad_images and i not in token_problems:
                keep.append(i)
        self.skipped += image_skips + token_skips
        if self.bad_samples == "error" and self.skipped:
            counts = ", ".join(f"{reason} {n}" for reason, n in Counter(s.reason for s in self.skipped).most_common())
            raise DataError.from_problems(f"{data_path} ({n_records} samples; bad: {counts})",
                                          problems + image_lines + token_lines, hint=SKIP_HINT)
        self.samples = [self.samples[i] for i in keep]
        return keep

    def _token_lengths(self, data_path, tokenized: ConversationLengths, keep: list[int]) -> list[int]:
        """The kept samples' tokenized lengths, warning of those truncated."""
        lengths, full_lengths = tokenized.lengths[keep], tokenized.full_lengths[keep]
        truncated = np.flatnonzero(full_lengths > self.model_max_length)
        if len(truncated):
            # As officially, a truncated answer is trained up to the cut (without its EOS).
            named = [f"{self.samples[i].name}: {full_lengths[i]} tokens" for i in truncated[:TRUNCATED_LISTED]]
            logger.warning("%s: %d of %d samples are longer than model_max_length=%d and are truncated%s:\n  %s",
                           data_path, len(truncated), len(self.samples), self.model_max_length,
                           f" (first {TRUNCATED_LISTED} shown)" if len(truncated) > TRUNCATED_LISTED else "",
                           "\n  ".join(named))
        return lengths.tolist()

    def _report_skipped(self, data_path, n_records: int, max_bad_fraction: float, skipped_samples_file) -> None:
        """Write the list, log the counts by reason, and refuse when too much of the file is bad."""
        if skipped_samples_file is not None:
            skipped_samples_file = Path(skipped_samples_file)
            skipped_samples_file.parent.mkdir(parents=True, exist_ok=True)
            with skipped_samples_file.open("w") as f:
                for entry in self.skipped:
                    f.write(json.dumps(dataclasses.asdict(entry)) + "\n")
        if not self.skipped:
            return
        counts = ", ".join(f"{reason} {n}" for reason, n in Counter(s.reason for s in self.skipped).most_common())
        listed = f"; each is listed in {skipped_samples_file}" if skipped_samples_file is not None else ""
        summary = f"{len(self.skipped)} of {n_records} samples ({len(self.skipped) / n_records:.2%}) are bad: {counts}"
        if not self.samples:
            raise DataError(f"{data_path}: {summary}{listed}; no sample is left to train on",
                            [f"{s.where}: {s.reason}: {s.detail}" for s in self.skipped])
        if len(self.skipped) > max_bad_fraction * n_records:
            raise DataError(f"{data_path}: {summary}{listed}. That is more than data.max_bad_fraction="
                            f"{max_bad_fraction} ({max_bad_fraction:.2%}) of the file: fix the data (a missing "
                            "source of the mix?) or raise data.max_bad_fraction to train on the rest",
                            [f"{s.where}: {s.reason}: {s.detail}" for s in self.skipped])
        logger.warning("%s: %s; skipping them and training on the other %d%s", data_path, summary,
                       len(self.samples), listed)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> list[int]:
        """Tokens per sample, image tokens included, after truncation (``check="full"``), or official
        LLaVA's estimate, words plus ``num_image_tokens`` for an image (``check="fast"``)."""
        return list(self._lengths)

    @property
    def modality_lengths(self) -> list[int]:
        """``lengths`` with text-only samples negative, for :class:`ModalityLengthGroupedSampler`.

        Official LLaVA counts words here and leaves the image out, as a fast check does (a
        constant for every image sample changes no order); a full check's tokens are what
        memory and padding are made of.
        """
        return [n if s.image is not None else -n for n, s in zip(self._lengths, self.samples)]

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        encoded = self._encode(sample)
        item = {"input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
                "labels": torch.tensor(encoded.labels, dtype=torch.long), "id": sample.id}
        if sample.image is not None:
            path = self._image_path(sample)
            try:
                image = load_image(path)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                # After a full check only an image damaged since gets here; after a fast one, also a
                # JPEG damaged inside its scans (quick_check).
                hint = f"; {SKIP_HINT}" if self.bad_samples == "error" else ""
                raise DataError(f"{sample.name}: cannot read image {path}: {e}{hint}") from e
            item["pixel_values"] = process_image(image, self.image_processor, self.image_aspect_ratio)
        return item
