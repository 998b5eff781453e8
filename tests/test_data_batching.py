"""DataCollatorForLlava and ModalityLengthGroupedSampler."""

import random

import pytest
import torch

from llava_sgg.data import DataCollatorForLlava, ModalityLengthGroupedSampler, split_to_even_chunks


def item(ids, trained, image=None):
    labels = [t if k in trained else -100 for k, t in enumerate(ids)]
    out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "id": f"s{ids[0]}"}
    if image is not None:
        out["pixel_values"] = torch.full((3, 4, 4), float(image))
    return out


def test_collate_a_mixed_batch():
    collate = DataCollatorForLlava(pad_token_id=3)
    batch = collate([item([10, 11, 12], {2}, image=1), item([20], {0}), item([30, 31], {1}, image=2)])
    assert set(batch) == {"input_ids", "labels", "attention_mask", "pixel_values"}
    assert batch["input_ids"].tolist() == [[10, 11, 12], [20, 3, 3], [30, 31, 3]]
    assert batch["labels"].tolist() == [[-100, -100, 12], [20, -100, -100], [-100, 31, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    # One image per sample that has one, in batch order: the model fills image tokens in that order.
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0]


def test_a_text_only_batch_has_no_pixel_values():
    batch = DataCollatorForLlava(pad_token_id=0)([item([5, 6], {1}), item([7], {0})])
    assert "pixel_values" not in batch and batch["input_ids"].dtype == torch.long


def test_the_attention_mask_does_not_depend_on_the_pad_id():
    # Pad set to EOS (2): the answer's own EOS must stay visible.
    batch = DataCollatorForLlava(pad_token_id=2)([item([1, 9, 2], {1, 2}), item([1], set())])
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="set tokenizer.pad_token"):
        DataCollatorForLlava(pad_token_id=None)


def modality_lengths(n_image, n_text, seed=0):
    rng = random.Random(seed)
    lengths = [rng.randint(50, 600) for _ in range(n_image)] + [-rng.randint(20, 900) for _ in range(n_text)]
    rng.shuffle(lengths)
    return lengths


def megabatches(order, size):
    return [order[i:i + size] for i in range(0, len(order), size)]


def test_the_sampler_yields_modality_pure_megabatches_sorted_by_length():
    lengths = modality_lengths(48, 32)
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(80)) and len(sampler) == 80
    for megabatch in megabatches(order, 8):
        assert len({lengths[i] > 0 for i in megabatch}) == 1
        for device_batch in megabatches(megabatch, 4):
            sizes = [abs(lengths[i]) for i in device_batch]
            assert sizes == sorted(sizes, reverse=True)


def test_only_the_leftovers_of_each_modality_mix():
    lengths = modality_lengths(45, 30, seed=1)  # neither is a whole number of megabatches of 8
    order = list(ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=3))
    assert sorted(order) == list(range(75))
    groups = megabatches(order, 8)
    mixed = [k for k, g in enumerate(groups) if len({lengths[i] > 0 for i in g}) > 1]
    assert mixed == [0]  # 5 image + 3 text leftovers fill the first megabatch; 3 text come last
    assert len(groups[-1]) == 3 and all(lengths[i] < 0 for i in groups[-1])


def test_the_order_is_a_function_of_seed_and_epoch():
    lengths = modality_lengths(30, 20)
    a = ModalityLengthGroupedSampler(lengths, batch_size=2, world_size=3, seed=7)
    b = ModalityLengthGroupedSampler(lengths, batch_size=2, world_size=3, seed=7)
    assert list(a) == list(a) == list(b)
    assert list(ModalityLengthGroupedSampler(lengths, batch_size=2, world_size=3, seed=8)) != list(a)
    first = list(a)
    a.set_epoch(1)
    assert sorted(list(a)) == sorted(first) and list(a) != first


def test_a_single_modality_is_grouped_by_length_alone():
    for sign in (1, -1):
        lengths = [sign * n for n in range(1, 21)]
        order = list(ModalityLengthGroupedSampler(lengths, batch_size=5, seed=0))
        assert sorted(order) == list(range(20))
        for batch in megabatches(order, 5):
            assert [abs(lengths[i]) for i in batch] == sorted((abs(lengths[i]) for i in batch), reverse=True)


def test_split_to_even_chunks_balances_total_length():
    assert split_to_even_chunks([0, 1, 2, 3], [10, 8, 3, 1], 2) == [[0, 3], [1, 2]]
    assert split_to_even_chunks([0, 1, 2], [5, 5, 5], 2) == [[0, 2], [1]]  # uneven: round-robin, as officially


def test_zero_lengths_are_rejected():
    with pytest.raises(ValueError, match="1 are 0, first at index 1"):
        ModalityLengthGroupedSampler([3, 0, -2], batch_size=1)
