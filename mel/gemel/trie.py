"""Prefix trie over the KB's entity names in the LLM's tokens: what GEMEL is allowed to write.

Each name becomes `encode_answer(name) + [EOS]`; a path from the root to a leaf is one name, so
constrained decoding can only produce KB names. Names that tokenise identically (the same name
on several entities, or names a lossy tokenizer cannot tell apart) share a leaf: a *group*,
whose entities are reported as ambiguous by the linker.

Storage: compressed-sparse-row arrays (children of node n are `child_tok/child_node[ptr[n]:ptr[n+1]]`,
sorted by token), so lookups are a slice and a binary search and the whole trie saves to one
safetensors file plus a JSON file of names (no pickle). The on-disk cache is keyed by a checksum of
the KB's names and a fingerprint of the tokenizer, so it is built once per KB and LLM;
candidate-restricted tries (a few dozen names) are built on the fly and never cached.
"""
from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import KBError
from ..paths import atomic_write, cache_dir, remove_dead_temps
from .prompt import encode_answer, eos_id

TRIE_FORMAT_VERSION = 1
TOKENIZE_BATCH = 2048


class TokenTrie:
    ROOT = 0

    def __init__(self, child_ptr: np.ndarray, child_tok: np.ndarray, child_node: np.ndarray,
                 leaf_group: np.ndarray, group_ptr: np.ndarray, group_entities: np.ndarray,
                 group_names: list[list[str]], group_tokens: list[list[int]] | None, eos: int, meta: dict | None = None):
        self.child_ptr, self.child_tok, self.child_node = child_ptr, child_tok, child_node
        self.leaf_group = leaf_group
        self.group_ptr, self.group_entities = group_ptr, group_entities
        self.group_names = group_names  # per group: the distinct KB names behind it (usually one)
        self._group_tokens = group_tokens
        self.eos = eos
        self.meta = meta or {}

    # -- queries -----------------------------------------------------------------------------
    @property
    def n_nodes(self) -> int:
        return len(self.child_ptr) - 1

    @property
    def n_groups(self) -> int:
        return len(self.group_names)

    def allowed(self, node: int) -> np.ndarray:
        """Token ids that may follow `node` (sorted)."""
        return self.child_tok[self.child_ptr[node]:self.child_ptr[node + 1]]

    def step(self, node: int, token: int) -> int:
        """The child of `node` through `token`, or -1 when the token leaves the trie."""
        lo, hi = self.child_ptr[node], self.child_ptr[node + 1]
        at = lo + int(np.searchsorted(self.child_tok[lo:hi], token))
        if at < hi and self.child_tok[at] == token:
            return int(self.child_node[at])
        return -1

    def walk(self, tokens: Iterable[int]) -> int:
        node = self.ROOT
        for token in tokens:
            node = self.step(node, int(token))
            if node < 0:
                return -1
        return node

    def group_at(self, node: int) -> int:
        """The name group ending at `node` (a leaf reached through EOS), else -1."""
        return int(self.leaf_group[node]) if node >= 0 else -1

    def entities(self, group: int) -> list[int]:
        return self.group_entities[self.group_ptr[group]:self.group_ptr[group + 1]].tolist()

    def name(self, group: int) -> str:
        return self.group_names[group][0]

    def group_tokens(self, group: int) -> list[int]:
        """The token sequence of a group (name tokens + EOS)."""
        if self._group_tokens is None:
            self._group_tokens = self._sequences_from_arrays()
        return self._group_tokens[group]

    def _sequences_from_arrays(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(self.n_groups)]
        stack = [(self.ROOT, [])]
        while stack:
            node, prefix = stack.pop()
            if self.leaf_group[node] >= 0:
                out[self.leaf_group[node]] = prefix
            for i in range(self.child_ptr[node], self.child_ptr[node + 1]):
                stack.append((int(self.child_node[i]), prefix + [int(self.child_tok[i])]))
        return out

    def contains(self, tokens: list[int]) -> bool:
        """True when `tokens` (ending with EOS) spell a name of the trie."""
        return self.group_at(self.walk(tokens)) >= 0

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def build(cls, names: Iterable[tuple[int, str]], tokenizer, meta: dict | None = None) -> "TokenTrie":
        """A trie over `(kb_idx, name)` pairs, tokenised with `tokenizer`."""
        eos = eos_id(tokenizer)
        pairs = [(int(idx), name) for idx, name in names if name and name.strip()]
        groups: dict[tuple[int, ...], int] = {}
        members: list[list[int]] = []
        group_names: list[list[str]] = []
        n_untokenisable = 0
        for start in range(0, len(pairs), TOKENIZE_BATCH):
            chunk = pairs[start:start + TOKENIZE_BATCH]
            encoded = tokenizer([name for _, name in chunk], add_special_tokens=False)["input_ids"]
            for (idx, name), ids in zip(chunk, encoded, strict=True):
                if not ids:
                    n_untokenisable += 1
                    continue
                seq = tuple(ids) + (eos,)
                g = groups.setdefault(seq, len(groups))
                if g == len(members):
                    members.append([])
                    group_names.append([])
                members[g].append(idx)
                if name not in group_names[g]:
                    group_names[g].append(name)
        if not groups:
            raise KBError("no entity name could be turned into tokens: the knowledge base has no usable names, so "
                          "GEMEL has nothing to generate; check the KB (`python -m mel kb info`)")
        # dict-of-dicts trie, then flattened breadth-first into CSR arrays
        children: list[dict[int, int]] = [{}]
        leaf: list[int] = [-1]
        sequences = list(groups)
        for seq, g in groups.items():
            node = 0
            for token in seq:
                nxt = children[node].get(token)
                if nxt is None:
                    nxt = len(children)
                    children[node][token] = nxt
                    children.append({})
                    leaf.append(-1)
                node = nxt
            leaf[node] = g
        ptr = np.zeros(len(children) + 1, np.int64)
        toks, kids = [], []
        for n, edges in enumerate(children):
            for token in sorted(edges):
                toks.append(token)
                kids.append(edges[token])
            ptr[n + 1] = len(toks)
        group_ptr = np.zeros(len(members) + 1, np.int64)
        group_ptr[1:] = np.cumsum([len(m) for m in members])
        info = dict(meta or {})
        info.update({"n_names": len(pairs), "n_groups": len(groups), "n_nodes": len(children),
                     "n_untokenisable": n_untokenisable,
                     "n_ambiguous_groups": sum(1 for m in members if len(m) > 1)})
        return cls(ptr, np.asarray(toks, np.int64), np.asarray(kids, np.int64), np.asarray(leaf, np.int64),
                   group_ptr, np.asarray([i for m in members for i in m], np.int64), group_names,
                   [list(s) for s in sequences], eos, info)

    # -- persistence -------------------------------------------------------------------------
    def save(self, stem: str | Path) -> None:
        """`stem.safetensors` (arrays) + `stem.json` (names, meta); each written atomically, and both
        carry one save id, so that `load` refuses a pair from two different saves."""
        from safetensors.numpy import save_file
        stem = Path(stem)
        arrays = {"child_ptr": self.child_ptr, "child_tok": self.child_tok, "child_node": self.child_node,
                  "leaf_group": self.leaf_group, "group_ptr": self.group_ptr, "group_entities": self.group_entities}
        save_id = uuid.uuid4().hex
        names = {"version": TRIE_FORMAT_VERSION, "eos": self.eos, "meta": self.meta, "group_names": self.group_names,
                 "save_id": save_id}
        remove_dead_temps(stem.parent, [f"{stem.name}.json", f"{stem.name}.safetensors"])  # killed writers' files
        with atomic_write(f"{stem}.json") as tmp:
            tmp.write_text(json.dumps(names, ensure_ascii=False))
        with atomic_write(f"{stem}.safetensors") as tmp:  # last: its presence marks a complete cache
            save_file(arrays, str(tmp), metadata={"save_id": save_id})

    @classmethod
    def load(cls, stem: str | Path) -> "TokenTrie":
        from safetensors import safe_open
        from safetensors.numpy import load_file
        stem = Path(stem)
        info = json.loads(Path(f"{stem}.json").read_text())
        if info.get("version") != TRIE_FORMAT_VERSION:
            raise KBError(f"{stem}.json is a trie of format {info.get('version')}, expected {TRIE_FORMAT_VERSION}")
        with safe_open(f"{stem}.safetensors", framework="numpy") as f:
            if (f.metadata() or {}).get("save_id") != info.get("save_id"):
                raise KBError(f"{stem}.json and {stem}.safetensors are from two different saves; delete them "
                              f"and the trie is rebuilt")
        a = load_file(f"{stem}.safetensors")
        return cls(a["child_ptr"], a["child_tok"], a["child_node"], a["leaf_group"], a["group_ptr"],
                   a["group_entities"], info["group_names"], None, int(info["eos"]), info.get("meta"))


