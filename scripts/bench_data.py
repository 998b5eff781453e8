"""Startup cost of training data at LLaVA-1.5 scale: a 665k-sample file made ready for training.

    python scripts/bench_data.py --out docs/benchmarks/data-startup-fast-cpu2.json          # data.check: fast
    python scripts/bench_data.py --check full --out docs/benchmarks/data-prep-cpu2.json     # data.check: full
    python scripts/bench_data.py --samples 20000 --out runs/bench/data-small.json   # a quick look

Writes a synthetic file shaped like ``llava_v1_5_mix665k.json`` (the mix's sources in their
proportions: multi-turn COCO conversations, detailed descriptions and reasoning, long text-only
ShareGPT chats, short-answer VQA merged per image as LLaVA-1.5 does, multiple choice, region
descriptions and boxes), a Vicuna-like tokenizer (a 32k-piece SentencePiece BPE trained here with
Llama's trainer options, loaded through transformers as Vicuna-7B-v1.5 is: ``LlamaTokenizer``, fast,
``Metaspace(split=False)``; no Vicuna tokenizer is available offline) and an image folder of
640x480 JPEGs (COCO's size) in which every path of the file exists. Then measures, each on its own:

- ``--check fast`` (the default config): the dataset built twice, each stage timed (reading and
  validating the file, the answers-fit check, the quick image check, the rest);
- ``--check full``: the text path (reading and validating the file; tokenizing every sample one
  call at a time, on a subset, extrapolated, against the batched tokenization, whose ids and labels
  are checked equal to it on that subset; the dataset built with an empty cache (cold) and again
  with the cache its first build wrote (warm: another rank, a re-run)) and the image check in
  threads and in processes;
- both: the cost per image of reading the header, of the quick check, of the draft (DCT-scaled)
  JPEG decode a full check uses and of the full decode a batch does.

Prints a summary and saves everything as JSON, with the machine, its load and the date.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# Run as a script from a checkout: the package beside scripts/ comes first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llava_sgg.evaluation.prompts import OPTION_LETTER, OPTION_LETTERS, SHORT_ANSWER  # noqa: E402

# The sources of llava_v1_5_mix665k.json (LLaVA-1.5 paper, Table 7) with their sample counts (rounded;
# scaled to --samples), the image folder each draws from (None: text-only) and that folder's number of
# images in the official layout.
SOURCES = {
    # name: (samples, image folder, distinct images available)
    "llava_conversation": (58_000, "coco/train2017", 118_287),
    "llava_detail": (23_000, "coco/train2017", 118_287),
    "llava_reasoning": (77_000, "coco/train2017", 118_287),
    "sharegpt": (40_688, None, 0),
    "vqav2": (82_783, "coco/train2017", 118_287),
    "gqa": (72_140, "gqa/images", 148_854),
    "okvqa": (8_998, "coco/train2017", 118_287),
    "ocrvqa": (80_000, "ocr_vqa/images", 207_572),
    "aokvqa": (66_160, "coco/train2017", 118_287),
    "textcaps": (21_953, "textvqa/train_images", 21_953),
    "refcoco": (48_447, "coco/train2017", 118_287),
    "vg": (86_417, "vg/VG_100K", 108_077),
}
VQA_SUFFIX = "\n" + SHORT_ANSWER
CHOICE_SUFFIX = "\n" + OPTION_LETTER
FUNCTION_WORDS = ("the a of and to in is that it on with as for was this are by at be from or an which there "
                  "image what his her they have one two three left right color man woman person people "
                  "table sitting standing white black red blue green street car dog cat".split())
SYLLABLES = ("th e an in er re on at en nd ti es or te of ed is it al ar st to nt ng se ha as ou io le ve co me de "
             "hi ri ro ic ne ea ra ce li ch ll be ma si om ur ca el ta la ns di fo ho pe ec pr no ct us ac ot il "
             "tr ly nc et ut ss so rs un lo wa ge ie wh ee wi em ad ol rt po we na ul ni ts mo ow pa im mi ai "
             "sh").split()


class Text:
    """Sentences of pseudo-English: Zipf-distributed words (function words most frequent), commas, numbers.

    The words are the same for every seed (the tokenizer is trained on other sentences of the same words,
    as a real one is trained on the language); ``rng`` draws the sentences.
    """

    def __init__(self, rng: np.random.Generator, vocabulary: int = 50_000, pool: int = 300_000):
        self.rng = rng
        words, seen, word_rng = list(FUNCTION_WORDS), set(FUNCTION_WORDS), np.random.default_rng(12345)
        while len(words) < vocabulary:
            word = "".join(SYLLABLES[i] for i in word_rng.integers(0, len(SYLLABLES),
                                                                  word_rng.choice([1, 1, 2, 2, 3, 4])))
            if word not in seen:
                seen.add(word)
                words.append(word)
        self.words = np.array(words, dtype=object)
        p = 1.0 / np.arange(1, len(words) + 1) ** 1.1
        self.cdf = np.cumsum(p / p.sum())
        self.pool = self._sentences(pool)

    def _sentences(self, count: int, mean_words: int = 13) -> list[str]:
        lengths = np.maximum(3, self.rng.poisson(mean_words, size=count))
        total = int(lengths.sum())
        words = self.words[np.minimum(np.searchsorted(self.cdf, self.rng.random(total)), len(self.words) - 1)]
        marks = self.rng.random(total)
        out, pos = [], 0
        for n in lengths:
            ws = list(words[pos:pos + n])
            for j in range(1, n - 1):
                if marks[pos + j] < 0.06:
                    ws[j] += ","
                elif marks[pos + j] < 0.07:
                    ws[j] = str(int(marks[pos + j] * 100_000) % 2000)
            ws[0] = ws[0].capitalize()
            out.append(" ".join(ws) + ("?" if marks[pos] > 0.97 else "."))
            pos += n
        return out

    def sentences(self, n: int) -> str:
        return " ".join(self.pool[i] for i in self.rng.integers(0, len(self.pool), n))

    def question(self, words: int = 6) -> str:
        return " ".join(self.words[self.rng.integers(0, 400, words)]).capitalize() + "?"

    def phrase(self, low: int = 1, high: int = 3) -> str:
        return " ".join(self.words[self.rng.integers(0, 3000, self.rng.integers(low, high + 1))])

    def box(self) -> str:
        x0, y0 = self.rng.random(2) * 0.6
        x1, y1 = x0 + 0.1 + self.rng.random() * 0.3, y0 + 0.1 + self.rng.random() * 0.3
        return f"[{x0:.2f}, {y0:.2f}, {x1:.2f}, {y1:.2f}]"


def _conversation(source: str, t: Text, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(question, answer) pairs as each source of the mix has them (LLaVA-1.5 merges the QAs of an image)."""
    if source == "llava_conversation":
        return [(t.sentences(1), t.sentences(int(rng.integers(2, 6)))) for _ in range(int(rng.integers(2, 6)))]
    if source == "llava_detail":
        return [("Describe the following image in detail.", t.sentences(int(rng.integers(5, 9))))]
    if source == "llava_reasoning":
        return [(t.sentences(int(rng.integers(1, 3))), t.sentences(int(rng.integers(4, 8))))]
    if source == "sharegpt":  # long chats; some past 2048 tokens
        return [(t.sentences(int(min(60, rng.lognormal(1.0, 1.0)) + 1)),
                 t.sentences(int(min(120, rng.lognormal(2.3, 0.8)) + 1))) for _ in range(int(rng.geometric(0.3)))]
    if source in ("vqav2", "gqa", "okvqa"):
        n = {"vqav2": rng.integers(1, 10), "gqa": rng.integers(4, 22), "okvqa": 1}[source]
        return [(t.question(int(rng.integers(4, 9))) + VQA_SUFFIX, t.phrase(1, 2)) for _ in range(int(n))]
    if source == "ocrvqa":
        return [(t.question(int(rng.integers(4, 7))) + VQA_SUFFIX, t.phrase(1, 5))
                for _ in range(int(rng.integers(3, 7)))]
    if source == "aokvqa":
        options = "\n".join(f"{letter}. {t.phrase(1, 3)}" for letter in OPTION_LETTERS)
        return [(f"{t.question(int(rng.integers(6, 12)))}\n{options}{CHOICE_SUFFIX}", OPTION_LETTERS[int(rng.integers(0, 4))])]
    if source == "textcaps":
        return [("Provide a one-sentence caption for the provided image.", t.sentences(1))]
    if source in ("refcoco", "vg"):
        pairs = []
        for _ in range(int(rng.integers(3, 10))):
            if rng.random() < 0.5:
                pairs.append((f"Please provide a short description for this region: {t.box()}", t.phrase(2, 6)))
            else:
                pairs.append(("Please provide the bounding box coordinate of the region this sentence describes: "
                              f"{t.phrase(2, 6)}.", t.box()))
        return pairs
    raise ValueError(source)


