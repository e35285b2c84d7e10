"""Train GEMEL's feature mapper (the only trained part) with the paper's recipe.

    python -m mel train gemel --format wikimel --data DIR --kb wikimel.sqlite --preset offline --out DIR

The LLM and the image encoder stay frozen; the loss is the cross-entropy of the query's answer
tokens + EOS only (demonstrations and question carry none). Recipe defaults are the paper's:
AdamW lr 1e-6, weight decay 0.01, 5 epochs, batch 1 x 16 gradient accumulation, 10% linear
warm-up, gradient clipping at 1.0, seed 42.

Which examples: the mapper only receives a gradient from a prompt that holds an image (it is the
only trainable part), so by default only examples whose prompt has at least one image (the query's
or a demonstration's) are used (`--examples with-image`); `--examples with-query-image` keeps
only those whose own mention has an image; `--examples all` keeps every example (paper-faithful,
same gradients, much slower on a CPU). Demonstrations come from the same split, with the query
itself excluded.

Checkpoints: the mapper directory (config.json + model.safetensors) is written every
`--save-every` optimizer steps and at the end, with the training facts in config.json; the
resumable state (the mapper's weights, optimizer, scheduler and step, one directory published in one
rename) goes to the sibling directory OUT.trainer_state just before, so `--resume` continues an
interrupted run where it stopped, even one killed in the middle of a save (see
mel/training/checkpoint.py); it is removed when the run finishes, unless --keep-state.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from ..errors import CheckpointError, InputError
from ..training import (
    TrainConfig,
    check_checkpoint_target,
    check_whole,
    load_config,
    load_training_state,
    make_optimizer_and_scheduler,
    read_training_state,
    recover_training_dirs,
    remove_written,
    save_training_state,
    seed_everything,
    update_config,
)
from ..training.checkpoint import STATE_FILE
from ..types import NIL, Example
from .demos import DemonstrationPool
from .features import image_feature_encoder
from .linker import ImageFeatures
from .mapper import FeatureMapper, MapperConfig
from .prompt import IGNORE_INDEX, PromptBuilder, Segment, embed_prompt

STATE_SUFFIX = ".trainer_state"
ExampleChoice = Literal["with-image", "with-query-image", "all"]
EXAMPLE_CHOICES = get_args(ExampleChoice)


@dataclass
class GemelTrainConfig(TrainConfig):
    """The paper's recipe (TrainConfig) and GEMEL's prompt. Every field is a flag of
    `python -m mel train gemel` (`n_demos` -> `--n-demos`)."""

    n_demos: int = field(default=4, metadata={"help": "demonstrations per prompt (paper: 16)"})
    retrieval: Literal["mention", "multimodal"] = field(default="mention", metadata={
        "help": "how demonstrations are retrieved: the mention's embedding, or mention + caption + image"})
    n_image_tokens: int = field(default=4, metadata={"help": "visual tokens per image"})
    image_feature: Literal["encoder", "conse"] = field(default="encoder", metadata={
        "help": "the image vector the mapper maps: the preset's image encoder (the paper's), or the text-aligned "
                "ConSE vector (mel.gemel.features); recorded in the mapper's config"})
    prompt: Literal["paper", "cue"] = field(default="paper", metadata={
        "help": "the paper's prompt, or 'cue' (beyond the paper): the expert cue's text in each segment with an "
                "image (mel.gemel.prompt); recorded in the mapper's config"})
    max_caption_chars: int | None = field(default=500, metadata={"help": "captions are cut to this length"})
    examples: ExampleChoice = field(default="with-image", metadata={
        "help": "which examples train: with an image in the prompt, with a query image, or all"})
    save_every: int = field(default=50, metadata={"help": "optimizer steps between checkpoints"})

    def __post_init__(self):
        super().__post_init__()
        check_whole(self, n_demos=0, n_image_tokens=1, save_every=1)
        if self.max_caption_chars is not None:
            check_whole(self, max_caption_chars=1)


@dataclass
class TrainItem:
    segments: list[Segment]
    answer: str
    sample_id: str


def trainable_summary(mapper: torch.nn.Module, *frozen: torch.nn.Module) -> dict:
    """Parameter counts: what is trained (the mapper) against everything that is frozen."""
    trainable = sum(p.numel() for p in mapper.parameters() if p.requires_grad)
    frozen_n = sum(p.numel() for m in frozen if m is not None for p in m.parameters())
    leaked = [n for m in frozen if m is not None for n, p in m.named_parameters() if p.requires_grad]
    total = trainable + frozen_n
    return {"trainable": trainable, "frozen": frozen_n, "total": total,
            "trainable_fraction": trainable / total if total else 0.0, "frozen_with_grad": leaked[:5]}


def answer_loss(model, embeds: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions (the query's answer + EOS)."""
    labels_t = torch.tensor(labels, device=embeds.device)
    first = int((labels_t != IGNORE_INDEX).nonzero()[0])  # answer tokens are the tail of the prompt
    n_keep = len(labels) - first + 1  # logits from the position before the first answer token onwards
    out = model(inputs_embeds=embeds, logits_to_keep=n_keep)  # every causal LM GEMEL uses takes it: mel.backends.llm
    logits = out.logits[0, -n_keep:-1].float()
    return torch.nn.functional.cross_entropy(logits, labels_t[first:])


