"""vicuna_v1 rendering, the <image> placeholder, and labels masked to exactly the answers."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llava_sgg.data import (IGNORE_INDEX, TEMPLATES, DataError, encode_conversation, get_template,
                            move_image_to_front, render_conversation, render_prompt)
from llava_sgg.model.tiny import _CORPUS, SPECIAL_TOKENS, tiny_tokenizer

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
TURNS = [("<image>\nWhat is in the image?", "The digit 3 is left of 7."), ("how many digits are there", "two")]


def test_render_a_conversation_as_official_vicuna_v1():
    rendered = render_conversation(TURNS, eos="</s>")
    assert rendered.text == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the image? "
        "ASSISTANT: The digit 3 is left of 7.</s>USER: how many digits are there ASSISTANT: two</s>")
    # Trained: everything after each "ASSISTANT:" through its </s>.
    assert [rendered.text[a:b] for a, b in rendered.trained_spans] == [" The digit 3 is left of 7.</s>", " two</s>"]


def test_the_generation_prompt_ends_with_assistant_and_continues_into_the_trained_span():
    assert render_prompt("What is in the image?") == f"{SYSTEM} USER: What is in the image? ASSISTANT:"
    rendered = render_conversation(TURNS, eos="</s>")
    prompt = render_prompt(TURNS[1][0], history=TURNS[:1], eos="</s>")
    assert prompt.endswith("</s>USER: how many digits are there ASSISTANT:")
    a, b = rendered.trained_spans[1]
    assert prompt + rendered.text[a:b] == rendered.text[:b]


def test_templates_are_found_by_name():
    assert get_template("vicuna_v1") is TEMPLATES["vicuna_v1"]
    assert get_template("vicuna_v1").sep2 is None  # the tokenizer's EOS
    with pytest.raises(ValueError, match="unknown conversation template 'vicuna'; known: plain, vicuna_v1"):
        get_template("vicuna")
    with pytest.raises(ValueError, match="pass eos=tokenizer.eos_token"):
        render_conversation(TURNS)


def test_plain_renders_the_image_and_caption_as_official_preprocess_plain():
    # Official: the question is replaced by the bare placeholder; text = placeholder + caption + "\n";
    # everything after the placeholder is trained.
    rendered = render_conversation([("<image>\nDescribe the image.", "7 and 3.")], template="plain")
    assert rendered.text == "<image>7 and 3.\n"
    assert [rendered.text[a:b] for a, b in rendered.trained_spans] == ["7 and 3.\n"]
    assert render_prompt("<image>\nDescribe the image.", template="plain") == "<image>"
    with pytest.raises(ValueError, match="one \\(question, caption\\) turn"):
        render_conversation(TURNS, template="plain")
    with pytest.raises(ValueError, match="one \\(question, caption\\) turn"):
        render_conversation([("no image here", "caption")], template="plain")


def test_plain_labels_are_the_caption_and_newline_after_the_image_tokens():
    tokenizer = tiny_tokenizer()
    encoded = encode_conversation([("<image>\nDescribe.", "The digit 3 is left of 7.")], tokenizer,
                                  model_max_length=512, num_image_tokens=4, template="plain")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    expected_caption = tokenizer("The digit 3 is left of 7.\n", add_special_tokens=False)["input_ids"]
    trained = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert trained == expected_caption
    assert encoded.input_ids.count(image_id) == 4
    assert encoded.input_ids[-len(expected_caption):] == expected_caption


def test_the_image_placeholder_moves_to_the_front_of_the_first_question():
    turns = [("What is in the image?\n<image>", "a"), ("and here?", "b")]
    assert move_image_to_front(turns) == [("<image>\nWhat is in the image?", "a"), ("and here?", "b")]
    assert move_image_to_front([("  <image>  ", "a")]) == [("<image>", "a")]  # official strips
    assert move_image_to_front([("first", "a"), ("<image> second", "b")]) == [("<image>\nfirst", "a"), ("second", "b")]


def subsequence_at(haystack, needle):
    return [i for i in range(len(haystack) - len(needle) + 1) if haystack[i:i + len(needle)] == needle]


def test_labels_are_exactly_the_answer_tokens_and_eos():
    tokenizer = tiny_tokenizer()
    turns = [("What is in the image?", "The digit 3 is left of 7."), ("how many digits are there", "two")]
    encoded = encode_conversation(turns, tokenizer, model_max_length=512)

    # Independently: each answer, with the space after "ASSISTANT:", tokenized alone and found in the sequence.
    ids = encoded.input_ids
    colon = tokenizer(" ASSISTANT:", add_special_tokens=False).input_ids
    expected = set()
    for _, answer in turns:
        piece = tokenizer(" " + answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        (at,) = subsequence_at(ids, colon + piece)
        expected |= set(range(at + len(colon), at + len(colon) + len(piece)))
    assert {i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX} == expected
    assert all(encoded.labels[i] == ids[i] for i in expected)
    assert ids[0] == tokenizer.bos_token_id and encoded.labels[0] == IGNORE_INDEX


def test_the_image_token_is_expanded_and_never_trained():
    tokenizer = tiny_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    plain = encode_conversation(TURNS, tokenizer, model_max_length=512, num_image_tokens=1)
    expanded = encode_conversation(TURNS, tokenizer, model_max_length=512, num_image_tokens=16)
    at = plain.input_ids.index(image_id)
    assert expanded.input_ids[at:at + 16] == [image_id] * 16 and image_id not in expanded.input_ids[at + 16:]
    assert expanded.labels[at:at + 16] == [IGNORE_INDEX] * 16
    assert expanded.input_ids[at + 16:] == plain.input_ids[at + 1:]
    assert expanded.labels[at + 16:] == plain.labels[at + 1:]
    assert tokenizer.decode(expanded.input_ids[at + 16:at + 18]) == "\nWhat"


def test_truncation_comes_after_image_expansion_and_keeps_a_cut_answer():
    tokenizer = tiny_tokenizer()
    full = encode_conversation(TURNS, tokenizer, model_max_length=512, num_image_tokens=16)
    cut = encode_conversation(TURNS, tokenizer, model_max_length=full.full_length - 3, num_image_tokens=16)
    assert cut.full_length == full.full_length and cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
    with pytest.raises(DataError, match="all answers are truncated away: the sample needs"):
        encode_conversation(TURNS, tokenizer, model_max_length=60, num_image_tokens=16)


def llama_style_tokenizer():
    """Sentencepiece-style BPE as Vicuna's: "▁" marks spaces, so the space after "ASSISTANT:" joins the answer."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS + [f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"])


def test_a_llama_style_tokenizer_trains_the_token_that_carries_the_space():
    tokenizer = llama_style_tokenizer()
    turns = [("<image>\nWhat is in the image?", "The digit 3\nis left of 7."), ("how many", "two")]
    encoded = encode_conversation(turns, tokenizer, model_max_length=512, num_image_tokens=4)
    trained = [i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
    pieces = tokenizer.convert_ids_to_tokens([encoded.input_ids[i] for i in trained])
    assert pieces[0] == "▁The" and pieces[pieces.index("</s>") + 1] == "▁t"
    assert tokenizer.convert_ids_to_tokens(encoded.input_ids[trained[0] - 1]) == "T:"  # "ASSISTANT:" is masked
    assert pieces.count("</s>") == 2 and pieces[-1] == "</s>"
