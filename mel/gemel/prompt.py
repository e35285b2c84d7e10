"""GEMEL's prompt, exactly as the paper writes it, and its assembly into LLM input embeddings.

Every segment (each demonstration, then the query) is preceded by its own image tokens
(when it has an image) and reads

    [Text]{caption}\\n[Question]What does {mention} mentioned in the text refer to?\\n[Answer]{name}\\n

The query segment stops after `[Answer]`; in training its answer is followed by EOS and only
those tokens (answer + EOS) carry a loss.

Tokenisation is done per piece (segment text, answer, separator) instead of on the joined
string, so that an entity name is always the same token sequence wherever it appears: in a
demonstration, in the training target and in the decoding trie (`encode_answer` is the single
definition). For byte-level BPE tokenizers (OPT, SmolLM2) this is identical to tokenising the
joined text, because `]` and a letter never merge.

A second prompt, `prompt="cue"`, is NOT the paper's (it is labelled so wherever it is used): in
each segment that has an image, the expert cue's text about that image (mel.backends.cue: the
offline preset's "faces" cue, e.g. "a photo of one person, apparently a woman aged about 30-40",
or the top ImageNet labels when no face is found) comes first, after the visual tokens:

    [Image]{cue}\n[Text]{caption}\n[Question]What does {mention} mentioned in the text refer to?\n[Answer]{name}\n

A segment without an image (or without a cue) reads exactly as in the paper's prompt, and
`prompt="paper"` (the default) never shows a cue.

Two normalisations, both stated: newlines inside a caption become spaces (they would break the
`[Text]`/`[Question]` layout), and a caption longer than `max_caption_chars` is cut to a window
around the mention (long news captions would otherwise dominate latency).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError

SEGMENT_TEMPLATE = "[Text]{caption}\n[Question]What does {mention} mentioned in the text refer to?\n[Answer]"
CUE_TEMPLATE = "[Image]{cue}\n"  # `cue` prompt only (beyond the paper): before [Text] in a segment with an image
PROMPT_STYLES = ("paper", "cue")
ANSWER_SEPARATOR = "\n"
IMAGE_MARKER = "<image>"  # how image tokens show in the rendered (human-readable) prompt
IGNORE_INDEX = -100       # label of tokens that carry no loss (torch's CrossEntropy default)


@dataclass
class Segment:
    """One block of the prompt: a demonstration (answer given) or the query (answer None)."""

    caption: str
    mention: str
    answer: str | None = None
    image: np.ndarray | None = None  # image feature vector (d_vision,), None = no visual tokens
    cue: str | None = None           # the expert cue's text about the image (shown in the `cue` prompt only)

    @property
    def has_image(self) -> bool:
        return self.image is not None


def clean_caption(caption: str, mention: str, max_chars: int | None = None) -> str:
    """Newlines -> spaces; a caption over `max_chars` is cut to a window centred on the mention."""
    text = re.sub(r"\s*\n\s*", " ", caption).strip()
    if max_chars and len(text) > max_chars:
        at = text.find(mention)
        if at < 0:
            at = text.lower().find(mention.lower())
        centre = at + len(mention) // 2 if at >= 0 else 0
        start = max(0, min(centre - max_chars // 2, len(text) - max_chars))
        text = text[start:start + max_chars].strip()
    return text


def check_style(style: str) -> str:
    if style not in PROMPT_STYLES:
        raise InputError(f"prompt must be one of {PROMPT_STYLES} ('paper': the paper's prompt; 'cue': the expert "
                         f"cue's text in each segment with an image, beyond the paper), got {style!r}")
    return style


def segment_body(segment: Segment, max_caption_chars: int | None = None, style: str = "paper") -> str:
    """A segment's text up to `[Answer]` (its answer excluded); with style "cue", the cue line first."""
    body = SEGMENT_TEMPLATE.format(caption=clean_caption(segment.caption, segment.mention, max_caption_chars),
                                   mention=segment.mention)
    cue = " ".join((segment.cue or "").split())  # one line: a newline would break the layout
    if style == "cue" and cue:
        body = CUE_TEMPLATE.format(cue=cue) + body
    return body


def segment_text(segment: Segment, max_caption_chars: int | None = None, style: str = "paper") -> str:
    """The text of one segment; a demonstration includes its answer and the separator."""
    text = segment_body(segment, max_caption_chars, style)
    if segment.answer is not None:
        text += segment.answer + ANSWER_SEPARATOR
    return text


