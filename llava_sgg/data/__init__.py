"""LLaVA-v1.5 instruction data: templates, validated loading, tokenization with checked label masks,
image preprocessing, batching and modality-grouped sampling."""

from .collate import DataCollatorForLlava
from .conversation import (TEMPLATES, VICUNA_V1, ConversationTemplate, RenderedConversation, get_template,
                           render_conversation, render_prompt)
from .dataset import BAD_SAMPLES, CHECKS, LlavaSFTDataset, Sample, SkippedSample, load_llava_json
from .errors import DataError
from .image import IMAGE_ASPECT_RATIOS, expand2square, image_problem, load_image, process_image
from .sampler import (ModalityLengthGroupedSampler, length_grouped_indices, modality_length_grouped_indices,
                      split_to_even_chunks)
from .tokenization import IGNORE_INDEX, EncodedConversation, check_tokenizer, encode_conversation, move_image_to_front

__all__ = [
    "BAD_SAMPLES", "CHECKS", "ConversationTemplate", "DataCollatorForLlava", "DataError", "EncodedConversation",
    "IGNORE_INDEX", "IMAGE_ASPECT_RATIOS", "LlavaSFTDataset", "ModalityLengthGroupedSampler",
    "RenderedConversation", "Sample", "SkippedSample", "TEMPLATES", "VICUNA_V1", "check_tokenizer",
    "encode_conversation", "expand2square", "get_template", "image_problem", "length_grouped_indices", "load_image",
    "load_llava_json", "modality_length_grouped_indices", "move_image_to_front", "process_image",
    "render_conversation", "render_prompt", "split_to_even_chunks",
]
