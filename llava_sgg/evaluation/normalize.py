"""Answer normalisation of the official VQA evaluation, in one place for every scorer.

Two official procedures share these tables:

* `vqa_normalize`: `processPunctuation` then `processDigitArticle` of the VQA
  challenge's `vqaEval.py` (GT-Vision-Lab/VQA), also used by the VizWiz API.
* `evalai_answer`: LLaVA's `EvalAIAnswerProcessor` (`llava/eval/m4c_evaluator.py`,
  copied from mmf): lowercase, drop every ',' and '?', split "'s" off its word,
  then the same two steps. LLaVA runs it on every TextVQA answer (prediction
  and human) and on VQAv2 / VizWiz predictions before upload.

Quirks kept on purpose, because the official numbers depend on them:

* `PERIOD_STRIP` reads `(?!<=\\d)`, a lookahead (a typo for the lookbehind
  `(?<!\\d)`): every '.' not followed by a digit is removed, so "3.5" keeps its
  period and "5." loses it.
* `periodStrip.sub("", text, re.UNICODE)` passes the flag as `count`, so at
  most 32 periods are removed.
* The contraction map only adds apostrophes ("dont" -> "don't"); "its" and
  "it's" stay different answers. "somebody'd" -> "somebodyd" is the map's own.
* A punctuation mark is deleted (not turned into a space) when it touches a
  space anywhere in the answer, or when the answer has a comma between digits:
  "10,000" -> "10000" but "red,blue" -> "red blue".
"""

from __future__ import annotations

import re

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {  # vqaEval's manualMap
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")

PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")  # vqaEval.py
EVALAI_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")  # m4c_evaluator.py; moot there, commas are gone already
PERIOD_STRIP_COUNT = int(re.UNICODE)  # the official `sub("", text, re.UNICODE)` passes the flag (32) as count


def process_punctuation(text: str, *, comma_strip: re.Pattern = COMMA_STRIP) -> str:
    """vqaEval `processPunctuation`."""
    out = text
    delete = comma_strip.search(text) is not None
    for mark in PUNCTUATION:
        if delete or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval `processDigitArticle`: number words to digits, articles dropped, contractions given apostrophes."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def vqa_normalize(text: str) -> str:
    """vqaEval's answer processing: punctuation, then digits / articles / contractions."""
    return process_digit_article(process_punctuation(text))


def clean_whitespace(text: str) -> str:
    """vqaEval's first step on every answer: newlines and tabs to spaces, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def evalai_answer(text: str) -> str:
    """LLaVA's `EvalAIAnswerProcessor()(text)` (m4c_evaluator), used for TextVQA, VQAv2 and VizWiz."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = clean_whitespace(text)
    text = process_punctuation(text, comma_strip=EVALAI_COMMA_STRIP)
    return process_digit_article(text)
