"""Answer generation in LLaVA's formats: question jsonl in, answer jsonl out.

As the official ``model_vqa_loader.py`` / ``model_vqa_mmbench.py``: the question
gets ``<image>\\n`` in front when it has an image, the conversation template
wraps it, decoding is greedy at temperature 0; here prompts are batched with
left padding, the work splits into chunks for several GPUs, and an answers file
that already holds some ids is resumed, not rewritten.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ..data import load_image, process_image, render_prompt
from .answers import AnswerFileError, format_ids, read_jsonl_records
from .prompts import OPTION_LETTER, OPTION_LETTER_CN, OPTION_LETTERS


@dataclass
class Prompt:
    """One generation request: the question text (without <image>), an optional image, what to record."""

    question_id: object
    text: str
    image: Image.Image | None = None
    record: dict = field(default_factory=dict)  # extra fields written to the answer line


def get_chunk(items: Sequence, num_chunks: int, chunk_idx: int) -> list:
    """The official split: ``num_chunks`` consecutive chunks of ceil(len / num_chunks)."""
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"chunk_idx must be in [0, {num_chunks}), got {chunk_idx}")
    size = math.ceil(len(items) / num_chunks)
    return list(items[chunk_idx * size:(chunk_idx + 1) * size])


def prompt_text(prompt: Prompt, *, image_token: str, template: str, eos: str | None) -> str:
    """The text the model is prompted with: the image placeholder (if any) first, then the question."""
    question = prompt.text.replace(image_token, "").strip() if prompt.image is not None else prompt.text
    if prompt.image is not None:
        question = f"{image_token}\n{question}"
    return render_prompt(question, eos=eos, template=template)


def encode_prompt(prompt: Prompt, tokenizer, *, image_token: str, num_image_tokens: int, template: str) -> list[int]:
    text = prompt_text(prompt, image_token=image_token, template=template, eos=tokenizer.eos_token)
    ids = tokenizer(text)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    expanded = []
    for token in ids:  # the model expects one placeholder per image patch feature
        expanded.extend([token] * num_image_tokens if token == image_id else [token])
    return expanded


@torch.no_grad()
def generate(model, processor, prompts: Sequence[Prompt], *, template: str = "vicuna_v1", batch_size: int = 8,
             max_new_tokens: int = 128, temperature: float = 0.0, image_aspect_ratio: str = "pad",
             progress: bool = True, desc: str = "answering") -> Iterator[tuple[Prompt, str]]:
    """Yield (prompt, answer) for each prompt, in order, in left-padded batches."""
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    config = model.config
    image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    model.eval()
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        encoded = [encode_prompt(p, tokenizer, image_token=image_token, num_image_tokens=config.image_seq_length,
                                 template=template) for p in batch]
        width = max(map(len, encoded))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
        attention_mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        images = [process_image(p.image, image_processor, image_aspect_ratio) for p in batch if p.image is not None]
        kwargs = {"pixel_values": torch.stack(images).to(device, dtype)} if images else {}
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **sampling, **kwargs)
        for prompt, row in zip(batch, output[:, width:]):
            yield prompt, tokenizer.decode(row, skip_special_tokens=True).strip()
        bar.update(len(batch))
    bar.close()


def question_key(record: dict):
    """What identifies an answer for resuming: the id, the round (MMBench), and the question text."""
    return record["question_id"], record.get("round_id"), record["prompt"]


def _question_image(folder, relative: str, source, question_id) -> Image.Image:
    path = Path(folder, relative)
    try:
        return load_image(path)
    except OSError as error:
        raise AnswerFileError(f"{source}: question {question_id!r}: image {path} cannot be read ({error})") from None


def _done_ids(answers_file: Path, key=question_key) -> set:
    if not answers_file.is_file():
        return set()
    done = set()
    with answers_file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                done.add(key(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise AnswerFileError(f"{answers_file}:{number}: not an answer line; fix or remove it to resume") from None
    return done


def write_answers(model, processor, prompts: Sequence[Prompt], answers_file: str | os.PathLike, *,
                  model_id: str, key=question_key, **generate_kwargs) -> Path:
    """Append answers for the prompts not yet in ``answers_file`` (resumable), in LLaVA's answer format."""
    answers_file = Path(answers_file)
    answers_file.parent.mkdir(parents=True, exist_ok=True)
    done = _done_ids(answers_file, key)
    todo = [p for p in prompts if key({"question_id": p.question_id, **p.record, "prompt": p.text}) not in done]
    with answers_file.open("a", encoding="utf-8") as handle:
        for prompt, text in generate(model, processor, todo, **generate_kwargs):
            record = {"question_id": prompt.question_id, **prompt.record, "prompt": prompt.text, "text": text,
                      "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
    return answers_file


def question_prompts(question_file: str | os.PathLike, image_folder: str | os.PathLike, *, num_chunks: int = 1,
                     chunk_idx: int = 0) -> list[Prompt]:
    """Prompts from LLaVA's question jsonl ({question_id, image?, text, category?}).

    Ids need not be unique (LLaVA's MME file gives both questions of an image its
    path); a (question_id, text) pair must be.
    """
    records = read_jsonl_records(question_file, required=("question_id", "text"))
    seen = set()
    for record in records:
        key = (record["question_id"], record["text"])
        if key in seen:
            raise AnswerFileError(f"{question_file}: question {key[0]!r} with the same text appears twice")
        seen.add(key)
    chunk = get_chunk(records, num_chunks, chunk_idx)
    # Every absent file at once, before the first is loaded: SEED-Bench's video questions, for one,
    # need their middle frame extracted to the path the question file names.
    absent = [f"{record['question_id']}: {Path(image_folder, record['image'])}" for record in chunk
              if record.get("image") and not Path(image_folder, record["image"]).is_file()]
    if absent:
        raise AnswerFileError(f"{question_file}: {len(absent)} question(s) name an image that is not a file "
                              f"under {image_folder}: {format_ids(absent)}")
    prompts = []
    for record in chunk:
        image = _question_image(image_folder, record["image"], question_file, record["question_id"]) \
            if record.get("image") else None
        prompts.append(Prompt(record["question_id"], record["text"], image))
    return prompts


def _mmbench_image(row: dict, tsv_file, index: int) -> Image.Image:
    try:
        return Image.open(io.BytesIO(base64.b64decode(row.get("image") or ""))).convert("RGB")
    except (ValueError, OSError) as error:  # binascii.Error is a ValueError, PIL's UnidentifiedImageError an OSError
        raise AnswerFileError(f"{tsv_file}: row with index {index}: the image column is not a base64 image "
                              f"({type(error).__name__}: {error})") from None


def mmbench_prompts(tsv_file: str | os.PathLike, *, rotate_options: bool = False, lang: str = "en",
                    num_chunks: int = 1, chunk_idx: int = 0, all_rounds: bool = False) -> list[Prompt]:
    """Prompts from the official MMBench TSV, as ``model_vqa_mmbench.py --single-pred-prompt``.

    One prompt per row, the official protocol: the TSV already holds each question's
    circular copies as rows of their own (see ``mmbench``). Hint (when present),
    question, "A. ..." lines, the answer instruction; options and hint absent where
    LLaVA finds them absent (``mmbench.is_missing``, pandas' NA strings included).
    ``rotate_options`` (the official ``--all-rounds``; ``all_rounds`` is the same)
    asks each row once per rotation of its options instead: not the published
    protocol on the official TSV (``mmbench.ROTATION_CAVEAT``).
    """
    from .mmbench import mmbench_questions, read_mmbench_tsv

    if lang not in ("en", "cn"):
        raise ValueError(f"lang must be 'en' or 'cn', got {lang!r}")
    rotate = rotate_options or all_rounds
    rows = read_mmbench_tsv(tsv_file)
    questions = mmbench_questions(rows, source=str(tsv_file))  # the scorer's checks, before any compute
    suffix = OPTION_LETTER_CN if lang == "cn" else OPTION_LETTER
    prompts = []
    for row in get_chunk(rows, num_chunks, chunk_idx):
        question = questions[int(row["index"])]
        image = _mmbench_image(row, tsv_file, question.index)
        options, option_chars = list(question.options), list(OPTION_LETTERS[:len(question.options)])
        for round_id in range(question.rounds if rotate else 1):
            text = question.question if question.hint is None else question.hint + "\n" + question.question
            for char, option in zip(OPTION_LETTERS, options):
                text += f"\n{char}. {option}"
            # Recorded as the official script does: the round, the rotated options and letters.
            prompts.append(Prompt(question.index, f"{text}\n{suffix}", image,
                                  {"round_id": round_id, "options": list(options), "option_char": list(option_chars)}))
            options, option_chars = options[1:] + options[:1], option_chars[1:] + option_chars[:1]
    return prompts


def merge_answer_files(paths: Iterable[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Concatenate chunk answer files; a duplicated (question_id, round_id, prompt) is an error."""
    seen, lines = set(), []
    for path in paths:
        for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            key = question_key(record)
            if key in seen:
                raise AnswerFileError(f"{path}:{number}: question {key[0]!r} answered twice across chunks")
            seen.add(key)
            lines.append(line)
    output = Path(output)
    output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return output


def science_prompts(question_file: str | os.PathLike, image_folder: str | os.PathLike, *,
                    single_pred_prompt: bool = True, num_chunks: int = 1, chunk_idx: int = 0) -> list[Prompt]:
    """Prompts from LLaVA's ScienceQA file (``llava_test_CQM-A.json``, conversation format), as
    ``model_vqa_science.py --single-pred-prompt``: the first human turn, <image> moved to the
    front when the problem has an image, the option-letter instruction appended.
    """
    path = Path(question_file)
    try:
        samples = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise AnswerFileError(f"{path}:{error.lineno}: not JSON ({error.msg})") from None
    if not isinstance(samples, list):
        raise AnswerFileError(f"{path}: expected a JSON list of samples")
    prompts = []
    for index, sample in enumerate(get_chunk(samples, num_chunks, chunk_idx)):
        try:
            question = sample["conversations"][0]["value"].replace("<image>", "").strip()
            qid = sample["id"]
        except (KeyError, IndexError, TypeError):
            raise AnswerFileError(f"{path}: sample {index} has no id or no first conversation turn") from None
        image = _question_image(image_folder, sample["image"], path, qid) if sample.get("image") else None
        if single_pred_prompt:
            question = f"{question}\n{OPTION_LETTER}"
        prompts.append(Prompt(qid, question, image))
    return prompts