def image_name(folder: str, index: int) -> str:
    return f"{folder}/{index:012d}.jpg" if folder.startswith("coco") else f"{folder}/{index}.jpg"


def write_mix(path: Path, samples: int, seed: int) -> dict:
    """The synthetic mix as a JSON list, sources interleaved at random; returns its description."""
    rng = np.random.default_rng(seed)
    t = Text(rng)
    total = sum(n for n, _, _ in SOURCES.values())
    counts = {name: round(n * samples / total) for name, (n, _, _) in SOURCES.items()}
    order = np.repeat(np.arange(len(SOURCES)), list(counts.values()))
    rng.shuffle(order)
    names = list(SOURCES)
    records, images = [], set()
    for i, k in enumerate(order):
        source = names[k]
        pairs = _conversation(source, t, rng)
        folder = SOURCES[source][1]
        sample = {"id": f"{source}-{i}"}
        if folder is not None:
            # Per source, one sample per image (the mix merges an image's questions into one sample).
            name = image_name(folder, int(rng.integers(0, SOURCES[source][2])))
            images.add(name)
            sample["image"] = name
            q = pairs[0][0]
            pairs[0] = (f"{q}\n<image>" if rng.random() < 0.1 else f"<image>\n{q}", pairs[0][1])
        sample["conversations"] = [{"from": role, "value": value} for q, a in pairs
                                   for role, value in (("human", q), ("gpt", a))]
        records.append(sample)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    turns = [len(r["conversations"]) for r in records]
    return {"path": str(path), "samples": len(records), "bytes": path.stat().st_size,
            "characters_of_turns": sum(len(c["value"]) for r in records for c in r["conversations"]),
            "turns_mean": float(np.mean(turns)), "turns_max": int(max(turns)),
            "text_only": sum("image" not in r for r in records), "distinct_images": len(images),
            "by_source": counts, "seed": seed, "images": sorted(images)}