def render_prompt(segments: list[Segment], n_image_tokens: int, max_caption_chars: int | None = None,
                  style: str = "paper") -> str:
    """The whole prompt as text, image tokens shown as `<image>` markers (for display and tests)."""
    check_style(style)
    return "".join(IMAGE_MARKER * n_image_tokens * seg.has_image + segment_text(seg, max_caption_chars, style)
                   for seg in segments)


# -- tokenisation ------------------------------------------------------------------------------
def encode_answer(tokenizer, name: str) -> list[int]:
    """Token ids of an entity name as the model reads and writes it (no special tokens)."""
    return list(tokenizer(name, add_special_tokens=False)["input_ids"])


def leading_special_ids(tokenizer) -> list[int]:
    """The ids a tokenizer puts before any text (BOS for OPT/Llama; nothing for SmolLM2)."""
    with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            return with_special[:start]
    return []


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise InputError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this LLM')} has no EOS token; GEMEL "
                         f"ends every generated name with EOS, so set `tokenizer.eos_token` for this model")
    return int(tokenizer.eos_token_id)


@dataclass
class TokenizedPrompt:
    input_ids: list[int]
    image_slots: list[tuple[int, int]] = field(default_factory=list)  # (position, segment index)
    labels: list[int] | None = None  # training only: IGNORE_INDEX except the query answer + EOS
    n_image_tokens: int = 0
    text: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


class PromptBuilder:
    """Turns segments into token ids with image slots, for one tokenizer."""

    def __init__(self, tokenizer, n_image_tokens: int = 4, max_caption_chars: int | None = 500, style: str = "paper"):
        self.tokenizer = tokenizer
        self.style = check_style(style)
        self.n_image_tokens = n_image_tokens
        self.max_caption_chars = max_caption_chars
        self.prefix = leading_special_ids(tokenizer)
        self.eos = eos_id(tokenizer)
        self.separator = encode_answer(tokenizer, ANSWER_SEPARATOR)
        # image slots hold a placeholder id; their embeddings are replaced by the mapper's output
        self.placeholder = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    def build(self, segments: list[Segment], target: str | None = None, use_images: bool = True,
              use_cues: bool = True) -> TokenizedPrompt:
        """`segments[-1]` is the query (answer None). `target`: the query's gold name (training).
        `use_images=False`: no visual tokens; `use_cues=False`: no cue lines (they only show in the `cue` style)."""
        if not segments or segments[-1].answer is not None:
            raise InputError("the last prompt segment must be the query (a segment without an answer)")
        ids: list[int] = list(self.prefix)
        slots: list[tuple[int, int]] = []
        for i, seg in enumerate(segments):
            if seg.has_image and use_images:
                slots.append((len(ids), i))
                ids += [self.placeholder] * self.n_image_tokens
            shown = seg if use_cues else Segment(seg.caption, seg.mention, seg.answer, seg.image)
            ids += encode_answer(self.tokenizer, segment_body(shown, self.max_caption_chars, self.style))
            if seg.answer is not None:
                ids += encode_answer(self.tokenizer, seg.answer) + self.separator
        labels = None
        if target is not None:
            answer = encode_answer(self.tokenizer, target) + [self.eos]
            labels = [IGNORE_INDEX] * len(ids) + answer
            ids += answer
        shown = [Segment(s.caption, s.mention, s.answer, s.image if use_images else None, s.cue if use_cues else None)
                 for s in segments]
        return TokenizedPrompt(ids, slots, labels, self.n_image_tokens if use_images else 0,
                               render_prompt(shown, self.n_image_tokens, self.max_caption_chars, self.style))


def embed_prompt(embed_tokens, prompt: TokenizedPrompt, segments: list[Segment], mapper=None,
                 device=None) -> torch.Tensor:
    """(1, L, d_embed) input embeddings: token embeddings with the mapper's visual tokens in the slots.

    Built with torch.cat so gradients reach the mapper in training; the LLM's embedding table is
    frozen, so nothing else receives a gradient.
    """
    ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=device)
    tokens = embed_tokens(ids)
    if not prompt.image_slots:
        return tokens
    if mapper is None:
        raise InputError("the prompt has image slots but no feature mapper was given")
    feats = np.stack([segments[i].image for _, i in prompt.image_slots]).astype(np.float32)
    visual = mapper(torch.from_numpy(feats).to(tokens.device)).to(tokens.dtype)  # (n_img, k, d)
    pieces, cursor = [], 0
    for j, (pos, _) in enumerate(prompt.image_slots):
        pieces += [tokens[:, cursor:pos], visual[j:j + 1]]
        cursor = pos + visual.shape[1]
    pieces.append(tokens[:, cursor:])
    return torch.cat(pieces, dim=1)
