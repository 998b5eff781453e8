"""The answer-format instructions of LLaVA-v1.5's questions, and the letters of multiple-choice options.

Defined once: the answer generators append them, the scorers strip or parse them, and the data that
trains on them (LLaVA's mix665k; the demo's scenes, data.py) asks in the same words, so a model learns
the answer format it is scored on. Imports nothing, so the scorers stay light.
"""

# The mix665k's and model_vqa_loader.py's short-answer instruction (VQAv2, GQA, TextVQA, POPE, MME...).
SHORT_ANSWER = "Answer the question using a single word or phrase."
# model_vqa_mmbench.py's and model_vqa_science.py's --single-pred-prompt instruction; MMBench-CN's.
OPTION_LETTER = "Answer with the option's letter from the given choices directly."
OPTION_LETTER_CN = "请直接回答选项字母。"
# MME's own suffix in its ground-truth files; LLaVA asks with SHORT_ANSWER instead and its converter
# maps the question back.
MME_SUFFIX = "Please answer yes or no."
# The letters of up to four options (LLaVA's all_options for MMBench; SEED-Bench's answers).
OPTION_LETTERS = ("A", "B", "C", "D")
