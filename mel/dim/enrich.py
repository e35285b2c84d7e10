"""`python -m mel kb enrich`: DIM's "dynamic entity representations", OFF by default.

DIM had an LLM (ChatGPT) rewrite the KB's entity descriptions into fluent text (Wiki+, Rich+,
Diverse+). This writes a NEW knowledge base whose descriptions were rewritten by a configurable
causal LM (`mel.backends.llm` spec: the offline preset's SmolLM2-135M, or `hf:<id or dir>`),
keeping every original description in an `original_description` column and recording the LLM
and prompt in the KB's meta. The source KB is never modified, and the new KB (with its dense indexes,
its original descriptions and its meta) is published as one unit by `build_kb`: it appears whole or
not at all.

    python -m mel kb enrich wikimel.sqlite --out wikimel-enriched.sqlite --llm smollm2 --preset offline --limit 200

Small LLMs can invent facts: the prompt asks for the given facts only, `--limit` lets you look at
a sample first, and entities whose rewrite comes back empty keep their original text.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from ..cli_kit import add_preset_args, check_output_file, count_arg, resolve_preset
from ..errors import InputError, KBError, require_whole

DEFAULT_PROMPT = ("Rewrite these facts about {name} as one or two fluent sentences. Use only the facts given.\n"
                  "Facts: {description}")
MAX_FACT_CHARS = 600  # long attribute lists are cut: the head of the list carries the identity


def llm_generator(spec: str, device: str = "cpu", max_new_tokens: int = 64) -> Callable[[Sequence[str]], list[str]]:
    """A function prompts -> completions using the causal LM named by `spec` (greedy decoding)."""
    import torch

    from ..backends.llm import load_causal_lm

    lm = load_causal_lm(spec, device=device)
    tok = lm.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # decoder-only models continue from the right end

    def render(prompt: str) -> str:
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
        return prompt + "\nRewritten:"

    def generate(prompts: Sequence[str]) -> list[str]:
        batch = tok([render(p) for p in prompts], return_tensors="pt", padding=True).to(lm.device)
        with torch.inference_mode():
            out = lm.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                    pad_token_id=tok.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]

    generate.name = getattr(lm, "name", spec)
    return generate


def clean(text: str, prompt: str = "") -> str:
    """One paragraph, no echoed instruction, no trailing half sentence (generation stops at a
    token budget). Small LMs often start by repeating the instruction: "Rewrite these facts...: ..."."""
    text = " ".join(text.split())
    head = prompt.split("{name}")[0].strip().lower()
    if head and text.lower().startswith(head) and ":" in text:
        text = text.split(":", 1)[1].strip()
    if "." in text and not text.endswith("."):
        text = text[: text.rfind(".") + 1]
    return text


def check_prompt(prompt: str) -> str:
    """`prompt` if it is a template with {name} and {description} and no other field (test-formatted
    now, before an LLM loads), else an InputError saying how to write one."""
    if not isinstance(prompt, str) or "{name}" not in prompt or "{description}" not in prompt:
        raise InputError("the enrichment prompt must contain {name} and {description}")
    try:
        prompt.format(name="", description="")
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(f"the enrichment prompt {prompt!r} is not a valid template ({type(exc).__name__}: {exc}): "
                         f"use only the fields {{name}} and {{description}}, and write a literal brace as {{{{ or "
                         f"}}}}") from None
    return prompt


def enrich_kb(kb_path: str | Path, out: str | Path, generate: Callable[[Sequence[str]], list[str]], *,
              text_encoder=None, prompt: str = DEFAULT_PROMPT, limit: int | None = None, batch_size: int = 8,
              progress: bool = True, llm_name: str = ""):
    """Write `out`: the KB at `kb_path` with descriptions rewritten by `generate` (first `limit`
    entities only, when given); originals go to `original_description`. Returns the new KB."""
    from tqdm.auto import tqdm

    from ..kb import KnowledgeBase, build_kb

    check_prompt(prompt)
    require_whole("the batch size", batch_size, 1)
    src = KnowledgeBase(kb_path, engine="numpy")  # its image index is copied, never searched
    out = Path(out)
    if out.resolve() == src.path.resolve():
        raise KBError("kb enrich writes a new KB and keeps the source: give --out a different file")
    entities = [e for _, e in src.iter_entities()]
    n = len(entities) if limit is None else min(int(limit), len(entities))
    originals = {e.id: e.description for e in entities}
    todo = [e for e in entities[:n] if e.description.strip()]
    rewritten = 0
    for start in tqdm(range(0, len(todo), batch_size), desc="enriching descriptions", disable=not progress):
        chunk = todo[start:start + batch_size]
        outputs = generate([prompt.format(name=e.name, description=e.description[:MAX_FACT_CHARS]) for e in chunk])
        for entity, text in zip(chunk, outputs, strict=True):
            text = clean(text, prompt)
            if text:
                entity.description = text
                rewritten += 1
    image_index = src.dense("image") if src.has_dense("image") else None  # images did not change: keep them

    def keep_originals(db) -> None:  # runs on the new KB before it is published
        db["entities"].add_column("original_description", str)
        db.conn.executemany("UPDATE entities SET original_description = ? WHERE id = ?",
                            [(text, eid) for eid, text in originals.items()])

    enrichment = {"llm": llm_name or getattr(generate, "name", ""), "prompt": prompt, "n_rewritten": rewritten,
                  "n_entities": len(entities), "source_kb": src.path.name}
    kb = build_kb(entities, out, text_encoder=text_encoder, source_format=src.source_format, progress=progress,
                  image_index=image_index, extra_meta={"enrichment": enrichment}, finish=keep_originals)
    return kb, rewritten


def original_descriptions(kb) -> dict[str, str]:
    """entity id -> the description before enrichment (empty dict for a KB that was not enriched)."""
    cols = {row[1] for row in kb.db.execute("PRAGMA table_info(entities)").fetchall()}
    if "original_description" not in cols:
        return {}
    return dict(kb.db.execute("SELECT id, original_description FROM entities").fetchall())


# -- CLI (`python -m mel kb enrich`) -----------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kb", help="the KB to read (left unchanged)")
    p.add_argument("--out", required=True, help="the enriched KB to write")
    p.add_argument("--llm", default=None, help="causal LM spec (default: the preset's llm, e.g. smollm2)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt template with {name} and {description}")
    p.add_argument("--limit", type=count_arg, default=None, help="rewrite only the first N entities (try it on a sample)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--quiet", action="store_true")
    add_preset_args(p)  # its text encoder re-embeds the KB, and its llm is the default --llm


def check_args(args) -> None:
    """Everything that can be checked before the LLM loads: the numbers, the prompt, the output file."""
    require_whole("--batch-size", args.batch_size, 1)
    require_whole("--max-new-tokens", args.max_new_tokens, 1)
    check_prompt(args.prompt)
    if Path(args.out).resolve() == Path(args.kb).resolve():
        raise KBError("kb enrich writes a new KB and keeps the source: give --out a different file")
    check_output_file(args.out)


def run(args) -> None:
    check_args(args)
    preset = resolve_preset(args)
    spec = args.llm or preset.llm
    generate = llm_generator(spec, device=preset.device, max_new_tokens=args.max_new_tokens)
    kb, rewritten = enrich_kb(args.kb, args.out, generate, text_encoder=preset.backend("text_encoder"),
                              prompt=args.prompt, limit=args.limit, batch_size=args.batch_size,
                              progress=not args.quiet, llm_name=spec)
    print(f"wrote {kb.path}: {kb.size:,} entities, {rewritten:,} descriptions rewritten by {spec}; "
          f"originals kept in the original_description column")