def build_tokenizer(folder: Path, seed: int):
    """A 32k-piece SentencePiece BPE with Llama-2's trainer options, saved as Vicuna-7B-v1.5 ships its
    tokenizer (tokenizer.model, no tokenizer.json) and loaded as this project loads Vicuna's."""
    from transformers import AutoTokenizer

    from llava_sgg.model.tiny import write_vicuna_style_tokenizer

    if not (folder / "tokenizer.model").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        from llava_sgg.data.conversation import VICUNA_V1

        text = Text(np.random.default_rng(seed + 1), pool=200_000)
        # The template's and the prompts' English too, which Vicuna's vocabulary covers.
        fixed = [VICUNA_V1.system, "USER: ASSISTANT:", VQA_SUFFIX.strip(), CHOICE_SUFFIX.strip(),
                 "Describe the following image in detail.", "Provide a one-sentence caption for the provided image.",
                 "Please provide a short description for this region:",
                 "Please provide the bounding box coordinate of the region this sentence describes:"]
        write_vicuna_style_tokenizer(folder, text.pool + fixed * 2000, 32000, num_threads=os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})  # as model.builder does
    return tokenizer


def natural_jpeg(rng: np.random.Generator, path: Path, size=(640, 480)) -> None:
    """A COCO-sized JPEG with smooth structure and sensor-like noise (about 130 KB at quality 90)."""
    from PIL import Image

    w, h = size
    small = Image.fromarray(rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    pixels = np.clip(np.asarray(small, np.float32) + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def build_images(folder: Path, names: list[str], pool: int, seed: int) -> Path:
    """Every image path of the file, each a hard link to one of ``pool`` distinct JPEGs."""
    marker = folder / f".complete-{len(names)}-{pool}"
    if marker.exists():
        return folder / ".pool"
    rng = np.random.default_rng(seed)
    (folder / ".pool").mkdir(parents=True, exist_ok=True)
    for i in range(pool):
        if not (folder / ".pool" / f"{i}.jpg").exists():
            natural_jpeg(rng, folder / ".pool" / f"{i}.jpg")
    for i, name in enumerate(names):
        path = folder / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(folder / ".pool" / f"{i % pool}.jpg", path)
    marker.touch()
    return folder / ".pool"


class Timer:
    """Wall and CPU seconds (all threads of this process, and of its finished children) of a block."""

    def __enter__(self):
        import resource

        self._wall, self._cpu = time.perf_counter(), time.process_time()
        self._children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return self

    def __exit__(self, *exc):
        import resource

        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.wall = time.perf_counter() - self._wall
        self.cpu = (time.process_time() - self._cpu + children.ru_utime + children.ru_stime
                    - self._children.ru_utime - self._children.ru_stime)
        self.load = os.getloadavg()[0]

    def row(self, **extra) -> dict:
        return {"wall_s": round(self.wall, 3), "cpu_s": round(self.cpu, 3), "load_1min_after": round(self.load, 2),
                **extra}


def environment() -> dict:
    import PIL
    import tokenizers
    import torch
    import transformers

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return {"device": f"CPU: {model}", "cpus": len(os.sched_getaffinity(0)), "date": datetime.date.today().isoformat(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
            "commit": commit + " (with uncommitted changes)" if commit else "",
            "load_1min_at_start": round(os.getloadavg()[0], 2)}


def bench_text(samples, tokenizer, subset: int) -> dict:
    """One call per sample (the previous implementation) against the batched path, on the same subset."""
    from llava_sgg.data import DataError, encode_conversation, render_conversation
    from llava_sgg.data.tokenization import conversation_lengths, encode_conversations, move_image_to_front

    settings = {"model_max_length": 2048, "num_image_tokens": 576}
    part = [move_image_to_front(s.turns) if s.image else s.turns for s in samples[:subset]]
    with Timer() as one_by_one:
        reference = []
        for t in part:
            try:
                reference.append(encode_conversation(t, tokenizer, **settings))
            except DataError as e:
                reference.append(e)
    with Timer() as batched:
        conversation_lengths(part, tokenizer, **settings)
    texts = [render_conversation(t, eos=tokenizer.eos_token).text for t in part]
    with Timer() as tokenizer_alone:  # the Rust tokenizer's share: the floor of any Python around it
        tokenizer.backend_tokenizer.encode_batch(texts)
    encoded = encode_conversations(part, tokenizer, **settings)
    identical = all(str(a) == str(b) if isinstance(a, DataError) else a == b for a, b in zip(reference, encoded))
    scale = len(samples) / len(part)
    return {"settings": settings, "subset": len(part), "identical_ids_labels_and_errors": identical,
            "one_call_per_sample": one_by_one.row(), "batched": batched.row(),
            "backend_encode_batch_alone": tokenizer_alone.row(),
            "one_call_per_sample_projected_to_the_file": {"wall_s": round(one_by_one.wall * scale, 1),
                                                          "cpu_s": round(one_by_one.cpu * scale, 1)}}


def bench_image_methods(pool: Path, repeats: int = 3) -> dict:
    """Cost per image on one thread of each way to check it, on the pool's JPEGs (in the page cache)."""
    from PIL import Image

    from llava_sgg.data.image import decode_check, load_image, quick_check

    def header(path):
        with Image.open(path) as image:
            image.verify()


    paths = sorted(pool.glob("*.jpg"))
    rows = {}
    for name, check in (("header_verify", header), ("quick_check_header_and_end_marker", quick_check),
                        ("decode_check_draft", decode_check), ("full_decode_load_image", load_image)):
        best = float("inf")
        for _ in range(repeats):
            with Timer() as t:
                for p in paths:
                    check(p)
            best = min(best, t.cpu)
        rows[name] = {"cpu_ms_per_image": round(best / len(paths) * 1e3, 3)}
    return {"images": len(paths), "size": "640x480 JPEG, quality 90", "bytes_mean": int(np.mean(
        [p.stat().st_size for p in paths])), "best_of": repeats, "rows": rows}


def _decode_chunk(paths):
    from llava_sgg.data.image import image_problem

    return [image_problem(p, decode=True) for p in paths]


def bench_image_parallel(paths: list[str], workers: int, rounds: int = 3) -> dict:
    """check_images (threads) against the same check in a process pool and in one thread, over the same
    images, in interleaved rounds (other work on the machine shifts single measurements)."""
    from concurrent.futures import ProcessPoolExecutor

    from llava_sgg.data.image import check_images

    def processes():
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_decode_chunk, [paths[i:i + 64] for i in range(0, len(paths), 64)]))

    modes = {"threads": lambda: check_images(paths, workers=workers), "processes": processes,
             "one_thread": lambda: check_images(paths, workers=1)}
    rows = {name: [] for name in modes}
    for _ in range(rounds):
        for name, run in modes.items():
            with Timer() as t:
                run()
            rows[name].append(t.row(ms_per_image=round(t.wall / len(paths) * 1e3, 3)))
    best = {name: min(r["ms_per_image"] for r in runs) for name, runs in rows.items()}
    return {"images": len(paths), "workers": workers, "best_ms_per_image": best, "rounds": rows}


@contextlib.contextmanager
def timed_stages(**targets):
    """While in the block, each ``name=(owner, attribute)`` records its wall and CPU time (``stages``) and
    its last result (``results``) in the dicts yielded; the originals are put back on exit."""
    stages, results, originals = {}, {}, []
    for name, (owner, attribute) in targets.items():
        original = getattr(owner, attribute)
        originals.append((owner, attribute, original))

        def wrapper(*args, _original=original, _name=name, **kwargs):
            with Timer() as t:
                results[_name] = _original(*args, **kwargs)
            stages[_name] = t.row()
            return results[_name]
        setattr(owner, attribute, wrapper)
    try:
        yield stages, results
    finally:
        for owner, attribute, original in originals:
            setattr(owner, attribute, original)


def bench_fast_dataset(data: Path, images: Path, tokenizer, rounds: int = 2) -> dict:
    """The dataset as training builds it by default (``data.check: fast``, no cache), ``rounds`` times,
    with the time of each stage: reading and validating the file, the special-token and answers-fit
    check (tokenizing the text before each first answer), the quick image check; the rest is the
    word counts of the modality grouping."""
    from transformers import CLIPImageProcessor

    from llava_sgg.data import LlavaSFTDataset
    from llava_sgg.data import dataset as module

    rows = []
    with timed_stages(read_and_validate=(module, "_load_samples"),
                      answers_fit=(LlavaSFTDataset, "_check_reachable"),
                      check_images=(LlavaSFTDataset, "_check_images")) as (stages, _):
        for _ in range(rounds):
            stages.clear()
            gc.collect()
            with Timer() as t:
                ds = LlavaSFTDataset(data, images, tokenizer, CLIPImageProcessor(), num_image_tokens=576,
                                     model_max_length=2048, check="fast", cache_dir=False)
            rows.append(t.row(samples=len(ds), stages=dict(stages)))
            del ds
    return {"rounds": rows, "best_wall_s": min(r["wall_s"] for r in rows)}


def bench_dataset(data: Path, images: Path, tokenizer, cache: Path) -> dict:
    """The dataset as ``data.check: full`` builds it, cold (an empty cache: the first rank of the first run),
    then warm (the node's other ranks, a re-run), with the time of each stage: reading and validating the
    file, tokenizing (batched; through the cache), checking the images (decoding them; through the cache)."""
    from transformers import CLIPImageProcessor

    from llava_sgg.data import LlavaSFTDataset
    from llava_sgg.data import dataset as module

    rows = {}
    with timed_stages(read_and_validate=(module, "_load_samples"), tokenize=(LlavaSFTDataset, "_tokenize_all"),
                      check_images=(LlavaSFTDataset, "_check_images")) as (stages, results):
        for name in ("cold", "warm"):
            stages.clear()
            gc.collect()
            with Timer() as t:
                ds = LlavaSFTDataset(data, images, tokenizer, CLIPImageProcessor(), num_image_tokens=576,
                                     model_max_length=2048, check="full", cache_dir=cache)
            rows[name] = t.row(samples=len(ds), stages=dict(stages))
            with_image = np.array([s.image is not None for s in ds.samples])
            del ds  # the next build starts as another process would, without this one's objects
    full = results["tokenize"].full_lengths
    rows["text_tokens"] = int(full.sum() - 575 * with_image.sum())  # the image placeholder counted once
    rows["tokens_with_576_per_image"] = int(full.sum())
    rows["truncated_at_2048"] = int((full > 2048).sum())
    rows["cache_bytes"] = sum(p.stat().st_size for p in cache.rglob("*.safetensors"))
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=665_298, help="llava_v1_5_mix665k.json's count")
    parser.add_argument("--subset", type=int, default=20_000, help="samples tokenized one at a time as well")
    parser.add_argument("--pool", type=int, default=200, help="distinct JPEGs behind the file's image paths")
    parser.add_argument("--parallel-images", type=int, default=4000, help="images decoded by threads and processes")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/data"))
    parser.add_argument("--check", choices=("fast", "full"), default="fast",
                        help="the data.check to measure: fast (the default's startup) or full (cold and warm cache)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/data-prep.json"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from llava_sgg.data import load_llava_json

    report = {"environment": environment(), "method": __doc__.split("\n\n", 2)[2].strip()}
    data = args.work / f"mix-{args.samples}-seed{args.seed}.json"
    described = args.work / f"mix-{args.samples}-seed{args.seed}.description.json"
    if not described.exists():
        print(f"writing {data} ...", flush=True)
        described.write_text(json.dumps(write_mix(data, args.samples, args.seed)))
    description = json.loads(described.read_text())
    names = description.pop("images")
    report["file"] = description
    tokenizer = build_tokenizer(args.work / "tokenizer", args.seed)
    report["tokenizer"] = ("SentencePiece BPE, 32000 pieces, Llama-2 trainer options (byte fallback, split digits), "
                           "trained on the synthetic text; loaded by transformers as Vicuna-7B-v1.5 is "
                           f"({type(tokenizer).__name__}, fast, {tokenizer.backend_tokenizer.pre_tokenizer}); "
                           "<image> added as a special token")
    print(f"linking {len(names)} image paths to {args.pool} JPEGs ...", flush=True)
    pool = build_images(args.work / "images", names, args.pool, args.seed)

    report["check"] = args.check
    if args.check == "fast":
        print("the dataset as data.check=fast builds it ...", flush=True)
        report["fast_dataset"] = bench_fast_dataset(data, args.work / "images", tokenizer)
    else:
        print("the dataset, cold then warm ...", flush=True)
        cache = args.work / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        report["dataset"] = bench_dataset(data, args.work / "images", tokenizer, cache)
        print("tokenizing a subset one call per sample, and batched ...", flush=True)
        samples = load_llava_json(data)
        report["text_subset"] = bench_text(samples, tokenizer, min(args.subset, len(samples)))
        del samples
    print("image checks ...", flush=True)
    report["image_methods"] = bench_image_methods(pool)
    if args.check == "full":
        some = [str(args.work / "images" / n) for n in names[:args.parallel_images]]
        report["image_parallel"] = bench_image_parallel(some, len(os.sched_getaffinity(0)))
    per_image = report["image_methods"]["rows"]["decode_check_draft"]["cpu_ms_per_image"] / 1e3
    report["image_check_note"] = (
        f"The file references {description['distinct_images']} distinct images (a full check decodes each once "
        f"when the cache is cold: about {description['distinct_images'] * per_image:.0f} s of CPU at "
        "decode_check's cost per image). They are hard links to the pool's JPEGs, so they are read from the page "
        "cache: reading LLaVA's real images from disk (tens of GB) adds its own time on a cold page cache.")
    report["environment"]["load_1min_at_end"] = round(os.getloadavg()[0], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    summarize(report)
    print(f"wrote {args.out}")
    return report


def summarize(r: dict) -> None:
    f, e = r["file"], r["environment"]
    print(f"\n{e['device']}, {e['cpus']} CPUs, 1-minute load {e['load_1min_at_start']} at start, "
          f"{e['load_1min_at_end']} at end, {e['date']}")
    print(f"file: {f['samples']} samples, {f['bytes'] / 1e6:.0f} MB, {f['distinct_images']} distinct images")
    if r["check"] == "fast":
        for k, run in enumerate(r["fast_dataset"]["rounds"]):
            rows = [(f"data.check=fast: dataset ready (round {k + 1})", run)]
            rows += [(f"  {stage}", row) for stage, row in run["stages"].items()]
            for name, row in rows:
                print(f"  {name:<52}{row['wall_s']:>9.1f} s wall{row['cpu_s']:>9.1f} s CPU")
    else:
        summarize_full(r)
    for name, row in r["image_methods"]["rows"].items():
        print(f"  image {name:<46}{row['cpu_ms_per_image']:>9.3f} ms CPU per image")


def summarize_full(r: dict) -> None:
    t, d = r["text_subset"], r["dataset"]
    print(f"  {d['text_tokens'] / 1e6:.1f} M text tokens")
    rows = []
    for run in ("cold", "warm"):
        rows.append((f"dataset ready, {run} cache", d[run]))
        rows += [(f"  {stage}", row) for stage, row in d[run]["stages"].items()]
    rows += [(f"tokenize {t['subset']} samples, one call per sample", t["one_call_per_sample"]),
             (f"tokenize {t['subset']} samples, batched", t["batched"]),
             ("  of which the Rust tokenizer alone", t["backend_encode_batch_alone"]),
             ("tokenize the file one call per sample (projected)", t["one_call_per_sample_projected_to_the_file"])]
    for name, row in rows:
        print(f"  {name:<52}{row['wall_s']:>9.1f} s wall{row['cpu_s']:>9.1f} s CPU")
    print(f"  batched == one call per sample on the subset: {t['identical_ids_labels_and_errors']}")
    for name, best in r["image_parallel"]["best_ms_per_image"].items():
        print(f"  image check, {name:<39}{best:>9.3f} ms wall per image (best of "
              f"{len(r['image_parallel']['rounds'][name])})")


if __name__ == "__main__":
    main()