# -- cache keys ----------------------------------------------------------------------------------
def names_checksum(names: list[tuple[int, str]]) -> str:
    h = hashlib.sha256()
    for idx, name in names:
        h.update(f"{idx}\t{name}\n".encode("utf-8"))
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Content hash of a tokenizer (vocabulary, merges, normaliser), independent of where it is stored."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode("utf-8"))
    else:
        for token, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            h.update(f"{token}\t{i}\n".encode("utf-8"))
    probe = "Zoë Saldaña (born 1978), São Paulo; 東京 — Falcon 9"
    h.update(json.dumps([encode_answer(tokenizer, probe), tokenizer.eos_token_id]).encode())
    return h.hexdigest()


def kb_trie(kb, tokenizer, *, use_cache: bool = True, directory: Path | None = None) -> TokenTrie:
    """The full-KB trie for `tokenizer`, from the disk cache when it exists, else built and cached."""
    if kb.size == 0:
        raise KBError(f"knowledge base {kb.path} is empty: GEMEL needs entity names to generate; build the KB "
                      f"from a dataset with `python -m mel kb build`")
    names = kb.names()
    key = hashlib.sha256(f"{TRIE_FORMAT_VERSION}|{names_checksum(names)}|{tokenizer_fingerprint(tokenizer)}"
                         .encode()).hexdigest()[:24]
    stem = (directory or cache_dir("gemel", "tries")) / f"trie-{key}"
    if use_cache and Path(f"{stem}.safetensors").exists() and Path(f"{stem}.json").exists():
        try:
            trie = TokenTrie.load(stem)
            trie.meta.update({"from_cache": True, "cache_file": f"{stem}.safetensors"})
            return trie
        except Exception:  # a damaged cache file is rebuilt, never trusted
            pass
    trie = TokenTrie.build(names, tokenizer, meta={"kb": kb.path.name, "cache_key": key,
                                                   "tokenizer": getattr(tokenizer, "name_or_path", "")})
    if use_cache:
        trie.save(stem)
    trie.meta.update({"from_cache": False, "cache_file": f"{stem}.safetensors" if use_cache else None})
    return trie