class MapperTrainer:
    """Holds the frozen models, the data and the optimisation; `run()` trains, `step_loss()` is one example."""

    def __init__(self, examples: list[Example], kb, preset, out: str | Path, config: GemelTrainConfig | None = None,
                 *, pool_examples: list[Example] | None = None, init: str | Path | None = None, progress: bool = True):
        self.config = config or GemelTrainConfig()
        if self.config.examples not in EXAMPLE_CHOICES:
            raise InputError(f"examples must be one of {EXAMPLE_CHOICES}, got {self.config.examples!r}")
        if self.config.batch_size != 1:
            raise InputError("GEMEL trains with batch size 1 (the paper's); use --grad-accum for larger effective batches")
        self.kb, self.preset, self.out, self.progress = kb, preset, check_checkpoint_target(out), progress
        seed_everything(self.config.seed)
        self.llm = preset.backend("llm")
        self.model = self.llm.model
        for p in self.model.parameters():  # frozen, whatever the loader did
            p.requires_grad_(False)
        self.model.eval()  # no dropout: the LLM is a fixed function of its inputs
        self.image_encoder, encoder_spec = image_feature_encoder(preset, self.config.image_feature)
        d_embed = int(self.model.get_input_embeddings().embedding_dim)
        mapper_config = MapperConfig(d_vision=int(self.image_encoder.dim), d_embed=d_embed,
                                     n_tokens=self.config.n_image_tokens, image_encoder=encoder_spec,
                                     llm=preset.llm, image_feature=self.config.image_feature,
                                     prompt=self.config.prompt)
        self.cues = preset.backend("cue") if self.config.prompt == "cue" else None
        self.mapper = FeatureMapper(mapper_config).to(self.llm.device)
        if init is not None:
            loaded, _ = FeatureMapper.from_pretrained(init, d_vision=mapper_config.d_vision, d_embed=d_embed)
            self.mapper.load_state_dict(loaded.state_dict())
        self.mapper.train()
        self.initial_state = {k: v.detach().clone() for k, v in self.mapper.state_dict().items()}
        self.builder = PromptBuilder(self.llm.tokenizer, self.config.n_image_tokens, self.config.max_caption_chars,
                                     style=self.config.prompt)
        self.images = ImageFeatures(self.image_encoder, size=1 << 16)
        self.items, self.data_report = self._prepare(examples, pool_examples)
        if not self.items:
            raise InputError(f"no training example left ({json.dumps(self.data_report)}); with --examples "
                             f"{self.config.examples} the split needs mention images; try --examples all")

    # -- data --------------------------------------------------------------------------------
    def _answer(self, example: Example) -> str | None:
        idx = self.kb.idx_of(example.gold_id) if example.gold_id != NIL else None
        return self.kb.entity_at(idx).name if idx is not None else None

    def _cue(self, image) -> str | None:
        """The expert cue's text for an image (prompt 'cue' only; None when unreadable)."""
        if self.cues is None or not image:
            return None
        from ..imageio import load_image
        try:
            return self.cues.cue(load_image(image)).text or None
        except InputError:
            return None

    def _prepare(self, examples: list[Example], pool_examples: list[Example] | None):
        report = {"n_examples": len(examples), "n_gold_not_in_kb": 0, "n_without_image": 0}
        usable = []
        for ex in examples:
            answer = self._answer(ex)
            if answer is None:
                report["n_gold_not_in_kb"] += 1
                continue
            usable.append((ex, answer))
        pool = DemonstrationPool(pool_examples if pool_examples is not None else [ex for ex, _ in usable],
                                 self.preset.backend("mention_encoder"), key=self.config.retrieval,
                                 image_encoder=self.image_encoder if self.config.retrieval == "multimodal" else None,
                                 progress=self.progress)
        demos = pool.retrieve_many([ex.mention for ex, _ in usable], self.config.n_demos,
                                   exclude_ids=[ex.sample_id for ex, _ in usable])
        items = []
        for (ex, answer), ds in zip(usable, demos, strict=True):
            query_img = self.images(ex.mention.image, strict=False) if ex.mention.image else None
            segs = []
            for d in ds:
                m = d.example.mention
                segs.append(Segment(m.caption, m.text, self._answer(d.example) or d.example.gold_name or d.example.gold_id,
                                    self.images(m.image, strict=False) if m.image else None, self._cue(m.image)))
            segs.append(Segment(ex.mention.caption, ex.mention.text, None, query_img, self._cue(ex.mention.image)))
            has_any = any(s.has_image for s in segs)
            if (self.config.examples == "with-image" and not has_any) or \
               (self.config.examples == "with-query-image" and query_img is None):
                report["n_without_image"] += 1
                continue
            items.append(TrainItem(segs, answer, ex.sample_id))
        report["n_items"] = len(items)
        report["n_items_with_query_image"] = sum(1 for it in items if it.segments[-1].has_image)
        report["pool_size"] = len(pool)
        return items, report

    # -- optimisation ------------------------------------------------------------------------
    def step_loss(self, item: TrainItem) -> torch.Tensor:
        prompt = self.builder.build(item.segments, target=item.answer)
        embeds = embed_prompt(self.llm.embed_tokens, prompt, item.segments, self.mapper, device=self.llm.device)
        return answer_loss(self.model, embeds, prompt.labels)

    @torch.no_grad()
    def item_losses(self, use_images: bool = True, state: dict | None = None, use_cues: bool | None = None) -> list[float]:
        """The answer loss of every training item with the current mapper (or `state`), or with no
        visual tokens at all (`use_images=False`); `use_cues` (prompt 'cue'; default: as `use_images`)."""
        use_cues = use_images if use_cues is None else use_cues
        current = {k: v.detach().clone() for k, v in self.mapper.state_dict().items()}
        if state is not None:
            self.mapper.load_state_dict(state)
        try:
            out = []
            for item in self.items:
                prompt = self.builder.build(item.segments, target=item.answer, use_images=use_images, use_cues=use_cues)
                embeds = embed_prompt(self.llm.embed_tokens, prompt, item.segments,
                                      self.mapper if use_images else None, device=self.llm.device)
                out.append(float(answer_loss(self.model, embeds, prompt.labels)))
            return out
        finally:
            self.mapper.load_state_dict(current)

    def fit_report(self) -> dict:
        """Mean answer loss on the training items: trained mapper vs its initialisation vs no visual tokens
        (does the mapper help at all on what it saw? There is no image-bearing dev set to ask)."""
        rows = {"trained_mapper": self.item_losses(), "initial_mapper": self.item_losses(state=self.initial_state),
                "no_visual_tokens": self.item_losses(use_images=False)}
        if self.config.prompt == "cue":  # no_visual_tokens has no cue either: the image is not used at all
            rows["cue_without_visual_tokens"] = self.item_losses(use_images=False, use_cues=True)
        query_img = [i for i, it in enumerate(self.items) if it.segments[-1].has_image]
        report = {"n_items": len(self.items), "n_items_with_query_image": len(query_img)}
        for name, losses in rows.items():
            report[f"mean_loss_{name}"] = round(float(np.mean(losses)), 4)
            if query_img:
                report[f"mean_loss_{name}_query_image_items"] = round(float(np.mean([losses[i] for i in query_img])), 4)
        return report

    def schedule(self) -> list[int]:
        """Item order over all epochs (a seeded shuffle per epoch), so a resumed run sees the same order."""
        order = []
        for epoch in range(self.config.epochs):
            idx = list(range(len(self.items)))
            random.Random(self.config.seed + epoch).shuffle(idx)
            order += idx
        return order

    @property
    def state_dir(self) -> Path:
        """Optimizer/scheduler state for --resume: a sibling of the mapper directory (never shipped with it)."""
        return self.out.with_name(self.out.name + STATE_SUFFIX)

    def total_steps(self) -> int:
        steps = math.ceil(len(self.items) * self.config.epochs / self.config.grad_accum)
        return min(steps, self.config.max_steps) if self.config.max_steps else steps

    def run(self, resume: bool = False, keep_state: bool = False, command: str = "") -> dict:
        from tqdm.auto import tqdm
        cfg = self.config
        total = self.total_steps()
        optimizer, scheduler = make_optimizer_and_scheduler(self.mapper.parameters(), cfg, total)
        step = micro = 0
        losses: list[float] = []
        state_dir = self.state_dir
        summary = trainable_summary(self.mapper, self.model, getattr(self.image_encoder, "model", None))
        for line in recover_training_dirs(self.out, state_dir):  # finish or undo a save that a kill cut short
            print(f"[gemel] {line}", file=sys.stderr)
        self.run_id = uuid.uuid4().hex[:12]  # names this run's saves: OUT and the state must come from the same one
        if resume:
            if not (state_dir / STATE_FILE).exists():
                raise CheckpointError(f"nothing to resume for {self.out}: {state_dir / STATE_FILE} is missing (the "
                                      f"run finished, or never saved a checkpoint); start without --resume")
            state = read_training_state(state_dir)
            if state.get("n_items") != len(self.items) or state.get("config") != dataclasses.asdict(cfg):
                raise CheckpointError(f"{state_dir} was saved by a run with other data or settings; resume with "
                                      f"the same command, or start a fresh --out")
            load_training_state(state_dir, optimizer, scheduler, module=self.mapper)
            step, micro, losses = state["step"], state["micro"], state.get("losses", [])
            self.run_id = state.get("run_id", self.run_id)
            if self._saved(self.out) != (self.run_id, step):  # killed between the state and OUT: publish OUT again
                self._save(step, losses, summary, command, final=False)
                print(f"[gemel] {self.out} published again from {state_dir} (step {step})", file=sys.stderr)
        order = self.schedule()[: total * cfg.grad_accum]
        started = time.perf_counter()
        bar = tqdm(total=len(order), initial=micro, desc="train gemel mapper", unit=" ex", disable=not self.progress)
        running = []
        epoch_sums: dict[int, list[float]] = {}
        optimizer.zero_grad(set_to_none=True)
        while micro < len(order):
            loss = self.step_loss(self.items[order[micro]])
            if loss.requires_grad:  # a prompt without any image gives the mapper (all that trains) no gradient
                (loss / cfg.grad_accum).backward()
            running.append(float(loss.detach()))
            acc = epoch_sums.setdefault(micro // len(self.items), [0.0, 0])
            acc[0] += running[-1]
            acc[1] += 1
            micro += 1
            bar.update(1)
            if micro % cfg.grad_accum == 0 or micro == len(order):
                torch.nn.utils.clip_grad_norm_(self.mapper.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(sum(running) / len(running))
                running = []
                bar.set_postfix(step=f"{step}/{total}", loss=f"{losses[-1]:.4f}")
                if step % cfg.save_every == 0 and micro < len(order):
                    # the state first (weights, optimizer and step in one rename), then OUT
                    self._save_state(state_dir, optimizer, scheduler, step, micro, losses)
                    self._save(step, losses, summary, command, final=False)
        bar.close()
        self.epoch_losses = {e: round(v[0] / v[1], 4) for e, v in sorted(epoch_sums.items())}
        result = {"steps": step, "micro_steps": micro, "losses": losses, "epoch_mean_loss": self.epoch_losses,
                  "seconds": round(time.perf_counter() - started, 1),
                  **summary, "data": self.data_report}
        if keep_state:
            self._save_state(state_dir, optimizer, scheduler, step, micro, losses)
        # without a final state, a kill from here on resumes from the last one and trains to the same end
        self._save(step, losses, summary, command, final=True)
        if not keep_state:
            remove_written(state_dir)
        return result

    def _save_state(self, state_dir: Path, optimizer, scheduler, step: int, micro: int, losses: list[float]) -> None:
        save_training_state(state_dir, optimizer, scheduler,
                            {"step": step, "micro": micro, "losses": losses, "n_items": len(self.items),
                             "config": dataclasses.asdict(self.config), "run_id": self.run_id},
                            module=self.mapper, config=self.mapper.config)

    @staticmethod
    def _saved(out: Path) -> tuple | None:
        """(run id, optimizer step) of the mapper in `out`; None when there is no readable one."""
        try:
            training = load_config(out).get("training", {}) if (out / "model.safetensors").exists() else {}
        except CheckpointError:
            return None
        return (training.get("run_id"), training.get("optimizer_steps")) if isinstance(training, dict) else None

    def _save(self, step: int, losses: list[float], summary: dict, command: str, final: bool) -> None:
        extra = {"training": {"command": command, "recipe": dataclasses.asdict(self.config), "optimizer_steps": step,
                              "run_id": getattr(self, "run_id", None),
                              "finished": final, "loss_first_step": losses[0] if losses else None,
                              "loss_last_step": losses[-1] if losses else None,
                              "epoch_mean_loss": getattr(self, "epoch_losses", None), "data": self.data_report,
                              "trainable_parameters": summary["trainable"],
                              "trainable_fraction": round(summary["trainable_fraction"], 6)},
                 "preset": getattr(self.preset, "name", "")}
        # save_pretrained_dir replaces the directory atomically and carries the user's files (README.md) over
        self.mapper.save_pretrained(self.out, extra=extra)


def evaluate_mapper(out: str | Path, kb, preset, examples: list[Example], pool_examples: list[Example],
                    n_demos: int, progress: bool = True) -> dict:
    """Dev accuracy (= Hits@1, whole-KB trie) of GEMEL with the trained mapper; recorded in config.json."""
    from ..evaluate import evaluate
    from .linker import GemelLinker
    linker = GemelLinker(kb, preset, mapper=str(out), pool=pool_examples, n_demos=n_demos)
    report = evaluate(linker, examples, progress=progress)
    with_image = [ex for ex in examples if ex.mention.image]
    return {"accuracy": report["hits@1"], "hits@5": report["hits@5"], "n": report["n"], "kb_size": report["kb_size"],
            "n_with_image": len(with_image), "latency_ms_p50": report["latency_ms_p50"]}


# -- CLI: `python -m mel train gemel`; the training flags come from GemelTrainConfig (mel.training.cli) --
CONFIG = GemelTrainConfig


def add_arguments(p) -> None:
    from ..cli_kit import add_preset_args, count_arg
    p.add_argument("--format", required=True, help="dataset format (wikimel, richpedia, wikidiverse, mimic, gemel, jsonl)")
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--split", default="train")
    p.add_argument("--kb", required=True, help="the KB built from the dataset (`python -m mel kb build`)")
    p.add_argument("--out", required=True, help="directory for the mapper (config.json + model.safetensors)")
    add_preset_args(p)
    p.add_argument("--limit", type=count_arg, default=None, help="only the first N examples of the split")
    p.add_argument("--init", default=None, help="start from this mapper directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--keep-state", action="store_true", help="keep OUT.trainer_state after the run")
    p.add_argument("--eval-split", default="dev", help="split for the dev accuracy written to config.json")
    p.add_argument("--eval-limit", type=count_arg, default=0, help="dev examples to evaluate after training (0: none)")
    p.add_argument("--fit-report", action="store_true", help="after training, compare the mean answer loss on the "
                   "training items: trained mapper, its initialisation, no visual tokens (3 more passes)")
    p.add_argument("--quiet", action="store_true")


def run(args) -> None:
    from ..cli_kit import config_from_args, resolve_preset
    from ..datasets import load_dataset
    from ..kb import KnowledgeBase
    config = config_from_args(GemelTrainConfig, args)
    preset = resolve_preset(args)
    kb = KnowledgeBase(args.kb)
    split = load_dataset(args.format, args.data, args.split)
    examples = split.examples[: args.limit] if args.limit else split.examples
    dev = load_dataset(args.format, args.data, args.eval_split).examples[: args.eval_limit] if args.eval_limit else []
    command = getattr(args, "command_line", "")
    trainer = MapperTrainer(examples, kb, preset, args.out, config, init=args.init, progress=not args.quiet)
    print(f"[mel] {len(trainer.items)} training examples ({json.dumps(trainer.data_report)}); "
          f"{trainer.total_steps()} optimizer steps", file=sys.stderr)
    result = trainer.run(resume=args.resume, keep_state=args.keep_state, command=command)
    print(f"trained {args.out}: {result['steps']} optimizer steps in {result['seconds']} s; loss "
          f"{result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}; trainable {result['trainable']:,} of "
          f"{result['total']:,} parameters ({100 * result['trainable_fraction']:.2f}%)")
    if args.fit_report:
        fit = trainer.fit_report()
        update_config(args.out, "fit", fit)
        print("fit on the training items (mean answer loss): " + ", ".join(
            f"{k[len('mean_loss_'):]} {v}" for k, v in fit.items() if k.startswith("mean_loss_")))
    if args.eval_limit:  # the split was read before training: a wrong name fails at once
        scores = evaluate_mapper(args.out, kb, preset, dev, examples, config.n_demos, progress=not args.quiet)
        update_config(args.out, "dev", {"split": args.eval_split, "format": args.format, **scores})
        print(f"dev ({args.eval_split}, n={scores['n']}, KB {scores['kb_size']:,}): accuracy {scores['accuracy']:.4f}")
